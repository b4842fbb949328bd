"""Core V4 attention (docs/architecture.md#core-attention), gather-based and blocked over queries.

One softmax per query and head over: its sliding window of uncompressed K=V vectors, its compressed
entries (CSA: the indexer's selected indices, gathered; HCA: every visible entry), and a per-head
sink logit that only enlarges the denominator. There is never a dense [T, T] or [T, T/m] mask:
each scan step holds `block` queries against `block + window` window keys plus their compressed
keys, so memory grows linearly with T. Each key source (window, cache ring, entries) gets its own
logits and exponentials, and the p.v sums are normalized once at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas import common
from kernels_pallas.common import PAD_POSITION, from_blocks, pad_to_blocks, to_blocks
from kernels_pallas.sparse_attention.sources import KeySources, PickedEntries


# p.v of values shared by the step's queries / gathered per query.
_SHARED, _PER_QUERY = "BQNK,BKH->BQNH", "BQNK,BQKH->BQNH"
# Queries per scan step on CPU: `block` capped so that a step's logits and gathered entries stay in
# cache (at T=8192 on 2 cores, CSA 2.9 -> 1.6 s with 16, sliding 0.73 -> 0.44 s with 32).
_CPU_STEP = {"gathered": 16, "shared": 32}


def scan_step(block: int, gathered: bool) -> int:
  """Queries per scan step: `block`, capped on CPU (results do not depend on it)."""
  if common.platform() != "cpu":
    return block
  return min(block, _CPU_STEP["gathered" if gathered else "shared"])


def _window_mask(q_pos: Array, k_pos: Array, window: int) -> Array:
  """[B, Q, K]: key position in (p_t - W, p_t] and a real slot
  (docs/architecture.md#sliding-window)."""
  d = q_pos[:, :, None] - k_pos[:, None, :]
  return (d >= 0) & (d < window) & (k_pos[:, None, :] >= 0)


def sparse_attention(
  q: Float[Array, "B T N H"],
  q_pos: Int[Array, "B T"],
  sink: Float[Array, "N"],
  keys: KeySources,
  *,
  scale: float,
  block: int,
  return_lse: bool = False,
) -> Array | tuple[Array, Array]:
  """Attention of T new queries over their key sources and the sink.

  Args:
    q: queries (normed, roped).
    q_pos: absolute positions of the queries; `keys.band.kv[:, i]` is the K=V of the same token.
    sink: per-head sink logits (not scaled).
    keys: the band (the T new tokens' K=V, window W, optional documents), an optional cache ring
      and optional compressed entries with their selection (HCA: every visible entry, CSA: each
      query's picks); see `sources.py`.
    scale: softmax scale for q.k.
    block: queries per scan step (at most: `scan_step` caps it on CPU).
    return_lse: also return the log-sum-exp of the full softmax denominator, sink included, in
      units of scaled logits: `exp(scale * q.k - lse)` is the probability of key k.
  Returns:
    [B, T, N, H] in q's dtype; with `return_lse`, (that, lse [B, T, N] float32).
  """
  B, T, N, H = q.shape
  kv, window, segments = keys.band.kv, keys.band.window, keys.band.segments
  ring, entries = keys.ring, keys.entries
  picked = isinstance(entries, PickedEntries)
  block = min(scan_step(block, picked), T)
  f32 = jnp.float32
  qp, nb = pad_to_blocks(q, block, 1, 0)
  pp, _ = pad_to_blocks(q_pos, block, 1, PAD_POSITION)
  # Left-pad the band by `window` slots so block b reads keys [b*block - W, b*block + block).
  kv_pad = jnp.pad(pad_to_blocks(kv, block, 1, 0)[0], ((0, 0), (window, 0), (0, 0)))
  kpos_pad = jnp.pad(pp, ((0, 0), (window, 0)), constant_values=PAD_POSITION)
  xs = {"q": to_blocks(qp, block), "pos": to_blocks(pp, block), "b": jnp.arange(nb)}
  if picked:
    xs["idx"] = to_blocks(pad_to_blocks(entries.picks, block, 1, -1)[0], block)
  if segments is not None:
    sp, _ = pad_to_blocks(segments, block, 1, -1)
    xs["seg"] = to_blocks(sp, block)
    kseg_pad = jnp.pad(sp, ((0, 0), (window, 0)), constant_values=-1)
  sink32 = sink.astype(f32)

  def one_block(x):
    qb = x["q"].astype(f32) * scale  # [B, Q, N, H]
    pos = x["pos"]  # [B, Q]
    start = x["b"] * block
    kb = jax.lax.dynamic_slice_in_dim(kv_pad, start, block + window, axis=1).astype(f32)
    kbpos = jax.lax.dynamic_slice_in_dim(kpos_pad, start, block + window, axis=1)
    mask = _window_mask(pos, kbpos, window)
    if segments is not None:
      kbseg = jax.lax.dynamic_slice_in_dim(kseg_pad, start, block + window, axis=1)
      mask = mask & (x["seg"][:, :, None] == kbseg[:, None, :])
    # One (logits [B, Q, N, K], mask [B, Q, K], values, p.v einsum) per key source.
    parts = [(jnp.einsum("BQNH,BKH->BQNK", qb, kb), mask, kb, _SHARED)]
    if ring is not None:
      pk = ring.kv.astype(f32)
      parts.append((jnp.einsum("BQNH,BKH->BQNK", qb, pk), _window_mask(pos, ring.pos, window),
                    pk, _SHARED))
    if entries is not None and entries.kv.shape[1] > 0:
      c32 = entries.kv.astype(f32)
      if not picked:  # HCA: all visible entries, dense over the (short) entry axis
        C = entries.kv.shape[1]
        visible = jnp.arange(C)[None, None, :] < ((pos + 1) // entries.ratio)[:, :, None]
        if segments is not None:
          visible = visible & (x["seg"][:, :, None] == entries.segments[:, None, :])
        parts.append((jnp.einsum("BQNH,BCH->BQNC", qb, c32), visible, c32, _SHARED))
      elif x["idx"].shape[-1] > 0:  # CSA: gather each query's own selected entries
        idx = x["idx"]  # [B, Q, P]
        g = jax.vmap(lambda cb, ib: cb[jnp.maximum(ib, 0)])(c32, idx)  # [B, Q, P, H]
        valid = idx >= 0
        if segments is not None:
          own = jax.vmap(lambda sb, ib: sb[jnp.maximum(ib, 0)])(entries.segments, idx)  # [B, Q, P]
          valid = valid & (own == x["seg"][:, :, None])
        parts.append((jnp.einsum("BQNH,BQPH->BQNP", qb, g), valid, g, _PER_QUERY))
    # Each source is masked and exponentiated on its own (no concatenated [B, Q, N, K_total]).
    # The sink joins the max and the denominator, never the numerator; the numerator is
    # normalized after p.v, on [B, Q, N, H] instead of every probability.
    logits = [jnp.where(mk[:, :, None, :], lg, -jnp.inf) for lg, mk, _, _ in parts]
    m = sink32[None, None, :]
    for lg in logits:
      m = jnp.maximum(m, jnp.max(lg, axis=-1))  # [B, Q, N]
    e = [jnp.exp(lg - m[..., None]) for lg in logits]
    denom = jnp.exp(sink32[None, None, :] - m)
    out = jnp.zeros((B, block, N, H), f32)
    for ei, (_, _, v, eq) in zip(e, parts):
      denom = denom + jnp.sum(ei, axis=-1)
      out = out + jnp.einsum(eq, ei, v)
    out = out / denom[..., None]
    return out.astype(q.dtype), m + jnp.log(denom)

  out, lse = jax.lax.map(jax.checkpoint(one_block), xs)
  out = from_blocks(out)[:, :T]
  if return_lse:
    return out, from_blocks(lse)[:, :T]
  return out
