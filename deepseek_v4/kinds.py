"""Attention layer kinds: one frozen dataclass per kind, and the registry of kinds by name.

A layer's kind (docs/architecture.md#layer-schedule, #layer-kinds) is one object: a frozen,
hashable dataclass whose fields are the kind's parameters (`HCA(ratio=128)`) and whose methods are
its row of the registry: which extra submodules the layer owns, the slice of the decode cache it
keeps and that slice's byte model, its keys per query (FLOPs), its summary component, its Muon
blocks, and how the core attention gets its keys. Every consumer (the layer, the cache, summary,
plan, Muon, the trainer) asks the kind; none branches on a ratio or a name.

Why methods on the class rather than a row object registered beside it: a kind and its behavior
cannot drift apart, a user kind is one `@register`-ed subclass, and a `ModelConfig` holding the
kind object needs no second lookup. Frozen dataclasses compare and hash by value, so a config full
of kinds is still a valid `jax.jit` static argument and `layout` can group equal kinds.

This module is a leaf (no project imports), so `config.py` can import it. The V4 kinds (Sliding,
Dense, CSA, HCA) build compressors and indexers, so they live beside the layers in
`deepseek_v4/layers/attention_kinds.py` and register themselves when `deepseek_v4` is imported;
`config.py` reaches them through `lookup` and `from_ratio` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np


@dataclasses.dataclass(frozen=True)
class EntrySources:
  """What a layer adds to the core attention beyond the window (docs/architecture.md#attention).

  Attributes:
    comp: [B, C, H] compressed entries, entry j summarizing positions [j m, (j+1) m) (m = the
      kind's `ratio`); None for a window-only layer.
    comp_idx: [B, T, k] the entries each query attends (a selection); None = every visible one.
    comp_seg: [B, C] document id of each entry (packed rows), or None.
    indexer: (query, weights, keys) of a lightning indexer, for its KL toward the attention in the
      indexer training stages (docs/architecture.md#indexer-training); None without an indexer.
  """

  comp: Any = None
  comp_idx: Any = None
  comp_seg: Any = None
  indexer: Any = None


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  """Base of every attention kind. Subclasses are frozen dataclasses, set `name`, and override
  the hooks their layer needs; the defaults describe a window-only layer without extra state.

  `cfg` below is the `ModelConfig`, `attn` the layer's `Attention` module (the shared projections,
  `attn.core`, and the submodules `build` returned, as attributes of the same names).
  """

  name: ClassVar[str] = ""

  # ----- structure ----------------------------------------------------------------------------
  @property
  def ratio(self) -> int:
    """Tokens per compressed entry (the core attention's entry stride); 0 = no entries."""
    return 0

  @property
  def component(self) -> str:
    """The summary component of the layer's attention projections: `attn_<component>`."""
    return self.name

  @property
  def label(self) -> str:
    """How the summary's headline counts layers of this kind."""
    return self.name

  @property
  def trains_indexer(self) -> bool:
    """The layer returns an indexer KL for the trainer to average
    (docs/architecture.md#indexer-training)."""
    return False

  def validate(self, cfg) -> None:
    """Raises ValueError naming the config fields this kind cannot run with."""

  def window(self, cfg, span: int) -> int:
    """W of the window branch when the call can see `span` positions (a sequence's T, a ring's
    slots)."""
    return cfg.window

  def rotary_compressed(self) -> bool:
    """Whether the layer's rotary uses the compressed theta (docs/architecture.md#rope)."""
    return self.ratio > 0

  def param_names(self) -> tuple[str, ...]:
    """The attributes of the extra submodules `build` creates (parameter path prefixes
    `attn.<name>.`), in checkpoint-name order."""
    return ()

  def build(self, cfg, lin: dict, rngs) -> dict[str, Any]:
    """The layer's extra submodules by attribute name (None = an empty slot). `lin` holds the
    std / param_dtype / rngs every `Linear` of the layer takes."""
    return {}

  # ----- forward ------------------------------------------------------------------------------
  def full_entries(self, attn, x, cq, cos, sin, freqs, row_pos, doc_pos, segments, stage: str,
                   impl: str, block: int) -> EntrySources:
    """The entries of a full sequence (`attn._full`); `stage` is the indexer training stage."""
    return EntrySources()

  def extend_entries(self, attn, x, cq, positions, cos, sin, freqs, n_valid, cache,
                     impl: str, block: int) -> tuple[EntrySources, dict]:
    """The entries of a cached chunk and the kind's new cache fields (`attn._extend`)."""
    return EntrySources(), {}

  # ----- the decode cache ---------------------------------------------------------------------
  def init_cache(self, cfg, batch: int, max_len: int, dtype) -> dict[str, Any]:
    """The kind's fields of the layer's `LayerCache` beyond the window ring (an empty cache)."""
    return {}

  def cache_parts(self, cfg, max_len: int, item: int) -> list[tuple]:
    """(name, role, slots, width, itemsize, stride) of every array `init_cache` allocates for one
    row, in its order (`cache.CachePart` documents the fields). The window ring is the cache's."""
    return []

  # ----- cost ---------------------------------------------------------------------------------
  def entry_keys(self, cfg, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(attended entries, indexer-scored entries) of the token with `ctx` tokens in context."""
    return np.zeros_like(ctx), np.zeros_like(ctx)

  def entry_key_sums(self, cfg, context: int) -> tuple[int, int]:
    """`entry_keys` summed over ctx = 1 .. context, exactly."""
    return 0, 0

  def block_entries(self, cfg, seq: int) -> int:
    """Entries one query block of a `seq`-token sequence attends beside the window (plan)."""
    return 0

  def scored_entries(self, cfg, seq: int) -> int:
    """Entries an indexer scores per query of a `seq`-token sequence (plan); 0 without one."""
    return 0

  def activation_bytes(self, cfg, act: int, tp_heads: int) -> float:
    """Per-token forward intermediates the kind adds to a block (plan's estimate)."""
    return 0.0

  def muon_blocks(self, cfg, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Row sizes of the independent matrices of the kind's own parameter `name` (the path below
    `attn.`), or None for one matrix."""
    return None

  def seq_len_problem(self, cfg, seq_len: int) -> str | None:
    """Why training at `seq_len` is pointless for this kind (ablation specs), or None."""
    return None

  # ----- the config.json boundary -------------------------------------------------------------
  def to_json(self) -> dict[str, Any]:
    """`{"kind": name, **fields}`: the project's encoding (config.json, checkpoint metadata)."""
    return {"kind": self.name, **dataclasses.asdict(self)}


_REGISTRY: dict[str, type[AttentionKind]] = {}


def register(cls: type[AttentionKind]) -> type[AttentionKind]:
  """Class decorator: makes `cls` a kind a config can hold and config.json can name."""
  if not (isinstance(cls, type) and issubclass(cls, AttentionKind)):
    raise TypeError(f"register({cls!r}): expected a subclass of AttentionKind")
  params = cls.__dict__.get("__dataclass_params__")  # the class itself, not only a base
  if params is None or not params.frozen:
    raise TypeError(f"register({cls.__name__}): a kind must be a frozen dataclass (hashable, "
                    "immutable), e.g. @dataclasses.dataclass(frozen=True)")
  if not cls.name:
    raise ValueError(f"register({cls.__name__}): set the class attribute `name`")
  old = _REGISTRY.get(cls.name)
  if old is not None and old.__qualname__ != cls.__qualname__:
    raise ValueError(f"kind name {cls.name!r} is taken by {old.__qualname__}")
  _REGISTRY[cls.name] = cls
  return cls


def registered() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def lookup(name: str) -> type[AttentionKind]:
  """The kind class registered as `name`."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention kind {name!r}; registered kinds: {list(_REGISTRY)} "
                     "(a user kind must be registered with deepseek_v4.kinds.register first)")
  return _REGISTRY[name]


def from_json(d: dict) -> AttentionKind:
  """Inverse of `AttentionKind.to_json`."""
  if not isinstance(d, dict) or "kind" not in d:
    raise ValueError(f"attention kind {d!r} must be a dict with a 'kind' name")
  fields = {k: v for k, v in d.items() if k != "kind"}
  cls = lookup(d["kind"])
  try:
    return cls(**fields)
  except TypeError as e:
    raise ValueError(f"attention kind {d!r}: {e}") from None


def from_ratio(ratio: int) -> AttentionKind:
  """The kind of an official `compress_ratios` entry (docs/architecture.md#layer-schedule): 0 is
  sliding window only, exactly 4 is CSA, any other positive ratio is HCA with that ratio."""
  if ratio == 0:
    return lookup("sliding")()
  if ratio == lookup("csa")().ratio:
    return lookup("csa")()
  return lookup("hca")(ratio=ratio)


def official_ratio(kind: AttentionKind) -> int | None:
  """Inverse of `from_ratio`: the official entry of `kind`, or None (no official encoding)."""
  r = 0 if kind.name == "sliding" else kind.ratio if kind.name in ("csa", "hca") else None
  return r if r is not None and from_ratio(r) == kind else None


def as_kind(entry: Any) -> AttentionKind:
  """A schedule entry as a kind: a kind itself, an official ratio, or a `to_json` dict."""
  if isinstance(entry, AttentionKind):
    return entry
  if isinstance(entry, dict):
    return from_json(entry)
  return from_ratio(entry)
