"""Lightning-indexer scores and top-k selection (spec §3.8), blocked over queries.

`I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s])`; entries with `s >= floor((p_t + 1) / m)` are
invisible. The top `P` indices are taken (ties: lowest index first, as `jax.lax.top_k` does), and
picks that are invisible are returned as -1. Memory is O(block * C) per step, never [T, C] at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.common import PAD_POSITION, from_blocks, pad_to_blocks, to_blocks


def indexer_scores(q: jax.Array, w: jax.Array, k: jax.Array) -> jax.Array:
  """q [B,T,I,J], w [B,T,I] (already scaled), k [B,C,J] -> scores [B,T,C] in float32."""
  qk = jnp.einsum("BTIJ,BCJ->BTIC", q.astype(jnp.float32), k.astype(jnp.float32))
  return jnp.einsum("BTIC,BTI->BTC", jax.nn.relu(qk), w.astype(jnp.float32))


def visible_count(positions: jax.Array, ratio: int) -> jax.Array:
  """Number of compressed entries visible to a query at `positions` (spec §3.7)."""
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
    val, idx = jax.lax.top_k(scores, P)
    return jnp.where((idx < nvis) & (val > -jnp.inf), idx, -1).astype(jnp.int32)

  out = jax.lax.map(one_block, (to_blocks(qp, block), to_blocks(wp, block), to_blocks(pp, block),
                                to_blocks(sp, block)))
  return from_blocks(out)[:, :T]
