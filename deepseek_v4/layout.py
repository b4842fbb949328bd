"""How the trunk's layers are grouped for `jax.lax.scan`, and the official per-layer names.

A layer's kind is (attention kind, hash-routed), the attention kind a `deepseek_v4.kinds` object.
The layers are cut, left to right, into groups: a group is a period of kinds repeated `count`
times (Flash: `[SWA·h] x 2`, `[CSA·h]`, `[HCA, CSA] x 20`). A group with `count > 1` holds its parameters stacked on a leading `layers`
axis and runs under one scan; a group of one is a plain block. Inside the model a parameter is
`groups.G.blocks.S.<rest>` (with the leading axis when scanned); outside (checkpoints, freeze
patterns, error messages, summaries) it is the official `layers.N.<rest>`. This module is the one
table between the two: `path_name` turns any key path into the dotted model path, `official` turns
a key path into its official names, `model_path` goes back.
"""

from __future__ import annotations

import dataclasses
import re

import jax

from deepseek_v4.config import ModelConfig
from deepseek_v4.kinds import AttentionKind

MAX_PERIOD = 4  # longest repeating pattern looked for (V4 uses 1 and 2)


@dataclasses.dataclass(frozen=True)
class Group:
  """Layers `start .. start + len(kinds) * count - 1`: the period (kinds, hashed) x count."""

  start: int
  kinds: tuple[AttentionKind, ...]
  hashed: tuple[bool, ...]
  count: int

  @property
  def period(self) -> int:
    return len(self.kinds)

  @property
  def ratios(self) -> tuple[int, ...]:
    """The compression ratio of each slot's kind (0 = no entries)."""
    return tuple(k.ratio for k in self.kinds)

  @property
  def scanned(self) -> bool:
    return self.count > 1

  @property
  def size(self) -> int:
    return self.period * self.count

  def layer(self, repeat: int, slot: int) -> int:
    """The official index of the block at (repeat, slot)."""
    return self.start + repeat * self.period + slot


def layer_groups(cfg: ModelConfig, scan_layers: bool = True) -> tuple[Group, ...]:
  """Greedy cut into maximal repeats: at each layer, the period (<= MAX_PERIOD) whose repeats
  cover the most layers (the shortest period on ties); a kind that does not repeat stands alone.
  With `scan_layers=False` (`Options.scan_layers`) every layer is its own group."""
  kinds = [(k, cfg.is_hash_layer(i)) for i, k in enumerate(cfg.layer_kinds)]
  L, i, groups = len(kinds), 0, []
  while i < L:
    period, count = 1, 1
    if scan_layers:
      for p in range(1, MAX_PERIOD + 1):
        c = 1
        while i + (c + 1) * p <= L and kinds[i + c * p: i + (c + 1) * p] == kinds[i: i + p]:
          c += 1
        if c >= 2 and c * p > period * count:
          period, count = p, c
    attn, hashed = zip(*kinds[i: i + period])
    groups.append(Group(i, tuple(attn), tuple(hashed), count))
    i += period * count
  return tuple(groups)


def locate(cfg: ModelConfig | tuple[Group, ...], layer: int,
           scan_layers: bool = True) -> tuple[int, int, int]:
  """(group, repeat, slot) of official layer `layer`, in `layer_groups(cfg)` or in the groups
  given (a cache's `layer_groups`): the one place a layer index is turned into a group position."""
  groups = layer_groups(cfg, scan_layers) if isinstance(cfg, ModelConfig) else tuple(cfg)
  num_layers = sum(grp.size for grp in groups)
  if not 0 <= layer < num_layers:
    raise ValueError(f"layer {layer} is outside [0, {num_layers})")
  for g, grp in enumerate(groups):
    if grp.start <= layer < grp.start + grp.size:
      r, s = divmod(layer - grp.start, grp.period)
      return g, r, s
  raise AssertionError("unreachable")


_INNER = re.compile(r"^groups\.(\d+)\.blocks\.(\d+)\.(.+)$")
_OUTER = re.compile(r"^layers\.(\d+)\.(.+)$")


def path_name(path) -> str:
  """The dotted model path of a key path: an nnx path (`("groups", 3, "blocks", 1, "attn")`), a
  jax tree key path (`DictKey`, `SequenceKey`, `GetAttrKey` or any key with `.key` / `.idx`; an
  nnx.Variable's `value` payload is not part of the name) or a dotted string (returned as is)."""
  if isinstance(path, str):
    return path
  parts = []
  for k in path:
    if isinstance(k, (str, int)):
      parts.append(str(k))
      continue
    if isinstance(k, jax.tree_util.GetAttrKey):
      part = k.name
    else:
      part = getattr(k, "key", getattr(k, "idx", k))
    if part != "value":
      parts.append(str(part))
  return ".".join(parts)


def official(cfg: ModelConfig | None, path, scan_layers: bool = True
             ) -> list[tuple[str, int | None]]:
  """`official_names` of a key path (any form `path_name` takes); without a config (a module that
  is not a whole model), the dotted path itself, unstacked."""
  name = path_name(path)
  return [(name, None)] if cfg is None else official_names(cfg, name, scan_layers)


def official_names(cfg: ModelConfig, path: str, scan_layers: bool = True
                   ) -> list[tuple[str, int | None]]:
  """The official names held by one model path, each with its index on the stacked axis.

  `groups.3.blocks.1.attn.wq_a.weight` -> [("layers.4.attn.wq_a.weight", 0), ...]; paths outside
  the groups are their own official name (index None).
  """
  m = _INNER.match(path)
  if m is None:
    return [(path, None)]
  grp = layer_groups(cfg, scan_layers)[int(m.group(1))]
  slot, rest = int(m.group(2)), m.group(3)
  if not grp.scanned:
    return [(f"layers.{grp.layer(0, slot)}.{rest}", None)]
  return [(f"layers.{grp.layer(r, slot)}.{rest}", r) for r in range(grp.count)]


def model_path(cfg: ModelConfig, name: str, scan_layers: bool = True
               ) -> tuple[str, int | None]:
  """Inverse of `official_names`: (model path, stacked index or None) of an official name."""
  m = _OUTER.match(name)
  if m is None:
    return name, None
  g, r, s = locate(cfg, int(m.group(1)), scan_layers)
  grp = layer_groups(cfg, scan_layers)[g]
  return f"groups.{g}.blocks.{s}.{m.group(2)}", (r if grp.scanned else None)


_ATTN = re.compile(r"^(?:groups\.(\d+)\.blocks\.(\d+)|layers\.(\d+)|mtp\.\d+)\.attn\.(.+)$")


def attention_param(cfg: ModelConfig, path) -> tuple[AttentionKind, str] | None:
  """(the layer's attention kind, the name below `attn.`) of an attention parameter, given as a
  model path, an official name or an MTP path (any form `path_name` takes); None otherwise."""
  m = _ATTN.match(path_name(path))
  if m is None:
    return None
  g, slot, layer, rest = m.groups()
  if g is not None:
    return layer_groups(cfg)[int(g)].kinds[int(slot)], rest
  if layer is not None:
    return cfg.layer_kinds[int(layer)], rest
  return cfg.mtp_kind, rest
