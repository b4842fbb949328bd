"""The V4 attention kinds (docs/architecture.md#layer-schedule): Sliding, Dense, CSA and HCA.

Each is a frozen dataclass registered in `deepseek_v4.kinds` (whose module doc says why a kind's
behavior lives in methods on its class). They live here, beside the layers, because they build the
compressor and the lightning indexer; `deepseek_v4/__init__.py` imports this module, so the V4
kinds are registered whenever the package is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_v4 import cache as cache_lib
from deepseek_v4.kinds import AttentionKind, EntrySources, register
from deepseek_v4.layers.compressor import Compressor
from deepseek_v4.layers.indexer import Indexer


def sum_min(cap: int, n: int) -> int:
  """sum_{c=1..n} min(cap, c)."""
  return n * (n + 1) // 2 if n <= cap else cap * (cap + 1) // 2 + (n - cap) * cap


def sum_floor(r: int, n: int) -> int:
  """sum_{c=1..n} floor(c / r)."""
  q = n // r
  return r * q * (q - 1) // 2 + q * (n - q * r + 1) if n >= 1 else 0


def sum_min_floor(cap: int, r: int, n: int) -> int:
  """sum_{c=1..n} min(cap, floor(c / r))."""
  if n < cap * r:
    return sum_floor(r, n)
  return sum_floor(r, cap * r - 1) + (n - cap * r + 1) * cap


@register
@dataclasses.dataclass(frozen=True)
class Sliding(AttentionKind):
  """Sliding window only: the last W keys (W = cfg.window), no compressed entries."""

  name = "sliding"


@register
@dataclasses.dataclass(frozen=True)
class Dense(AttentionKind):
  """Full causal attention: a sliding layer whose window spans every position the call can see
  (the `attention="dense"` ablation). Same parameters as Sliding, so it counts under its summary
  component; its cache ring holds every position."""

  name = "dense"

  @property
  def component(self) -> str:
    return "sliding"

  def window(self, cfg, span: int) -> int:
    return span


@dataclasses.dataclass(frozen=True)
class _Compressed(AttentionKind):
  """A layer with a main compressor of ratio m: entry j pools positions [j m, (j+1) m)
  (docs/architecture.md#compressor); `overlap` = CSA's two overlapping series."""

  overlap = False

  def validate(self, cfg) -> None:
    if not (isinstance(self.ratio, int) and not isinstance(self.ratio, bool) and self.ratio > 0):
      raise ValueError(f"{type(self).__name__}(ratio={self.ratio!r}): the ratio must be a "
                       "positive integer")

  def param_names(self) -> tuple[str, ...]:
    return ("compressor",)

  def build(self, cfg, lin: dict, rngs) -> dict:
    return {"compressor": Compressor(cfg.d_model, self.ratio, cfg.head_dim, self.overlap,
                                     cfg.rms_eps, **lin)}

  def full_entries(self, attn, x, cq, cos, sin, freqs, row_pos, doc_pos, segments, stage, impl,
                   block):
    comp = attn.compressor(x, freqs, doc_pos, segments)  # [B, T // m, H]
    comp_seg = None if segments is None else segments[:, : comp.shape[1] * self.ratio: self.ratio]
    return EntrySources(comp=comp, comp_seg=comp_seg)

  def extend_entries(self, attn, x, cq, positions, cos, sin, freqs, n_valid, cache, impl,
                     block):
    comp, state = attn.compressor.extend(x, positions[:, 0], n_valid, cache.compressor,
                                         cache.entries, freqs)
    return EntrySources(comp=comp), {"compressor": state, "entries": comp}

  def init_cache(self, cfg, batch, max_len, dtype) -> dict:
    H = cfg.head_dim
    return dict(compressor=cache_lib.empty_compressor_state(batch, self.ratio, H, self.overlap),
                entries=jnp.zeros((batch, max_len // self.ratio, H), dtype))

  def cache_parts(self, cfg, max_len, item) -> list[tuple]:
    # pending values + logits [m, K] (K = 2H with CSA's overlap) and CSA's prev halves [m, H] x 2
    H = cfg.head_dim
    return [(self.entries_name, "kv", max_len // self.ratio, H, item, self.ratio),
            ("compressor state", "state", self.ratio, (6 if self.overlap else 2) * H, 4, 0)]

  def block_entries(self, cfg, seq: int) -> int:
    return seq // self.ratio


@register
@dataclasses.dataclass(frozen=True)
class HCA(_Compressed):
  """Heavily compressed attention: window + every visible entry of a non-overlapping compressor
  with ratio m (docs/architecture.md#layer-kinds)."""

  name = "hca"
  ratio: int = 128

  @property
  def label(self) -> str:
    return "HCA"

  @property
  def entries_name(self) -> str:
    return f"HCA entries (m={self.ratio})"

  def validate(self, cfg) -> None:
    super().validate(cfg)
    if self.ratio == CSA().ratio:
      raise ValueError(f"HCA(ratio={self.ratio}): ratio {self.ratio} is CSA's "
                       "(docs/architecture.md#layer-schedule)")

  def entry_keys(self, cfg, ctx):
    return ctx // self.ratio, np.zeros_like(ctx)

  def entry_key_sums(self, cfg, context):
    return sum_floor(self.ratio, context), 0


@register
@dataclasses.dataclass(frozen=True)
class CSA(_Compressed):
  """Compressed sparse attention: window + the top-k entries (by the lightning indexer) of an
  overlapping compressor with ratio 4 (docs/architecture.md#layer-kinds, #indexer)."""

  name = "csa"
  ratio: int = 4
  overlap = True
  entries_name = "CSA entries"

  @property
  def label(self) -> str:
    return "CSA"

  @property
  def trains_indexer(self) -> bool:
    return True

  def validate(self, cfg) -> None:
    super().validate(cfg)
    for name in ("index_heads", "index_head_dim", "index_topk"):
      if getattr(cfg, name) <= 0:
        raise ValueError(f"{name}={getattr(cfg, name)} must be positive when a CSA layer exists"
                         f" (attention={cfg.attention!r})")
    if not (0 < cfg.rope_dim <= cfg.index_head_dim):
      raise ValueError(f"rope_dim={cfg.rope_dim} must fit in index_head_dim={cfg.index_head_dim}")

  def param_names(self) -> tuple[str, ...]:
    return ("compressor", "indexer")

  def build(self, cfg, lin: dict, rngs) -> dict:
    return {**super().build(cfg, lin, rngs), "indexer": Indexer(cfg, self.ratio, rngs=rngs)}

  def full_entries(self, attn, x, cq, cos, sin, freqs, row_pos, doc_pos, segments, stage, impl,
                   block):
    src = super().full_entries(attn, x, cq, cos, sin, freqs, row_pos, doc_pos, segments, stage,
                               impl, block)
    # The indexer reads detached inputs: it learns only from its own loss
    # (docs/architecture.md#indexer-training).
    sg = jax.lax.stop_gradient
    ikeys, iq, iw = attn.indexer.encode(sg(x), sg(cq), cos, sin, freqs, segments, doc_pos)
    idx = None
    if stage != "dense":  # dense warm-up: every visible entry, no selection
      idx = sg(attn.indexer.select(iq, iw, ikeys, row_pos, segments, src.comp_seg, impl=impl,
                                     block=block))
    return dataclasses.replace(src, comp_idx=idx, indexer=(iq, iw, ikeys))

  def extend_entries(self, attn, x, cq, positions, cos, sin, freqs, n_valid, cache, impl,
                     block):
    src, new = super().extend_entries(attn, x, cq, positions, cos, sin, freqs, n_valid, cache,
                                      impl, block)
    idx, new["index_keys"], new["indexer"] = attn.indexer.extend(
      x, cq, positions, cos, sin, freqs, n_valid, cache.indexer, cache.index_keys, impl, block)
    return dataclasses.replace(src, comp_idx=idx), new

  def init_cache(self, cfg, batch, max_len, dtype) -> dict:
    J = cfg.index_head_dim
    return {**super().init_cache(cfg, batch, max_len, dtype),
            "indexer": cache_lib.empty_compressor_state(batch, self.ratio, J, True),
            "index_keys": jnp.zeros((batch, max_len // self.ratio, J), dtype)}

  def cache_parts(self, cfg, max_len, item) -> list[tuple]:
    J = cfg.index_head_dim
    return super().cache_parts(cfg, max_len, item) + [
      ("CSA indexer keys", "index", max_len // self.ratio, J, item, self.ratio),
      ("indexer compressor state", "state", self.ratio, 6 * J, 4, 0)]

  def entry_keys(self, cfg, ctx):
    visible = ctx // self.ratio
    return np.minimum(cfg.index_topk, visible), visible

  def entry_key_sums(self, cfg, context):
    return (sum_min_floor(cfg.index_topk, self.ratio, context),
            sum_floor(self.ratio, context))

  def block_entries(self, cfg, seq: int) -> int:
    return min(cfg.index_topk, seq // self.ratio)

  def scored_entries(self, cfg, seq: int) -> int:
    return seq // self.ratio

  def activation_bytes(self, cfg, act: int, tp_heads: int) -> float:
    # indexer queries (+ f32 scores) and the overlapping compressor's two f32 series
    return (cfg.index_heads * (cfg.index_head_dim * act + 4) / tp_heads
            + 2 * 2 * cfg.head_dim * 4)

  def muon_blocks(self, cfg, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    # The overlapping compressors (main and indexer) project to series A and series B.
    if name in ("compressor.wkv.weight", "compressor.wgate.weight",
                "indexer.compressor.wkv.weight", "indexer.compressor.wgate.weight"):
      return (shape[-2] // 2, shape[-2] // 2)
    return None

  def seq_len_problem(self, cfg, seq_len: int) -> str | None:
    entries = seq_len // self.ratio
    if cfg.index_topk > entries:
      return (f"field 'index_topk' = {cfg.index_topk}: larger than the {entries} compressed "
              f"entries a CSA layer holds at seq_len={seq_len} (seq_len / {self.ratio}), so the "
              "top-k selects nothing; lower it")
    return None
