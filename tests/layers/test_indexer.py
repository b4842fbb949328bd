"""Lightning indexer scores and top-k (docs/architecture.md#indexer,
kernels_pallas/indexer_topk/reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.indexer_topk import reference as ref_lib
from tests.tolerances import F32_FUNCTION


def _np_scores(q, w, k):
  """I[b, t, s] = sum_h w[b, t, h] * ReLU(q[b, t, h] . k[b, s]), with explicit loops over h."""
  q, w, k = (np.asarray(a, np.float64) for a in (q, w, k))
  B, T, I, J = q.shape
  out = np.zeros((B, T, k.shape[1]))
  for h in range(I):
    out += w[:, :, h, None] * np.maximum(np.einsum("btj,bsj->bts", q[:, :, h], k), 0.0)
  return out


def _np_topk(scores, positions, m, topk):
  """Per query: visible s < floor((t+1)/m), the highest scores (ties lowest index first),
  k = min(topk, C) picks in ascending index order, slots without a visible pick -> -1."""
  B, T, C = scores.shape
  P = min(topk, C)
  out = np.full((B, T, P), -1, np.int64)
  for b in range(B):
    for t in range(T):
      nvis = (positions[b, t] + 1) // m
      cand = sorted(range(min(nvis, C)), key=lambda s: (-scores[b, t, s], s))
      out[b, t, : min(P, len(cand))] = sorted(cand[:P])
  return out


def _inputs(seed, B=2, T=37, C=9, I=4, J=8):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, I, J)).astype(np.float32)
  w = rng.normal(size=(B, T, I)).astype(np.float32)  # negative weights are allowed
  k = rng.normal(size=(B, C, J)).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
  return q, w, k, pos


def test_scores_match_numpy():
  q, w, k, _ = _inputs(0)
  s = ref_lib.indexer_scores(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k))
  assert s.shape == (2, 37, 9) and s.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(s), _np_scores(q, w, k), rtol=F32_FUNCTION,
                             atol=F32_FUNCTION)


def test_scores_relu_per_head():
  # A head whose q.k is negative contributes nothing, whatever its weight.
  q = np.array([[[[1.0, 0.0], [-1.0, 0.0]]]], np.float32)  # [1, 1, 2, 2]
  k = np.array([[[2.0, 0.0]]], np.float32)
  w = np.array([[[0.5, 100.0]]], np.float32)
  s = ref_lib.indexer_scores(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k))
  np.testing.assert_allclose(np.asarray(s), [[[1.0]]], rtol=F32_FUNCTION)


@pytest.mark.parametrize("topk", [3, 9, 20], ids=["k<C", "k=C", "k>C"])
def test_topk_matches_numpy(topk):
  q, w, k, pos = _inputs(1)
  m = 4
  idx = ref_lib.indexer_topk(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k), jnp.asarray(pos),
                             ratio=m, topk=topk, block=8)
  assert idx.dtype == jnp.int32 and idx.shape == (2, 37, min(topk, 9))
  ref = _np_topk(_np_scores(q, w, k), pos, m, topk)
  np.testing.assert_array_equal(np.asarray(idx), ref)


def test_visibility_bound():
  # s is visible iff s < floor((t + 1) / 4): t = 0..2 none, t = 3 entry 0, t = 7 entries 0, 1.
  q, w, k, pos = _inputs(2, B=1, T=12, C=3)
  w = np.abs(w) + 1.0
  q = np.abs(q)
  k = np.abs(k)  # every score positive
  idx = np.asarray(ref_lib.indexer_topk(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k),
                                        jnp.asarray(pos), ratio=4, topk=3, block=5))[0]
  for t in range(12):
    valid = sorted(s for s in idx[t] if s >= 0)
    assert valid == list(range((t + 1) // 4)), (t, idx[t])
    assert list(idx[t][len(valid):]) == [-1] * (3 - len(valid))  # invalid picks trail as -1


def test_ties_lowest_index_first():
  # All scores equal (q = 0): picks are the lowest visible indices, in order.
  B, T, C, I, J = 1, 20, 5, 2, 4
  q = np.zeros((B, T, I, J), np.float32)
  w = np.ones((B, T, I), np.float32)
  k = np.random.default_rng(3).normal(size=(B, C, J)).astype(np.float32)
  pos = np.arange(T)[None].astype(np.int32)
  idx = np.asarray(ref_lib.indexer_topk(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k),
                                        jnp.asarray(pos), ratio=4, topk=3, block=7))[0]
  for t in range(T):
    nvis = (t + 1) // 4
    expect = list(range(min(nvis, 3))) + [-1] * (3 - min(nvis, 3))
    assert list(idx[t]) == expect, (t, idx[t])


def test_block_size_does_not_change_results():
  q, w, k, pos = _inputs(4, T=37)
  args = (jnp.asarray(q), jnp.asarray(w), jnp.asarray(k), jnp.asarray(pos))
  fn = jax.jit(ref_lib.indexer_topk, static_argnames=("ratio", "topk", "block"))
  outs = [np.asarray(fn(*args, ratio=4, topk=4, block=b)) for b in (1, 3, 16)]
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])
  np.testing.assert_array_equal(outs[0], _np_topk(_np_scores(q, w, k), pos, 4, 4))


def test_offset_positions_and_no_entries():
  # Decode-like call: queries at positions 40.., all 9 entries visible; C = 0 gives [B, T, 0].
  q, w, k, _ = _inputs(5, T=3)
  pos = np.broadcast_to(40 + np.arange(3), (2, 3)).astype(np.int32)
  idx = ref_lib.indexer_topk(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k), jnp.asarray(pos),
                             ratio=4, topk=4, block=2)
  np.testing.assert_array_equal(np.asarray(idx), _np_topk(_np_scores(q, w, k), pos, 4, 4))
  assert (np.asarray(idx) >= 0).all()
  empty = ref_lib.indexer_topk(jnp.asarray(q), jnp.asarray(w), jnp.zeros((2, 0, 8)),
                               jnp.asarray(pos), ratio=4, topk=4, block=2)
  assert empty.shape == (2, 3, 0)


def _tie_heavy_scores(seed, R=64, C=300):
  """Rows with repeated values, both zeros (-0.0 ranks below +0.0 in XLA's total order, as in
  `top_k`), -inf tails and fully -inf rows."""
  rng = np.random.default_rng(seed)
  s = np.round(rng.normal(size=(R, C)) * 2) / 2
  s[rng.random((R, C)) < 0.1] = -0.0
  s[rng.random((R, C)) < 0.1] = 0.0
  cut = rng.integers(0, C + 1, size=R)
  s[np.arange(C)[None, :] >= cut[:, None]] = -np.inf
  s[0] = -np.inf
  s[1, :] = 7.0  # one value everywhere: the lowest indices
  return jnp.asarray(s, jnp.float32)


@pytest.mark.parametrize("P", [1, 5, 64, 300])
def test_top_indices_bisect_equals_top_k(P):
  """The CPU bisection and `jax.lax.top_k` pick the same entries, in the same (ascending) order,
  -inf never, for tie-heavy rows; and the picks are exactly NumPy's stable ranking."""
  s = _tie_heavy_scores(P)
  a = np.asarray(jax.jit(lambda x: ref_lib.top_indices(x, P, "bisect"))(s))
  b = np.asarray(jax.jit(lambda x: ref_lib.top_indices(x, P, "top_k"))(s))
  np.testing.assert_array_equal(a, b)
  sn = np.asarray(s)
  for r in range(sn.shape[0]):
    # XLA's total order: -0.0 below +0.0; stable: lower index first among equals
    rank = sorted(range(sn.shape[1]), key=lambda c: (-sn[r, c], np.signbit(sn[r, c]), c))
    pick = sorted(c for c in rank[:P] if sn[r, c] > -np.inf)
    np.testing.assert_array_equal(a[r], pick + [-1] * (P - len(pick)), err_msg=f"row {r}")
  assert (a[0] == -1).all() and list(a[1]) == list(range(P))


def test_top_indices_rejects_bad_arguments():
  with pytest.raises(ValueError, match="P=4 must be in"):
    ref_lib.top_indices(jnp.zeros((2, 3)), 4)
  with pytest.raises(ValueError, match="method='heap'"):
    ref_lib.top_indices(jnp.zeros((2, 3)), 2, "heap")
