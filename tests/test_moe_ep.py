"""Expert-parallel MoE (layers/moe_ep.py) against the local grouped-matmul MoE on 8 CPU devices.

The "buffer" path runs here; the "ragged" path's collective (`jax.lax.ragged_all_to_all`) has no
XLA:CPU implementation, so its values are checked with a CPU emulation of the collective (same
semantics, built from all_gather) and the real collective is checked to lower for CUDA."""

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


def _ep(mesh_kw, capacity_factor=None, all_to_all=None):
  mesh = sharding.make_mesh(**mesh_kw)
  ep = moe_ep.expert_parallel_layout(mesh, "fsdp_ep", capacity_factor, all_to_all)
  assert ep is not None
  return ep


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """`jax.lax.ragged_all_to_all` as its docstring states it, from all_gather (runs on CPU)."""
  me = jax.lax.axis_index(axis_name)
  ops = jax.lax.all_gather(operand, axis_name)  # [P, n, ...]
  src = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # what each source sends me
  size = jax.lax.all_gather(send_sizes, axis_name)[:, me]
  dst = jax.lax.all_gather(output_offsets, axis_name)[:, me]
  rows = jnp.arange(output.shape[0])
  out = output
  for s in range(ops.shape[0]):
    inside = (rows >= dst[s]) & (rows < dst[s] + size[s])
    take = ops[s][jnp.clip(src[s] + rows - dst[s], 0, operand.shape[0] - 1)]
    out = jnp.where(inside.reshape(-1, *([1] * (out.ndim - 1))), take, out)
  return out


@pytest.fixture
def emulated(monkeypatch):
  monkeypatch.setattr(moe_ep, "ragged_all_to_all", emulated_ragged_all_to_all)


MESHES = {
  "expert8": dict(expert=8),
  "fsdp2_expert4": dict(fsdp=2, expert=4),
  "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2),
}


@pytest.mark.parametrize("path", ["buffer", "ragged"])
@pytest.mark.parametrize("mesh_kw", MESHES.values(), ids=MESHES.keys())
def test_dropless_equals_local(mesh_kw, path, emulated):
  x, idx, w, w1, w2, w3 = _inputs(32)
  ref = moe.routed_experts(x, idx, w, w1, w2, w3, LIMIT)
  ep = _ep(mesh_kw, all_to_all=path)
  got = jax.jit(lambda *a: moe_ep.routed_experts_ep(*a, LIMIT, ep))(x, idx, w, w1, w2, w3)
  err = rel_err(got, ref)
  print(f"moe ep {path} {mesh_kw}: rel err {err:.2e}")
  assert err < F32_SHARDED_REL


def test_token_count_not_divisible_is_padded():
  x, idx, w, w1, w2, w3 = _inputs(5)  # 5 tokens over 8 token shards
  ref = moe.routed_experts(x, idx, w, w1, w2, w3, LIMIT)
  ep = _ep(dict(expert=8))
  got = jax.jit(lambda *a: moe_ep.routed_experts_ep(*a, LIMIT, ep))(x, idx, w, w1, w2, w3)
  assert got.shape == (5, D)
  assert rel_err(got, ref) < F32_SHARDED_REL


@pytest.mark.parametrize("path", ["buffer", "ragged"])
def test_gradients_equal_local(path, emulated):
  x, idx, w, w1, w2, w3 = _inputs(16, seed=1)
  ep = _ep(dict(fsdp=2, expert=4), all_to_all=path)

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
  ep = _ep(dict(expert=8), capacity_factor=1.0, all_to_all="buffer")
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


def _kept_pairs_ragged(idx: np.ndarray, token_shards: int, expert_shards: int, rows: int
                       ) -> np.ndarray:
  """NumPy statement of the ragged path's policy: each destination keeps `rows` pairs, filled in
  source order, each source's pairs in (expert, token) order."""
  N, X = idx.shape
  El = E // expert_shards
  per_shard = N // token_shards
  keep = np.zeros((N, X), bool)
  for dest in range(expert_shards):
    used = 0
    for s in range(token_shards):
      # mesh expert=8: every token shard is a source of every destination
      pairs = [(idx[t, k], t, k) for t in range(s * per_shard, (s + 1) * per_shard)
               for k in range(X) if idx[t, k] // El == dest]
      for _, t, k in sorted(pairs):
        keep[t, k] = used < rows
        used += 1
  return keep


def test_ragged_capacity_drops_follow_the_stated_policy(emulated):
  x, idx, w, w1, w2, w3 = _inputs(64, seed=2)
  ep = _ep(dict(expert=8), capacity_factor=1.0, all_to_all="ragged")
  rows = moe_ep.ragged_rows(64 // ep.token_shards, K, E // 8, 8, 1.0)
  assert rows == 16  # ceil(1.0 * 8 tokens * 2): the device of the popular expert overflows
  keep = _kept_pairs_ragged(np.asarray(idx), ep.token_shards, ep.expert_shards, rows)
  assert 0 < (~keep).sum() < keep.size
  ref = moe.routed_experts(x, idx, w * jnp.asarray(keep), w1, w2, w3, LIMIT)
  got = jax.jit(lambda *a: moe_ep.routed_experts_ep(*a, LIMIT, ep))(x, idx, w, w1, w2, w3)
  assert rel_err(got, ref) < F32_SHARDED_REL


def test_layout_comes_from_the_rules():
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  assert moe_ep.expert_parallel_layout(mesh, "fsdp") is None  # experts kept whole
  ep = moe_ep.expert_parallel_layout(mesh, "fsdp_ep")
  assert ep.token_axes == ("data", "fsdp", "expert") and ep.expert_axis == "expert"
  assert (ep.token_shards, ep.expert_shards) == (8, 4)
  assert ep.all_to_all == "buffer"  # CPU devices: XLA:CPU has no ragged-all-to-all
  assert ep.capacity_factor is None
  assert moe_ep.expert_parallel_layout(mesh, "fsdp_ep", all_to_all="ragged").all_to_all == "ragged"
  assert moe_ep.default_all_to_all("gpu") == moe_ep.default_all_to_all("tpu") == "ragged"
  hash(moe.MoEImpl(expert_parallel=ep))  # a static jit argument
  with pytest.raises(ValueError, match="all_to_all='nccl'"):
    moe_ep.expert_parallel_layout(mesh, "fsdp_ep", all_to_all="nccl")
  with pytest.raises(ValueError, match="capacity_factor=0"):
    moe_ep.expert_parallel_layout(mesh, "fsdp_ep", capacity_factor=0)


def test_moe_module_takes_the_layout_explicitly():
  import deepseek_v4
  from flax import nnx

  cfg = deepseek_v4.tiny(d_model=16, moe_inter_dim=8, num_experts=8, experts_per_token=2,
                         vocab_size=32)
  mod = moe.MoE(cfg.replace(init_std=0.3), False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 8, 16))
  ids = jnp.zeros((2, 8), jnp.int32)
  ref, ref_stats = mod(x, ids)
  ep = _ep(dict(fsdp=2, expert=4))
  got, stats = nnx.jit(lambda m, a, b: m(a, b, moe.MoEImpl(expert_parallel=ep)))(mod, x, ids)
  assert rel_err(got, ref) < F32_SHARDED_REL
  np.testing.assert_array_equal(np.asarray(stats["experts"]), np.asarray(ref_stats["experts"]))


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_ragged_path_lowers_for_cuda(grad):
  """The real collective, compiled for GPU from this CPU machine: lowering succeeds and the
  module holds the ragged all-to-alls (forward: rows, expert ids and the return trip; backward
  adds the transposes of the two float ones)."""
  x, idx, w, w1, w2, w3 = _inputs(32)
  ep = _ep(dict(fsdp=2, expert=4), all_to_all="ragged")

  def f(x, w, w1, w2, w3):
    return jnp.sum(moe_ep.routed_experts_ep(x, idx, w, w1, w2, w3, LIMIT, ep, gmm="ragged_dot"))

  fn = jax.grad(f, argnums=(0, 1, 2, 3, 4)) if grad else f
  with jax.set_mesh(ep.mesh):
    text = jax.jit(fn).trace(x, w, w1, w2, w3).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("ragged_all_to_all") == (5 if grad else 3)


def test_moe_and_moe_ep_do_not_import_each_other_in_a_cycle():
  import ast
  import inspect

  tree = ast.parse(inspect.getsource(moe_ep))
  imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              for a in n.names} | {n.module for n in ast.walk(tree)
                                   if isinstance(n, ast.ImportFrom)}
  assert "moe" not in imported and "deepseek_v4.layers.moe" not in imported
