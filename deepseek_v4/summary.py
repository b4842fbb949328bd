"""Model summary from shapes only: parameters, KV-cache bytes and FLOPs per token.

Nothing is allocated: the model is built under `nnx.eval_shape` and its abstract state is walked.
Sections of ARCHITECTURE.md used here: §1 (sizes and schedules), §5.3 (KV-cache bytes), §6.1
(tensor names, which are our parameter paths).

What is counted (and why the numbers match the published ones):

* Parameters are the `nnx.Param` leaves. The router balancing bias (`RouterBias`) and the frozen
  `tid2eid` tables (`HashTable`) are state, not parameters, and are reported as buffers.
* "Total" is the trunk without the MTP block. Flash: 284.33B without MTP (published 284B, +0.1%),
  290.94B with it (which would round to 291B), so the headline excludes MTP, as DeepSeek-V3's 671B
  did. Pro: 1.573T without MTP (-1.7% from 1.6T, which is a two-digit rounding of it) and 1.599T
  with. MTP shares the embedding and LM head; its line holds only its own block and glue.
* "Active per token" counts routed experts at K/E of their size and everything else fully (every
  token runs every attention, compressor, indexer, mHC site, norm, router, shared expert and the
  LM head). The published 13B / 49B match "active excl. embedding, without MTP": Flash 13.27B
  (+2.1%), Pro 48.85B (-0.3%); including the embedding table gives 13.80B / 49.78B.
* KV-cache bytes follow §5.3: main entries in DeepSeek's serving format are 64 rope channels in BF16
  plus the other channels in FP8 (576 B at c = 512, scales not counted), indexer keys FP4 (64 B at
  c_I = 128); the reference code stores everything in BF16. Each trunk layer also keeps a fixed
  ring of W window entries and their int32 positions; the MTP block caches nothing (generation
  never runs it). The rows come from `cache.byte_model`, which a test checks against the arrays
  `init_cache` allocates. The compressors' pending/overlap buffers (FP32, fixed
  size) are reported apart from the total, as the spec's table does. Flash at 1M: 3.62 GB / 7.22 GB.
* FLOPs are a forward pass without MTP, 2 FLOPs per multiply-accumulate: every active weight
  matrix (the embedding is a lookup, not a matmul), plus attention (q.k and p.v: 2 matmuls of
  N x c per key) over W window keys, min(k_I, ctx/4) selected CSA entries, ctx/ratio HCA entries,
  and the indexer's scoring of every visible CSA entry (H_I x c_I MACs per entry). Elementwise work
  (norms, softmax, Sinkhorn, pooling) is ignored. "At context ctx" is the token at position ctx - 1
  (a decode step with ctx tokens cached); "prefill mean" averages over positions 0 .. ctx - 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from deepseek_v4 import layout
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import kinds as kinds_lib
from deepseek_v4.config import ModelConfig
from deepseek_v4.layers.attention_kinds import sum_min
from deepseek_v4.layers.params import HashTable, RouterBias

# The report's headline figures (spec §1.1 notes): (total, active) parameters.
PUBLISHED = {"flash": (284e9, 13e9), "pro": (1.6e12, 49e9)}

COMPONENTS = (
  "embedding", "lm_head", "attn_sliding", "attn_csa", "attn_hca", "compressors", "indexers", "mhc",
  "norms", "router_gates", "routed_experts", "shared_experts",
)
LABELS = {
  "embedding": "embedding", "lm_head": "LM head",
  "attn_sliding": "attention projections (sliding)", "attn_csa": "attention projections (CSA)",
  "attn_hca": "attention projections (HCA)", "compressors": "main compressors",
  "indexers": "lightning indexers", "mhc": "mHC (hc_* fn/base/scale)", "norms": "RMSNorm weights",
  "router_gates": "router gates", "routed_experts": "routed experts",
  "shared_experts": "shared experts", "mtp": "MTP module (own weights)",
  "mtp_projections": "MTP e_proj/h_proj",
  "attn_core_sliding": "attention core (sliding: W keys)",
  "attn_core_csa": "attention core (CSA: W + top-k keys)",
  "attn_core_hca": "attention core (HCA: W + ctx/m keys)",
  "indexer_scores": "indexer scoring (ctx/4 entries)",
}



def _label(key: str) -> str:
  """The table label of a component or FLOPs key (a registered kind's: from its name)."""
  if key in LABELS:
    return LABELS[key]
  for prefix, what in (("attn_core_", "attention core"), ("attn_", "attention projections")):
    if key.startswith(prefix):
      return f"{what} ({key[len(prefix):]})"
  return key


# Serving-format widths (spec §5.3): rope channels BF16, the rest FP8; indexer keys FP4.
BF16_BYTES, FP8_BYTES, FP4_BYTES, FP32_BYTES = 2, 1, 0.5, 4


# ----- abstract model -----------------------------------------------------------------------------
def abstract_state(cfg: ModelConfig, keep_quantized: str | None = None
                   ) -> list[tuple[tuple, nnx.Variable]]:
  """(official path, abstract variable) for every leaf of `Transformer(cfg)` (routed experts
  stored as `keep_quantized` says), without allocating; the stacks of scanned layers are split
  into their layers (`layers.N.*`)."""
  from deepseek_v4 import abstract
  from deepseek_v4.options import Options

  return official_variables(cfg, abstract.model(cfg, options=Options(
    keep_quantized=keep_quantized)))


def official_variables(cfg: ModelConfig, model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
  """(official path, variable) for every leaf of `model` (abstract or concrete); the stacks of
  scanned layers are split into their layers (`layers.N.*`)."""
  out = []
  for path, stacked in nnx.to_flat_state(nnx.state(model)):
    for name, r in layout.official(cfg, path):
      official = tuple(int(p) if p.isdigit() else p for p in name.split("."))
      var = stacked
      if r is not None:  # one layer of a stack: drop the leading `layers` axis
        value = stacked.get_value()
        names = stacked.get_metadata().get("out_sharding")
        var = stacked.replace(jax.ShapeDtypeStruct(value.shape[1:], value.dtype),
                              out_sharding=tuple(names[1:]) if names else names)
      out.append((official, var))
  return out


def component(path: tuple, cfg: ModelConfig) -> str:
  """The summary component of a trunk parameter path (hub naming, e.g. layers.3.attn.wq_a.weight).

  RMSNorm weights (including q_norm, kv_norm and the compressors' entry norms) all count as
  "norms"; a compressor's wkv/wgate/ape are "compressors" (main) or "indexers" (indexer's own).
  """
  names = [p for p in path if isinstance(p, str)]
  if names[0] == "embed":
    return "embedding"
  if names[0] == "head":
    return "lm_head"
  if any(n.startswith("hc_") for n in names):
    return "mhc"
  if any(n.endswith("norm") for n in names):  # norm, q_norm, attn_norm, enorm, ...
    return "norms"
  if names[0] in ("e_proj", "h_proj"):
    return "mtp_projections"  # the MTP block's input glue
  if "indexer" in names:
    return "indexers"
  if "compressor" in names:
    return "compressors"
  if "attn" in names:
    kind = cfg.layer_kinds[path[1]] if path[0] == "layers" else cfg.mtp_kind
    return "attn_" + kind.component
  if "shared_experts" in names:
    return "shared_experts"
  if "experts" in names:
    return "routed_experts"
  if "gate" in names:
    return "router_gates"
  raise ValueError(f"parameter {'.'.join(map(str, path))} fits no summary component")


def _is_matmul(path: tuple, shape: tuple[int, ...]) -> bool:
  """Weights used as a per-token matmul: every matrix except the embedding lookup and `ape`."""
  return len(shape) >= 2 and path[0] != "embed" and path[-1] != "ape"


# ----- parameters ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts; `total`/`active`/`matmul` map component -> count (trunk, MTP excluded).

  Attributes:
    total: parameters per component.
    active: per-token active parameters per component (routed experts at K/E).
    matmul_active: active parameters that are per-token matmul weights (for FLOPs).
    mtp_total / mtp_active / mtp_matmul_active: the same for the MTP block, per component.
    buffers: non-parameter variables, name -> (elements, bytes).
    param_bytes: bytes of all parameters (with MTP) at the dtypes they are built with.
  """

  total: dict[str, int]
  active: dict[str, float]
  matmul_active: dict[str, float]
  mtp_total: dict[str, int]
  mtp_active: dict[str, float]
  mtp_matmul_active: dict[str, float]
  buffers: dict[str, tuple[int, int]]
  param_bytes: int

  @property
  def trunk(self) -> int:
    return sum(self.total.values())

  @property
  def mtp(self) -> int:
    return sum(self.mtp_total.values())

  @property
  def active_incl_embedding(self) -> float:
    return sum(self.active.values())

  @property
  def active_excl_embedding(self) -> float:
    return self.active_incl_embedding - self.active["embedding"]


def count_params(cfg: ModelConfig, keep_quantized: str | None = None) -> ParamCounts:
  """Counts parameters and buffers of `Transformer(cfg)` from its abstract state.

  With `keep_quantized` (`Options.keep_quantized`) the routed experts are held as FP4 codes and
  scales (`KeptWeight`): the counts are those of the logical (decoded) weights, and
  `param_bytes` what is held."""
  if keep_quantized:
    counts = count_params(cfg)
    held = sum(math.prod(v.get_value().shape) * np.dtype(v.get_value().dtype).itemsize
               for _, v in abstract_state(cfg, keep_quantized)
               if not isinstance(v, (RouterBias, HashTable)))
    return dataclasses.replace(counts, param_bytes=held)
  expert_frac = cfg.experts_per_token / cfg.num_experts
  parts: dict[str, dict[str, float]] = {
    k: {} for k in ("total", "active", "matmul", "mtp_total", "mtp_active", "mtp_matmul")
  }
  buffers: dict[str, list[int]] = {"router_bias": [0, 0], "hash_tables": [0, 0]}
  param_bytes = 0
  for path, var in abstract_state(cfg):
    value = var.get_value()
    size = math.prod(value.shape)
    nbytes = size * np.dtype(value.dtype).itemsize
    if isinstance(var, (RouterBias, HashTable)):
      b = buffers["router_bias" if isinstance(var, RouterBias) else "hash_tables"]
      b[0] += size
      b[1] += nbytes
      continue
    if not isinstance(var, nnx.Param):
      raise ValueError(f"unexpected variable type {type(var).__name__} at {path}")
    param_bytes += nbytes
    is_mtp = path[0] == "mtp"
    comp = component(path[2:] if is_mtp else path, cfg)
    active = size * (expert_frac if comp == "routed_experts" else 1.0)
    matmul = active if _is_matmul(path[2:] if is_mtp else path, value.shape) else 0.0
    prefix = "mtp_" if is_mtp else ""
    for key, v in (("total", size), ("active", active), ("matmul", matmul)):
      d = parts[prefix + key]
      d[comp] = d.get(comp, 0) + v
  # A registered kind's own component (attn_<component>) follows the V4 ones.
  comps = COMPONENTS + tuple(c for c in parts["total"] if c not in COMPONENTS)
  trunk = {k: {c: parts[k].get(c, 0) for c in comps} for k in ("total", "active", "matmul")}
  return ParamCounts(
    total={c: int(v) for c, v in trunk["total"].items()}, active=trunk["active"],
    matmul_active=trunk["matmul"], mtp_total={c: int(v) for c, v in parts["mtp_total"].items()},
    mtp_active=parts["mtp_active"], mtp_matmul_active=parts["mtp_matmul"],
    buffers={k: (v[0], v[1]) for k, v in buffers.items()}, param_bytes=param_bytes,
  )


# ----- KV cache -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheRow:
  """One line of the KV-cache table.

  Attributes:
    name: what is stored.
    layers: layers holding it.
    entries: entries per layer at the given context (fixed for windows and compressor state).
    bytes_serving / bytes_bf16: bytes per entry (serving format; all-BF16 as the reference stores).
    per_token_serving / per_token_bf16: amortized bytes per token of context per layer (0 when
      the size does not grow with the context).
  """

  name: str
  layers: int
  entries: int
  bytes_serving: float
  bytes_bf16: float
  per_token_serving: float
  per_token_bf16: float

  @property
  def total_serving(self) -> float:
    return self.layers * self.entries * self.bytes_serving

  @property
  def total_bf16(self) -> float:
    return self.layers * self.entries * self.bytes_bf16


@dataclasses.dataclass(frozen=True)
class KVCache:
  """KV-cache bytes of one sequence at `context` tokens (spec §5.1, §5.3).

  Attributes:
    context: tokens in the cache.
    rows: stored tensors (compressed entries, indexer keys, windows).
    state_bytes: FP32 compressor pending/overlap buffers, fixed-size, not in the totals.
  """

  context: int
  rows: list[CacheRow]
  state_bytes: int

  @property
  def total_serving(self) -> float:
    return sum(r.total_serving for r in self.rows)

  @property
  def total_bf16(self) -> float:
    return sum(r.total_bf16 for r in self.rows)

  @property
  def per_token_serving(self) -> float:
    return sum(r.layers * r.per_token_serving for r in self.rows)

  @property
  def per_token_bf16(self) -> float:
    return sum(r.layers * r.per_token_bf16 for r in self.rows)


def entry_bytes(cfg: ModelConfig) -> dict[str, float]:
  """Bytes of one main K=V entry and one indexer key, serving format and BF16 (spec §5.3)."""
  return {
    "main_serving": cfg.rope_dim * BF16_BYTES + cfg.nope_dim * FP8_BYTES,
    "main_bf16": cfg.head_dim * BF16_BYTES,
    "index_serving": cfg.index_head_dim * FP4_BYTES,
    "index_bf16": cfg.index_head_dim * BF16_BYTES,
  }


def kv_cache(cfg: ModelConfig, context: int) -> KVCache:
  """KV-cache bytes per stored tensor at `context` tokens, from the cache's own byte model
  (`cache.byte_model`: what `init_cache` allocates; the MTP block caches nothing), with each K=V
  vector and indexer key priced in the serving format and in BF16."""
  eb = entry_bytes(cfg)
  price = {"kv": (eb["main_serving"], eb["main_bf16"]),
           "index": (eb["index_serving"], eb["index_bf16"]), "int32": (4, 4)}
  merged: dict[str, list] = {}
  for p in cache_lib.byte_model(cfg, context):
    if p.role == "state":
      continue
    row = merged.setdefault(p.name, [0, p.slots, *price[p.role], p.stride])
    row[0] += p.layers
  rows = [CacheRow(name, layers, entries, serving, bf16, serving / stride if stride else 0.0,
                   bf16 / stride if stride else 0.0)
          for name, (layers, entries, serving, bf16, stride) in merged.items()]
  state = sum(p.bytes for p in cache_lib.byte_model(cfg, context) if p.role == "state")
  return KVCache(context=context, rows=rows, state_bytes=state)


# ----- FLOPs --------------------------------------------------------------------------------------
def attention_keys(cfg: ModelConfig, kind, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(attended keys, indexer-scored entries) of the token that has `ctx` tokens in context, in a
  layer of `kind` (an AttentionKind, or an official compress_ratios entry)."""
  kind = kinds_lib.as_kind(kind)
  window = np.minimum(kind.window(cfg, ctx), ctx)
  entries, scored = kind.entry_keys(cfg, ctx)
  return window + entries, scored


def attention_key_sums(cfg: ModelConfig, kind, context: int) -> tuple[int, int]:
  """`attention_keys` summed over ctx = 1 .. context, in closed form (exact integers): a prefill's
  totals without an array as long as the context."""
  kind = kinds_lib.as_kind(kind)
  W = kind.window(cfg, context)
  window = context * (context + 1) // 2 if W >= context else sum_min(W, context)
  entries, scored = kind.entry_key_sums(cfg, context)
  return window + entries, scored


def _attention_flops(cfg: ModelConfig, keys_of) -> dict:
  per_key = 2 * 2 * cfg.num_heads * cfg.head_dim  # q.k and p.v, 2 FLOPs per MAC
  per_entry = 2 * cfg.index_heads * cfg.index_head_dim
  out = {"attn_core_sliding": 0, "attn_core_csa": 0, "attn_core_hca": 0, "indexer_scores": 0}
  for kind in cfg.layer_kinds:
    keys, scored = keys_of(kind)
    core = "attn_core_" + kind.component
    out[core] = out.get(core, 0) + keys * per_key
    out["indexer_scores"] = out["indexer_scores"] + scored * per_entry
  return out


def attention_flops(cfg: ModelConfig, ctx: np.ndarray) -> dict[str, np.ndarray]:
  """Per-token attention FLOPs by layer kind, plus the indexer scoring, at context `ctx`."""
  return _attention_flops(cfg, lambda r: attention_keys(cfg, r, ctx))


def attention_flops_prefill_mean(cfg: ModelConfig, context: int) -> dict[str, float]:
  """`attention_flops` averaged over the tokens of a `context`-token prefill (ctx = 1 ..
  context), from closed-form sums: memory and time independent of the context."""
  sums = _attention_flops(cfg, lambda r: attention_key_sums(cfg, r, context))
  return {k: v / context for k, v in sums.items()}


@dataclasses.dataclass(frozen=True)
class Flops:
  """Forward FLOPs per token (MTP excluded).

  Attributes:
    context: the context length.
    matmul: weight matmuls per component (independent of the context).
    attention: attention cores and indexer scoring for the token at position context - 1.
    attention_prefill_mean: the same averaged over a prefill of `context` tokens.
  """

  context: int
  matmul: dict[str, float]
  attention: dict[str, float]
  attention_prefill_mean: dict[str, float]

  @property
  def total(self) -> float:
    return sum(self.matmul.values()) + sum(self.attention.values())

  @property
  def total_prefill_mean(self) -> float:
    return sum(self.matmul.values()) + sum(self.attention_prefill_mean.values())


def flops_per_token(cfg: ModelConfig, context: int, counts: ParamCounts | None = None) -> Flops:
  """Forward FLOPs per token at `context` (see the module docstring for what is counted)."""
  counts = counts or count_params(cfg)
  matmul = {c: 2.0 * v for c, v in counts.matmul_active.items() if v}
  at = {k: float(v) for k, v in attention_flops(cfg, np.int64(context)).items()}
  mean = {k: float(v) for k, v in attention_flops_prefill_mean(cfg, context).items()}
  return Flops(context=context, matmul=matmul, attention=at, attention_prefill_mean=mean)


# ----- the summary --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Summary:
  """Everything `summarize` reports. `name` is the preset name when unmodified, else None."""

  name: str | None
  config: ModelConfig
  params: ParamCounts
  kv: KVCache
  flops: Flops
  keep_quantized: str | None = None  # `Options.keep_quantized` of the counted model

  def to_dict(self) -> dict[str, Any]:
    p, kv, f = self.params, self.kv, self.flops
    d = {
      "name": self.name,
      "config": self.config.to_dict(),
      "params": {
        "by_component": p.total,
        "total_without_mtp": p.trunk,
        "mtp": p.mtp,
        "mtp_by_component": p.mtp_total,
        "total_with_mtp": p.trunk + p.mtp,
        "active_by_component": p.active,
        "active_incl_embedding": p.active_incl_embedding,
        "active_excl_embedding": p.active_excl_embedding,
        "mtp_active": sum(p.mtp_active.values()),
        "buffers": {k: {"elements": v[0], "bytes": v[1]} for k, v in p.buffers.items()},
        "param_bytes_as_built_with_mtp": p.param_bytes,
      },
      "kv_cache": {
        "context": kv.context,
        "rows": [dataclasses.asdict(r) | {"total_serving": r.total_serving,
                                          "total_bf16": r.total_bf16} for r in kv.rows],
        "total_serving_bytes": kv.total_serving,
        "total_bf16_bytes": kv.total_bf16,
        "per_token_serving_bytes": kv.per_token_serving,
        "per_token_bf16_bytes": kv.per_token_bf16,
        "compressor_state_bytes_fp32": kv.state_bytes,
      },
      "flops_per_token": {
        "context": f.context,
        "matmul": f.matmul,
        "attention_at_context": f.attention,
        "attention_prefill_mean": f.attention_prefill_mean,
        "total_at_context": f.total,
        "total_prefill_mean": f.total_prefill_mean,
      },
    }
    if self.name in PUBLISHED:
      total, active = PUBLISHED[self.name]
      d["published"] = {"total": total, "active": active}
    return d


def summarize(cfg: ModelConfig, context: int = 1048576, name: str | None = None,
              keep_quantized: str | None = None) -> Summary:
  """Parameters, KV cache and FLOPs of `cfg` from shapes only.

  Args:
    cfg: the model configuration.
    context: context length (tokens) for the KV-cache and FLOPs figures.
    name: preset name, used to compare against the published figures (None: no comparison).
  Returns:
    A Summary (see `format_summary` and `Summary.to_dict`).
  """
  if context < 1:
    raise ValueError(f"context={context} must be a positive number of tokens")
  counts = count_params(cfg, keep_quantized)
  return Summary(name=name, config=cfg, params=counts, kv=kv_cache(cfg, context),
                 flops=flops_per_token(cfg, context, counts), keep_quantized=keep_quantized)


# ----- text output --------------------------------------------------------------------------------
def human(n: float, unit: str = "") -> str:
  """12345678 -> '12.35M' (decimal prefixes)."""
  for div, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= div:
      return f"{n / div:.2f}{suffix}{unit}"
  return f"{n:.0f}{unit}" if float(n).is_integer() else f"{n:.1f}{unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                            for i, (c, w) in enumerate(zip(r, widths)))
  return [fmt(header), "-" * len(fmt(header)), *map(fmt, rows)]


def _params_lines(s: Summary) -> list[str]:
  p, cfg = s.params, s.config
  rows = [[_label(c), f"{p.total[c]:,}", human(p.total[c]), human(p.active[c])]
          for c in p.total if p.total[c]]
  rows.append(["total without MTP", f"{p.trunk:,}", human(p.trunk),
               human(p.active_incl_embedding)])
  rows.append([LABELS["mtp"], f"{p.mtp:,}", human(p.mtp), human(sum(p.mtp_active.values()))])
  rows.append(["total with MTP", f"{p.trunk + p.mtp:,}", human(p.trunk + p.mtp),
               human(p.active_incl_embedding + sum(p.mtp_active.values()))])
  out = [f"Parameters (routed experts active at K/E = {cfg.experts_per_token}/{cfg.num_experts}; "
         f"{human(p.param_bytes, 'B')} as built, {cfg.param_dtype} matrices"
         f"{', routed experts kept FP4' if s.keep_quantized else ''})"]
  out += _table(["component", "parameters", "", "active/token"], rows)
  out.append(f"active per token, without MTP: {human(p.active_incl_embedding)} incl. embedding, "
             f"{human(p.active_excl_embedding)} excl. embedding")
  buf = ", ".join(f"{k} {v[0]:,} ({human(v[1], 'B')})" for k, v in p.buffers.items() if v[0])
  out.append(f"buffers (not parameters): {buf or 'none'}")
  if s.name in PUBLISHED:
    total, active = PUBLISHED[s.name]
    with_mtp = p.trunk + p.mtp
    out.append(f"published ({s.name}): {human(total)} total / {human(active)} active. Here: total "
               f"{human(p.trunk)} without MTP ({p.trunk / total - 1:+.1%}), {human(with_mtp)} with "
               f"({with_mtp / total - 1:+.1%}); active {human(p.active_excl_embedding)} excl. "
               f"embedding ({p.active_excl_embedding / active - 1:+.1%}), "
               f"{human(p.active_incl_embedding)} incl. "
               f"({p.active_incl_embedding / active - 1:+.1%})")
  return out


def _kv_lines(kv: KVCache) -> list[str]:
  rows = [[r.name, str(r.layers), f"{r.entries:,}", f"{r.bytes_serving:g}", f"{r.bytes_bf16:g}",
           f"{r.per_token_serving:g}", f"{r.per_token_bf16:g}", human(r.total_serving, "B"),
           human(r.total_bf16, "B")] for r in kv.rows]
  rows.append(["total", "", "", "", "", f"{kv.per_token_serving:g}", f"{kv.per_token_bf16:g}",
               human(kv.total_serving, "B"), human(kv.total_bf16, "B")])
  out = [f"KV cache per sequence at context {kv.context:,} (serving: rope BF16 + rest FP8, "
         "indexer FP4; bf16: as the reference stores)"]
  out += _table(["stored", "layers", "entries/layer", "B/entry", "bf16", "B/token/layer", "bf16",
                 "total", "bf16"], rows)
  out.append(f"+ compressor pending/overlap state (FP32, fixed): {human(kv.state_bytes, 'B')}; "
             f"totals in GiB: {kv.total_serving / 2**30:.3f} serving, "
             f"{kv.total_bf16 / 2**30:.3f} bf16")
  return out


def _flops_lines(f: Flops) -> list[str]:
  rows = [[LABELS.get(k, k), human(v, "F"), human(v, "F")] for k, v in f.matmul.items()]
  for k, v in f.attention.items():
    if v or f.attention_prefill_mean[k]:
      rows.append([_label(k), human(v, "F"), human(f.attention_prefill_mean[k], "F")])
  rows.append(["total", human(f.total, "F"), human(f.total_prefill_mean, "F")])
  out = [f"Forward FLOPs per token (MTP excluded, 2 FLOPs/MAC): the token at position "
         f"{f.context - 1:,}, and the mean over a {f.context:,}-token prefill"]
  return out + _table(["part", "at context", "prefill mean"], rows)


def switches(cfg: ModelConfig) -> str:
  """The ablation switches of `cfg` in one line (`field=value`, as config.json stores them)."""
  attention = cfg.attention + {"hca": f" (hca_ratio={cfg.hca_ratio})"}.get(cfg.attention, "")
  streams = "" if cfg.residual == "plain" else f" (hc_mult={cfg.hc_mult})"
  return (f"residual={cfg.residual}{streams}, attention={attention}, "
          f"score_func={cfg.score_func}, router_bias={cfg.router_bias}, "
          f"hash_layers={cfg.num_hash_layers}")


def _layer_counts(kinds: tuple) -> str:
  """"2 sliding, 2 CSA, 2 HCA" (the V4 kinds always, zero or not), then any other kind; "all
  dense" when every layer is dense."""
  labels = [k.label for k in kinds]
  if set(labels) == {"dense"}:
    return "all dense"
  order = ["sliding", "CSA", "HCA"] + [x for x in dict.fromkeys(labels)
                                       if x not in ("sliding", "CSA", "HCA")]
  return ", ".join(f"{labels.count(x)} {x}" for x in order)


def format_summary(s: Summary) -> str:
  """The summary as plain-text tables."""
  cfg = s.config
  layers = _layer_counts(cfg.layer_kinds)
  head = (f"DeepSeek-V4 {s.name or 'custom config'}: {cfg.num_layers} layers "
          f"({layers}), D={cfg.d_model}, heads={cfg.num_heads}x{cfg.head_dim}, "
          f"experts={cfg.num_experts} (top-{cfg.experts_per_token}), MTP={cfg.num_mtp_layers}; "
          f"{switches(cfg)}")
  blocks = [[head], _params_lines(s), _kv_lines(s.kv), _flops_lines(s.flops)]
  return "\n\n".join("\n".join(b) for b in blocks)
