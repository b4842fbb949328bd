"""Per-device memory of a run on a mesh, from shapes and shardings (`python -m deepseek_v4 plan`,
deepseek_v4/plan_cli.py).

Nothing is allocated. The model is built under `nnx.eval_shape`, each variable's logical axes are
resolved by the rule table (deepseek_v4/sharding/rules.py) on the mesh's axis sizes, and the bytes
of one device's shard are added up. The same strict checks as a real run apply: a mesh axis that
does not divide a dimension is an error naming both numbers.

What is exact and what is estimated:

* exact (shapes x dtypes / shards): parameters, router buffers, gradients (trained parameters,
  parameter dtype), optimizer state, KV cache (the `deepseek_v4.cache` pytree: window rings,
  compressed entries, indexer keys in the compute dtype, float32 compressor tails; batch-sharded).
* optimizer: DeepSeek's recipe as train/optimizer.py builds it: Muon (one momentum buffer) for
  matrices, AdamW (two moments) for the embedding, LM head and every vector; `--optimizer adamw`
  puts all on AdamW. Moments in `--moment-dtype` (train/optimizer.py: float32). Frozen parameters
  (`--freeze REGEX`, re.search on dotted paths, as TrainConfig.freeze) have neither gradients nor
  state. A LoRA plan (`--lora-rank R`) counts the LoRA-wrapped model (lora.build_model) and trains
  only its adapters; over kept FP4 experts (QLoRA) the codes and scales are frozen parameters.
* estimated (activations): a block's attention and its MoE run one after the other, so one
  block's peak is the larger of the two working sets. Attention: the block's intermediates per
  token (mHC streams in float32, projections, the shared expert's float32 SwiGLU) and the
  attention/indexer working set of one query block (both run `Options.attn_block` queries per scan
  step). MoE: the expert-parallel all-to-all buffers of the path that will run
  (`Settings.all_to_all`: "ragged" on GPU/TPU, T_l * k send rows and a receive buffer of R rows;
  "buffer" on CPU, P * C rows each way; sizes from layers/moe_ep.py, dropless = worst case; T_l =
  the tokens one device holds inside the MoE's shard_map, i.e. the global tokens of a step or
  prefill chunk over every token shard, even when the batch itself is too small to split and is
  replicated outside the MoE), with three [D] buffers per received row on the tiled grouped
  matmul (`Settings.gmm`, what "auto" runs on GPU) and the float32 SwiGLU rows besides on
  ragged_dot. Besides the block: the streams at block boundaries, the parameters of one step of
  the layer scan (XLA copies them out of the stacked layers) and, in training, their float32
  weight gradients, and the float32 logits of the cross-entropy chunk; with
  `keep_quantized="experts"` the decoded expert weights (`Settings.gmm`: "tiled" decodes one
  expert per tile, "ragged_dot" decodes a layer's local experts up front; layers/moe_ffn.py).
  Kept FP4 experts are exact: 0.5 byte per weight for the packed codes plus 1/32 byte for the
  E8M0 scale of each 1x32 block. Training with `--remat full` keeps each block's input streams
  and recomputes the rest during the backward pass; `--remat none` keeps every intermediate.
  XLA's own workspace, fragmentation and the CUDA context are not modeled: `--headroom` reserves
  a fraction of device memory for them (default 10%). The estimates are checked against XLA's
  compiled memory for H200 (deepseek_v4/aot/memory.py, docs/plan.md "plan vs the compiler").
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from deepseek_v4 import layout, sharding
from deepseek_v4.config import ModelConfig
from deepseek_v4.layers.moe_ep import ALL_TO_ALL, capacity, ragged_rows
from deepseek_v4.options import Options

GMM_PATHS = ("tiled", "ragged_dot", "reference")


# ----- sizes -------------------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
  """'141GB' -> 141e9, '140GiB' -> 140 * 2**30, '8e9' -> 8e9 (decimal units unless 'iB').

  A number without a unit counts bytes; since no device has under 1 MB, such a size is refused
  ('141' surely meant 141GB) instead of read as 141 bytes.
  """
  m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text)
  try:
    number = float(m[1]) if m else math.nan
  except ValueError:
    number = math.nan
  if not (m and math.isfinite(number) and (m[2] or not m[3])):
    raise ValueError(f"device memory {text!r}: expected e.g. 141GB, 140GiB or 80e9")
  base = 1024 if m[3] else 1000
  value = int(number * base ** " KMGT".index(m[2] or " "))
  if value <= 0:
    raise ValueError(f"device memory {text!r} must be positive, e.g. 141GB (H200) or 80GB (H100)")
  if value < 10**6 and m[2]:
    raise ValueError(f"device memory {text!r} is {value} bytes, under 1 MB: no device is that "
                     f"small; expected e.g. 141GB (H200) or 80GB (H100)")
  if value < 10**6:
    raise ValueError(f"device memory {text!r} is {value} bytes: a number without a unit counts "
                     f"bytes; write e.g. {m[1]}GB or {m[1]}GiB")
  return value


def parse_capacity_factor(text: str) -> float:
  """'1.25' -> 1.25: a positive finite capacity factor (the runtime refuses 0, NaN and inf)."""
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f"capacity factor {text!r} is not a number; expected e.g. 1.25") from None
  _check_capacity_factor(value)
  return value


def _check_capacity_factor(value: float | None) -> None:
  if value is not None and not (math.isfinite(value) and value > 0):
    raise ValueError(f"capacity factor {value} must be a positive finite number (e.g. 1.25), or "
                     "None for dropless")


def parse_regex(text: str) -> str:
  """A `--freeze` pattern, checked to compile (returned as given)."""
  try:
    re.compile(text)
  except re.error as e:
    raise ValueError(f"{text!r} is not a regular expression: {e}") from None
  return text


def parse_mesh(text: str) -> dict[str, int]:
  """`sharding.parse_mesh`, refusing an axis named twice ('expert=8,expert=4' is ambiguous)."""
  names = [item.partition("=")[0].strip() for item in text.split(",") if item.strip()]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f"mesh {text!r} names the axis {', '.join(map(repr, twice))} more than "
                     "once; give each axis one size")
  return sharding.parse_mesh(text)


def gb(n: float) -> str:
  return f"{n / 1e9:.2f} GB"


def _itemsize(dtype) -> int:
  return np.dtype(dtype).itemsize


def _shards(spec, sizes: dict[str, int]) -> int:
  axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
  return math.prod(sizes[a] for a in axes)


# ----- default mesh ------------------------------------------------------------------------------
def default_mesh(cfg: ModelConfig, num_devices: int, *, devices_per_host: int = 8,
                 train: bool = False) -> dict[str, int]:
  """The mesh `plan` and the docs recommend (see docs/plan.md for the reasoning).

  Experts are ~97% of the parameters, so expert parallelism comes first: every device holds E/P
  whole experts and only tokens move. Inference keeps one model copy per host (`data` = hosts:
  decoding never crosses the slow inter-host link); training spreads parameters, gradients and
  optimizer state over every device (expert x fsdp = all devices, `data` = 1).
  """
  if num_devices < 1:
    raise ValueError(f"num_devices={num_devices} must be >= 1")
  if devices_per_host < 1:
    raise ValueError(f"devices_per_host={devices_per_host} must be >= 1")
  if num_devices > devices_per_host and num_devices % devices_per_host:
    raise ValueError(f"{num_devices} devices are not a whole number of hosts of "
                     f"devices_per_host={devices_per_host} (--devices-per-host); expected a "
                     f"multiple of {devices_per_host}")
  group = num_devices if train else math.gcd(num_devices, devices_per_host)
  expert = math.gcd(group, cfg.num_experts)
  return dict(data=num_devices // group, fsdp=group // expert, expert=expert, tensor=1)


def default_rules(sizes: dict[str, int]) -> str:
  if sizes["expert"] > 1:
    return "fsdp_ep"
  return "fsdp_tp" if sizes["tensor"] > 1 else "fsdp"


# ----- the plan ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
  """What is planned. `seq` is the training sequence length, or the cache capacity (prompt +
  generated tokens) for inference."""

  train: bool = False
  batch: int = 8
  seq: int = 4096
  grad_accum: int = 1
  remat: str = "full"
  optimizer: str = "muon"
  moment_dtype: str = "float32"
  param_dtype: str | None = None
  freeze: tuple[str, ...] = ()
  capacity_factor: float | None = None
  all_to_all: str = "ragged"  # expert-parallel path (layers/moe_ep.py): ragged on GPU/TPU
  prefill_chunk: int = 8192
  ce_chunk: int = 1024
  gmm: str = "tiled"  # grouped-matmul path (kernels_pallas/moe_gmm): what "auto" runs on GPU
  lora_rank: int = 0  # LoRA training (only the adapters train; QLoRA with kept FP4 experts)
  lora_targets: tuple[str, ...] = ("wq_a", "wq_b", "wkv", "wo_b")  # as TrainConfig.lora_targets
  # with a `context` mesh axis: the prefilled cache whole on each device (what decoding.prefill
  # leaves, docs/context_parallel.md#prefill) or split along the sequence; see context_plan


@dataclasses.dataclass
class Plan:
  """Per-device bytes by line; `total` sums them."""

  name: str
  mesh: dict[str, int]
  rules: str
  settings: Settings
  lines: list[tuple[str, float, str]]  # (label, bytes per device, note)
  notes: list[str]
  device_memory: int | None = None
  headroom: float = 0.1

  @property
  def total(self) -> float:
    return sum(b for _, b, _ in self.lines)

  @property
  def usable(self) -> float | None:
    return None if self.device_memory is None else self.device_memory * (1 - self.headroom)

  @property
  def fits(self) -> bool | None:
    return None if self.usable is None else self.total <= self.usable

  def to_dict(self) -> dict[str, Any]:
    return dict(name=self.name, mesh=self.mesh, rules=self.rules,
                settings=dataclasses.asdict(self.settings),
                lines=[dict(label=a, bytes_per_device=b, note=c) for a, b, c in self.lines],
                total_bytes_per_device=self.total, device_memory=self.device_memory,
                usable=self.usable, fits=self.fits, notes=self.notes)


def _is_adamw(path: str, ndim: int) -> bool:
  """DeepSeek's AdamW group, as the optimizer itself decides it (`optim.param_group`):
  embedding, LM head, norms, mHC biases and gates, sinks and the compressors' `ape`."""
  from deepseek_v4.optim.muon import ADAMW, param_group

  return param_group(path, ndim)[0] == ADAMW


def state_lines(cfg: ModelConfig, sizes: dict[str, int], rules: str, s: Settings,
                options: Options = Options()):
  """(lines, notes) for parameters, buffers, gradients and optimizer state."""
  from deepseek_v4.layers.moe import KeptWeight
  from deepseek_v4.layers.params import HashTable, RouterBias

  table = sharding.get_rules(rules).params
  frozen = [re.compile(parse_regex(p)) for p in s.freeze]
  matched: set[str] = set()
  mdt = _itemsize(s.moment_dtype)
  tot = dict(params=0.0, buffers=0.0, grads=0.0, opt=0.0, n_params=0, n_trained=0)
  largest = (0.0, "")
  per_layer = [0.0] * cfg.num_layers  # local parameter bytes of each trunk layer
  per_layer_trained = [0.0] * cfg.num_layers
  for path, var in _abstract_leaves(cfg, s, options):
    name = layout.path_name(path)
    shape = tuple(var.shape)
    spec = sharding.logical_to_spec(sharding.variable_names(var), shape, sizes, table, what=name)
    local = math.prod(shape) / _shards(spec, sizes)
    if isinstance(var, (RouterBias, HashTable)):
      tot["buffers"] += local * _itemsize(var.dtype)
      continue
    if isinstance(var, KeptWeight) and var.dtype != np.uint8:  # kept FP4 experts' E8M0 scales
      tot["params"] += local * _itemsize(var.dtype)
      continue
    item = _itemsize(var.dtype)  # matrices in param_dtype; norms, mHC, sinks, ape in float32
    tot["params"] += local * item
    if path[0] == "layers":
      per_layer[path[1]] += local * item
    tot["n_params"] += math.prod(shape) * (2 if isinstance(var, KeptWeight) else 1)  # FP4 pairs
    if local * item > largest[0]:
      largest = (local * item, name)
    hits = [p.pattern for p in frozen if p.search(name)]
    matched.update(hits)
    if not s.train or hits or not _trained(var, s):
      continue
    tot["n_trained"] += math.prod(shape)
    tot["grads"] += local * item
    if path[0] == "layers":
      per_layer_trained[path[1]] += local * item
    moments = 2 if s.optimizer == "adamw" or _is_adamw(name, len(shape)) else 1
    tot["opt"] += local * moments * mdt
  unmatched = [p.pattern for p in frozen if p.pattern not in matched]
  if unmatched:
    shown = ", ".join(f"/{u}/" for u in unmatched)
    raise ValueError(f"freeze pattern(s) {shown} match no parameter "
                     f"(re.search on dotted names such as 'layers.3.ffn.experts.w1', "
                     f"'embed.weight'); nothing would be frozen")
  kept = ", routed experts FP4" if options.keep_quantized == "experts" else ""
  lines = [(f"parameters ({tot['n_params'] / 1e9:.2f}B, matrices {cfg.param_dtype}{kept})",
            tot["params"], "exact"),
           ("router bias + hash tables", tot["buffers"], "exact")]
  if s.train:
    lines += [(f"gradients ({tot['n_trained'] / 1e9:.2f}B trained)", tot["grads"], "exact"),
              (f"optimizer state ({s.optimizer}, {s.moment_dtype} moments)", tot["opt"], "exact")]
  notes = [f"largest parameter shard: {largest[1]} ({gb(largest[0])})"]
  return lines, notes, (per_layer, per_layer_trained)


# ----- LoRA and QLoRA training (LoRA adapters over frozen, kept FP4 experts: docs/plan.md) --------
def lora_spec(s: Settings) -> tuple[tuple[str, ...], int, float] | None:
  """(targets, rank, alpha) of a LoRA plan (alpha does not change memory), None without LoRA."""
  return (s.lora_targets, s.lora_rank, 1.0) if s.lora_rank else None


def _abstract_leaves(cfg: ModelConfig, s: Settings, options: Options):
  """(official path, abstract variable) of every leaf of the planned model: the model as
  `summary.abstract_state` gives it, or, for a LoRA plan, the LoRA-wrapped model of
  `lora.build_model` split the same way (the adapters of scanned layers stacked like them)."""
  from deepseek_v4 import abstract, summary

  if not s.lora_rank:
    return summary.abstract_state(cfg, options.keep_quantized)
  return summary.official_variables(cfg, abstract.model(cfg, lora=lora_spec(s), options=Options(
    keep_quantized=options.keep_quantized)))


def _trained(var, s: Settings) -> bool:
  """Whether a (not frozen) parameter trains: with LoRA only the adapters do."""
  from flax import nnx

  return not s.lora_rank or isinstance(var, nnx.LoRAParam)


def check_kept_training(s: Settings, options: Options) -> None:
  """A training plan over routed experts kept as FP4 codes is a LoRA plan (QLoRA): the codes
  are frozen data (train/optimizer.py `check_kept` refuses training them)."""
  if s.train and options.keep_quantized and not s.lora_rank:
    raise ValueError(f"keep_quantized={options.keep_quantized!r} holds the routed experts as "
                     "frozen FP4 codes, which cannot be trained: plan a LoRA run over them "
                     "(--lora-rank R, QLoRA) or load them in param_dtype (keep_quantized=None)")
  if s.lora_rank < 0:
    raise ValueError(f"lora_rank={s.lora_rank} must be >= 0 (0: no LoRA)")


def check_expert_adapters(s: Settings, sizes: dict[str, int], rules: str) -> None:
  """Adapters on the routed experts run without expert parallelism only (layers/moe.py)."""
  r = sharding.get_rules(rules)
  if s.lora_rank and "experts" in s.lora_targets and r.expert_parallel and sizes["expert"] > 1:
    raise ValueError(f"LoRA target 'experts' runs without expert parallelism only, but the mesh "
                     f"has expert={sizes['expert']} under rules {rules!r}: drop 'experts' from "
                     "the targets or plan a mesh without an expert axis")


def scan_step_bytes(cfg: ModelConfig, per_layer: list[float]) -> float:
  """Parameters of one step of the layer scan, which XLA copies out of the stacked [count, ...]
  parameters (a dynamic slice per leaf): the largest period of a scanned group. 0 when no group
  is scanned (every layer has its own parameters)."""
  steps = [sum(per_layer[g.start:g.start + g.period]) for g in layout.layer_groups(cfg)
           if g.scanned]
  return max(steps) if steps else 0.0


def _batch_shards(sizes: dict[str, int], rules: str, batch: int, strict: bool) -> int:
  spec = sharding.logical_to_spec(("batch",), (batch,), sizes,
                                  sharding.get_rules(rules).activations, what="batch",
                                  strict=strict)
  return _shards(spec, sizes)


def _act_shards(sizes: dict[str, int], rules: str, name: str, dim: int) -> int:
  spec = sharding.logical_to_spec((name,), (dim,), sizes, sharding.get_rules(rules).activations,
                                  strict=False)
  return _shards(spec, sizes)


def block_bytes_per_token(cfg: ModelConfig, tp_heads: int, tp_mlp: int, ep: bool) -> float:
  """Intermediates of one block's forward pass per token (estimate; see the module docstring)."""
  act = _itemsize(cfg.dtype)
  M, D, N, H, F, X = (cfg.hc_mult, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.moe_inter_dim,
                      cfg.experts_per_token)
  mhc = 2 * (M * D * 4 + M * D * act + D * act)  # two sites: f32 streams, new streams, collapse
  attn = (cfg.q_lora_rank + 2 * H) * act + N * H * (2 * act + 4) / tp_heads  # q, o (+ f32 o)
  attn += cfg.o_groups * cfg.o_lora_rank * act / tp_heads
  attn += max(k.activation_bytes(cfg, act, tp_heads) for k in cfg.layer_kinds)  # e.g. CSA's
  shared = cfg.num_shared_experts * (3 * F * 4 / tp_mlp + D * 4)
  router = cfg.num_experts * 4 * 2
  routed = 0.0 if ep else X * (2 * D * act + 3 * F * 4 / tp_mlp + F * act / tp_mlp)
  return mhc + attn + shared + router + routed


def attention_block_bytes(cfg: ModelConfig, rows: int, seq: int, tp_heads: int,
                          attn_block: int = Options.attn_block) -> float:
  """One query block's attention + indexer working set (float32 scores, probabilities, keys), at
  `attn_block` queries per block (`Options.attn_block`)."""
  blk = min(attn_block, seq)
  keys = cfg.window + blk
  for kind in cfg.layer_kinds:
    keys = max(keys, min(kind.window(cfg, seq), seq) + blk + kind.block_entries(cfg, seq))
  N = cfg.num_heads / tp_heads
  core = rows * blk * (N * keys * 4 * 2 + keys * cfg.head_dim * 4)
  scored = max(kind.scored_entries(cfg, seq) for kind in cfg.layer_kinds)
  index = rows * blk * cfg.index_heads / tp_heads * scored * 4
  return core + index


def ep_buffer_bytes(cfg: ModelConfig, tokens: int, shards: int, cf: float | None,
                    tp_mlp: int, all_to_all: str = "ragged", gmm: str = "ragged_dot") -> float:
  """The expert-parallel dispatch/compute/combine buffers of one MoE (layers/moe_ep.py).

  `tokens` is T_l, the tokens of one device inside the MoE's shard_map. Received rows hold the
  input, its expert-sorted copy, the float32 SwiGLU inputs and output, and the expert output;
  the "ragged" path's send side holds only the T_l * k pairs (sorted rows, returned rows, and
  the rows back in token order), the "buffer" path sends and receives P * C rows. With the tiled
  grouped matmul (`gmm="tiled"`, what "auto" runs on GPU) the SwiGLU runs one tile at a time:
  a received row holds three [D] buffers (the rows, their expert-sorted copy and the tile-aligned
  layout; the expert output reuses one), not the float32 SwiGLU activations. XLA's buffer
  assignment for Flash on 8 H200s shows exactly these at the MoE's peak of a scanned layer; with
  two adjacent unscanned MoE layers (Flash cut to 4 layers) it overlapped six.
  """
  if all_to_all not in ALL_TO_ALL:
    raise ValueError(f"all_to_all={all_to_all!r} must be one of {ALL_TO_ALL}")
  act = _itemsize(cfg.dtype)
  E_l = cfg.num_experts // shards
  X, D, F = cfg.experts_per_token, cfg.d_model, cfg.moe_inter_dim
  per_row = 4 * D * act + 3 * F * 4 / tp_mlp + F * act / tp_mlp
  if all_to_all == "buffer":
    rows = shards * capacity(tokens, X, E_l, shards, cf)
    return rows * (per_row + 3 * 4)
  rows = ragged_rows(tokens, X, E_l, shards, cf)
  if gmm == "tiled":
    per_row = 3 * D * act
  return tokens * X * (3 * D * act + 2 * 4) + rows * (per_row + 2 * 4)


def decoded_experts_line(cfg: ModelConfig, expert_shards: int, gmm: str):
  """The decoded copies of kept FP4 experts alive at once (layers/moe_ffn.py): one expert's
  w1, w2, w3 on the tiled path, every local expert of one layer on ragged_dot / reference."""
  if gmm not in GMM_PATHS:
    raise ValueError(f"gmm={gmm!r} must be one of {GMM_PATHS}")
  one = 3 * cfg.moe_inter_dim * cfg.d_model * _itemsize(cfg.dtype)
  if gmm == "tiled":
    return ("decoded FP4 experts (tiled: one expert per tile)", float(one), "estimate")
  local = cfg.num_experts // expert_shards
  return (f"decoded FP4 experts ({gmm}: {local} experts of one layer)", float(local * one),
          "estimate")


def activation_lines(cfg: ModelConfig, sizes: dict[str, int], rules: str, s: Settings,
                     step_params: float = 0.0, step_trained: float = 0.0,
                     options: Options = Options()):
  """Activation lines. A block's attention and its MoE run one after the other, so the block's
  peak is the larger of the two working sets (XLA reuses one's buffers for the other); the
  block-boundary streams, the parameters of one step of the layer scan (`scan_step_bytes`) and,
  in training, the float32 weight gradients of that step are alive across both."""
  r = sharding.get_rules(rules)
  ep = r.expert_parallel
  tp_h = _act_shards(sizes, rules, "heads", cfg.num_heads)
  tp_f = _act_shards(sizes, rules, "mlp", cfg.moe_inter_dim)
  tp_v = _act_shards(sizes, rules, "vocab", cfg.vocab_size)
  shards = _batch_shards(sizes, rules, s.batch, strict=s.train)
  rows = s.batch // shards if s.batch % shards == 0 else s.batch
  per_block = block_bytes_per_token(cfg, tp_h, tp_f, ep)
  ep_shards = sizes[dict(r.params)["expert"]] if ep else 1
  token_shards = _act_shards(sizes, rules, "batch", math.prod(sizes.values()))  # MoE shard_map
  act = _itemsize(cfg.dtype)
  stream = cfg.hc_mult * cfg.d_model * act
  L = cfg.num_layers + cfg.num_mtp_layers
  cf = "dropless" if s.capacity_factor is None else f"capacity factor {s.capacity_factor}"
  if s.train:
    if rows % s.grad_accum:
      raise ValueError(f"{rows} rows per device not divisible by grad_accum={s.grad_accum}")
    rows //= s.grad_accum
    n = rows * s.seq
    saved = L * n * (stream if s.remat == "full" else per_block)
    work = n * per_block * (2 if s.remat == "full" else 1)
    work += attention_block_bytes(cfg, rows, s.seq, tp_h, options.attn_block) * 3
    t_l = -(-s.batch // s.grad_accum * s.seq // token_shards)
    moe = 2 * ep_buffer_bytes(cfg, t_l, ep_shards, s.capacity_factor, tp_f, s.all_to_all,
                              s.gmm) if ep else 0.0
    logits = min(s.ce_chunk, n) * cfg.vocab_size * 4 * 3 / tp_v
    grads32 = step_trained * 4 / _itemsize(cfg.param_dtype)
    lines = [(f"saved activations ({L} blocks, remat {s.remat})", saved, "estimate"),
             ("one block's backward (max of attention, MoE)", max(work, moe), "estimate"),
             ("one scan step: parameters + float32 weight gradients", step_params + grads32,
              "estimate")]
    head = f"rows/device per micro-batch {rows} x {s.seq} tokens"
    what = "recompute + backward"
  else:
    chunk = min(s.prefill_chunk, s.seq)
    n = rows * chunk
    work = n * per_block + attention_block_bytes(cfg, rows, s.seq, tp_h, options.attn_block)
    t_l = -(-s.batch * chunk // token_shards)  # a replicated batch is split inside the MoE
    moe = ep_buffer_bytes(cfg, t_l, ep_shards, s.capacity_factor, tp_f, s.all_to_all,
                          s.gmm) if ep else 0.0
    logits = rows * cfg.vocab_size * 4 * 2 / tp_v
    lines = [(f"prefill chunk of {chunk} tokens: streams in and out", 2 * n * stream,
              "estimate"),
             ("one block (max of attention, MoE)", max(work, moe), "estimate"),
             ("one scan step's parameters", step_params, "estimate")]
    head = f"rows/device {rows}, cache capacity {s.seq} tokens"
    what = "forward"
  if options.keep_quantized == "experts":
    lines.append(decoded_experts_line(cfg, ep_shards, s.gmm))
  lines.append(("logits (float32)", logits, "estimate"))
  block = (f"one block's {what}: attention {gb(work)}, MoE all-to-all ({s.all_to_all}, "
           f"{s.gmm} gmm, {cf}) {gb(moe)}")
  return lines, [head, block]


def cache_lines(cfg: ModelConfig, sizes: dict[str, int], rules: str, s: Settings):
  from deepseek_v4 import cache as cache_lib

  shards = _batch_shards(sizes, rules, s.batch, strict=False)
  total = cache_lib.model_bytes(cfg, s.batch, s.seq)  # = the init_cache pytree (test_cache_bytes)
  return [(f"KV cache ({s.batch} x {s.seq} tokens, {cfg.dtype})", total / shards, "exact")]


def make_plan(cfg: ModelConfig, mesh: dict[str, int], rules: str | None = None,
              settings: Settings = Settings(), *, name: str = "custom",
              device_memory: int | None = None, headroom: float = 0.1,
              options: Options = Options()) -> Plan:
  """The per-device memory plan of `cfg` on a mesh of axis sizes `mesh` (no devices needed), run
  with `options` (its keep_quantized and attn_block; the layers scanned as `layout` groups them).

  Raises:
    ValueError: a mesh axis that does not divide a parameter dimension (or, when training, the
      batch), or bad settings; the message names the numbers.
  """
  sizes = {**dict.fromkeys(sharding.MESH_AXES, 1), **mesh}
  rules = rules or default_rules(sizes)
  s = settings
  if s.remat not in ("full", "none") or s.optimizer not in ("muon", "adamw"):
    raise ValueError(f"remat={s.remat!r} (full|none), optimizer={s.optimizer!r} (muon|adamw)")
  _check_capacity_factor(s.capacity_factor)
  cfg = cfg if s.param_dtype is None else cfg.replace(param_dtype=s.param_dtype)
  check_kept_training(s, options)
  check_expert_adapters(s, sizes, rules)
  if sizes.get("context", 1) > 1:  # one sequence split over devices: its own activation model
    return context_plan(cfg, sizes, rules, s, name, device_memory, headroom, options)
  lines, notes, (per_layer, trained) = state_lines(cfg, sizes, rules, s, options)
  act, act_notes = activation_lines(cfg, sizes, rules, s, scan_step_bytes(cfg, per_layer),
                                    scan_step_bytes(cfg, trained), options)
  lines += act
  if not s.train:
    lines += cache_lines(cfg, sizes, rules, s)
  return Plan(name, sizes, rules, s, lines, act_notes + notes, device_memory, headroom)


# ----- context parallelism (docs/plan.md "Context parallelism") ---------------------------------


def devices_per_context(devices: int, context: int) -> int:
  """The devices of one context group's sequence slice: `devices` / `context` (an error naming
  both when it does not divide)."""
  if devices % context:
    raise ValueError(f"{devices} devices cannot hold a context axis of {context}: expected a "
                     f"device count that is a multiple of {context}")
  return devices // context


def with_context(sizes: dict[str, int], context: int) -> dict[str, int]:
  """`sizes` with a `context` axis of size `context` (refused when it already has another)."""
  if sizes.get("context", 1) not in (1, context):
    raise ValueError(f"the mesh already has context={sizes['context']}, but context parallelism "
                     f"{context} was asked for; give one of them")
  return {**sizes, "context": context}


def _token_shards(sizes: dict[str, int], rules: str) -> int:
  """Devices the tokens of a step are split over inside the MoE's shard_map: the batch axes, and
  the `context` axis, which splits the sequence (counted once if the rules already list it)."""
  spec = sharding.logical_to_spec(("batch",), (math.prod(sizes.values()),), sizes,
                                  sharding.get_rules(rules).activations, strict=False)
  axes = {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
  return _shards(spec, sizes) * (1 if "context" in axes else sizes.get("context", 1))


def context_slice_bytes_per_token(cfg: ModelConfig, tp_heads: int, tp_mlp: int) -> float:
  """Per token of a device's whole slice, what one context-parallel block holds over the slice
  (layers/context_parallel.py): the hyper-connections' streams (as `block_bytes_per_token`),
  the attention's output and K=V (the query blocks' results, stacked), the compressors' float32
  series (the main one and CSA's indexer's, each run once over the slice), the shared expert and
  the router (token-wise, over the slice)."""
  act = _itemsize(cfg.dtype)
  M, D, H, J, F = cfg.hc_mult, cfg.d_model, cfg.head_dim, cfg.index_head_dim, cfg.moe_inter_dim
  mhc = 2 * (M * D * 4 + M * D * act + D * act)
  series = lambda k: (2 if getattr(k, "overlap", False) else 1) * 2 * 4  # kv and gate, f32
  comp = max((series(k) * (H + (J if k.trains_indexer else 0)) for k in cfg.layer_kinds
              if k.ratio), default=0)
  shared = cfg.num_shared_experts * (3 * F * 4 / tp_mlp + D * 4)
  return mhc + (D + H) * act + comp + shared + cfg.num_experts * 4 * 2


def context_query_bytes_per_token(cfg: ModelConfig, tp_heads: int) -> float:
  """Per token of one query block (its queries and the halo before them, under `jax.lax.map` in
  layers/context_parallel.py): the query's low-rank input and the block's recomputed K=V, the
  heads' q, its float32 normalization and o, the grouped output projection's input, and CSA's
  indexer queries and weights."""
  act = _itemsize(cfg.dtype)
  N, H, J = cfg.num_heads, cfg.head_dim, cfg.index_head_dim
  out = (cfg.q_lora_rank + H) * act + N * H * (2 * act + 4) / tp_heads
  out += cfg.o_groups * cfg.o_lora_rank * act / tp_heads
  return out + max((cfg.index_heads * (J * act + 4) / tp_heads for k in cfg.layer_kinds
                    if k.trains_indexer), default=0)


def context_query_block(cfg: ModelConfig, seq: int, devices: int) -> int:
  """Queries per block of a device's slice of the padded `seq` (layers/context_parallel.py's
  `query_blocks` at `ContextParallel.query_block`)."""
  from deepseek_v4 import plan_context
  from deepseek_v4.layers.context_parallel import ContextParallel, query_blocks

  Tl = plan_context.padded_length(cfg, seq, devices) // devices
  return Tl // query_blocks(Tl, ContextParallel.query_block)


def context_activation_lines(cfg: ModelConfig, sizes: dict[str, int], rules: str, s: Settings,
                             step_params: float = 0.0, step_trained: float = 0.0,
                             options: Options = Options(), gathered_weights: float = 0.0):
  """`activation_lines` with each row's sequence split over the `context` axis (N devices).

  Token-wise intermediates (streams, the compressors, the MoE) hold T / N tokens per device
  (`context_slice_bytes_per_token`); in the prefill the query-side ones exist for one query block
  at a time, its queries and the halo before them (`context_query_bytes_per_token`,
  `context_query_block`). A layer's attention also holds what context parallelism adds
  (deepseek_v4/plan_context.py): the previous slice's tail (neighbour exchange) and the layer's
  compressed entries and indexer keys gathered at the full length; each kernel block scores and
  gathers against all T / m entries (`attention_block_bytes` at the full length). Training
  counts every intermediate over the slice (an upper bound for the query-side ones) and keeps
  the gathered buffers' cotangents too. `gathered_weights`: one layer's weights gathered along
  the context axis (nearly all routed experts), alive with the MoE's buffers, not the
  attention's (XLA's buffer assignment); training holds them twice (each and its transpose).
  """
  from deepseek_v4 import plan_context

  r = sharding.get_rules(rules)
  ep = r.expert_parallel
  N = sizes["context"]
  tp_h = _act_shards(sizes, rules, "heads", cfg.num_heads)
  tp_f = _act_shards(sizes, rules, "mlp", cfg.moe_inter_dim)
  tp_v = _act_shards(sizes, rules, "vocab", cfg.vocab_size)
  shards = _batch_shards(sizes, rules, s.batch, strict=False)  # one long row: not split
  rows = s.batch // shards if s.batch % shards == 0 else s.batch
  T = plan_context.padded_length(cfg, s.seq, N)
  per_block = block_bytes_per_token(cfg, tp_h, tp_f, ep)
  ep_shards = _shards((dict(r.params)["expert"],), sizes) if ep else 1
  token_shards = _token_shards(sizes, rules)
  stream = cfg.hc_mult * cfg.d_model * _itemsize(cfg.dtype)
  L = cfg.num_layers + cfg.num_mtp_layers
  cf = "dropless" if s.capacity_factor is None else f"capacity factor {s.capacity_factor}"
  if s.train:
    if rows % s.grad_accum:
      raise ValueError(f"{rows} rows per device not divisible by grad_accum={s.grad_accum}")
    rows //= s.grad_accum
    chunk, passes = T, 2
  else:
    chunk, passes = plan_context.padded_length(cfg, min(s.prefill_chunk, T), N), 1
  n = rows * chunk // N  # tokens per device in one forward
  exchange = (plan_context.largest_gathered(cfg, T, N, rows) * passes
              + plan_context.largest_neighbour(cfg, T, N, rows))
  query_block = attention_block_bytes(cfg, rows, T, tp_h, options.attn_block)
  # the prefill's queries run in blocks (with the halo before each); training counts the
  # query-side intermediates over the whole slice (an upper bound: the backward recomputes one
  # rematerialized block at a time)
  q_tokens = rows * (context_query_block(cfg, chunk, N) + plan_context.largest_halo(cfg, T, N))
  t_l = -(-(s.batch // (s.grad_accum if s.train else 1)) * chunk // token_shards)
  moe = passes * ep_buffer_bytes(cfg, t_l, ep_shards, s.capacity_factor, tp_f, s.all_to_all,
                                 s.gmm) if ep else 0.0
  # The backward multiplies by each gathered weight and by its transpose: XLA holds both
  # layouts of the running layer's gathered experts (the 128K Flash training compile).
  moe += gathered_weights * passes
  if s.train:
    full = s.remat == "full"
    tokens = n * per_block * (2 if full else 1)
    work = tokens + 3 * query_block + exchange
    grads32 = step_trained * 4 / _itemsize(cfg.param_dtype)
    lines = [(f"saved activations ({L} blocks, remat {s.remat})",
              L * n * (stream if full else per_block), "estimate"),
             ("one block's backward (max of attention + exchange, MoE)", max(work, moe),
              "estimate"),
             ("one scan step: parameters + float32 weight gradients", step_params + grads32,
              "estimate"),
             ("logits (float32)", min(s.ce_chunk, n) * cfg.vocab_size * 4 * 3 / tp_v, "estimate")]
    head = f"rows/device per micro-batch {rows}, {n // rows:,} of {T:,} tokens per device"
  else:
    tokens = (n * context_slice_bytes_per_token(cfg, tp_h, tp_f)
              + q_tokens * context_query_bytes_per_token(cfg, tp_h))
    work = tokens + query_block + exchange
    lines = [(f"prefill chunk of {chunk} tokens ({chunk // N} per device): streams in and out",
              2 * n * stream, "estimate"),
             ("one block (max of attention + exchange, MoE)", max(work, moe), "estimate"),
             ("one scan step's parameters", step_params, "estimate"),
             ("logits (float32)", rows * cfg.vocab_size * 4 * 2 / tp_v, "estimate")]
    head = f"rows/device {rows}, cache capacity {T:,} tokens, sequence split {N} ways"
  where = "" if s.train else f" (the slice, and query blocks of {q_tokens // rows:,} tokens)"
  block = (f"one block: attention {gb(work)} (tokens{where} {gb(tokens)}, kernel blocks at the "
           f"full length {gb(query_block)}, context exchange {gb(exchange)}), MoE all-to-all "
           f"({s.all_to_all}, {s.gmm} gmm, {cf}) {gb(moe)}"
           + (f" with the layer's weights gathered along context {gb(gathered_weights)}"
              if gathered_weights else ""))
  return lines, [head, block]


def context_cache_lines(cfg: ModelConfig, sizes: dict[str, int], rules: str, s: Settings):
  """The prefilled cache of `s.batch` rows at the padded length, whole on every device of the
  context axis: a context-parallel prefill leaves it gathered (docs/context_parallel.md#prefill)."""
  from deepseek_v4 import cache as cache_lib
  from deepseek_v4 import plan_context

  T = plan_context.padded_length(cfg, s.seq, sizes["context"])
  per_row = sum(p.bytes for p in cache_lib.byte_model(cfg, T))
  shards = _batch_shards(sizes, rules, s.batch, strict=False)
  return [(f"KV cache ({s.batch} x {T} tokens, {cfg.dtype}, whole on every context device)",
           s.batch * per_row / shards, "exact")]


def context_plan(cfg: ModelConfig, sizes: dict[str, int], rules: str, s: Settings, name: str,
                 device_memory: int | None, headroom: float, options: Options) -> Plan:
  """`make_plan` for a mesh with a `context` axis of size > 1 (each row's sequence split into
  contiguous slices): state as `state_lines`, activations by `context_activation_lines`, and for
  inference the prefilled cache by `context_cache_lines`."""
  from deepseek_v4 import plan_context

  lines, notes, (local, _) = state_lines(cfg, sizes, rules, s, options)
  # A layer runs on its weights gathered along the context axis, its routed experts excepted
  # (they stay split where the rules split them): the rule tables replicate parameters along
  # the axis (nothing to gather); aot.long_context.zero_over_context shards them, and then every
  # layer, scanned or not, holds a gathered copy while it runs.
  r = sharding.get_rules(rules)
  drop = lambda t: tuple(a for a in ((t,) if isinstance(t, str) else t or ()) if a != "context")
  gathered = r.replace(params=tuple((n, t if n == "expert" else drop(t)) for n, t in r.params))
  _, _, (per_layer, trained) = state_lines(cfg, sizes, gathered, s, options)
  step, step_trained = scan_step_bytes(cfg, local), scan_step_bytes(cfg, trained)
  # The gathered copy of the running layer alone: each layer of a scan step gathers its own
  # weights where it uses them, after the previous layer's MoE has let go of its copy (XLA's
  # buffer assignment for Flash: one layer's three expert matrices at the MoE's peak). The
  # step's local slices stay in the scan-step line.
  gather = max(per_layer) if per_layer != local else 0.0
  act, act_notes = context_activation_lines(cfg, sizes, rules, s, step, step_trained, options,
                                            gather)
  lines += act
  if not s.train:
    lines += context_cache_lines(cfg, sizes, rules, s)
  notes = act_notes + notes + plan_context.format_exchanges(cfg, s.seq,
                                                            sizes["context"]).split("\n")
  return Plan(name, sizes, sharding.get_rules(rules).name, s, lines, notes, device_memory,
              headroom)


def format_plan(p: Plan) -> str:
  n = math.prod(p.mesh.values())
  # the context axis is shown only when it splits the sequence (plans without it read as before)
  mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items() if k != "context" or v > 1)
  mode = "fine-tuning" if p.settings.train else "inference"
  out = [f"plan: {p.name} {mode} on {n} devices, mesh {mesh}, rules {p.rules}",
         *(f"  {x}" for x in p.notes), ""]
  width = max(len(label) for label, _, _ in p.lines) + 2
  out.append(f"{'per device':<{width}}{'bytes':>12}  kind")
  out.append("-" * (width + 20))
  for label, b, kind in p.lines:
    out.append(f"{label:<{width}}{gb(b):>12}  {kind}")
  out.append("-" * (width + 20))
  out.append(f"{'total':<{width}}{gb(p.total):>12}")
  if p.device_memory is not None:
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    margin = p.usable - p.total
    out.append(f"device memory {gb(p.device_memory)}, usable {gb(p.usable)} after "
               f"{p.headroom:.0%} headroom: {verdict} ({'spare' if p.fits else 'short by'} "
               f"{gb(abs(margin))})")
  return "\n".join(out)
