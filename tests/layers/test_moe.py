"""Mixture of experts (docs/architecture.md#moe): router, selection, combine weights, clamped
SwiGLU experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4.layers import moe
from tests.tolerances import F32_FUNCTION, F32_GMM_REL, rel_err

LIMIT = 10.0


def _np_softplus(x):
  return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def _np_scores(x, gate):
  return np.sqrt(_np_softplus(np.asarray(x, np.float64) @ np.asarray(gate, np.float64).T))


def _np_silu(x):
  return x / (1 + np.exp(-x))


def _np_expert(x, w1, w2, w3, limit):
  """Clamped SwiGLU: gate <= limit (upper only), up in [-limit, limit]."""
  g = np.minimum(x @ w1.T, limit)
  v = np.clip(x @ w3.T, -limit, limit)
  return (_np_silu(g) * v) @ w2.T


def _np_routed(x, idx, w, w1, w2, w3, limit):
  x, w, w1, w2, w3 = (np.asarray(a, np.float64) for a in (x, w, w1, w2, w3))
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = idx[t, k]
      out[t] += w[t, k] * _np_expert(x[t], w1[e], w2[e], w3[e], limit)
  return out


def test_router_scores_sqrt_softplus():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 16)).astype(np.float32) * 4  # logits up to ~ +-30 (softplus tails)
  gate = rng.normal(size=(5, 16)).astype(np.float32)
  s = moe.router_scores(jnp.asarray(x), jnp.asarray(gate))
  assert s.dtype == jnp.float32 and s.shape == (7, 5)
  np.testing.assert_allclose(np.asarray(s), _np_scores(x, gate), rtol=F32_FUNCTION,
                             atol=F32_FUNCTION)
  # bf16 inputs still give float32 scores.
  assert moe.router_scores(jnp.asarray(x, jnp.bfloat16), jnp.asarray(gate)).dtype == jnp.float32


def test_learned_selection_uses_bias_weights_do_not():
  scores = np.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.3, 0.4]], np.float32)
  bias = np.array([0.0, -1.0, 0.0, 1.0], np.float32)
  idx = np.asarray(moe.route_topk(jnp.asarray(scores), jnp.asarray(bias), 2))
  # scores + bias = [[0.9, -0.2, 0.1, 1.2], [0.1, -0.8, 0.3, 1.4]]
  np.testing.assert_array_equal(idx, [[3, 0], [3, 2]])
  w = np.asarray(moe.combine_weights(jnp.asarray(scores), jnp.asarray(idx), 1.5, True))
  expect = np.array([[0.2, 0.9], [0.4, 0.3]])  # unbiased scores of the picks
  expect = expect / expect.sum(axis=1, keepdims=True) * 1.5
  np.testing.assert_allclose(w, expect, rtol=F32_FUNCTION)


def test_combine_weights_sum_to_route_scale():
  rng = np.random.default_rng(1)
  scores = rng.uniform(0.01, 3, size=(11, 8)).astype(np.float32)
  idx = np.asarray(moe.route_topk(jnp.asarray(scores), jnp.zeros(8), 3))
  for scale in (1.5, 2.5):
    w = np.asarray(moe.combine_weights(jnp.asarray(scores), jnp.asarray(idx), scale, True))
    np.testing.assert_allclose(w.sum(axis=1), scale, rtol=F32_FUNCTION)
  raw = np.asarray(moe.combine_weights(jnp.asarray(scores), jnp.asarray(idx), 1.0, False))
  np.testing.assert_allclose(raw, np.take_along_axis(scores, idx, 1), rtol=F32_FUNCTION)


def test_swiglu_clamps():
  g = np.array([-20.0, -1.0, 0.5, 9.0, 10.0, 30.0], np.float32)
  v = np.array([-30.0, -5.0, 0.2, 11.0, 10.0, -12.0], np.float32)
  out = np.asarray(moe.swiglu(jnp.asarray(g), jnp.asarray(v), LIMIT))
  ref = _np_silu(np.minimum(g, 10.0).astype(np.float64)) * np.clip(v, -10, 10)
  np.testing.assert_allclose(out, ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)
  assert out[0] != 0  # the gate has no lower clamp: silu(-20) * (-10) is tiny but not clamped


def _expert_weights(seed, E=5, F=6, D=8, big=False):
  rng = np.random.default_rng(seed)
  s = 3.0 if big else 0.3  # "big" drives gate/up activations beyond the clamp
  w1 = (s * rng.normal(size=(E, F, D))).astype(np.float32)
  w3 = (s * rng.normal(size=(E, F, D))).astype(np.float32)
  w2 = (0.3 * rng.normal(size=(E, D, F))).astype(np.float32)
  return w1, w2, w3


@pytest.mark.parametrize("big", [False, True], ids=["in_range", "beyond_clamp"])
def test_routed_experts_match_numpy_loop(big):
  rng = np.random.default_rng(2)
  T, D, E, X = 9, 8, 5, 2
  x = (rng.normal(size=(T, D)) * (2.0 if big else 1.0)).astype(np.float32)
  idx = np.stack([rng.permutation(E)[:X] for _ in range(T)]).astype(np.int32)
  w = rng.uniform(0.1, 1.0, size=(T, X)).astype(np.float32)
  w1, w2, w3 = _expert_weights(3, big=big)
  if big:  # the test is only meaningful if the clamp is active somewhere
    pre = np.einsum("td,efd->tef", x, w1)
    assert pre.max() > LIMIT and np.abs(np.einsum("td,efd->tef", x, w3)).max() > LIMIT
  out = jax.jit(moe.routed_experts, static_argnames="limit")(
    jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), jnp.asarray(w1), jnp.asarray(w2),
    jnp.asarray(w3), limit=LIMIT)
  assert out.shape == (T, D) and out.dtype == jnp.float32
  ref = _np_routed(x, idx, w, w1, w2, w3, LIMIT)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_routed_experts_with_idle_experts():
  # Experts 0, 2 and 4 get no token at all; expert 3 gets every token.
  rng = np.random.default_rng(4)
  x = rng.normal(size=(6, 8)).astype(np.float32)
  idx = np.array([[3, 1]] * 3 + [[1, 3]] * 3, np.int32)
  w = rng.uniform(0.1, 1.0, size=(6, 2)).astype(np.float32)
  w1, w2, w3 = _expert_weights(5)
  out = moe.routed_experts(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), jnp.asarray(w1),
                           jnp.asarray(w2), jnp.asarray(w3), LIMIT)
  np.testing.assert_allclose(np.asarray(out), _np_routed(x, idx, w, w1, w2, w3, LIMIT),
                             rtol=F32_FUNCTION, atol=F32_FUNCTION)


# ----- the MoE module -----------------------------------------------------------------------------
def _cfg():
  return deepseek_v4.tiny(d_model=16, moe_inter_dim=8, num_experts=6, experts_per_token=2,
                          vocab_size=32, route_scale=1.5)


def _np_moe(x, ids, mod, cfg):
  """docs/architecture.md#moe: scores, selection (hash table or top-k of scores + bias), weights,
  experts."""
  x = np.asarray(x, np.float64)
  s = _np_scores(x, mod.gate.weight[...])
  if mod.gate.hashed:
    idx = np.asarray(mod.gate.tid2eid[...])[ids]
  else:
    biased = s + np.asarray(mod.gate.bias[...], np.float64)
    idx = np.stack([sorted(range(s.shape[1]), key=lambda e: (-row[e], e))[: cfg.experts_per_token]
                    for row in biased])
  w = np.take_along_axis(s, idx, 1)
  w = w / w.sum(1, keepdims=True) * cfg.route_scale
  e = mod.experts
  y = _np_routed(x, idx, w, e.w1[...], e.w2[...], e.w3[...], cfg.swiglu_limit)
  sh = mod.shared_experts
  y += _np_expert(x, *(np.asarray(v.weight[...], np.float64) for v in (sh.w1, sh.w2, sh.w3)),
                  cfg.swiglu_limit)
  return y, idx


@pytest.mark.parametrize("hashed", [True, False], ids=["hash", "learned"])
def test_moe_module_matches_numpy(hashed):
  cfg = _cfg()
  mod = moe.MoE(cfg.replace(init_std=0.3), hashed, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(6)
  if hashed:  # a known table: token v -> experts (v mod 6, (v + 1) mod 6)
    table = np.stack([np.arange(32) % 6, (np.arange(32) + 1) % 6], axis=1).astype(np.int32)
    mod.gate.tid2eid[...] = jnp.asarray(table)
  else:
    mod.gate.bias[...] = jnp.asarray(rng.normal(size=(6,)).astype(np.float32))
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  ids = rng.integers(0, 32, size=(2, 5)).astype(np.int32)
  y, stats = nnx.jit(lambda m, a, b: m(a, b))(mod, jnp.asarray(x), jnp.asarray(ids))
  ref, ref_idx = _np_moe(x.reshape(10, 16), ids.reshape(-1), mod, cfg)
  assert y.shape == (2, 5, 16) and y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(stats["experts"]).reshape(10, 2), ref_idx)
  np.testing.assert_allclose(np.asarray(y).reshape(10, 16), ref, rtol=F32_FUNCTION,
                             atol=F32_FUNCTION)
  if hashed:
    np.testing.assert_array_equal(np.asarray(stats["experts"]),
                                  np.stack([ids % 6, (ids + 1) % 6], axis=-1))


def test_hash_routing_ignores_scores_and_bias():
  cfg = _cfg()
  mod = moe.MoE(cfg, True, rngs=nnx.Rngs(1))
  table = np.tile(np.array([[4, 0]], np.int32), (32, 1))
  table[7] = [2, 5]
  mod.gate.tid2eid[...] = jnp.asarray(table)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(3, 16)).astype(np.float32))
  scores, idx, w = mod.route(x, jnp.array([7, 0, 7]))
  np.testing.assert_array_equal(np.asarray(idx), [[2, 5], [4, 0], [2, 5]])
  s = np.asarray(scores)
  expect = np.take_along_axis(s, np.asarray(idx), 1)
  np.testing.assert_allclose(np.asarray(w), expect / expect.sum(1, keepdims=True) * 1.5,
                             rtol=F32_FUNCTION)
  assert not hasattr(mod.gate, "bias")


def test_default_hash_table_rows_are_distinct():
  t = np.asarray(moe.default_hash_table(jax.random.key(0), 50, 8, 3))
  assert t.shape == (50, 3) and t.dtype == np.int32
  assert all(len(set(row)) == 3 for row in t) and t.min() >= 0 and t.max() < 8


# ----- implementations ----------------------------------------------------------------------------
@pytest.mark.parametrize("gmm", ["tiled", "ragged_dot", "reference"])
@pytest.mark.parametrize("hashed", [True, False], ids=["hash", "learned"])
def test_every_grouped_matmul_gives_the_same_moe(hashed, gmm):
  """MoEImpl(gmm=...) switches the grouped matmul; outputs and gradients agree with ragged_dot."""
  cfg = _cfg()
  mod = moe.MoE(cfg.replace(init_std=0.3), hashed, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 7, 16)).astype(np.float32))
  ids = jnp.asarray(rng.integers(0, 32, size=(2, 7)).astype(np.int32))

  def loss(m, x, impl):
    y, _ = m(x, ids, impl)
    return jnp.sum(jnp.sin(y)), y

  def run(impl):
    grad = nnx.grad(loss, argnums=(0, 1), has_aux=True)
    return nnx.jit(grad, static_argnames="impl")(mod, x, impl=impl)

  ((g_mod, g_x), y) = run(moe.MoEImpl(gmm=gmm))
  ((r_mod, r_x), ref) = run(moe.MoEImpl(gmm="ragged_dot"))
  assert rel_err(y, ref) < F32_GMM_REL
  assert rel_err(g_x, r_x) < F32_FUNCTION
  for name in ("w1", "w2", "w3"):
    a, b = getattr(g_mod.experts, name)[...], getattr(r_mod.experts, name)[...]
    assert rel_err(a, b) < F32_FUNCTION, name


def test_moe_impl_is_hashable_and_defaults_to_auto_local():
  impl = moe.MoEImpl()
  assert impl.gmm == "auto" and impl.expert_parallel is None
  assert hash(impl) == hash(moe.MoEImpl()) and impl == moe.MoEImpl()


def test_dispatch_has_no_expert_sized_intermediate():
  """Dispatch and combine are O(tokens * k): no [T*k, E] (one-hot) array in the program."""
  T, D, E, X = 64, 8, 48, 2
  x = jnp.zeros((T, D))
  idx = jnp.zeros((T, X), jnp.int32)
  w = jnp.ones((T, X))
  w1, w2, w3 = jnp.zeros((E, 4, D)), jnp.zeros((E, D, 4)), jnp.zeros((E, 4, D))
  jaxpr = jax.make_jaxpr(lambda *a: moe.routed_experts(*a, LIMIT, gmm="ragged_dot"))(
    x, idx, w, w1, w2, w3)
  shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
  assert not any(len(s) == 2 and s[0] in (T, T * X) and s[1] == E for s in shapes), shapes
