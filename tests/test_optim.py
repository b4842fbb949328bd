"""DeepSeek's Muon (docs/architecture.md#optimizer): Newton-Schulz, the update vs an independent
NumPy version and vs optax.contrib.muon, the parameter groups, and convergence on a quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import layout
from deepseek_v4 import optim
from deepseek_v4.layers.params import HashTable, RouterBias
from tests.tolerances import F32_FUNCTION, rel_err


def _with_spectrum(rng, shape, s):
  u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
  v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
  k = min(shape)
  return u[:, :k] @ np.diag(s) @ v[:k, :]


@pytest.mark.parametrize("shape", [(64, 32), (32, 256), (48, 48)], ids=["tall", "wide", "square"])
def test_newton_schulz_singular_values_near_one(shape):
  rng = np.random.default_rng(0)
  for x in (rng.standard_normal(shape), _with_spectrum(rng, shape, np.logspace(-3, 0, min(shape)))):
    out = np.asarray(optim.newton_schulz(jnp.asarray(x, jnp.float32)))
    sv = np.linalg.svd(out, compute_uv=False)
    assert np.all(np.abs(sv - 1.0) < 1e-3), (sv.min(), sv.max())
    # Same singular vectors as the input: O = U V^T of the SVD of X.
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    assert rel_err(out, u @ vt) < 2e-3


def test_newton_schulz_hybrid_tail_tightens_the_spectrum():
  """The 8 quintic steps alone leave singular values spread around 1; the 2 (2,-1.5,0.5) steps
  pin them (why DeepSeek adds them)."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((32, 64)), jnp.float32)
  quintic = np.linalg.svd(np.asarray(optim.newton_schulz(x, optim.HYBRID_NS_COEFFS[:8])),
                          compute_uv=False)
  hybrid = np.linalg.svd(np.asarray(optim.newton_schulz(x)), compute_uv=False)
  assert np.ptp(quintic) > 0.1
  assert np.ptp(hybrid) < 1e-3


@pytest.mark.parametrize("shape", [(12, 16, 48), (3, 4, 40, 24)], ids=["wide", "tall"])
def test_newton_schulz_chunks_do_not_change_the_result(shape):
  """Running a stack a few matrices per loop step (CPU's default) is the same per-matrix math as
  one batched call, and each matrix equals Newton-Schulz on it alone."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
  count = int(np.prod(shape[:-2]))
  whole = np.asarray(optim.newton_schulz(x, chunk=count))
  for chunk in (1, 2, 3, None):
    got = np.asarray(optim.newton_schulz(x, chunk=chunk))
    assert got.shape == x.shape
    assert rel_err(got, whole) < F32_FUNCTION, chunk
  flat = x.reshape(-1, *shape[-2:])
  alone = np.stack([np.asarray(optim.newton_schulz(m)) for m in flat]).reshape(shape)
  assert rel_err(whole, alone) < F32_FUNCTION
  assert optim.ns_chunk(count, *shape[-2:]) in (count, 12)  # all fit in the CPU cache budget
  with pytest.raises(ValueError, match="chunk=5 must be a positive divisor of the 12"):
    optim.newton_schulz(x, chunk=5)


def test_ns_chunk_fits_the_cpu_budget_and_divides_the_count():
  if jax.default_backend() != "cpu":
    assert optim.ns_chunk(768, 128, 256) == 768
    return
  assert optim.ns_chunk(768, 128, 256) == 8  # 8 x 128 KiB = 1 MiB
  assert optim.ns_chunk(7, 512, 1024) == 1  # one 2 MiB matrix is over budget: one at a time
  assert optim.ns_chunk(12, 128, 256) == 6  # the largest divisor of 12 that fits (<= 8)
  assert optim.ns_chunk(1, 4, 4) == 1
  assert optim.ns_chunk(0, 4, 4) == 1  # an empty stack
  assert optim.newton_schulz(jnp.zeros((0, 4, 8))).shape == (0, 4, 8)


# ----- an independent NumPy (float64) implementation (docs/architecture.md#optimizer) ------------
def _np_ns(x):
  tall = x.shape[0] > x.shape[1]
  m = x.T if tall else x
  m = m / np.linalg.norm(m)
  for k in range(10):
    a, b, c = (3.4445, -4.7750, 2.0315) if k < 8 else (2.0, -1.5, 0.5)
    g = m @ m.T
    m = a * m + b * g @ m + c * g @ g @ m
  return m.T if tall else m


def _np_matrices(name, w):
  """Independent logical matrices of a parameter as (row slices per leading index)."""
  if name == "experts":  # [E, F, D]: each expert separately
    return [(e, slice(None)) for e in range(w.shape[0])]
  if name == "hc_fn":  # [(2+M)M, MD] with M=2: rows 0:2, 2:4, 4:8
    return [(None, slice(0, 2)), (None, slice(2, 4)), (None, slice(4, 8))]
  if name == "wo_a":  # 3 groups of 4 rows
    return [(None, slice(4 * g, 4 * g + 4)) for g in range(3)]
  return [(None, slice(None))]


def _np_muon_run(params, grads_seq, lr, mu, wd, gamma):
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  mom = {k: np.zeros_like(v) for k, v in params.items()}
  for grads in grads_seq:
    for k, w in params.items():
      g = grads[k].astype(np.float64)
      mom[k] = mu * mom[k] + g
      x = mu * mom[k] + g
      o = np.zeros_like(w)
      for lead, rows in _np_matrices(k, w):
        xm = x[lead][rows] if lead is not None else x[rows]
        n, m = xm.shape
        om = _np_ns(xm) * np.sqrt(max(n, m)) * gamma
        if lead is not None:
          o[lead][rows] = om
        else:
          o[rows] = om
      params[k] = w * (1 - lr * wd) - lr * o
  return params


def test_muon_matches_independent_numpy():
  rng = np.random.default_rng(0)
  shapes = {"dense": (24, 40), "tall": (40, 12), "experts": (3, 8, 16), "hc_fn": (8, 32),
            "wo_a": (12, 20)}
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads_seq = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
               for _ in range(4)]
  blocks = {"hc_fn": optim.MatrixBlocks((2, 2, 4)), "wo_a": optim.MatrixBlocks((4, 4, 4))}
  tx = optim.deepseek_muon(0.02, lambda name, shape: blocks.get(name, optim.MatrixBlocks()),
                           momentum=0.95, rms_scale=0.18, weight_decay=0.1)
  p = {k: jnp.asarray(v) for k, v in params.items()}
  state = tx.init(p)
  update = jax.jit(tx.update)
  ref = _np_muon_run(params, grads_seq, lr=0.02, mu=0.95, wd=0.1, gamma=0.18)
  for g in grads_seq:
    u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, u)
  for k in shapes:
    # Compare the accumulated updates (params minus their decayed start), not the params.
    delta = np.asarray(p[k], np.float64) - params[k]
    ref_delta = ref[k] - params[k]
    assert rel_err(delta, ref_delta) < F32_FUNCTION, k


def test_update_rms_is_gamma():
  """An orthogonal n x m update has RMS 1/sqrt(max(n, m)); rescaled, it is gamma = 0.18."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 32, 96)), jnp.float32)
  o = optim.orthogonalize(x, rms_scale=0.18)
  rms = np.sqrt(np.mean(np.square(np.asarray(o)), axis=(1, 2)))
  # Rank-32 orthogonal 32x96 matrix: ||O||_F^2 = 32, RMS = sqrt(32 / (32*96)) = 1/sqrt(96).
  np.testing.assert_allclose(rms, 0.18, rtol=1e-3)


@pytest.mark.parametrize("nesterov,steps", [(False, 4), (True, 1)], ids=["plain", "nesterov-1"])
def test_plain_2d_case_matches_optax_contrib_muon(nesterov, steps):
  """Where the recipes coincide: without Nesterov optax's EMA momentum with bias correction is a
  positive multiple of DeepSeek's plain sum, and the Frobenius normalization removes the factor;
  with Nesterov they agree at step 1 (later, optax's bias-correction weights differ)."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((24, 40)), jnp.float32),
            "v": jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)}
  ours = optim.deepseek_muon(0.01, momentum=0.95, nesterov=nesterov, rms_scale=0.18,
                             weight_decay=0.1)
  theirs = optax.contrib.muon(0.01, ns_coeffs=optim.HYBRID_NS_COEFFS, ns_steps=10, beta=0.95,
                              eps=1e-7, weight_decay=0.1, nesterov=nesterov,
                              consistent_rms=0.18)
  s1, s2 = ours.init(params), theirs.init(params)
  p1 = p2 = params
  for _ in range(steps):
    g = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = theirs.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for k in params:
      assert rel_err(u1[k], u2[k]) < F32_FUNCTION, k


def test_nesterov_differs_from_optax_after_step_one():
  """Documents the one real difference: optax's bias-corrected EMA Nesterov vs DeepSeek's."""
  rng = np.random.default_rng(4)
  params = {"w": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}
  ours = optim.deepseek_muon(0.01, weight_decay=0.0)
  theirs = optax.contrib.muon(0.01, ns_coeffs=optim.HYBRID_NS_COEFFS, ns_steps=10, eps=1e-7,
                              consistent_rms=0.18)
  s1, s2 = ours.init(params), theirs.init(params)
  diffs = []
  for _ in range(3):
    g = {"w": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)}
    u1, s1 = ours.update(g, s1, params)
    u2, s2 = theirs.update(g, s2, params)
    diffs.append(rel_err(u1["w"], u2["w"]))
  assert diffs[0] < 1e-4 and diffs[1] > 1e-3


# ----- parameter groups (docs/architecture.md#optimizer) ------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
  return nnx.eval_shape(lambda: deepseek_v4.Transformer(deepseek_v4.tiny(), rngs=nnx.Rngs(0)))


def test_parameter_groups_are_the_spec_lists(tiny_model):
  cfg = tiny_model.cfg
  rows = {r["name"]: r for r in optim.describe(tiny_model)}
  adamw = {n for n, r in rows.items() if r["optimizer"] == "adamw"}
  expected = {"embed.weight", "head.weight", "norm.weight", "hc_head_base", "hc_head_scale"}
  for i, ratio in enumerate(cfg.compress_ratios):
    pre = f"layers.{i}."
    expected |= {pre + "attn_norm.weight", pre + "ffn_norm.weight", pre + "attn.q_norm.weight",
                 pre + "attn.kv_norm.weight", pre + "attn.attn_sink"}
    expected |= {pre + f"hc_{s}_{k}" for s in ("attn", "ffn") for k in ("base", "scale")}
    if ratio:
      expected |= {pre + "attn.compressor.ape", pre + "attn.compressor.norm.weight"}
    if ratio == 4:
      expected |= {pre + "attn.indexer.compressor.ape", pre + "attn.indexer.compressor.norm.weight"}
  pre = "mtp.0."
  expected |= {pre + n for n in ("attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight",
                                 "attn.kv_norm.weight", "attn.attn_sink", "enorm.weight",
                                 "hnorm.weight", "norm.weight", "hc_head_base", "hc_head_scale")}
  expected |= {pre + f"hc_{s}_{k}" for s in ("attn", "ffn") for k in ("base", "scale")}
  assert adamw == expected
  muon = {n for n, r in rows.items() if r["optimizer"] == "muon"}
  assert all(len(rows[n]["shape"]) >= 2 for n in muon)
  assert {"layers.0.hc_attn_fn", "hc_head_fn", "layers.3.ffn.gate.weight", "mtp.0.e_proj.weight",
          "layers.2.attn.indexer.weights_proj.weight", "layers.5.ffn.experts.w2"} <= muon
  # Non-gradient state never reaches the optimizer.
  state = nnx.state(tiny_model, nnx.Param)
  names = set(rows)
  for path, var in nnx.to_flat_state(nnx.state(tiny_model)):
    if isinstance(var, (RouterBias, HashTable)):
      assert ".".join(map(str, path)) not in names
  official = [n for path, _ in nnx.to_flat_state(state)
              for n, _ in layout.official_names(cfg, ".".join(map(str, path)))]
  assert len(names) == len(official)


def test_logical_blocks(tiny_model):
  cfg = tiny_model.cfg
  M, G, dg = cfg.hc_mult, cfg.o_groups, cfg.o_lora_rank
  rows = {r["name"]: r["blocks"] for r in optim.describe(tiny_model)}
  D = cfg.d_model
  assert rows["layers.0.hc_attn_fn"] == [(1, (M, M * D)), (1, (M, M * D)), (1, (M * M, M * D))]
  assert rows["hc_head_fn"] == [(1, (M, M * D))]
  assert rows["layers.1.attn.wo_a.weight"] == [(1, (dg, cfg.num_heads * cfg.head_dim // G))] * G
  E, F = cfg.num_experts, cfg.moe_inter_dim
  assert rows["layers.3.ffn.experts.w1"] == [(E, (F, D))]
  assert rows["layers.3.ffn.experts.w2"] == [(E, (D, F))]
  H, J = cfg.head_dim, cfg.index_head_dim
  assert rows["layers.2.attn.compressor.wkv.weight"] == [(1, (H, D))] * 2  # CSA: two series
  assert rows["layers.3.attn.compressor.wkv.weight"] == [(1, (H, D))]  # HCA: one
  assert rows["layers.2.attn.indexer.compressor.wgate.weight"] == [(1, (J, D))] * 2


def test_muon_converges_on_a_quadratic():
  rng = np.random.default_rng(5)
  target = jnp.asarray(rng.standard_normal((3, 16, 32)), jnp.float32)
  w = {"experts": jnp.zeros((3, 16, 32), jnp.float32)}
  tx = optim.deepseek_muon(optax.cosine_decay_schedule(0.5, 200), weight_decay=0.0)
  state = tx.init(w)
  loss = lambda w: jnp.mean(jnp.square(w["experts"] - target))

  @jax.jit
  def step(w, state):
    g = jax.grad(loss)(w)
    u, state = tx.update(g, state, w)
    return optax.apply_updates(w, u), state

  start = float(loss(w))
  for _ in range(200):
    w, state = step(w, state)
  assert float(loss(w)) < 1e-2 * start


def test_keeps_dtype_and_rejects_vectors():
  tx = optim.scale_by_deepseek_muon()
  p = {"w": jnp.ones((8, 4), jnp.bfloat16)}
  u, _ = tx.update(p, tx.init(p), p)
  assert u["w"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="label it adamw"):
    v = {"b": jnp.ones((4,))}
    tx.update(v, tx.init(v), v)
  with pytest.raises(ValueError, match="matches no AdamW rule"):
    optim.param_group("layers.0.mystery", 1)


def test_state_keeps_parameter_sharding_on_8_devices():
  from jax.sharding import NamedSharding, PartitionSpec as P

  if len(jax.devices()) < 8:
    pytest.skip("needs the 8 simulated CPU devices of conftest.py")
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  shardings = {"w": NamedSharding(mesh, P("fsdp", None)),
               "experts": NamedSharding(mesh, P("fsdp", None, None))}
  rng = np.random.default_rng(6)
  params = {"w": rng.standard_normal((16, 24)), "experts": rng.standard_normal((8, 4, 12))}
  params = {k: jax.device_put(jnp.asarray(v, jnp.float32), shardings[k]) for k, v in
            params.items()}
  tx = optim.deepseek_muon(0.01)
  state = jax.jit(tx.init)(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  for k, sh in shardings.items():
    assert state[0].momentum[k].sharding.is_equivalent_to(sh, params[k].ndim), k
    assert updates[k].shape == params[k].shape
  # Same numbers as unsharded.
  plain = {k: jnp.asarray(np.asarray(v)) for k, v in params.items()}
  ref, _ = tx.update(plain, tx.init(plain), plain)
  for k in params:
    assert rel_err(updates[k], ref[k]) < F32_FUNCTION
