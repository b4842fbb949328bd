"""Training step of DeepSeek-V4 (docs/architecture.md#training): losses, gradient step, router-bias
update.

`loss_fn(model, batch)` runs the trunk with the chosen lightning-indexer stage
(docs/architecture.md#indexer-training) and returns `(loss, aux)`:

  loss = L_LM + lambda_MTP L_MTP + sum_layers L_bal + w_idx L_indexer

`train_step` (one `nnx.jit` with the model and optimizer donated) differentiates it with respect to
the trainable parameters, accumulates gradients over micro-batches, applies the optimizer (clipping,
Muon/AdamW, schedule), then moves each learned router's balancing bias one notch toward balance (a
state update, not a gradient step; docs/architecture.md#load-balancing). It returns a dict of scalar
metrics.

Choices the spec leaves open (UNVERIFIED), made here and documented:
  * balance loss and bias update apply to learned-routing layers only (and the MTP block), not to
    hash layers, whose selection is not learned; the per-layer losses are summed;
  * the load of an expert is the number of (token, slot) assignments in the whole step (all
    micro-batches), padding excluded;
  * indexer loss: KL over the CSA compressed entries, with the target taken from the main
    attention's one joint softmax (window + entries + sink), summed over heads and L1-normalized;
    averaged over queries and over CSA layers;
  * with the indexer stage "off" (ordinary training / fine-tuning) the indexer gets no gradient at
    all, so its parameters are frozen (otherwise weight decay alone would erode them;
    docs/architecture.md#fine-tuning).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepseek_v4 import layout, losses
from deepseek_v4.config import ModelConfig
from deepseek_v4.model import Transformer, default_positions
from deepseek_v4.options import Options
from deepseek_v4.optim import adamw_optimizer, deepseek_optimizer

IndexerStage = Literal["off", "dense", "sparse"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]



@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Run settings (separate from the architecture's ModelConfig). Hashable: a jit static arg.

  Attributes:
    seq_len / batch_size: tokens per row and rows per optimizer step (all micro-batches).
    grad_accum: micro-batches per step (batch_size must be divisible by it).
    steps: optimizer steps of the run.
    learning_rate / warmup_steps / decay_fraction / final_lr_ratio: warmup-stable-decay schedule:
      linear warm-up, constant, then cosine decay to `final_lr_ratio * learning_rate` over the
      last `decay_fraction` of the steps (docs/architecture.md#schedule).
    muon_momentum / muon_rms_scale / weight_decay: Muon's mu, gamma and lambda
      (docs/architecture.md#optimizer).
    adam_b1 / adam_b2 / adam_eps / adam_weight_decay: AdamW of the non-matrix groups.
    optimizer: "muon_v4" (V4: Muon for matrices, AdamW for the rest, docs/architecture.md#optimizer)
      or "adamw" (ablation: AdamW with the adam_* settings on every parameter, the same clipping and
      schedule).
    adamw_learning_rate: peak learning rate of optimizer="adamw" (None = learning_rate); AdamW
      on matrices usually wants a smaller one than Muon.
    clip_norm: global gradient-norm clip (None = off).
    mtp_weight / mtp_weight_decay_phase: lambda of the MTP loss before / during the LR decay.
    balance_alpha: weight of the sequence-wise balance loss per learned layer.
    bias_update_speed: step of the aux-loss-free router-bias update.
    indexer_stage: "off" (indexer frozen), "dense" (warm-up: dense attention, only the indexer
      trains), "sparse" (top-k attention, indexer trained on its selected entries).
    indexer_loss_weight: weight of the indexer KL in the total loss.
    remat: activation rematerialization per block: none, full (save nothing), dots, dots_no_batch.
    ce_chunk: tokens per chunk of the float32 head/cross-entropy.
    compute_dtype: None = the ModelConfig's; "bfloat16" = bf16 compute, float32 master weights.
    freeze: regexes (re.search on dotted parameter names) of parameters not to train.
    lora_rank / lora_alpha / lora_targets: LoRA fine-tuning when lora_rank > 0 (only the
      adapters train); targets are projection names (see deepseek_v4.lora).
    seed: parameter init and data order.
    log_every / save_every / keep_checkpoints: logging and checkpoint cadence, checkpoints kept.
    packing: "aligned" (recommended: documents share rows at aligned offsets, with exact
      per-document attention masking), "concat" (documents joined with EOS, cut into rows, no
      masking) or "pad" (one document per row).
    val_fraction / val_documents: documents held out for validation (a share of them, or a
      count; 0 = none; see deepseek_v4.evaluate).
    eval_every / eval_rows: validation loss every this many steps (and at the last step), on
      the first this many validation rows.
  """

  seq_len: int = 128
  batch_size: int = 8
  grad_accum: int = 1
  steps: int = 200
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  decay_fraction: float = 0.2
  final_lr_ratio: float = 0.1
  muon_momentum: float = 0.95
  muon_rms_scale: float = 0.18
  weight_decay: float = 0.1
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-20
  adam_weight_decay: float = 0.1
  optimizer: Literal["muon_v4", "adamw"] = "muon_v4"
  adamw_learning_rate: float | None = None
  clip_norm: float | None = 1.0
  mtp_weight: float = 0.3
  mtp_weight_decay_phase: float = 0.1
  balance_alpha: float = 1e-4
  bias_update_speed: float = 1e-3
  indexer_stage: IndexerStage = "off"
  indexer_loss_weight: float = 1.0
  remat: RematPolicy = "none"
  ce_chunk: int = 1024
  compute_dtype: Literal["float32", "bfloat16"] | None = None
  freeze: tuple[str, ...] = ()
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("wq_a", "wq_b", "wkv", "wo_b")
  seed: int = 0
  log_every: int = 10
  save_every: int = 100
  keep_checkpoints: int = 3
  packing: Literal["concat", "pad", "aligned"] = "concat"
  val_fraction: float = 0.0
  val_documents: int = 0
  eval_every: int = 50
  eval_rows: int = 64

  def __post_init__(self):
    # Every run setting has its type and range: no negative warm-up or weight decay, no
    # NaN / inf, no bools or strings where numbers belong; the error names the field and value.
    for name in ("warmup_steps", "lora_rank", "seed", "val_documents"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{name}={v!r} must be an integer >= 0")
    at_least_0, in_0_1, unit, positive = "[0, inf)", "[0, 1]", "[0, 1)", "(0, inf)"
    ranges = {
      "learning_rate": positive, "decay_fraction": in_0_1, "final_lr_ratio": in_0_1,
      "muon_momentum": unit, "muon_rms_scale": positive, "weight_decay": at_least_0,
      "adam_b1": unit, "adam_b2": unit, "adam_eps": positive, "adam_weight_decay": at_least_0,
      "mtp_weight": at_least_0, "mtp_weight_decay_phase": at_least_0,
      "balance_alpha": at_least_0, "bias_update_speed": at_least_0,
      "indexer_loss_weight": at_least_0, "lora_alpha": positive, "val_fraction": unit,
    }
    if self.clip_norm is not None:
      ranges["clip_norm"] = positive
    if self.adamw_learning_rate is not None:
      ranges["adamw_learning_rate"] = positive
    if self.optimizer not in ("muon_v4", "adamw"):
      raise ValueError(f"optimizer={self.optimizer!r}; expected 'muon_v4' or 'adamw'")
    inside = {at_least_0: lambda v: v >= 0, in_0_1: lambda v: 0 <= v <= 1,
              unit: lambda v: 0 <= v < 1, positive: lambda v: v > 0}
    for name, interval in ranges.items():
      v = getattr(self, name)
      if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
          or not inside[interval](v)):
        extra = {"clip_norm": " (or None: no clipping)",
                 "adamw_learning_rate": " (or None: learning_rate)"}.get(name, "")
        raise ValueError(f"{name}={v!r} must be a finite number in {interval}{extra}")
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected None, 'float32' or "
                       "'bfloat16'")
    for name in ("freeze", "lora_targets"):
      v = getattr(self, name)
      if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) for p in v):
        raise ValueError(f"{name}={v!r} must be a tuple of strings")
    for pattern in self.freeze:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"freeze={pattern!r} is not a regular expression ({e})") from None
    for name in ("seq_len", "batch_size", "grad_accum", "steps", "ce_chunk", "log_every",
                 "save_every", "keep_checkpoints", "eval_every", "eval_rows"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive integer")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size={self.batch_size} not divisible by "
                       f"grad_accum={self.grad_accum}")
    if self.val_fraction and self.val_documents:
      raise ValueError(f"val_fraction={self.val_fraction} and val_documents="
                       f"{self.val_documents}: hold out a share or a count, not both")
    Options(indexer_stage=self.indexer_stage, remat=self.remat)  # their one check (options.py)
    if self.packing not in ("concat", "pad", "aligned"):
      raise ValueError(f"packing={self.packing!r}; expected concat, pad or aligned")
    if not (0.0 <= self.decay_fraction <= 1.0):
      raise ValueError(f"decay_fraction={self.decay_fraction} must be in [0, 1]")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"learning_rate={self.learning_rate!r} must be a positive finite number")
    if isinstance(self.freeze, list):
      object.__setattr__(self, "freeze", tuple(self.freeze))
    if isinstance(self.lora_targets, list):
      object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

  @property
  def peak_learning_rate(self) -> float:
    """The schedule's peak: adamw_learning_rate for optimizer="adamw" when set, else
    learning_rate."""
    if self.optimizer == "adamw" and self.adamw_learning_rate is not None:
      return self.adamw_learning_rate
    return self.learning_rate

  @property
  def decay_start(self) -> int:
    """First step of the LR decay phase."""
    return self.steps - int(round(self.decay_fraction * self.steps))

  def replace(self, **overrides) -> "TrainConfig":
    return dataclasses.replace(self, **overrides)


# ----- schedule -----------------------------------------------------------------------------------
def wsd_schedule(tcfg: TrainConfig) -> optax.Schedule:
  """Warmup-stable-decay (docs/architecture.md#schedule): linear warm-up reaching the peak at step
  `warmup_steps - 1`, constant, then cosine decay from `decay_start` to `final_lr_ratio * peak` at
  `steps`; the peak is `tcfg.peak_learning_rate` (the optimizer's own)."""
  peak, final = tcfg.peak_learning_rate, tcfg.final_lr_ratio
  warm = max(tcfg.warmup_steps, 1)
  start, length = tcfg.decay_start, max(tcfg.steps - tcfg.decay_start, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.minimum(1.0, (step + 1.0) / warm)
    t = jnp.clip((step - start) / length, 0.0, 1.0)
    decay = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    return peak * jnp.minimum(warmup, decay)

  return schedule


def mtp_weight_at(tcfg: TrainConfig, step: int) -> float:
  """lambda of the MTP loss: 0.3 until the LR decay starts, 0.1 after
  (docs/architecture.md#mtp-loss)."""
  return tcfg.mtp_weight if step < tcfg.decay_start else tcfg.mtp_weight_decay_phase


# ----- model / optimizer construction -------------------------------------------------------------
def training_model_config(cfg: ModelConfig, tcfg: TrainConfig) -> ModelConfig:
  """bf16 compute with float32 master weights when asked (optimizer state follows the params)."""
  if tcfg.compute_dtype is None:
    return cfg
  return cfg.replace(dtype=tcfg.compute_dtype, param_dtype="float32")


def _freeze_patterns(tcfg: TrainConfig) -> tuple[re.Pattern, ...]:
  patterns = list(tcfg.freeze)
  if tcfg.indexer_stage == "off":
    patterns.append(r"\.indexer\.")
  try:
    return tuple(re.compile(p) for p in patterns)
  except re.error as e:
    raise ValueError(f"freeze pattern {e.pattern!r} is not a valid regular expression: {e}") from None


def trainable_filter(tcfg: TrainConfig, cfg: ModelConfig | None = None,
                     scan_layers: bool = True):
  """The nnx filter of trained parameters: Params minus frozen patterns (LoRA: adapters only).

  Freeze patterns are `re.search`ed on the official names (`layers.7.attn.wq_a.weight`); a
  stacked parameter of scanned layers is trainable when any of its layers is, and the frozen
  layers' slices are then held fixed by `freeze_mask` (gradients and updates zeroed).
  """
  compiled = _freeze_patterns(tcfg)
  only_indexer = tcfg.indexer_stage == "dense"
  lora = tcfg.lora_rank > 0

  def trainable(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    if lora:
      return isinstance(value, nnx.LoRAParam)
    names = [n for n, _ in layout.official(cfg, path, scan_layers)]
    # V3.2 warm-up: everything frozen except the indexer (docs/architecture.md#indexer-training)
    if only_indexer:
      return ".indexer." in names[0]
    return any(not any(p.search(n) for p in compiled) for n in names)

  return _Filter(trainable, tuple(p.pattern for p in compiled), only_indexer, lora, cfg)


@dataclasses.dataclass(frozen=True)
class _Filter:
  """A hashable callable filter (nnx.jit caches on the optimizer's graph, which holds it)."""

  fn: Any = dataclasses.field(compare=False, hash=False)
  patterns: tuple[str, ...]
  only_indexer: bool
  lora: bool
  cfg: ModelConfig | None = None

  def __call__(self, path, value) -> bool:
    return self.fn(path, value)


def freeze_mask(tree, tcfg: TrainConfig, cfg: ModelConfig, scan_layers: bool = True):
  """`tree` (gradients or updates of the trainable parameters) with the slices of frozen layers
  inside stacked parameters set to zero; a no-op when no stack is partly frozen."""
  if tcfg.lora_rank or tcfg.indexer_stage == "dense":
    return tree
  compiled = _freeze_patterns(tcfg)

  def mask(path, x):
    names = layout.official(cfg, path, scan_layers)
    keep = [not any(p.search(n) for p in compiled) for n, _ in names]
    if all(keep) or names[0][1] is None:
      return x
    m = jnp.asarray(keep, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * m

  return jax.tree_util.tree_map_with_path(mask, tree)


@functools.lru_cache(maxsize=32)
def _transform(cfg: ModelConfig, tcfg: TrainConfig, scan_layers: bool = True
               ) -> optax.GradientTransformation:
  """One transformation object per (model, run) config: the optimizer's graph holds it as static
  data, so reusing the object lets `train_step` reuse its compiled program across builds."""
  adam = dict(adam_b1=tcfg.adam_b1, adam_b2=tcfg.adam_b2, adam_eps=tcfg.adam_eps,
              adam_weight_decay=tcfg.adam_weight_decay, clip_norm=tcfg.clip_norm,
              mu_dtype=jnp.float32)
  if tcfg.optimizer == "adamw":
    tx = adamw_optimizer(wsd_schedule(tcfg), **adam)
  else:
    tx = deepseek_optimizer(
      wsd_schedule(tcfg), cfg, muon_momentum=tcfg.muon_momentum,
      muon_rms_scale=tcfg.muon_rms_scale, muon_weight_decay=tcfg.weight_decay, **adam)
  # Frozen layers inside a stack of scanned layers: their slices get no update (weight decay
  # included), as a frozen unstacked parameter would.
  hold = optax.stateless(lambda updates, params=None: freeze_mask(updates, tcfg, cfg, scan_layers))
  return optax.chain(tx, hold)


def make_optimizer(model: Transformer, tcfg: TrainConfig) -> nnx.Optimizer:
  """nnx.Optimizer over the trainable parameters with DeepSeek's Muon/AdamW split (or AdamW
  everywhere with tcfg.optimizer="adamw")."""
  scan_layers = model.options.scan_layers
  wrt = trainable_filter(tcfg, model.cfg, scan_layers)
  if not nnx.state(model, wrt):
    raise ValueError("no trainable parameters: every parameter is frozen by "
                     f"freeze={tcfg.freeze} / indexer_stage={tcfg.indexer_stage!r} / "
                     f"lora_rank={tcfg.lora_rank}")
  return nnx.Optimizer(model, _transform(model.cfg, tcfg, scan_layers), wrt=wrt)


def build(cfg: ModelConfig, tcfg: TrainConfig, rngs=nnx.Rngs, options: Options = Options()
          ) -> tuple[Transformer, nnx.Optimizer]:
  """A freshly initialized model (LoRA-wrapped if asked, built with `options`) and its optimizer;
  `rngs(seed)` makes the key streams (`deepseek_v4.abstract.ShapeOnlyRngs` for a shapes-only
  build)."""
  from deepseek_v4 import lora as lora_lib

  model = lora_lib.build_model(training_model_config(cfg, tcfg), lora_spec(tcfg),
                               rngs=rngs(tcfg.seed), adapter_rngs=rngs(tcfg.seed + 1),
                               options=options)
  return model, make_optimizer(model, tcfg)


def lora_spec(tcfg: TrainConfig) -> tuple[tuple[str, ...], int, float] | None:
  """(targets, rank, alpha) of a LoRA run (`lora.build_model`), None without LoRA."""
  return (tcfg.lora_targets, tcfg.lora_rank, tcfg.lora_alpha) if tcfg.lora_rank else None


# ----- forward ------------------------------------------------------------------------------------
def step_options(tcfg: TrainConfig, base: Options | None = None) -> Options:
  """The trunk options of a training step: `base` (the run's options: MoE implementation,
  kernels, build-time fields; default `Options()`) with the indexer stage and remat of `tcfg`.
  A `base` that sets either to another non-default value than `tcfg` is a ValueError."""
  base = Options() if base is None else base
  default = Options()
  for name in ("indexer_stage", "remat"):
    mine, theirs = getattr(base, name), getattr(tcfg, name)
    if mine != getattr(default, name) and mine != theirs:
      raise ValueError(f"options {name}={mine!r} disagrees with the TrainConfig's {name}="
                       f"{theirs!r}; a training step takes {name} from its TrainConfig")
  return base.replace(indexer_stage=tcfg.indexer_stage, remat=tcfg.remat)


def mtp_targets(targets: jax.Array, segments: jax.Array | None = None) -> jax.Array:
  """Targets of the MTP positions i < T-1 (token i+2 = targets[i+1]); with packed documents,
  -1 where input i+1 belongs to another segment than input i (a cross-document prediction)."""
  t = targets[:, 1:]
  if segments is None:
    return t
  return jnp.where(segments[:, 1:] == segments[:, :-1], t, -1)


def loss_fn(model: Transformer, batch: dict, tcfg: TrainConfig = TrainConfig(),
            mtp_weight: float | jax.Array | None = None, options: Options | None = None
            ) -> tuple[jax.Array, dict]:
  """Total training loss and its parts.

  Args:
    model: the Transformer.
    batch: {"inputs": int [B, T], "targets": int [B, T] (next tokens, -1 = not scored),
      optional "input_mask": [B, T] (1 = a real token; routing statistics skip padding),
      optional "segments" / "positions": int [B, T] (packed documents, `data.pack(...,
      "aligned")`: document id per token and position inside the document; attention stays
      inside a document and MTP targets across a document boundary are ignored)}.
    tcfg: run settings (loss weights, indexer stage, remat, CE chunk).
    options: the run's `Options` (default `model.options`); the indexer stage and remat come
      from `tcfg` (see `step_options`).
    mtp_weight: lambda of the MTP loss (default tcfg.mtp_weight).
  Returns:
    (loss, aux) with aux = {lm_loss, mtp_loss, balance_loss, indexer_loss, loads [L, E],
    tokens}.
  """
  cfg = model.cfg
  ids, targets = batch["inputs"], batch["targets"]
  B, T = ids.shape
  mask = batch.get("input_mask")
  mask = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
  segments = batch.get("segments")
  positions = batch.get("positions")
  if segments is not None:
    segments = segments.astype(jnp.int32)
  positions = default_positions(ids, None if positions is None else positions.astype(jnp.int32),
                                segments)
  opts = step_options(tcfg, model.options if options is None else options)
  streams, outs, _ = model.trunk(ids, positions, segments=segments, options=opts)
  head = model.head.weight[...]
  lm_sum, ntok = losses.chunked_cross_entropy(model.final_hidden(streams), head, targets,
                                              tcfg.ce_chunk)
  lm = lm_sum / jnp.maximum(ntok, 1)
  # Indexer KL: per indexer layer (CSA) the mean over its queries, then the mean over those layers.
  csa = [o.indexer_kl for o, k in zip(outs, cfg.layer_kinds) if k.trains_indexer]
  indexer = (sum(k[0] / jnp.maximum(k[1], 1.0) for k in csa) / len(csa)) if csa else jnp.zeros(())
  learned = [o.moe for i, o in enumerate(outs) if not cfg.is_hash_layer(i)]
  masks = [mask] * len(learned)
  mtp = jnp.zeros(())
  if cfg.num_mtp_layers and T > 1:
    h, mtp_out = model.mtp_hidden(streams, ids, positions, segments, opts)
    mtp = losses.mean_cross_entropy(h, head, mtp_targets(targets, segments), tcfg.ce_chunk)
    learned.append(mtp_out.moe)
    masks.append(mask[:, 1:])
  bal = sum((losses.balance_loss(s["scores"], s["experts"], m, tcfg.balance_alpha)
             for s, m in zip(learned, masks)), jnp.zeros(()))
  loads = jnp.stack([losses.expert_loads(s["experts"], m, cfg.num_experts)
                     for s, m in zip(learned, masks)]) if learned else jnp.zeros((0,))
  w_mtp = tcfg.mtp_weight if mtp_weight is None else mtp_weight
  loss = lm + w_mtp * mtp + bal + tcfg.indexer_loss_weight * indexer
  aux = dict(lm_loss=lm, mtp_loss=mtp, balance_loss=bal, indexer_loss=indexer, loads=loads,
             tokens=ntok)
  return loss, aux


# ----- the step -----------------------------------------------------------------------------------
def _grads(model: Transformer, wrt, batch: dict, tcfg: TrainConfig, mtp_weight,
           options: Options | None = None):
  """Loss, aux and gradients, averaged over `grad_accum` micro-batches (a lax.scan)."""
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def pure_loss(params, mb):
    return loss_fn(nnx.merge(graphdef, params, rest), mb, tcfg, mtp_weight, options)

  grad_fn = jax.value_and_grad(pure_loss, has_aux=True)
  A = tcfg.grad_accum
  if A == 1:
    (loss, aux), grads = grad_fn(params, batch)
    return loss, aux, grads
  micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)

  def body(carry, mb):
    (loss, aux), g = grad_fn(params, mb)
    acc = jax.tree.map(jnp.add, carry, (loss, aux, g))
    return acc, None

  (l0, a0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
  (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
  scale = lambda x: x / A if jnp.issubdtype(x.dtype, jnp.floating) else x
  aux = {k: (v if k in ("loads", "tokens") else scale(v)) for k, v in aux.items()}
  return loss / A, aux, jax.tree.map(scale, grads)


def update_router_biases(model: Transformer, loads: jax.Array, speed: float) -> None:
  """Aux-loss-free balancing after the step: one sign step per learned router
  (docs/architecture.md#load-balancing).

  `loads` [n, E] has one row per learned-routing layer in official order, then the MTP block."""
  cfg = model.cfg
  row = {i: n for n, i in enumerate(i for i in range(cfg.num_layers) if not cfg.is_hash_layer(i))}
  update = jax.vmap(losses.router_bias_update, in_axes=(0, 0, None))
  for group in model.groups:
    spec = group.spec
    for s, block in enumerate(group.blocks):
      if spec.hashed[s]:
        continue
      rows = jnp.asarray([row[spec.layer(r, s)] for r in range(spec.count)])
      bias = block.ffn.gate.bias
      if spec.scanned:
        bias.set_value(update(bias[...], loads[rows], speed))
      else:
        bias.set_value(losses.router_bias_update(bias[...], loads[rows[0]], speed))
  for k, m in enumerate(model.mtp):
    bias = m.ffn.gate.bias
    bias.set_value(losses.router_bias_update(bias[...], loads[len(row) + k], speed))


def _apply_update(model: Transformer, optimizer: nnx.Optimizer, grads, loads: jax.Array,
                  tcfg: TrainConfig) -> None:
  """The optimizer step, then the router-bias step (in place)."""
  optimizer.update(model, grads)
  if loads.shape[0] and model.cfg.router_bias:
    update_router_biases(model, loads, tcfg.bias_update_speed)


def _train_step(model: Transformer, optimizer: nnx.Optimizer, batch: dict, mtp_weight,
                tcfg: TrainConfig, options: Options | None = None,
                apply=True) -> dict[str, jax.Array]:
  loss, aux, grads = _grads(model, optimizer.wrt, batch, tcfg, mtp_weight, options)
  grads = freeze_mask(grads, tcfg, model.cfg, model.options.scan_layers)
  lr = wsd_schedule(tcfg)(optimizer.step[...])
  grad_norm = optax.tree.norm(grads)
  loads = aux["loads"]
  if apply is True:  # a Python constant: the update is unconditional
    _apply_update(model, optimizer, grads, loads, tcfg)
  else:  # traced: one compiled program serves both the step and the metrics-only probe
    graphdef, state = nnx.split((model, optimizer))

    def update(state):
      m, o = nnx.merge(graphdef, state)
      _apply_update(m, o, grads, loads, tcfg)
      return nnx.state((m, o))

    nnx.update((model, optimizer), jax.lax.cond(apply, update, lambda s: s, state))
  if loads.shape[0]:
    imbalance = jnp.mean(jax.vmap(losses.load_imbalance)(loads))
  else:
    imbalance = jnp.ones(())
  return dict(loss=loss, lm_loss=aux["lm_loss"], mtp_loss=aux["mtp_loss"],
              balance_loss=aux["balance_loss"], indexer_loss=aux["indexer_loss"],
              grad_norm=grad_norm, lr=lr, load_imbalance=imbalance, tokens=aux["tokens"])


train_step = nnx.jit(_train_step, static_argnames=("tcfg", "options"),
                     donate_argnames=("model", "optimizer"))
train_step.__doc__ = """One optimizer step (jitted; `model` and `optimizer` are donated).

Args:
  model, optimizer: updated in place.
  batch: see `loss_fn`; leading axis batch_size (split into grad_accum micro-batches).
  mtp_weight: lambda of the MTP loss for this step (a traced scalar: no recompiles).
  tcfg: run settings (static).
  options: the run's `Options` (static; default `model.options`), e.g. `parallel.options(mesh,
    rules)`; the indexer stage and remat come from `tcfg`.
  apply: False computes the metrics without changing the model or optimizer. Pass it as a bool
    in every call (True / False) and both share one compiled program (`trainer.fit` measures
    the parameters it is about to save this way); left at its default, the update is
    unconditional.
Returns:
  {loss, lm_loss, mtp_loss, balance_loss, indexer_loss, grad_norm (before clipping), lr (of this
  step), load_imbalance (max/mean expert load, mean over learned layers), tokens}.
"""


def as_batch(inputs: np.ndarray, targets: np.ndarray, input_mask: np.ndarray | None = None,
             segments: np.ndarray | None = None, positions: np.ndarray | None = None
             ) -> dict[str, jax.Array]:
  """Device arrays in the layout `loss_fn` reads."""
  out = {"inputs": jnp.asarray(inputs, jnp.int32), "targets": jnp.asarray(targets, jnp.int32)}
  if input_mask is not None:
    out["input_mask"] = jnp.asarray(input_mask, jnp.float32)
  if segments is not None:
    out["segments"] = jnp.asarray(segments, jnp.int32)
  if positions is not None:
    out["positions"] = jnp.asarray(positions, jnp.int32)
  return out
