"""The key sources of one core-attention call (docs/architecture.md#core-attention) as typed
records.

A query attends, in one softmax with the sink, over up to three sources:
  Band            the T new tokens' own K=V, seen within the window W
                  (docs/architecture.md#sliding-window), optionally split into packed documents;
  Ring            older window keys: a decode cache ring of K=V and positions (< 0 = empty slot);
  VisibleEntries  HCA: every compressed entry with index < floor((p_t + 1) / m)
                  (docs/architecture.md#causality);
  PickedEntries   CSA: the compressed entries each query picked (the indexer's top-k, -1 = none).
`KeySources` holds a band, an optional ring and optional entries (one of the two kinds), and its
`kind` says which layer kind the call is ("sliding", "csa", "hca"), so no body guesses it from
which arrays happen to be None.

Each record checks its own shapes when built (ValueError naming the shape and the expected one);
`KeySources` checks that its parts agree with each other. They are JAX pytrees: the arrays are the
leaves, W and m are static (part of the tree structure), so records pass through jit, vmap,
custom_vjp and stop_gradient. Rebuilding from leaves skips the checks (JAX's tree utilities
rebuild records with placeholder leaves).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import ClassVar

import jax
from jaxtyping import Array, Float, Int


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape)


def _expect(record: str, name: str, x, want: tuple, pattern: str) -> None:
  """Raises unless x.shape == want (entries of `want` that are None match any size)."""
  got = _shape(x)
  if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)):
    shown = "(" + ", ".join("?" if w is None else str(w) for w in want) + ")"
    raise ValueError(f"{record}: {name} must be {pattern}={shown}, got shape {got}")


def _static_int(record: str, name: str, value, least: int) -> int:
  """value as a Python int >= least (a static of the tree structure: hashed, compared by value)."""
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{record}: {name} must be an int >= {least}, got {value!r}") from None
  if value < least:
    raise ValueError(f"{record}: {name} must be an int >= {least}, got {value!r}")
  return value


def _pytree(data: tuple[str, ...], static: tuple[str, ...] = ()):
  """Registers a frozen dataclass as a pytree: `data` fields are leaves (None = absent subtree),
  `static` fields go into the tree structure."""
  def register(cls):
    def flatten(r):
      return tuple(getattr(r, n) for n in data), tuple(getattr(r, n) for n in static)

    def unflatten(aux, leaves):
      r = object.__new__(cls)  # no __post_init__: leaves may be placeholders here
      for n, v in zip(data + static, tuple(leaves) + tuple(aux)):
        object.__setattr__(r, n, v)
      return r

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls

  return register


@_pytree(data=("kv", "segments"), static=("window",))
@dataclasses.dataclass(frozen=True)
class Band:
  """The window band: the T new tokens' K=V; query t sees those at positions (p_t - W, p_t].

  Attributes:
    kv: [B, T, H] K=V of the new tokens (`kv[:, t]` belongs to query t).
    window: W >= 1 (static).
    segments: [B, T] packed documents: each token's document id; a query then sees only keys and
      entries of its own document. Full sequences only (no `Ring`).
  """

  kv: Float[Array, "B T H"]
  window: int
  segments: Int[Array, "B T"] | None = None

  def __post_init__(self):
    if len(_shape(self.kv)) != 3:
      raise ValueError(f"Band: kv must be [B, T, H], got shape {_shape(self.kv)}")
    object.__setattr__(self, "window", _static_int("Band", "window", self.window, 1))
    if self.segments is not None:
      _expect("Band", "segments", self.segments, _shape(self.kv)[:2], "[B, T]")


@_pytree(data=("kv", "pos"))
@dataclasses.dataclass(frozen=True)
class Ring:
  """Older window keys of a decode cache ring (docs/architecture.md#decode-update).

  Attributes:
    kv: [B, S, H] K=V of the slots.
    pos: [B, S] their positions; < 0 marks an empty slot.
  """

  kv: Float[Array, "B S H"]
  pos: Int[Array, "B S"]

  def __post_init__(self):
    if len(_shape(self.kv)) != 3:
      raise ValueError(f"Ring: kv must be [B, S, H], got shape {_shape(self.kv)}")
    _expect("Ring", "pos", self.pos, _shape(self.kv)[:2], "[B, S]")


def _check_entries(record: str, kv, segments) -> None:
  if len(_shape(kv)) != 3:
    raise ValueError(f"{record}: kv must be [B, C, H], got shape {_shape(kv)}")
  if segments is not None:
    _expect(record, "segments", segments, _shape(kv)[:2], "[B, C]")


@_pytree(data=("kv", "segments"), static=("ratio",))
@dataclasses.dataclass(frozen=True)
class VisibleEntries:
  """HCA selection: query t sees every entry with index < floor((p_t + 1) / m).

  Attributes:
    kv: [B, C, H] compressed entries (normed, roped).
    ratio: m >= 1, tokens per entry (static).
    segments: [B, C] the document of each entry (with `Band.segments`).
  """

  kind: ClassVar[str] = "hca"
  kv: Float[Array, "B C H"]
  ratio: int
  segments: Int[Array, "B C"] | None = None

  def __post_init__(self):
    _check_entries("VisibleEntries", self.kv, self.segments)
    object.__setattr__(self, "ratio", _static_int("VisibleEntries", "ratio", self.ratio, 1))

  @property
  def usable(self) -> bool:
    """Whether any query could see an entry (there is at least one)."""
    return _shape(self.kv)[1] > 0


@_pytree(data=("kv", "picks", "segments"))
@dataclasses.dataclass(frozen=True)
class PickedEntries:
  """CSA selection: query t sees the entries it picked (docs/architecture.md#indexer).

  Attributes:
    kv: [B, C, H] compressed entries (normed, roped).
    picks: [B, T, P] entry indices per query, -1 = none; a repeated index counts twice.
    segments: [B, C] the document of each entry (with `Band.segments`).
  """

  kind: ClassVar[str] = "csa"
  kv: Float[Array, "B C H"]
  picks: Int[Array, "B T P"]
  segments: Int[Array, "B C"] | None = None

  def __post_init__(self):
    _check_entries("PickedEntries", self.kv, self.segments)
    _expect("PickedEntries", "picks", self.picks, (_shape(self.kv)[0], None, None), "[B, T, P]")

  @property
  def usable(self) -> bool:
    """Whether any query could see an entry (there are entries and slots to pick them)."""
    return _shape(self.kv)[1] > 0 and _shape(self.picks)[2] > 0


@_pytree(data=("band", "ring", "entries"))
@dataclasses.dataclass(frozen=True)
class KeySources:
  """Every key a call's queries attend over: the band, an optional ring, optional entries.

  Attributes:
    band: the new tokens' window keys.
    ring: older window keys (decode / chunked prefill), or None.
    entries: compressed entries with their selection (HCA: `VisibleEntries`, CSA:
      `PickedEntries`), or None (a sliding-window layer).
  """

  band: Band
  ring: Ring | None = None
  entries: VisibleEntries | PickedEntries | None = None

  def __post_init__(self):
    if not isinstance(self.band, Band):
      raise ValueError(f"KeySources: band must be a Band, got {type(self.band).__name__}")
    if self.ring is not None and not isinstance(self.ring, Ring):
      raise ValueError(f"KeySources: ring must be a Ring or None, got {type(self.ring).__name__}")
    if self.entries is not None and not isinstance(self.entries, (VisibleEntries, PickedEntries)):
      raise ValueError("KeySources: entries must be VisibleEntries, PickedEntries or None, got "
                       f"{type(self.entries).__name__}")
    B, T, H = _shape(self.band.kv)
    if self.ring is not None:
      _expect("KeySources", "ring.kv", self.ring.kv, (B, None, H), "[B, S, H]")
      if self.band.segments is not None:
        raise ValueError("KeySources: band.segments are for full sequences, not with a ring")
    e = self.entries
    if e is not None:
      _expect("KeySources", "entries.kv", e.kv, (B, None, H), "[B, C, H]")
      if isinstance(e, PickedEntries):
        _expect("KeySources", "entries.picks", e.picks, (B, T, None), "[B, T, P]")
      if self.band.segments is not None and e.segments is None:
        raise ValueError("KeySources: with band.segments, entries need segments [B, C] too")

  @property
  def kind(self) -> str:
    """The layer kind of the call: "sliding" (no entries), "csa" or "hca"."""
    return "sliding" if self.entries is None else self.entries.kind

  def without_unusable_entries(self) -> KeySources:
    """The same keys with entries no query can see dropped (no entries at all, or zero picks a
    query): the softmax is unchanged, and a body can run the call as a sliding window."""
    if self.entries is None or self.entries.usable:
      return self
    return dataclasses.replace(self, entries=None)
