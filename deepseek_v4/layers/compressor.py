"""KV compressor (docs/architecture.md#compressor): gated softmax pooling of every window of `m`
tokens into one entry.

HCA (ratio != 4): non-overlapping windows, one projection series. CSA (ratio 4): each token's
projection has two halves; entry i pools the previous window through the first half (A) and the
current window through the second half (B): 2m slots per channel under one softmax. The learned
positional bias `ape[j mod m]` is added to the gate logits. Entries are RMS-normed, then roped at
the fixed position `m * i`. The projections run in float32 (the reference does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from deepseek_v4.layers.norms import RMSNorm
from deepseek_v4.layers.params import Linear, param
from deepseek_v4.layers.rope import apply_rope, rope_angles


def project(x: Float[Array, "B T D"], wkv: Array, wgate: Array, ape: Array,
            start: int | Array = 0) -> tuple[Array, Array]:
  """Per-token values `C_j` and biased gate logits `Z_j + ape[j mod m]` (float32).

  `start` is the absolute position of x[:, 0] (for chunked prefill and decoding).
  """
  x32 = x.astype(jnp.float32)
  c = jnp.einsum("BTD,KD->BTK", x32, wkv.astype(jnp.float32))
  z = jnp.einsum("BTD,KD->BTK", x32, wgate.astype(jnp.float32))
  m = ape.shape[0]
  slot = (start + jnp.arange(x.shape[1])) % m
  return c, z + ape.astype(jnp.float32)[slot]


def window_slots(c: Float[Array, "B S K"], z: Float[Array, "B S K"], ratio: int, overlap: bool,
                 prev: tuple[Array, Array] | None = None, same_doc: Array | None = None,
                 ) -> tuple[Array, Array]:
  """The slots each of the n = S/m entries pools: (values, biased gate logits), each
  [B, n, slots, width]; slots = m tokens of its window (HCA), or 2m (CSA): the m tokens of the
  previous window through the first half, then the m of its own through the second half.

  Args:
    c, z: values and biased gate logits, `K = (1 + overlap) * width`.
    ratio: m.
    overlap: CSA two-series pooling.
    prev: CSA only: (values, logits) [B, m, width] of the first halves of the window just before
      c[:, 0]; None means "no previous window" (value 0, logit -inf, so weight 0).
    same_doc: CSA with packed documents: [B, n] whether window i-1 belongs to the document of
      window i; where not, entry i has no previous window.
  """
  B, S, K = c.shape
  n = S // ratio
  c = c.reshape(B, n, ratio, K)
  z = z.reshape(B, n, ratio, K)
  if not overlap:
    return c, z
  w = K // 2
  if prev is None:
    prev = (jnp.zeros((B, ratio, w), c.dtype), jnp.full((B, ratio, w), -jnp.inf, z.dtype))
  # Series A of window i-1 and series B of window i share one softmax over 2m slots.
  prev_c = jnp.concatenate([prev[0][:, None], c[:, :-1, :, :w]], axis=1)  # [B, n, m, w]
  prev_z = jnp.concatenate([prev[1][:, None], z[:, :-1, :, :w]], axis=1)
  if same_doc is not None:
    prev_z = jnp.where(same_doc[:, :, None, None], prev_z, -jnp.inf)
  vals = jnp.concatenate([prev_c, c[..., w:]], axis=2)  # [B, n, 2m, w]
  logits = jnp.concatenate([prev_z, z[..., w:]], axis=2)
  return vals, logits


def pool_windows(c: Float[Array, "B S K"], z: Float[Array, "B S K"], ratio: int, overlap: bool,
                 prev: tuple[Array, Array] | None = None, same_doc: Array | None = None) -> Array:
  """Pools S = n*m window-aligned tokens into n entries (float32, before norm and RoPE): one
  channel-wise softmax over each entry's `window_slots` (same arguments). Returns [B, n, width]."""
  vals, logits = window_slots(c, z, ratio, overlap, prev, same_doc)
  return jnp.sum(jax.nn.softmax(logits, axis=2) * vals, axis=2)


class Compressor(nnx.Module):
  """Owns wkv, wgate, ape and the entry norm of one compressor (main or indexer)."""

  def __init__(self, d_model: int, ratio: int, width: int, overlap: bool, eps: float, *,
               std: float, param_dtype, rngs: nnx.Rngs):
    self.ratio = ratio
    self.overlap = overlap
    k = (2 if overlap else 1) * width
    self.wkv = Linear(d_model, k, axes=("comp_width", "embed"), std=std,
                      param_dtype=param_dtype, rngs=rngs)
    self.wgate = Linear(d_model, k, axes=("comp_width", "embed"), std=std,
                        param_dtype=param_dtype, rngs=rngs)
    self.ape = param(jnp.zeros((ratio, k), jnp.float32), (None, "comp_width"))
    self.norm = RMSNorm(width, eps, axis_name="head_dim")

  def project(self, x: Array, start: int | Array = 0) -> tuple[Array, Array]:
    return project(x, self.wkv.weight[...], self.wgate.weight[...], self.ape[...], start)

  def finish(self, pooled: Float[Array, "B n W"], first_entry: int | Array, freqs: np.ndarray,
             dtype) -> Array:
    """Norm, then RoPE at positions `m * (first_entry + i)`; returns entries in `dtype`."""
    entries = self.norm(pooled.astype(dtype))
    pos = (first_entry + jnp.arange(pooled.shape[1])) * self.ratio
    cos, sin = rope_angles(pos[None, :], freqs)
    return apply_rope(entries, cos, sin)

  def finish_at(self, pooled: Float[Array, "B n W"], entry: Int[Array, "B n"], freqs: np.ndarray,
                dtype) -> Array:
    """Like `finish`, with a per-row entry index: RoPE at positions `m * entry[b, i]`."""
    entries = self.norm(pooled.astype(dtype))
    cos, sin = rope_angles(entry * self.ratio, freqs)
    return apply_rope(entries, cos, sin)

  def extend(self, x: Float[Array, "B T D"], start: Int[Array, "B"], n_valid: Int[Array, "B"],
             state, entries: Float[Array, "B C W"], freqs: np.ndarray):
    """Decode / chunked-prefill step (docs/architecture.md#decode-update): feeds the chunk x (row b
    at positions start[b] ..., its first n_valid[b] tokens real) to the tail `state` (a cache
    CompressorState); returns (entries with every newly closed window stored, new state)."""
    c, z = self.project(x, start[:, None])
    pooled, entry, closed, state = extend_windows(c, z, start, n_valid, state, self.ratio,
                                                  self.overlap)
    new = self.finish_at(pooled, entry, freqs, entries.dtype)
    return store_entries(entries, new, entry, closed), state

  def __call__(self, x: Float[Array, "B T D"], freqs: np.ndarray, positions: Array | None = None,
               segments: Array | None = None) -> Array:
    """All complete windows of a sequence that starts at position 0 -> [B, T // m, width].

    With packed documents (`segments` [B, T] document ids, `positions` [B, T] positions inside
    each document, every document starting at a multiple of m), windows never straddle
    documents, a CSA entry pools no window of another document, and entries are roped at their
    document-local start position.
    """
    B, T, _ = x.shape
    m = self.ratio
    n = T // m
    if n == 0:
      return jnp.zeros((B, 0, self.norm.weight.shape[0]), x.dtype)
    c, z = self.project(x[:, : n * m])
    if segments is None:
      return self.finish(pool_windows(c, z, m, self.overlap), 0, freqs, x.dtype)
    seg = segments[:, : n * m : m]  # [B, n] document of each window
    same_doc = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] == seg[:, :-1]], axis=1)
    pooled = pool_windows(c, z, m, self.overlap, same_doc=same_doc)
    cos, sin = rope_angles(positions[:, : n * m : m], freqs)
    return apply_rope(self.norm(pooled.astype(x.dtype)), cos, sin)


# ----- incremental compression (decode / chunked prefill, docs/architecture.md#decode-update) -----
def _align(pending: Array, new: Array, offset: Array, fill: float, length: int) -> Array:
  """Per row: the pending slots, then the chunk written from slot `offset`: [length, K]."""
  m, K = pending.shape
  buf = jnp.concatenate([pending, jnp.full((length - m, K), fill, pending.dtype)], axis=0)
  return jax.lax.dynamic_update_slice(buf, new.astype(pending.dtype), (offset, 0))


def _take_window(x: Array, idx: Array, ratio: int) -> Array:
  """x [B, n*m, K] -> the window idx[b] of each row: [B, m, K]."""
  B, S, K = x.shape
  return jax.vmap(lambda xb, i: jax.lax.dynamic_slice_in_dim(xb, i * ratio, ratio, 0))(x, idx)


def extend_windows(c: Float[Array, "B T K"], z: Float[Array, "B T K"], start: Array,
                   n_valid: Array, state, ratio: int, overlap: bool):
  """Feeds T new tokens to a compressor tail; pools every window the chunk closes.

  Row b's tokens sit at positions `start[b] .. start[b] + T - 1`; only the first `n_valid[b]`
  are real (the rest is right padding and changes nothing). The pending slots and the chunk are
  laid out window-aligned (windows are anchored at position 0), so the same `pool_windows` as
  the full sequence pools them.

  Args:
    c, z: the chunk's values and biased gate logits (float32, from `project(x, start)`).
    start, n_valid: [B] int32.
    state: the CompressorState before the chunk.
    ratio, overlap: m and CSA two-series pooling.
  Returns:
    (pooled [B, n, width] float32, entry index [B, n], closed [B, n] bool, new state). Only
    `closed` windows are real entries; the others are partial and must not be stored.
  """
  B, T, K = c.shape
  m = ratio
  n = -(-(m - 1 + T) // m)  # windows the aligned buffer spans
  offset = start % m
  cb = jax.vmap(lambda p, x, o: _align(p, x, o, 0.0, n * m))(state.pending_c, c, offset)
  zb = jax.vmap(lambda p, x, o: _align(p, x, o, -jnp.inf, n * m))(state.pending_z, z, offset)
  prev = (state.prev_c, state.prev_z) if overlap else None
  pooled = pool_windows(cb, zb, m, overlap, prev)  # [B, n, width]
  first = start // m
  entry = first[:, None] + jnp.arange(n)  # [B, n]
  end = start + n_valid
  closed = (entry + 1) * m <= end[:, None]
  num_closed = end // m - first  # [B]
  # The new tail: the first window the chunk leaves open, its slots past `end` emptied.
  keep = (jnp.arange(m)[None, :] < (end % m)[:, None])[..., None]  # [B, m, 1]
  tail = jnp.minimum(num_closed, n - 1)
  new = dict(pending_c=jnp.where(keep, _take_window(cb, tail, m), 0.0),
             pending_z=jnp.where(keep, _take_window(zb, tail, m), -jnp.inf))
  if overlap:
    w = K // 2
    last = jnp.maximum(num_closed - 1, 0)
    moved = (num_closed > 0)[:, None, None]
    new["prev_c"] = jnp.where(moved, _take_window(cb, last, m)[..., :w], state.prev_c)
    new["prev_z"] = jnp.where(moved, _take_window(zb, last, m)[..., :w], state.prev_z)
  return pooled, entry, closed, state.replace(**new)


def store_entries(entries: Float[Array, "B C W"], new: Array, entry: Array,
                  closed: Array) -> Array:
  """Writes the closed windows' entries at their indices (others are dropped)."""
  B, C, _ = entries.shape
  idx = jnp.where(closed, entry, C)  # out of range = not written
  rows = jnp.arange(B)[:, None]
  return entries.at[rows, idx].set(new.astype(entries.dtype), mode="drop")

