"""Expert-parallel MoE (layers/moe_ep.py) against the local grouped-matmul MoE on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_v4 import sharding
from deepseek_v4.layers import moe, moe_ep
from tests.tolerances import F32_SHARDED_REL, rel_err

E, K, D, F, LIMIT = 8, 2, 16, 12, 10.0


def _inputs(n_tokens: int, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (n_tokens, D), jnp.float32)
  scores = jax.random.uniform(ks[1], (n_tokens, E), jnp.float32)
  # skew the routing so one expert is popular: exercises uneven all-to-all loads
  scores = scores.at[:, 3].add(0.5)
  idx = jax.lax.top_k(scores, K)[1]
  w = moe.combine_weights(scores, idx, 1.5, True)
  w1 = 0.3 * jax.random.normal(ks[2], (E, F, D))
  w3 = 0.3 * jax.random.normal(ks[3], (E, F, D))
  w2 = 0.3 * jax.random.normal(ks[4], (E, D, F))
  return x, idx, w, w1, w2, w3


def _ep(mesh_kw, capacity_factor=None):
  mesh = sharding.make_mesh(**mesh_kw)
  with sharding.use(mesh, "fsdp_ep", capacity_factor=capacity_factor):
    ep = sharding.expert_parallel()
  assert ep is not None
  return ep


MESHES = {
  "expert8": dict(expert=8),
  "fsdp2_expert4": dict(fsdp=2, expert=4),
  "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
}


@pytest.mark.parametrize("mesh_kw", MESHES.values(), ids=MESHES.keys())
def test_dropless_equals_local(mesh_kw):
  x, idx, w, w1, w2, w3 = _inputs(32)
  ref = moe.routed_experts(x, idx, w, w1, w2, w3, LIMIT)
  ep = _ep(mesh_kw)
  got = jax.jit(lambda *a: moe_ep.routed_experts_ep(*a, LIMIT, ep))(x, idx, w, w1, w2, w3)
  err = rel_err(got, ref)
  print(f"moe ep {mesh_kw}: rel err {err:.2e}")
  assert err < F32_SHARDED_REL


def test_token_count_not_divisible_is_padded():
  x, idx, w, w1, w2, w3 = _inputs(5)  # 5 tokens over 8 token shards
  ref = moe.routed_experts(x, idx, w, w1, w2, w3, LIMIT)
  ep = _ep(dict(expert=8))
  got = jax.jit(lambda *a: moe_ep.routed_experts_ep(*a, LIMIT, ep))(x, idx, w, w1, w2, w3)
  assert got.shape == (5, D)
  assert rel_err(got, ref) < F32_SHARDED_REL


def test_gradients_equal_local():
  x, idx, w, w1, w2, w3 = _inputs(16, seed=1)
  ep = _ep(dict(fsdp=2, expert=4))

  def loss(fn, x, w, w1, w2, w3):
    return jnp.sum(jnp.sin(fn(x, idx, w, w1, w2, w3)))

  local = lambda *a: moe.routed_experts(*a, LIMIT)  # noqa: E731
  dist = lambda *a: moe_ep.routed_experts_ep(*a, LIMIT, ep)  # noqa: E731
  args = (x, w, w1, w2, w3)
  g_ref = jax.grad(lambda *a: loss(local, *a), argnums=tuple(range(5)))(*args)
  g_ep = jax.jit(jax.grad(lambda *a: loss(dist, *a), argnums=tuple(range(5))))(*args)
  for name, a, b in zip(("x", "w", "w1", "w2", "w3"), g_ep, g_ref):
    assert rel_err(a, b) < F32_SHARDED_REL, name


def _kept_pairs(idx: np.ndarray, token_shards: int, expert_shards: int, cap: int) -> np.ndarray:
  """NumPy statement of the dropped-token policy: per (source shard, destination) the first
  `cap` pairs in token-major, top-k order are kept."""
  N, X = idx.shape
  local_experts = E // expert_shards
  keep = np.zeros((N, X), bool)
  per_shard = N // token_shards
  for s in range(token_shards):
    used = np.zeros(expert_shards, int)
    for t in range(s * per_shard, (s + 1) * per_shard):
      for k in range(X):
        d = idx[t, k] // local_experts
        keep[t, k] = used[d] < cap
        used[d] += 1
  return keep


def test_capacity_drops_follow_the_stated_policy():
  x, idx, w, w1, w2, w3 = _inputs(64, seed=2)
  ep = _ep(dict(expert=8), capacity_factor=1.0)
  per_shard = 64 // ep.token_shards
  cap = moe_ep.capacity(per_shard, K, E // ep.expert_shards, ep.expert_shards, 1.0)
  assert cap == 2  # ceil(1.0 * 8 tokens * 2 / 8 shards): the popular expert overflows
  keep = _kept_pairs(np.asarray(idx), ep.token_shards, ep.expert_shards, cap)
  assert 0 < (~keep).sum() < keep.size  # the test really drops something
  # A dropped pair contributes exactly zero: the local MoE with its weight zeroed.
  ref = moe.routed_experts(x, idx, w * jnp.asarray(keep), w1, w2, w3, LIMIT)
  got = jax.jit(lambda *a: moe_ep.routed_experts_ep(*a, LIMIT, ep))(x, idx, w, w1, w2, w3)
  assert rel_err(got, ref) < F32_SHARDED_REL


def test_capacity_formula():
  assert moe_ep.capacity(10, 6, 32, 8, None) == 60  # dropless: every pair could go to one device
  assert moe_ep.capacity(10, 6, 2, 8, None) == 20  # a token reaches at most E_l experts there
  assert moe_ep.capacity(10, 6, 32, 8, 1.25) == 10  # ceil(1.25 * 60 / 8)
  assert moe_ep.capacity(10, 6, 32, 8, 100.0) == 60  # never above dropless


def test_experts_must_divide_the_expert_axis():
  x, idx, w, w1, w2, w3 = _inputs(8)
  ep = _ep(dict(fsdp=2, expert=4))
  with pytest.raises(ValueError, match=r"num_experts=6 .* size 4"):
    moe_ep.routed_experts_ep(x, idx, w, w1[:6], w2[:6], w3[:6], LIMIT, ep)
