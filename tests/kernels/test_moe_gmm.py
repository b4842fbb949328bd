"""Grouped matmul (kernels_pallas/moe_gmm): the tiled CPU path equals `jax.lax.ragged_dot` and the
reference, forward and gradients, for every group-size pattern."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import common
from kernels_pallas.moe_gmm import ops, reference, tiled
from tests.tolerances import BF16, F32_FUNCTION, F32_GMM_REL, rel_err

M, K, N = 37, 12, 10

# Group sizes over E = 5 groups, M = 37 rows, tile 8 unless a case says otherwise.
PATTERNS = {
  "uneven": [3, 0, 17, 9, 8],
  "one_group_holds_all": [0, 0, 37, 0, 0],
  "multiples_of_tile": [8, 16, 0, 8, 5],
  "single_rows": [1, 1, 1, 1, 33],
  "rows_past_the_groups": [5, 0, 2, 0, 0],  # rows 7.. belong to no group: output 0
  "all_empty": [0, 0, 0, 0, 0],
}


def _inputs(sizes, seed=0, transpose_rhs=False, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(M, K)), dtype)
  shape = (len(sizes), N, K) if transpose_rhs else (len(sizes), K, N)
  w = jnp.asarray(rng.normal(size=shape) / np.sqrt(K), dtype)
  return x, w, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("tile", [8, 5, 64], ids=lambda t: f"tile{t}")
@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["EKN", "ENK"])
@pytest.mark.parametrize("sizes", PATTERNS.values(), ids=PATTERNS.keys())
def test_tiled_equals_ragged_dot(sizes, transpose_rhs, tile):
  x, w, gs = _inputs(sizes, transpose_rhs=transpose_rhs)
  run = lambda impl: jax.jit(lambda x, w, g: ops.grouped_matmul(  # noqa: E731
    x, w, g, transpose_rhs=transpose_rhs, impl=impl, tile=tile))(x, w, gs)
  ours, ragged = run("tiled"), run("ragged_dot")
  ref = reference.gmm(x, w, gs, transpose_rhs=transpose_rhs)
  assert ours.shape == (M, N) and ours.dtype == jnp.float32
  if sum(sizes) == 0:
    assert not np.any(np.asarray(ours)) and not np.any(np.asarray(ragged))
    return
  assert rel_err(ours, ragged) < F32_GMM_REL
  assert rel_err(ours, ref) < F32_GMM_REL
  assert not np.any(np.asarray(ours)[sum(sizes):])  # rows past the groups are 0


@pytest.mark.parametrize("transpose_rhs", [False, True], ids=["EKN", "ENK"])
@pytest.mark.parametrize("sizes", PATTERNS.values(), ids=PATTERNS.keys())
def test_gradients_equal_ragged_dot(sizes, transpose_rhs):
  x, w, gs = _inputs(sizes, seed=1, transpose_rhs=transpose_rhs)
  probe = jnp.asarray(np.random.default_rng(2).normal(size=(M, N)), jnp.float32)

  def grads(impl):
    loss = lambda x, w: jnp.sum(probe * jnp.sin(ops.grouped_matmul(  # noqa: E731
      x, w, gs, transpose_rhs=transpose_rhs, impl=impl, tile=8)))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

  (dx, dw), (rx, rw) = grads("tiled"), grads("ragged_dot")
  assert dx.shape == x.shape and dw.shape == w.shape
  if sum(sizes) == 0:
    assert not np.any(np.asarray(dx)) and not np.any(np.asarray(dw))
    return
  assert rel_err(dx, rx) < F32_GMM_REL
  assert rel_err(dw, rw) < F32_GMM_REL


def test_tgmm_is_the_weight_gradient():
  x, _, gs = _inputs(PATTERNS["uneven"], seed=3)
  dy = jnp.asarray(np.random.default_rng(4).normal(size=(M, N)), jnp.float32)
  ref = reference.tgmm(x, dy, gs)
  np64 = np.zeros((5, K, N))
  start = 0
  for e, s in enumerate(PATTERNS["uneven"]):  # NumPy loop over each group's rows
    np64[e] = np.asarray(x, np.float64)[start:start + s].T @ np.asarray(dy, np.float64)[
      start:start + s]
    start += s
  assert rel_err(ref, np64) < F32_FUNCTION
  assert rel_err(tiled.tgmm(x, dy, gs, 8), np64) < F32_FUNCTION


def test_tile_count_bound_holds():
  """sum_e ceil(size_e / tile) <= num_tiles(M, E, tile) for random and extreme partitions."""
  rng = np.random.default_rng(5)
  for _ in range(300):
    E, tile = int(rng.integers(1, 40)), int(rng.integers(1, 70))
    m = int(rng.integers(0, 500))
    cuts = np.sort(rng.integers(0, m + 1, size=E - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [m]]))
    if rng.random() < 0.3:  # every group of size tile * j + 1: the most padding
      sizes = np.minimum(sizes, 1) + tile * (sizes // (tile + 1))
    used = int(np.sum(-(-sizes // tile)))
    assert used <= tiled.num_tiles(max(m, int(sizes.sum())), E, tile)


def test_bf16_matches_float32():
  x, w, gs = _inputs(PATTERNS["uneven"], seed=6)
  ours = ops.grouped_matmul(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), gs, impl="tiled")
  assert ours.dtype == jnp.bfloat16
  assert rel_err(ours, ops.grouped_matmul(x, w, gs, impl="ragged_dot")) < BF16


def test_auto_runs_tiled_on_cpu_and_says_so(caplog):
  assert jax.default_backend() == "cpu"
  common.forget_logged()
  with caplog.at_level(logging.INFO, logger="kernels_pallas"):
    assert ops.resolve_impl("auto") == "tiled"
    ops.resolve_impl("auto")
  assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
    (logging.INFO, "moe_gmm: impl='auto' runs tiled on cpu")]
  assert ops.resolve_impl("ragged_dot") == "ragged_dot"


def test_bad_inputs_name_the_shapes():
  x, w, gs = _inputs(PATTERNS["uneven"])
  with pytest.raises(ValueError, match=r"x has K=12 but w \(5, 10, 12\)"):
    ops.grouped_matmul(x, jnp.swapaxes(w, 1, 2), gs)
  with pytest.raises(ValueError, match=r"group_sizes must be integer \[E=5\]"):
    ops.grouped_matmul(x, w, gs[:4])
  with pytest.raises(ValueError, match="impl must be one of"):
    ops.grouped_matmul(x, w, gs, impl="pallas")


@pytest.mark.parametrize("sizes", PATTERNS.values(), ids=PATTERNS.keys())
def test_fused_tiled_ffn_equals_ragged_dot_ffn(sizes):
  """The one-loop tiled SwiGLU FFN equals three ragged_dot matmuls, forward and gradients, with
  the clamp active (large weights). A composition of three matmuls whose weight gradients sum
  tile by tile (ragged_dot: one dot over all of a group's rows): the pure-function tolerance."""
  rng = np.random.default_rng(7)
  E, F, D = len(sizes), 6, K
  x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  w1, w3 = (jnp.asarray(2.0 * rng.normal(size=(E, F, D)), jnp.float32) for _ in range(2))
  w2 = jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(F), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  probe = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)

  def run(impl):
    f = lambda x, w1, w2, w3: ops.grouped_swiglu_ffn(  # noqa: E731
      x, w1, w2, w3, gs, limit=3.0, impl=impl, tile=8)
    y = jax.jit(f)(x, w1, w2, w3)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a)) * probe), argnums=(0, 1, 2, 3)))(
      x, w1, w2, w3)
    return y, g

  (y, g), (ry, rg) = run("tiled"), run("ragged_dot")
  np.testing.assert_array_equal(np.asarray(run("reference")[0]).shape, (M, D))
  if sum(sizes) == 0:
    assert not np.any(np.asarray(y)) and not any(np.any(np.asarray(a)) for a in g)
    return
  pre = np.asarray(x[: sum(sizes)]) @ np.asarray(w1).reshape(-1, D).T
  assert np.abs(pre).max() > 3.0  # the clamp matters somewhere
  assert rel_err(y, ry) < F32_FUNCTION
  for name, a, b in zip(("x", "w1", "w2", "w3"), g, rg):
    assert rel_err(a, b) < F32_FUNCTION, name


@pytest.mark.parametrize("sizes", [PATTERNS["uneven"], PATTERNS["single_rows"],
                                   PATTERNS["rows_past_the_groups"]],
                         ids=["uneven", "single_rows", "rows_past_the_groups"])
def test_ffn_backward_is_the_same_for_any_unroll(sizes):
  """The fused FFN backward runs `BWD_UNROLL` tiles per loop iteration; the tiles, their products
  and the order of the weight-gradient sums are the same for any unroll, so the cotangents are
  bit-identical, including when the tiles in use are not a multiple of the unroll (the extra
  tiles are zero rows)."""
  rng = np.random.default_rng(11)
  E, F, D = len(sizes), 6, K
  x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  w1, w3 = (jnp.asarray(rng.normal(size=(E, F, D)), jnp.float32) for _ in range(2))
  w2 = jnp.asarray(rng.normal(size=(E, D, F)) / np.sqrt(F), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
  res = (x, w1, w2, w3, jnp.asarray(sizes, jnp.int32))
  tiles_used = int(np.sum(-(-np.asarray(sizes) // 8)))
  assert tiles_used % tiled.BWD_UNROLL  # the padding tiles are exercised
  runs = {u: jax.jit(lambda dy, u=u: tiled._ffn_bwd(8, 3.0, res, dy, unroll=u))(dy)
          for u in (1, 3, tiled.BWD_UNROLL)}
  for u, out in runs.items():
    for name, a, b in zip(("x", "w1", "w2", "w3"), out[:4], runs[1][:4]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"unroll {u}: {name}")
