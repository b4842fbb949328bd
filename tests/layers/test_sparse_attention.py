"""Core attention (docs/architecture.md#sliding-window, #causality, #core-attention) vs a dense
NumPy attention with an explicit mask."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.sparse_attention.reference import sparse_attention
from tests.attention_keys import keys
from tests.tolerances import F32_FUNCTION

SCALE = 0.37


def _np_attention(q, q_pos, kv, sink, window, prefix_kv=None, prefix_pos=None, comp=None,
                  comp_idx=None, comp_ratio=0):
  """Dense attention, one (b, t) at a time: keys = window band of the new tokens, prefix keys
  (positions < 0 are empty), compressed keys (HCA rule, or the CSA indices); the sink enlarges
  only the denominator and is not scaled."""
  q, kv, sink = (np.asarray(a, np.float64) for a in (q, kv, sink))
  B, T, N, H = q.shape
  out = np.zeros((B, T, N, H))
  for b in range(B):
    for t in range(T):
      p = q_pos[b, t]
      keys = [kv[b, j] for j in range(T) if p - window < q_pos[b, j] <= p]
      if prefix_kv is not None:
        keys += [np.asarray(prefix_kv[b, j], np.float64) for j in range(prefix_kv.shape[1])
                 if prefix_pos[b, j] >= 0 and p - window < prefix_pos[b, j] <= p]
      if comp is not None:
        if comp_idx is None:
          keys += [np.asarray(comp[b, s], np.float64) for s in range(comp.shape[1])
                   if s < (p + 1) // comp_ratio]
        else:
          keys += [np.asarray(comp[b, s], np.float64) for s in comp_idx[b, t] if s >= 0]
      for h in range(N):
        if not keys:
          continue
        K = np.stack(keys)  # [n_keys, H]
        z = K @ q[b, t, h] * SCALE
        zmax = max(z.max(), sink[h])
        e = np.exp(z - zmax)
        a = e / (e.sum() + np.exp(sink[h] - zmax))
        out[b, t, h] = a @ K
  return out


def _inputs(seed, B=2, T=37, N=3, H=8, C=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, N, H)).astype(np.float32)
  kv = rng.normal(size=(B, T, H)).astype(np.float32)
  sink = rng.normal(size=(N,)).astype(np.float32)
  pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
  comp = rng.normal(size=(B, C, H)).astype(np.float32) if C else None
  return q, pos, kv, sink, comp


@functools.partial(jax.jit, static_argnames=("window", "block", "comp_ratio"))
def _ours(q, q_pos, kv, sink, window, block, prefix_kv=None, prefix_pos=None, comp=None,
          comp_idx=None, comp_ratio=0):
  k = keys(kv, window, prefix_kv=prefix_kv, prefix_pos=prefix_pos, comp=comp, comp_idx=comp_idx,
           comp_ratio=comp_ratio)
  return sparse_attention(q, q_pos, sink, k, scale=SCALE, block=block)


def _csa_indices(seed, B, T, C, P, m):
  """Random distinct visible picks per query, padded with -1 (like the indexer's output)."""
  rng = np.random.default_rng(seed)
  idx = np.full((B, T, P), -1, np.int32)
  for b in range(B):
    for t in range(T):
      nvis = min((t + 1) // m, C)
      pick = rng.permutation(nvis)[: rng.integers(0, P + 1)]
      idx[b, t, : len(pick)] = pick
  return idx


BLOCKS = [1, 5, 16, 64]


@pytest.mark.parametrize("block", BLOCKS)
def test_sliding_matches_dense(block):
  q, pos, kv, sink, _ = _inputs(0)
  out = _ours(q, pos, kv, sink, window=6, block=block)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _np_attention(q, pos, kv, sink, 6),
                             rtol=F32_FUNCTION, atol=F32_FUNCTION)


@pytest.mark.parametrize("block", BLOCKS)
def test_hca_matches_dense(block):
  m = 4
  q, pos, kv, sink, comp = _inputs(1, C=37 // m)
  out = _ours(q, pos, kv, sink, window=6, block=block, comp=comp, comp_ratio=m)
  ref = _np_attention(q, pos, kv, sink, 6, comp=comp, comp_ratio=m)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


@pytest.mark.parametrize("block", BLOCKS)
def test_csa_matches_dense(block):
  m, C, P = 4, 9, 4
  q, pos, kv, sink, comp = _inputs(2, C=C)
  idx = _csa_indices(3, 2, 37, C, P, m)
  out = _ours(q, pos, kv, sink, window=6, block=block, comp=comp, comp_idx=idx, comp_ratio=m)
  ref = _np_attention(q, pos, kv, sink, 6, comp=comp, comp_idx=idx, comp_ratio=m)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_window_larger_than_sequence():
  q, pos, kv, sink, _ = _inputs(4, T=10)
  out = _ours(q, pos, kv, sink, window=128, block=4)
  np.testing.assert_allclose(np.asarray(out), _np_attention(q, pos, kv, sink, 128),
                             rtol=F32_FUNCTION, atol=F32_FUNCTION)


@pytest.mark.parametrize("with_comp", [False, True], ids=["sliding", "hca"])
def test_prefix_equals_concatenated_sequence(with_comp):
  # Full sequence of 20 tokens vs: the last 7 as new queries, the older 13 as a shuffled ring
  # of prefix slots with some empty (-1) slots.
  S, T, W, m = 13, 7, 6, 4
  q, pos, kv, sink, comp = _inputs(5, T=S + T, C=(S + T) // m if with_comp else 0)
  cargs = dict(comp=comp, comp_ratio=m) if with_comp else {}
  full = np.asarray(_ours(q, pos, kv, sink, window=W, block=5, **cargs))
  rng = np.random.default_rng(6)
  order = rng.permutation(S)
  pre_kv = np.concatenate([kv[:, order], np.full((2, 3, 8), 9.0, np.float32)], axis=1)
  pre_pos = np.concatenate([pos[:, order], np.full((2, 3), -1, np.int32)], axis=1)
  out = _ours(q[:, S:], pos[:, S:], kv[:, S:], sink, window=W, block=5, prefix_kv=pre_kv,
              prefix_pos=pre_pos, **cargs)
  np.testing.assert_allclose(np.asarray(out), full[:, S:], rtol=F32_FUNCTION, atol=F32_FUNCTION)
  ref = _np_attention(q[:, S:], pos[:, S:], kv[:, S:], sink, W, prefix_kv=pre_kv,
                      prefix_pos=pre_pos, **cargs)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_single_decode_query_with_prefix():
  # T = 1 at position 9 with a ring holding positions 4..8 (W = 6: keys 4..9).
  rng = np.random.default_rng(7)
  q = rng.normal(size=(1, 1, 2, 8)).astype(np.float32)
  kv = rng.normal(size=(1, 1, 8)).astype(np.float32)
  ring = rng.normal(size=(1, 6, 8)).astype(np.float32)
  ring_pos = np.array([[6, 7, 8, 3, 4, 5]], np.int32)  # slot = pos mod 6; position 3 is too old
  sink = np.zeros(2, np.float32)
  out = _ours(q, np.array([[9]], np.int32), kv, sink, window=6, block=16, prefix_kv=ring,
              prefix_pos=ring_pos)
  ref = _np_attention(q, np.array([[9]]), kv, sink, 6, prefix_kv=ring, prefix_pos=ring_pos)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


# ----- explicit masks -----------------------------------------------------------------------------
WINDOW_MASK_T6_W3 = np.array([
  [1, 0, 0, 0, 0, 0],
  [1, 1, 0, 0, 0, 0],
  [1, 1, 1, 0, 0, 0],
  [0, 1, 1, 1, 0, 0],
  [0, 0, 1, 1, 1, 0],
  [0, 0, 0, 1, 1, 1],
])

HCA_MASK_T6_M2 = np.array([  # entry s visible iff s < floor((t + 1) / 2)
  [0, 0, 0],
  [1, 0, 0],
  [1, 0, 0],
  [1, 1, 0],
  [1, 1, 0],
  [1, 1, 1],
])


def _observed_mask(base_out, perturbed_outs):
  return np.stack([np.any(np.abs(o - base_out) > 0, axis=(0, 2, 3)) for o in perturbed_outs],
                  axis=1).astype(int)


@pytest.mark.parametrize("block", [1, 4, 6])
def test_window_mask_is_the_literal_band(block):
  q, pos, kv, sink, _ = _inputs(8, B=1, T=6, N=2, H=4)
  base = np.asarray(_ours(q, pos, kv, sink, window=3, block=block))
  outs = []
  for j in range(6):  # perturb key/value j only
    kv2 = kv.copy()
    kv2[:, j] += 1.0
    outs.append(np.asarray(_ours(q, pos, kv2, sink, window=3, block=block)))
  np.testing.assert_array_equal(_observed_mask(base, outs), WINDOW_MASK_T6_W3)


def test_hca_mask_is_the_literal_rule():
  q, pos, kv, sink, comp = _inputs(9, B=1, T=6, N=2, H=4, C=3)
  base = np.asarray(_ours(q, pos, kv, sink, window=3, block=4, comp=comp, comp_ratio=2))
  outs = []
  for s in range(3):
    c2 = comp.copy()
    c2[:, s] += 1.0
    outs.append(np.asarray(_ours(q, pos, kv, sink, window=3, block=4, comp=c2, comp_ratio=2)))
  np.testing.assert_array_equal(_observed_mask(base, outs), HCA_MASK_T6_M2)


def test_csa_mask_follows_indices():
  q, pos, kv, sink, comp = _inputs(10, B=1, T=6, N=2, H=4, C=3)
  idx = np.array([[[-1, -1], [2, -1], [-1, -1], [0, 2], [1, -1], [1, 0]]], np.int32)
  expect = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 0]])
  base = np.asarray(_ours(q, pos, kv, sink, window=3, block=4, comp=comp, comp_idx=idx,
                          comp_ratio=2))
  outs = []
  for s in range(3):
    c2 = comp.copy()
    c2[:, s] += 1.0
    outs.append(np.asarray(_ours(q, pos, kv, sink, window=3, block=4, comp=c2, comp_idx=idx,
                                 comp_ratio=2)))
  np.testing.assert_array_equal(_observed_mask(base, outs), expect)


# ----- the sink -----------------------------------------------------------------------------------
def test_sink_only_in_denominator_and_unscaled():
  # Query 0 sees only key 0: out = e^z / (e^z + e^sink) * k0 with z = SCALE * q.k0.
  q = np.array([[[[1.0, 2.0, 0.0, -1.0]]]], np.float32)
  kv = np.array([[[0.5, 1.0, -2.0, 0.3]]], np.float32)
  sink = np.array([0.8], np.float32)
  out = np.asarray(_ours(q, np.array([[0]], np.int32), kv, sink, window=4, block=1))
  z = SCALE * float(q[0, 0, 0] @ kv[0, 0])
  a = np.exp(z) / (np.exp(z) + np.exp(0.8))
  np.testing.assert_allclose(out[0, 0, 0], a * kv[0, 0], rtol=F32_FUNCTION, atol=F32_FUNCTION)
  assert a < 1  # the weights of a query sum to less than 1


def test_very_negative_sink_is_plain_softmax():
  q, pos, kv, _, _ = _inputs(11, B=1, T=9)
  sink = np.full((3,), -1e4, np.float32)
  out = np.asarray(_ours(q, pos, kv, sink, window=4, block=4))
  ref = np.zeros_like(out, np.float64)
  for t in range(9):
    K = kv[0, max(0, t - 3): t + 1].astype(np.float64)
    for h in range(3):
      z = K @ q[0, t, h] * SCALE
      a = np.exp(z - z.max())
      ref[0, t, h] = (a / a.sum()) @ K
  np.testing.assert_allclose(out, ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)
