"""Context parallelism on paper: what splitting one sequence over N devices exchanges and adds
(`plan --context-parallel N`, docs/plan.md "Context parallelism").

Each of the N devices holds a contiguous slice of T / N tokens (the sequence padded to a multiple of
N x the lcm of the compression ratios, so no compression window straddles two slices). Per layer
the devices exchange, on the paper's two-stage scheme (docs/architecture.md#layer-kinds):

1. a neighbour exchange: each device sends the next one the tail of its slice that the next
   slice's first queries and compressor windows read, as the layer's attention input (width D):
   the last W - 1 tokens for the sliding band, or a whole window of m if more (CSA's overlapping
   compressors read the window before the slice; docs/architecture.md#compressor). HCA windows
   never overlap. (Their positions are computed where they are needed; packed documents add 4
   bytes per halo token for the document ids, not counted here.)
2. an all-gather over the N devices of the layer's compressed entries (T / m of width c) and, in a
   CSA layer, of the indexer keys (T / 4 of width c_I): every query may select any earlier entry.

A ring over the raw K=V head (what context parallelism of dense attention passes around) moves
T x c per layer instead. Everything here is arithmetic on the config: nothing is built.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from deepseek_v4.config import ModelConfig

MIB = 1 << 20


def padded_length(cfg: ModelConfig, seq: int, devices: int) -> int:
  """`seq` rounded up to a multiple of `devices` x lcm(compression ratios): every slice then holds
  whole compression windows (the padded tail is masked; it changes no real token)."""
  if devices < 1 or seq < 1:
    raise ValueError(f"seq={seq} and devices={devices} must be >= 1")
  ratios = [k.ratio for k in cfg.layer_kinds if k.ratio > 0] or [1]
  step = devices * math.lcm(*ratios)
  return -(-seq // step) * step


@dataclasses.dataclass(frozen=True)
class LayerExchange:
  """One layer kind's context-parallel traffic for one row of `seq` tokens (bytes).

  Attributes:
    kind: the kind's label ("sliding", "CSA", "HCA (m=128)").
    layers: trunk layers of this kind.
    neighbour: what one device sends the next (stage 1).
    entries: the layer's compressed entries at the full length, the all-gather's result (stage 2).
    index_keys: the indexer keys at the full length (CSA), likewise.
    ring_kv: the raw K=V head at the full length: what a ring over raw KV passes per layer.
  """

  kind: str
  layers: int
  neighbour: float
  entries: float
  index_keys: float
  ring_kv: float

  @property
  def gathered(self) -> float:
    """The all-gathered buffer every device holds during the layer's attention."""
    return self.entries + self.index_keys

  def received(self, devices: int) -> float:
    """Bytes one device receives in stage 2: the other N - 1 slices of the gathered buffer."""
    return self.gathered * (devices - 1) / devices


def exchanges(cfg: ModelConfig, seq: int, devices: int, dtype=None) -> list[LayerExchange]:
  """Per layer kind, what one layer exchanges for one row of `seq` tokens split over `devices`
  (the length padded as `padded_length`); K=V, entries and keys in `dtype` (default the compute
  dtype), compressor halves in float32."""
  T = padded_length(cfg, seq, devices)
  act = np.dtype(dtype or cfg.dtype).itemsize
  H, J = cfg.head_dim, cfg.index_head_dim
  rows: dict[object, list] = {}
  for kind in cfg.layer_kinds:
    if kind in rows:
      rows[kind][1] += 1
      continue
    neighbour = _halo(cfg, kind, T) * cfg.d_model * act  # the layer's input x
    entries = T // kind.ratio * H * act if kind.ratio else 0
    keys = T // kind.ratio * J * act if kind.trains_indexer else 0
    label = kind.label + (f" (m={kind.ratio})" if kind.name == "hca" else "")
    rows[kind] = [label, 1, neighbour, entries, keys, T * H * act]
  return [LayerExchange(*r) for r in rows.values()]


def _halo(cfg: ModelConfig, kind, T: int) -> int:
  """Tokens of the previous slice a layer of `kind` reads (layers/context_parallel.halo_size)."""
  band = min(kind.window(cfg, T), T) - 1  # keys before a slice's first query
  return max(band, kind.ratio if getattr(kind, "overlap", False) else 0)  # CSA: a window


def largest_halo(cfg: ModelConfig, seq: int, devices: int) -> int:
  """The most tokens any layer prepends to its slice (stage 1): what each query block carries
  before its queries (layers/context_parallel.py runs a block with the halo before it)."""
  T = padded_length(cfg, seq, devices)
  return max((_halo(cfg, kind, T) for kind in cfg.layer_kinds), default=0)


def largest_gathered(cfg: ModelConfig, seq: int, devices: int, rows: int = 1) -> float:
  """The largest all-gathered buffer of one layer for `rows` rows: what is alive per device
  during one attention (layers run one after the other)."""
  return rows * max((e.gathered for e in exchanges(cfg, seq, devices)), default=0.0)


def largest_neighbour(cfg: ModelConfig, seq: int, devices: int, rows: int = 1) -> float:
  return rows * max((e.neighbour for e in exchanges(cfg, seq, devices)), default=0.0)


def prefill_flops(cfg: ModelConfig, seq: int) -> float:
  """Forward FLOPs of a `seq`-token prefill of one row (summary's count: weight matmuls plus the
  attention cores and indexer scoring averaged over the prefill; MTP excluded)."""
  from deepseek_v4 import summary

  return summary.flops_per_token(cfg, seq).total_prefill_mean * seq


def prefill_seconds(cfg: ModelConfig, seq: int, devices: int, peak_flops: float = 790e12,
                    utilization: float = 0.4) -> float:
  """Wall time of a `seq`-token prefill of one row split over `devices` that each run at
  `utilization` of `peak_flops` (the paper's arithmetic: FLOPs / achieved rate)."""
  return prefill_flops(cfg, seq) / (devices * peak_flops * utilization)


def exchange_seconds(cfg: ModelConfig, seq: int, devices: int,
                     link_bytes_per_s: float = 900e9) -> dict[str, float]:
  """Seconds the whole trunk spends exchanging (all layers, one row), each device receiving over
  one link of `link_bytes_per_s` per direction (NVLink on an H200: 900 GB/s), with nothing
  overlapped: {'neighbour', 'all_gather', 'ring_kv' (the raw-KV ring instead)}."""
  out = dict(neighbour=0.0, all_gather=0.0, ring_kv=0.0)
  for e in exchanges(cfg, seq, devices):
    out["neighbour"] += e.layers * e.neighbour / link_bytes_per_s
    out["all_gather"] += e.layers * e.received(devices) / link_bytes_per_s
    out["ring_kv"] += e.layers * e.ring_kv * (devices - 1) / devices / link_bytes_per_s
  return out


def format_exchanges(cfg: ModelConfig, seq: int, devices: int) -> str:
  """The per-layer exchange table `plan --context-parallel` prints (MiB)."""
  T = padded_length(cfg, seq, devices)
  out = [f"per-layer exchange, one row of {T:,} tokens over {devices} devices (MiB)",
         f"{'kind':<14}{'layers':>7}{'neighbour':>11}{'entries':>10}{'index keys':>12}"
         f"{'received':>10}{'raw-KV ring':>13}"]
  for e in exchanges(cfg, seq, devices):
    out.append(f"{e.kind:<14}{e.layers:>7}{e.neighbour / MIB:>11.2f}{e.entries / MIB:>10.1f}"
               f"{e.index_keys / MIB:>12.1f}{e.received(devices) / MIB:>10.1f}"
               f"{e.ring_kv / MIB:>13.1f}")
  return "\n".join(out)
