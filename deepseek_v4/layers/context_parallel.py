"""Context-parallel attention (docs/context_parallel.md): a full sequence sliced along a mesh
axis, each device holding one contiguous slice, in the V4 paper's two stages.

  1. Neighbour exchange: each device receives the last `halo` tokens of the previous slice (their
     attention input, `jax.lax.ppermute`): W - 1 of them for the sliding band, and CSA's
     compressors also need the whole window before the slice (its first halves pool into the
     slice's first entry). The slice's queries then run against the band of halo + slice.
  2. Entry exchange: each device compresses its own windows (a slice length is a multiple of the
     ratio, so no window straddles two devices), and the compressed entries, their documents and
     the indexer keys are all-gathered over the axis (`jax.lax.all_gather`). The indexer's top-k
     and the sparse attention then run locally for the slice's queries at their global positions.

Everything else in the model is token-wise and stays on its slice (GSPMD, the activation rule
`seq` -> the axis). The sequence is padded at its end to a multiple of (devices * ratio) inside
each layer; padding comes after every real token, so causality keeps it out of their outputs.
All of it is differentiable (the transposes of ppermute and all_gather are the reverse
permutation and a reduce-scatter), so training runs context-parallel too.

A prefill chunk (`prefill_attention`) continues a gathered decode cache from a window-aligned
position: the cache stands in for the first slice's previous device (its window ring for the
halo keys, its compressor state for CSA's overlap), and the chunk's entries are written into the
cache's entry buffers, against which every query then scores and attends.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from deepseek_v4 import sharding
from deepseek_v4.layers.attention_kinds import CSA, HCA, Sliding
from deepseek_v4.layers.compressor import pool_windows, store_entries
from deepseek_v4.layers.rope import apply_rope, rope_angles
from deepseek_v4.losses import indexer_kl_from_attention
from kernels_pallas.common import PAD_POSITION
from kernels_pallas.sparse_attention import sources

# Document id of the missing halo before the first slice: no real document has it.
_NO_DOCUMENT = -(2**31)
# Row position of that missing halo: negative positions are never keys (kernels' band mask).
_NO_POSITION = -1


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """Where the sequence is split: `axis` of `mesh` (the activation rule of "seq"); the batch
  dimension stays on `batch_axes` (the rule of "batch") inside the per-device code."""

  mesh: Mesh
  axis: str
  batch_axes: tuple[str, ...] = ()
  # Queries per block of a slice's attention (`query_blocks`): the per-query arrays (q and its
  # float32 normalization, the indexer's queries, scores and picks) exist for one block at a time.
  query_block: int = 8192

  def __post_init__(self):
    if self.query_block < 1:
      raise ValueError(f"ContextParallel: query_block must be >= 1, got {self.query_block}")

  @property
  def size(self) -> int:
    return self.mesh.shape[self.axis]


class _Chunk(NamedTuple):
  """A prefill chunk inside the `shard_map`: the layer cache (whole on every device), each row's
  start position and real tokens [B]."""

  cache: Any
  start: Array
  n_valid: Array


def context_parallel_layout(mesh: Mesh, rules: str | sharding.Rules) -> ContextParallel | None:
  """The layout of `rules` on `mesh`: None unless the activation rule "seq" names a mesh axis of
  size > 1."""
  r = sharding.get_rules(rules)
  table = dict(r.activations)
  seq = table["seq"]
  axes = (seq,) if isinstance(seq, str) else tuple(seq or ())
  axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
  if not axes:
    return None
  if len(axes) > 1:
    raise ValueError(f"rules {r.name}: 'seq' maps to mesh axes {axes}; context parallelism "
                     "splits the sequence over one axis")
  batch = table["batch"]
  batch = (batch,) if isinstance(batch, str) else tuple(batch or ())
  return ContextParallel(mesh, axes[0], tuple(a for a in batch if a in mesh.shape))


def halo_size(attn, window: int) -> int:
  """Tokens of the previous slice each device needs: W - 1 for the band, and a whole window of m
  for an overlapping (CSA) compressor."""
  comp = attn.ratio if attn.compressor is not None and attn.compressor.overlap else 0
  return max(window - 1, comp, 0)


def _check(attn, T: int, slice_len: int, halo: int, window: int) -> None:
  if not isinstance(attn.kind, (Sliding, CSA, HCA)):
    raise ValueError(f"context parallelism runs sliding, CSA and HCA layers; layer kind "
                     f"{attn.kind.name!r} has no context-parallel path")
  if halo > slice_len:
    raise ValueError(f"context parallelism: a {attn.kind.name} layer needs the last {halo} "
                     f"tokens of the previous slice (window {window}), but each device holds "
                     f"{slice_len} tokens (T={T} padded over the context axis); use fewer "
                     "context devices or a longer sequence")


def _pad(x, row, rope, seg, pad: int):
  """Appends `pad` tokens after the sequence: zeros, positions continuing, a new document."""
  if not pad:
    return x, row, rope, seg
  more = jnp.arange(1, pad + 1, dtype=row.dtype)[None, :]
  x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
  row = jnp.concatenate([row, row[:, -1:] + more], axis=1)
  rope = jnp.concatenate([rope, rope[:, -1:] + more], axis=1)
  if seg is not None:
    seg = jnp.concatenate([seg, jnp.broadcast_to(seg[:, -1:] + 1, (seg.shape[0], pad))], axis=1)
  return x, row, rope, seg


def full_attention(attn, x: Float[Array, "B T D"], positions: Int[Array, "B T"],
                   segments: Int[Array, "B T"] | None, cp: ContextParallel, *, stage: str,
                   impl: str, block: int):
  """`Attention._full` with the sequence split over `cp.axis`; same (output, None, KL) result:
  with an indexer training stage, each device scores its slice's queries against the gathered
  entries and the [sum, count] KL is summed over the devices."""
  y, _, kl = _run(attn, x, positions, segments, cp, stage=stage, impl=impl, block=block)
  return y, None, kl


def prefill_attention(attn, x: Float[Array, "B T D"], positions: Int[Array, "B T"],
                      n_valid: Int[Array, "B"], cache, cp: ContextParallel, *, impl: str,
                      block: int):
  """A context-parallel prefill chunk into a gathered layer cache: row b's tokens at
  `positions[b] = start[b] + arange(T)`, its first n_valid[b] real, where start[b] (the tokens the
  cache already holds) is a multiple of the layer's ratio for every row with real tokens
  (`decoding.prefill` checks it; a row with none only rides along and writes nothing). Returns
  (output [B, T, D], the chunk's K=V [B, T, H] for the caller's window ring, the new cache fields
  but the window).

  The attention is `full_attention`'s with the cache (whole on every device) standing in for the
  first slice's missing previous device (docs/context_parallel.md#prefill): that slice's halo keys
  come from the cache's window ring and its CSA overlap from the cache's last closed window; every
  query scores and attends against the cache's entries, into which this chunk's gathered entries
  are written first (visibility by position hides the slots not written yet).
  The cache stays gathered (every device holds all of it, like a plain decode cache); each
  compressor's tail (the open window and, for CSA, the last closed window's first halves) is
  recomputed from the last <= 2m real tokens, or continued from the cache's for a shorter chunk.
  """
  start = positions[:, 0]
  y, (kv, comp, ikeys), _ = _run(attn, x, positions, None, cp, stage="off", impl=impl,
                                 block=block, prior=_Chunk(cache, start, n_valid))
  new = {}
  if attn.compressor is not None:
    new["compressor"] = _tail_state(attn.compressor, x, start, n_valid, cache.compressor,
                                    attn.freqs)
    new["entries"] = comp
  if attn.indexer is not None:
    sg = jax.lax.stop_gradient
    new["indexer"] = _tail_state(attn.indexer.compressor, sg(x), start, n_valid, cache.indexer,
                                 attn.freqs)
    new["index_keys"] = ikeys
  return y, kv[:, : x.shape[1]], new


def _store_closed(buf: Float[Array, "B C W"], entries: Array, ratio: int, start: Array,
                  n_valid: Array):
  """A chunk's entries (window j of the chunk from start[b]) written at their indices
  start[b] / m + j, those of the windows each row's real tokens close only."""
  entry = start[:, None] // ratio + jnp.arange(entries.shape[1])[None, :]  # [B, C_chunk]
  return store_entries(buf, entries, entry, (entry + 1) * ratio <= (start + n_valid)[:, None])


def _tail_state(compressor, x: Float[Array, "B T D"], start: Array, n_valid: Array, state,
                freqs):
  """The compressor state after a chunk (row b from position start[b], n_valid[b] real tokens)
  fed to `state`: the chunk's last closed window (CSA's overlap needs its first halves) and its
  open one, whose entries are not kept. A chunk that closes no window (fewer than m real tokens)
  continues `state` from its start instead: start[b] on a window boundary means `state` holds no
  open window, only (CSA) the last closed one's first halves. A row with no real token keeps
  `state` whatever its start."""
  m = compressor.ratio
  lead = m if compressor.overlap else 0
  B = x.shape[0]
  end = start + n_valid
  first = jnp.maximum(end // m * m - lead, start)  # [B], position of the first token fed
  xp = jnp.pad(x, ((0, 0), (0, lead + m), (0, 0)))
  tail = jax.vmap(lambda xb, s: jax.lax.dynamic_slice_in_dim(xb, s, lead + m, 0))(
    xp, first - start)
  dummy = jnp.zeros((B, 1, compressor.norm.weight.shape[0]), jnp.float32)  # entries: not kept
  _, state = compressor.extend(tail, first, end - first, state, dummy, freqs)
  return state


def _run(attn, x, positions, segments, cp: ContextParallel, *, stage: str, impl: str, block: int,
         prior=None):
  """The output [B, T, D]; with `prior` (a prefill chunk: the layer cache, start [B], n_valid
  [B]) also (K=V [B, T_pad, H], the cache's entries and indexer keys with this chunk's written:
  None where the layer has none), else None; and the indexer KL [sum, count] (zeros unless
  `stage` trains the indexer of a CSA layer).

  x, positions and segments are the layer's global arrays (GSPMD places them); the per-device
  work runs under `jax.shard_map`, manual over every mesh axis: the slice along `cp.axis`, the
  batch along `cp.batch_axes` where they divide it, the layer's parameters and the cache whole.
  """
  B, T, _ = x.shape
  n = cp.size
  m = max(attn.ratio, 1)
  window = attn.window(T)
  pad = -T % (n * m)
  Tl = (T + pad) // n
  halo = halo_size(attn, window)
  _check(attn, T, Tl, halo, window)
  row = positions if segments is None else jnp.broadcast_to(jnp.arange(T, dtype=positions.dtype),
                                                            (B, T))
  x, row, rope, seg = _pad(x, row, positions, segments, pad)
  real = jnp.broadcast_to(jnp.arange(T + pad) < T, (B, T + pad))
  docs = seg is not None
  if seg is None:  # the compressors always run with documents, to cut the missing halo off
    seg = jnp.zeros_like(row)

  nb = 1
  for a in cp.batch_axes:
    nb *= cp.mesh.shape[a]
  b_axes = cp.batch_axes if cp.batch_axes and B % nb == 0 else None
  spec, spec3, whole = P(b_axes, cp.axis), P(b_axes, cp.axis, None), P(b_axes, None, None)
  graphdef, params = nnx.split(attn)
  parts = prior is not None

  def body(params, x, row, rope, seg, real, prior):
    layer = nnx.merge(graphdef, params)
    y, more, kl = _slice_attention(layer, x, row, rope, seg, docs=docs, axis=cp.axis, n=n,
                                   halo=halo, window=window, impl=impl, block=block,
                                   query_block=cp.query_block, prior=prior, stage=stage,
                                   real=real)
    return (y, more, kl[None]) if parts else (y, kl[None])

  more_specs = (spec3, None if attn.compressor is None else whole,
                None if attn.indexer is None else whole)
  # The cache is whole on every device along the axis (gathered), split like the batch.
  prior_specs = jax.tree.map(lambda a: P(b_axes, *(None,) * (a.ndim - 1)), prior)
  # Each device's KL [sum, count] of its queries, one row per device (summed outside, where a
  # psum's transpose cannot double-count).
  kl_spec = P((*(b_axes or ()), cp.axis), None)
  # check_vma=False: the kernels' loops carry values that vary over the manual axes; every
  # collective here is explicit, and the parameters' gradient is the sum over devices.
  run = jax.shard_map(body, mesh=cp.mesh,
                      in_specs=(P(), spec3, spec, spec, spec, spec, prior_specs),
                      out_specs=(spec3, more_specs, kl_spec) if parts else (spec3, kl_spec),
                      check_vma=False)
  with sharding.context.suspended():
    out = run(params, x, row, rope, seg, real, prior)
  y, more, kl = out if parts else (out[0], None, out[1])
  return y[:, :T], more, jnp.sum(kl, axis=0)


def _previous(a: Array, halo: int, axis: str, n: int, fill) -> Array:
  """The last `halo` tokens (axis 1) of the previous device's slice; `fill` on the first."""
  got = jax.lax.ppermute(a[:, a.shape[1] - halo:], axis, [(i, i + 1) for i in range(n - 1)])
  return jnp.where(jax.lax.axis_index(axis) == 0, jnp.asarray(fill, a.dtype), got)


def _gather(a: Array, axis: str) -> Array:
  """Every device's slice of `a` along axis 1, in device order."""
  return jax.lax.all_gather(a, axis, axis=1, tiled=True)


def query_blocks(slice_len: int, block: int) -> int:
  """How many equal query blocks a slice of `slice_len` tokens runs in: the fewest whose size
  divides the slice and is at most `block`, or 1 (the whole slice) when that needs blocks of
  under block / 4 tokens (a slice length with no fitting divisor)."""
  if slice_len <= block:
    return 1
  for count in range(-(-slice_len // block), slice_len + 1):
    if slice_len % count == 0:
      return count if slice_len // count >= max(block // 4, 1) else 1
  return 1


def _slice_attention(attn, x, row, rope, seg, *, docs: bool, axis: str, n: int, halo: int,
                     window: int, impl: str, block: int, query_block: int, prior=None,
                     stage: str = "off", real=None):
  """One device's attention output [B, Tl, D] for its slice (x, positions, documents local),
  (its K=V [B, Tl, H], the gathered entries, the gathered indexer keys), and the indexer KL
  [sum, count] of its queries (zeros unless `stage` trains a CSA layer's indexer:
  docs/architecture.md#indexer-training; "dense" attends to every visible entry): the queries at
  tokens marked `real` [B, Tl] (the rest is the layer's padding; default all). With `prior` (a
  prefill chunk: the layer cache, start [B], n_valid [B]), the entries and indexer keys are the
  cache's with the chunk's written (`_entries`), and the first slice's halo keys come from the
  cache's window ring (`_ring_halo_positions`, `_ring_keys`).

  The compressors run over the whole slice (their entries are all-gathered once); the queries
  then run in `query_blocks` blocks, each with the `halo` tokens before it (its band's keys and,
  recomputed, their K=V), under `jax.lax.map`: q, its float32 normalization and the indexer's
  scores exist for one block at a time."""
  if halo:  # stage 1: the previous slice's last tokens
    x = jnp.concatenate([_previous(x, halo, axis, n, 0), x], axis=1)
    row = jnp.concatenate([_previous(row, halo, axis, n, _NO_POSITION), row], axis=1)
    rope = jnp.concatenate([_previous(rope, halo, axis, n, 0), rope], axis=1)
    seg = jnp.concatenate([_previous(seg, halo, axis, n, _NO_DOCUMENT), seg], axis=1)
  # The halo's queries are never this device's (attend keeps [halo:]).
  if real is None:
    real = jnp.ones(row.shape, bool)
  real = jnp.pad(real, ((0, 0), (x.shape[1] - real.shape[1], 0)))
  freqs = attn.freqs
  comp, ikeys, comp_seg = None, None, None
  if attn.compressor is not None:  # stage 2: this slice's entries, all-gathered
    comp, ikeys, comp_seg = _entries(attn, x, rope, seg, freqs, docs=docs, axis=axis, halo=halo,
                                     prior=prior)
  if prior is not None and halo:  # a prefill chunk: the first slice's halo is the cache's ring
    row = _ring_halo_positions(row, prior.cache.window, prior.start, halo)

  train_indexer = stage != "off" and attn.indexer is not None
  sg = jax.lax.stop_gradient

  def attend(x, row, rope, seg, real):  # queries [halo:] of a block with its halo before it
    cos, sin = rope_angles(rope, freqs)
    cq, q, kv = attn.project_qkv(x, cos, sin)
    if prior is not None:
      kv = _ring_keys(kv, row, prior.cache.window, prior.start)
    idx = None
    if attn.indexer is not None:
      # The indexer reads detached inputs (docs/architecture.md#indexer-training).
      iq, iw = attn.indexer.queries(sg(x), sg(cq), cos, sin)
      if stage != "dense":  # the dense warm-up attends to every visible entry
        idx = sg(attn.indexer.select(iq, iw, ikeys, row, seg if docs else None, comp_seg,
                                     impl=impl, block=block))
    entries = attn._entries(comp, idx, comp_seg)
    keys = sources.KeySources(sources.Band(kv, window, seg if docs else None), entries=entries)
    o = attn.core(q, row, keys, impl=impl, block=block, return_lse=train_indexer)
    kl = jnp.zeros((2,), jnp.float32)
    if train_indexer:  # the block's own queries (not the halo's) against the gathered entries
      o, lse = o
      own = lambda a: a[:, halo:]
      # The layer's padding after the last real token is no query of the loss.
      real = own(real)
      if idx is not None:
        entries = sources.PickedEntries(entries.kv, jnp.where(real[..., None], own(idx), -1),
                                        entries.segments)
      kl = indexer_kl_from_attention(sg(own(q)), sg(own(lse)), sg(entries), own(iq), own(iw),
                                     ikeys, jnp.where(real, own(row), PAD_POSITION),
                                     scale=attn.scale, block=block,
                                     segments=own(seg) if docs else None)
    return attn.output(o, cos, sin)[:, halo:], kv[:, halo:], kl

  B, Tl = x.shape[0], x.shape[1] - halo
  count = query_blocks(Tl, query_block)
  if count == 1:
    y, kv, kl = attend(x, row, rope, seg, real)
  else:
    size = Tl // count

    # Rematerialized per block: a backward pass recomputes one block's attention at a time
    # instead of keeping every block's per-query residuals (Flash at 128K tokens over 8 devices:
    # the float32 query normalization alone is 1.1 GB per block and layer).
    @jax.checkpoint
    def one(start):
      cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, halo + size, axis=1)
      return attend(cut(x), cut(row), cut(rope), cut(seg), cut(real))

    y, kv, kl = jax.lax.map(one, jnp.arange(count) * size)  # [count, B, size, ...]
    y = jnp.moveaxis(y, 0, 1).reshape(B, Tl, *y.shape[3:])
    kv = jnp.moveaxis(kv, 0, 1).reshape(B, Tl, *kv.shape[3:])
    kl = jnp.sum(kl, axis=0)
  return y, (kv, None if comp is None else comp, ikeys), kl


def _ring_halo_positions(row: Int[Array, "B S"], ring, start: Int[Array, "B"], halo: int):
  """Positions of halo + slice with the missing halo (the first device's) replaced by the `halo`
  positions before each row's start that the cache's window ring holds (slot p mod W); the others
  (before 0, or more than W back) stay missing (_NO_POSITION, which no band mask accepts)."""
  W = ring.pos.shape[1]
  want = start[:, None] - halo + jnp.arange(halo)  # [B, halo]
  held = jnp.take_along_axis(ring.pos, want % W, axis=1) == want
  ring_row = jnp.where(held, want, _NO_POSITION).astype(row.dtype)
  head = jnp.where(row[:, :halo] == _NO_POSITION, ring_row, row[:, :halo])
  return jnp.concatenate([head, row[:, halo:]], axis=1)


def _ring_keys(kv: Float[Array, "B S H"], row: Int[Array, "B S"], ring, start: Int[Array, "B"]):
  """A query block's K=V with the keys before the chunk's start (only the first device's halo
  holds such positions: every other slice starts >= halo tokens after it) read from the cache's
  window ring, slot p mod W, so they enter as band keys and the kernels get the key sources of
  the full forward (no ring source). Works for any block: it goes by position, not index."""
  W = ring.kv.shape[1]
  before = row < start[:, None]  # [B, S]
  slot = jnp.where(before, row, 0) % W
  old = jnp.take_along_axis(ring.kv, slot[..., None], axis=1).astype(kv.dtype)  # [B, S, H]
  return jnp.where(before[..., None], old, kv)


def _entries(attn, x, rope, seg, freqs, *, docs: bool, axis: str, halo: int, prior=None):
  """Stage 2: this slice's compressed entries (and CSA's indexer keys) and, with documents,
  the entries' documents, all-gathered: (entries [B, C, H], indexer keys or None, documents or
  None). With `prior` (a prefill chunk: the layer cache, start [B], n_valid [B]): the cache's
  entries and indexer keys with the chunk's closed windows written (`_store_closed`)."""
  m = attn.ratio

  def compress(compressor, inputs, cached):
    # The compressor reads its own overlap from the halo: windows start at a multiple of m
    # (the slice does), and the entry of the halo's window is the previous device's.
    lead = m if compressor.overlap else 0
    s = halo - lead
    if cached is None:
      out = compressor(inputs[:, s:], freqs, rope[:, s:], seg[:, s:])
      return _gather(out[:, lead // m:], axis)  # [B, C, width]
    state, buf = cached  # a prefill chunk: the cache's compressor state and entry buffer
    out = _continued(compressor, inputs[:, s:], rope[:, halo::m], state, axis, freqs, buf.dtype)
    return _store_closed(buf, _gather(out, axis), m, prior.start, prior.n_valid)  # [B, C_cache, .]

  cache = None if prior is None else prior.cache
  comp = compress(attn.compressor, x, None if cache is None else (cache.compressor, cache.entries))
  comp_seg = _gather(seg[:, halo::m], axis) if docs else None
  ikeys = None
  if attn.indexer is not None:
    ikeys = compress(attn.indexer.compressor, jax.lax.stop_gradient(x),
                     None if cache is None else (cache.indexer, cache.index_keys))
  return comp, ikeys, comp_seg


def _continued(compressor, inputs: Float[Array, "B S D"], entry_pos: Int[Array, "B n"], state,
               axis: str, freqs, dtype) -> Array:
  """The entries [B, n, width] of a prefill chunk's slice (`inputs`: for CSA, the window before
  the slice, then the slice; entry_pos: each window's first position) whose first window
  continues a cache: on the first device CSA's previous window is the cache's last closed one
  (its first halves are in `state`; empty for a chunk from position 0), elsewhere the halo's."""
  m = compressor.ratio
  c, z = compressor.project(inputs)  # window-aligned: position mod m = index mod m
  prev = None
  if compressor.overlap:
    w = c.shape[-1] // 2
    first = jax.lax.axis_index(axis) == 0
    prev = (jnp.where(first, state.prev_c, c[:, :m, :w]),
            jnp.where(first, state.prev_z, z[:, :m, :w]))
    c, z = c[:, m:], z[:, m:]
  pooled = pool_windows(c, z, m, compressor.overlap, prev)  # [B, n, width]
  cos, sin = rope_angles(entry_pos, freqs)
  return apply_rope(compressor.norm(pooled.astype(dtype)), cos, sin)


__all__ = ["ContextParallel", "context_parallel_layout", "full_attention", "halo_size",
           "prefill_attention", "query_blocks"]
