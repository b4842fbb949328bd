"""Decode-time KV cache (docs/architecture.md#cache-kinds): fixed-capacity pytrees, so one compiled
step serves every position.

Per layer:
  * every kind: the sliding-window ring of the last W roped K=V vectors, slot `p mod W`, with the
    absolute position of each slot (negative = empty);
  * CSA / HCA: the compressed entries `[B, max_len // m, H]` (entry i is written once, when window
    i closes) and the compressor state: pending buffer `[B, m, K]` of the current incomplete
    window's values and biased gate logits (gates pre-filled with -inf = empty slot); CSA adds
    the overlap state `[B, m, K/2]`, the first halves of the last complete window;
  * CSA: the same for the indexer's own compressor, plus the indexer keys `[B, max_len // 4, J]`.

Each row of the batch has its own length (its next position), so prompts of different lengths are
right-padded and every row advances independently. The number of entries a row holds is
`lengths // m` (the count is derived, never stored twice). Plain generation never runs the MTP
block and caches nothing for it; speculative decoding keeps the MTP block's own window ring in a
separate `LayerCache` (`init_mtp_cache`, docs/speculative.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float, Int

from deepseek_v4 import layout
from deepseek_v4.config import ModelConfig
from deepseek_v4.kinds import AttentionKind
from kernels_pallas.common import PAD_POSITION


@struct.dataclass
class WindowCache:
  """Ring of the last W K=V vectors: kv [B, W, H]; pos [B, W] (PAD_POSITION = empty slot)."""

  kv: Float[Array, "B W H"]
  pos: Int[Array, "B W"]


@struct.dataclass
class CompressorState:
  """The not-yet-compressed tail of one compressor (docs/architecture.md#cache-kinds), all float32.

  pending_c / pending_z: values and biased gate logits of the current window, slot `p mod m`;
    empty slots hold (0, -inf) so they get zero weight.
  prev_c / prev_z: CSA only, series-A halves of the last complete window (same empty rule).
  """

  pending_c: Float[Array, "B m K"]
  pending_z: Float[Array, "B m K"]
  prev_c: Float[Array, "B m K2"] | None = None
  prev_z: Float[Array, "B m K2"] | None = None


@struct.dataclass
class LayerCache:
  """One layer's state, as its kind's `init_cache` fills it (deepseek_v4.kinds). Sliding layers
  fill only `window`; HCA adds `compressor` + `entries`; CSA adds the indexer's `indexer` state
  and `index_keys` as well; `extra` holds a user kind's own state (any pytree)."""

  window: WindowCache
  compressor: CompressorState | None = None
  entries: Float[Array, "B C H"] | None = None
  indexer: CompressorState | None = None
  index_keys: Float[Array, "B C J"] | None = None
  extra: Any = None


@struct.dataclass
class Cache:
  """Whole-model cache. `lengths[b]` = tokens row b holds = the position of its next token.

  `groups` follows the model's layer groups (`deepseek_v4.layout`): one tuple of LayerCaches per
  group (one per slot of its period), stacked on a leading [count] axis when the group is scanned,
  so decoding scans the cache alongside the parameters. `layer(i)` gives official layer i's.
  """

  groups: tuple[tuple[LayerCache, ...], ...]
  lengths: Int[Array, "B"]
  max_len: int = struct.field(pytree_node=False, default=0)
  layer_groups: tuple = struct.field(pytree_node=False, default=())

  @property
  def batch(self) -> int:
    return self.lengths.shape[0]

  def layer(self, i: int) -> LayerCache:
    """Official layer i's cache (a slice of its group's stack when scanned)."""
    g, r, s = layout.locate(self.layer_groups, i)
    c = self.groups[g][s]
    return jax.tree.map(lambda a: a[r], c) if self.layer_groups[g].scanned else c


def empty_compressor_state(batch: int, ratio: int, width: int, overlap: bool) -> CompressorState:
  """A fresh compressor tail: every slot empty (value 0, logit -inf)."""
  k = (2 if overlap else 1) * width
  zeros = lambda n: jnp.zeros((batch, ratio, n), jnp.float32)  # noqa: E731
  ninf = lambda n: jnp.full((batch, ratio, n), -jnp.inf, jnp.float32)  # noqa: E731
  if overlap:
    return CompressorState(zeros(k), ninf(k), zeros(width), ninf(width))
  return CompressorState(zeros(k), ninf(k))


def ring_size(cfg: ModelConfig, kind: AttentionKind, max_len: int) -> int:
  """Slots of a layer's window ring: its kind's window at `max_len` positions (W, or every
  position for a dense layer)."""
  return kind.window(cfg, max_len)


def init_layer_cache(cfg: ModelConfig, kind: AttentionKind, batch: int, max_len: int,
                     dtype) -> LayerCache:
  H, W = cfg.head_dim, ring_size(cfg, kind, max_len)
  window = WindowCache(kv=jnp.zeros((batch, W, H), dtype),
                       pos=jnp.full((batch, W), PAD_POSITION, jnp.int32))
  return LayerCache(window=window, **kind.init_cache(cfg, batch, max_len, dtype))


def init_cache(cfg, batch: int, max_len: int, dtype=None, *, scan_layers: bool | None = None
               ) -> Cache:
  """An empty cache for `batch` sequences of up to `max_len` tokens each.

  Args:
    cfg: the model (a `Transformer`: its config and the layer layout it was built with) or its
      `ModelConfig` (then the layout of `scan_layers`, default True, `Options.scan_layers`).
    batch: B.
    max_len: capacity in tokens (prompt + generated); positions 0 .. max_len - 1.
    dtype: storage dtype of window K=V, entries and indexer keys (default `cfg.dtype`); the
      compressor tails are always float32 (docs/architecture.md#cache-kinds).
  """
  if not isinstance(cfg, ModelConfig):  # a model: its own config and build-time layout
    if scan_layers is not None and scan_layers != cfg.options.scan_layers:
      raise ValueError(f"scan_layers={scan_layers} but the model was built with "
                       f"scan_layers={cfg.options.scan_layers}")
    cfg, scan_layers = cfg.cfg, cfg.options.scan_layers
  scan_layers = True if scan_layers is None else scan_layers
  if not (isinstance(batch, (int, np.integer)) and batch >= 1):
    raise ValueError(f"batch={batch!r} must be a positive integer")
  if not (isinstance(max_len, (int, np.integer)) and max_len >= 1):
    raise ValueError(f"max_len={max_len!r} must be a positive integer")
  if max_len > cfg.max_position_embeddings:
    raise ValueError(f"max_len={max_len} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  dtype = jnp.dtype(dtype or cfg.dtype)
  groups = []
  layer_groups = layout.layer_groups(cfg, scan_layers)
  for grp in layer_groups:
    slots = tuple(init_layer_cache(cfg, k, batch, max_len, dtype) for k in grp.kinds)
    if grp.scanned:
      slots = jax.tree.map(lambda a: jnp.broadcast_to(a, (grp.count, *a.shape)), slots)
    groups.append(slots)
  return Cache(groups=tuple(groups), lengths=jnp.zeros((batch,), jnp.int32),
               max_len=int(max_len), layer_groups=layer_groups)


def init_mtp_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> LayerCache:
  """An empty decode cache of the MTP block (its kind's window ring, `cfg.mtp_kind`) for
  speculative decoding (docs/speculative.md). Its positions are the trunk cache's: MTP position i
  holds the key of (X_i, token i+1)."""
  if cfg.num_mtp_layers == 0:
    raise ValueError("num_mtp_layers=0: the model has no MTP block to cache")
  return init_layer_cache(cfg, cfg.mtp_kind, batch, max_len, jnp.dtype(dtype or cfg.dtype))


def cache_bytes(cache) -> int:
  """Bytes held by every array of a cache (all rows); also takes `jax.eval_shape`'s abstract one."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


@dataclasses.dataclass(frozen=True)
class CachePart:
  """One kind of array the cache allocates, per sequence row, over the layers of one kind that hold
  it (docs/architecture.md#cache-bytes). The one byte model: `summary.kv_cache` and `plan` read it.

  Attributes:
    name: what is stored ("window K=V", "CSA entries", ...).
    kind: the name of the layer kind holding it ("sliding", "csa", "hca", ...), or "" for the
      row's length counter.
    role: "kv" (K=V vectors: window and compressed entries), "index" (indexer keys), "int32"
      (positions, the length counter) or "state" (the float32 compressor tails).
    layers: layers holding it.
    slots: slots per layer at the capacity.
    width: values per slot.
    itemsize: bytes per value as allocated.
    stride: tokens of context per slot (0 = fixed size, independent of the capacity).
  """

  name: str
  kind: str
  role: str
  layers: int
  slots: int
  width: int
  itemsize: int
  stride: int

  @property
  def bytes(self) -> int:
    return self.layers * self.slots * self.width * self.itemsize

  @property
  def per_token(self) -> float:
    """Amortized bytes one more token of context costs (0 for the fixed-size parts)."""
    return self.layers * self.width * self.itemsize / self.stride if self.stride else 0.0


def _layer_parts(cfg: ModelConfig, kind: AttentionKind, max_len: int, item: int) -> list[tuple]:
  """(name, role, slots, width, itemsize, stride) of every array `init_layer_cache` allocates for
  one row of a layer of `kind`, in the same order: the window ring, then the kind's own."""
  H, slots = cfg.head_dim, ring_size(cfg, kind, max_len)
  full = kind.window(cfg, max_len + 1) > slots  # the ring grows with the capacity: dense
  stride = 1 if full else 0
  parts = [("all keys (dense attention)" if full else f"sliding windows (W={cfg.window})",
            "kv", slots, H, item, stride),
           ("window positions", "int32", slots, 1, 4, stride)]
  return parts + kind.cache_parts(cfg, max_len, item)


def byte_model(cfg: ModelConfig, max_len: int, dtype=None) -> tuple[CachePart, ...]:
  """What `init_cache(cfg, 1, max_len, dtype)` allocates, part by part (summed over the layers of a
  kind): the trunk's layers only, since generation never runs the MTP block and so caches nothing
  for it, plus the row's int32 length counter."""
  item = jnp.dtype(dtype or cfg.dtype).itemsize
  merged: dict[tuple[str, str], list] = {}
  for kind in cfg.layer_kinds:
    for name, role, slots, width, size, stride in _layer_parts(cfg, kind, max_len, item):
      row = merged.setdefault((kind.component, name), [role, 0, slots, width, size, stride])
      row[1] += 1
  parts = [CachePart(name, kind, *row) for (kind, name), row in merged.items()]
  return (*parts, CachePart("row length", "", "int32", 1, 1, 1, 4, 0))


def model_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
  """Bytes `init_cache(cfg, batch, max_len, dtype)` allocates, from the byte model (no arrays)."""
  return batch * sum(p.bytes for p in byte_model(cfg, max_len, dtype))


def bytes_per_token(cfg: ModelConfig, dtype=None) -> float:
  """Cache bytes one more token of context costs per sequence (docs/architecture.md#cache-bytes,
  amortized): CSA entries + indexer keys (1 per 4 tokens) and HCA entries (1 per m' tokens), and
  every K=V vector (+ its position) with attention="dense"."""
  return sum(p.per_token for p in byte_model(cfg, 0, dtype))


def fixed_bytes(cfg: ModelConfig, dtype=None) -> int:
  """Per-sequence bytes that do not grow with the context: window rings (+ their positions), the
  float32 compressor tails and the row's length counter."""
  return sum(p.bytes for p in byte_model(cfg, 0, dtype) if not p.stride)


def capacity_multiple(cfg: ModelConfig) -> int:
  """lcm of the compression ratios: a max_len that is a multiple of it wastes no entry slot."""
  ratios = [k.ratio for k in cfg.layer_kinds if k.ratio > 0] or [1]
  return math.lcm(*ratios)
