"""Lightning-indexer scores and top-k selection (docs/architecture.md#indexer), blocked over
queries.

`I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])`; entries with `s >= floor((p_t + 1) / m)` are
invisible. The top `P` entries are taken (ties: lowest index first, as `jax.lax.top_k` does) and
returned in ascending entry order; a query that sees fewer than P entries gets -1 in the trailing
slots. Memory is O(block * C) per step, never [T, C] at once.

The selection (`top_indices`) is exact either way it runs:
  "bisect" (CPU): the P-th largest score of each row by a 32-step bisection over the scores'
    order-preserving uint32 keys (each step one vectorized count), then the picks by a mask and
    a prefix sum. XLA:CPU's `top_k` costs about 75 us per row at P=512 of C=2048 on one core
    (56 us at C=512: its cost follows P more than C); this is 2-3x faster there (2 CPU cores).
  "top_k" (GPU/TPU): `jax.lax.top_k`, its picks then sorted by index.
Both take the same set, in XLA's total order of float32 (-0.0 below +0.0, as `top_k` ranks them).
The order of the picks does not change what the attention computes beyond float rounding: it
sums over them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import common
from kernels_pallas.common import PAD_POSITION, from_blocks, pad_to_blocks, to_blocks


def indexer_scores(q: jax.Array, w: jax.Array, k: jax.Array) -> jax.Array:
  """q [B,T,I,J], w [B,T,I] (already scaled), k [B,C,J] -> scores [B,T,C] in float32."""
  qk = jnp.einsum("BTIJ,BCJ->BTIC", q.astype(jnp.float32), k.astype(jnp.float32))
  return jnp.einsum("BTIC,BTI->BTC", jax.nn.relu(qk), w.astype(jnp.float32))


def _order_key(x: jax.Array) -> jax.Array:
  """uint32 keys whose unsigned order is XLA's total order of the float32 values."""
  u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))


def top_indices(scores: jax.Array, P: int, method: str = "auto") -> jax.Array:
  """The P highest `scores` of each row [..., C] (ties: lowest index first; -inf never picked),
  as int32 indices in ascending order, -1 in the slots past a row's finite entries.

  method: "bisect", "top_k", or "auto" (bisect on CPU, top_k elsewhere): see the module doc.
  """
  C = scores.shape[-1]
  if not 0 <= P <= C:
    raise ValueError(f"top_indices: P={P} must be in [0, C={C}]")
  if method == "auto":
    method = "bisect" if common.platform() == "cpu" else "top_k"
  if method == "top_k":
    val, idx = jax.lax.top_k(scores, P)
    idx = jnp.sort(jnp.where(val > -jnp.inf, idx, C), axis=-1)
    return jnp.where(idx < C, idx, -1).astype(jnp.int32)
  if method != "bisect":
    raise ValueError(f"top_indices: method={method!r}; expected 'auto', 'bisect' or 'top_k'")
  key = _order_key(scores)

  def halve(_, bounds):  # invariant: at least P keys >= lo; fewer than P keys > hi
    lo, hi = bounds
    mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)  # the upper middle: no uint32 overflow
    enough = jnp.sum(key >= mid[..., None], axis=-1) >= P
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - jnp.uint32(1))

  lo = jnp.zeros(key.shape[:-1], jnp.uint32)
  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, jnp.full_like(lo, 0xFFFFFFFF)))
  kth = lo[..., None]  # the key of the P-th largest score
  above, tied = key > kth, key == kth
  room = P - jnp.sum(above, axis=-1, keepdims=True)  # tied entries to take, lowest index first
  picked = (above | (tied & (jnp.cumsum(tied, axis=-1) <= room))) & (scores > -jnp.inf)
  count = jnp.cumsum(picked, axis=-1, dtype=jnp.int32)  # picks up to and including each entry
  slots = jnp.arange(1, P + 1, dtype=jnp.int32)
  rows = count.reshape(-1, C)
  idx = jax.vmap(lambda c: jnp.searchsorted(c, slots, side="left"))(rows)  # the j-th pick
  idx = idx.reshape(*scores.shape[:-1], P)
  return jnp.where(idx < C, idx, -1).astype(jnp.int32)


def visible_count(positions: jax.Array, ratio: int) -> jax.Array:
  """Number of compressed entries visible to a query at `positions`
  (docs/architecture.md#causality)."""
  return (positions + 1) // ratio


def indexer_topk(q: jax.Array, w: jax.Array, k: jax.Array, positions: jax.Array, *, ratio: int,
                 topk: int, block: int, q_seg: jax.Array | None = None,
                 k_seg: jax.Array | None = None) -> jax.Array:
  """Selected entry indices [B, T, min(topk, C)] (int32, -1 = none).

  Args:
    q: indexer queries [B, T, I, J] (roped).
    w: per-head weights [B, T, I], including the c_I^-1/2 * H_I^-1/2 scale.
    k: indexer keys [B, C, J] (the indexer compressor's entries).
    positions: absolute positions [B, T] of the queries.
    ratio: compression ratio m of the entries.
    topk: k_I.
    block: queries per scan step.
    q_seg, k_seg: packed documents: document ids [B, T] of the queries and [B, C] of the entries;
      entries of other documents are invisible.
  """
  B, T = q.shape[:2]
  C = k.shape[1]
  P = min(topk, C)
  if P == 0:
    return jnp.zeros((B, T, 0), jnp.int32)
  block = min(block, T)
  qp, _ = pad_to_blocks(q, block, 1, 0)
  wp, _ = pad_to_blocks(w, block, 1, 0)
  pp, _ = pad_to_blocks(positions, block, 1, PAD_POSITION)
  segs = jnp.zeros_like(positions) if q_seg is None else q_seg
  sp, _ = pad_to_blocks(segs, block, 1, -1)
  kseg = jnp.zeros((B, C), segs.dtype) if k_seg is None else k_seg

  def one_block(args):
    qb, wb, pb, sb = args
    nvis = visible_count(pb, ratio)[..., None]  # [B, Q, 1]
    ok = (jnp.arange(C) < nvis) & (sb[:, :, None] == kseg[:, None, :])  # [B, Q, C]
    scores = jnp.where(ok, indexer_scores(qb, wb, k), -jnp.inf)
    return top_indices(scores, P)

  out = jax.lax.map(one_block, (to_blocks(qp, block), to_blocks(wp, block), to_blocks(pp, block),
                                to_blocks(sp, block)))
  return from_blocks(out)[:, :T]
