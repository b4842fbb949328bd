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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from deepseek_v4 import sharding
from deepseek_v4.layers.attention_kinds import CSA, HCA, Sliding
from deepseek_v4.layers.compressor import store_entries
from deepseek_v4.layers.rope import rope_angles
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
  """A context-parallel prefill of a whole prompt into an empty layer cache, for a chunk at
  positions 0..T-1 (row b's first n_valid[b] tokens real): (output [B, T, D], the chunk's K=V
  [B, T, H] for the caller's window ring, the new cache fields but the window).

  The attention is `full_attention`'s (right padding comes after every real token, so it changes
  no real output). The cache ends gathered (every device holds all of it, like a plain decode
  cache): the entries and indexer keys the all-gather already brought, the window ring from the
  last W real tokens' K=V, and each compressor's tail (the open window and, for CSA, the last
  closed window's first halves) recomputed from the last <= 2m real tokens.
  """
  y, (kv, comp, ikeys), _ = _run(attn, x, positions, None, cp, stage="off", impl=impl,
                                 block=block, parts=True)
  new = {}
  if attn.compressor is not None:
    new["compressor"] = _tail_state(attn.compressor, x, n_valid, cache.compressor, attn.freqs)
    new["entries"] = _store_closed(cache.entries, comp, attn.ratio, n_valid)
  if attn.indexer is not None:
    sg = jax.lax.stop_gradient
    new["indexer"] = _tail_state(attn.indexer.compressor, sg(x), n_valid, cache.indexer,
                                 attn.freqs)
    new["index_keys"] = _store_closed(cache.index_keys, ikeys, attn.ratio, n_valid)
  return y, kv[:, : x.shape[1]], new


def _store_closed(buf: Float[Array, "B C W"], entries: Array, ratio: int, n_valid: Array):
  """The entries of the windows each row's real tokens close, written at their indices."""
  entry = jnp.arange(entries.shape[1])[None, :]
  return store_entries(buf, entries, entry, (entry + 1) * ratio <= n_valid[:, None])


def _tail_state(compressor, x: Float[Array, "B T D"], n_valid: Array, empty, freqs):
  """The compressor state after a row's n_valid tokens: `empty` fed the row's last closed window
  (CSA's overlap needs its first halves) and its open one, whose entries are not kept."""
  m = compressor.ratio
  lead = m if compressor.overlap else 0
  B = x.shape[0]
  start = jnp.maximum(n_valid // m * m - lead, 0)  # [B], a multiple of m
  xp = jnp.pad(x, ((0, 0), (0, lead + m), (0, 0)))
  tail = jax.vmap(lambda xb, s: jax.lax.dynamic_slice_in_dim(xb, s, lead + m, 0))(xp, start)
  dummy = jnp.zeros((B, 1, compressor.norm.weight.shape[0]), jnp.float32)  # entries: not kept
  _, state = compressor.extend(tail, start, n_valid - start, empty, dummy, freqs)
  return state


def _run(attn, x, positions, segments, cp: ContextParallel, *, stage: str, impl: str, block: int,
         parts: bool = False):
  """The output [B, T, D], with `parts` (K=V [B, T_pad, H], entries, indexer keys: all
  gathered, None where the layer has none) else None, and the indexer KL [sum, count] (zeros
  unless `stage` trains the indexer of a CSA layer).

  x, positions and segments are the layer's global arrays (GSPMD places them); the per-device
  work runs under `jax.shard_map`, manual over every mesh axis: the slice along `cp.axis`, the
  batch along `cp.batch_axes` where they divide it, the layer's parameters whole.
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

  def body(params, x, row, rope, seg, real):
    layer = nnx.merge(graphdef, params)
    y, more, kl = _slice_attention(layer, x, row, rope, seg, docs=docs, axis=cp.axis, n=n,
                                   halo=halo, window=window, impl=impl, block=block,
                                   query_block=cp.query_block, stage=stage, real=real)
    return (y, more, kl[None]) if parts else (y, kl[None])

  more_specs = (spec3, None if attn.compressor is None else whole,
                None if attn.indexer is None else whole)
  # Each device's KL [sum, count] of its queries, one row per device (summed outside, where a
  # psum's transpose cannot double-count).
  kl_spec = P((*(b_axes or ()), cp.axis), None)
  # check_vma=False: the kernels' loops carry values that vary over the manual axes; every
  # collective here is explicit, and the parameters' gradient is the sum over devices.
  run = jax.shard_map(body, mesh=cp.mesh, in_specs=(P(), spec3, spec, spec, spec, spec),
                      out_specs=(spec3, more_specs, kl_spec) if parts else (spec3, kl_spec),
                      check_vma=False)
  with sharding.context.suspended():
    out = run(params, x, row, rope, seg, real)
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
                     window: int, impl: str, block: int, query_block: int, stage: str = "off",
                     real=None):
  """One device's attention output [B, Tl, D] for its slice (x, positions, documents local),
  (its K=V [B, Tl, H], the gathered entries, the gathered indexer keys), and the indexer KL
  [sum, count] of its queries (zeros unless `stage` trains a CSA layer's indexer:
  docs/architecture.md#indexer-training; "dense" attends to every visible entry): the queries at
  tokens marked `real` [B, Tl] (the rest is the layer's padding; default all).

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
    comp, ikeys, comp_seg = _entries(attn, x, rope, seg, freqs, docs=docs, axis=axis, halo=halo)

  train_indexer = stage != "off" and attn.indexer is not None
  sg = jax.lax.stop_gradient

  def attend(x, row, rope, seg, real):  # queries [halo:] of a block with its halo before it
    cos, sin = rope_angles(rope, freqs)
    cq, q, kv = attn.project_qkv(x, cos, sin)
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


def _entries(attn, x, rope, seg, freqs, *, docs: bool, axis: str, halo: int):
  """Stage 2: this slice's compressed entries (and CSA's indexer keys) and, with documents,
  the entries' documents, all-gathered: (entries [B, C, H], indexer keys or None, documents or
  None)."""
  m = attn.ratio

  def compress(compressor, inputs):
    # The compressor reads its own overlap from the halo: windows start at a multiple of m
    # (the slice does), and the entry of the halo's window is the previous device's.
    lead = m if compressor.overlap else 0
    s = halo - lead
    out = compressor(inputs[:, s:], freqs, rope[:, s:], seg[:, s:])
    return _gather(out[:, lead // m:], axis)  # [B, C, width]

  comp = compress(attn.compressor, x)
  comp_seg = _gather(seg[:, halo::m], axis) if docs else None
  ikeys = None
  if attn.indexer is not None:
    ikeys = compress(attn.indexer.compressor, jax.lax.stop_gradient(x))
  return comp, ikeys, comp_seg


__all__ = ["ContextParallel", "context_parallel_layout", "full_attention", "halo_size",
           "prefill_attention", "query_blocks"]
