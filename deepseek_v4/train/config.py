"""Run settings of training (docs/architecture.md#training): `TrainConfig`, the warmup-stable-decay
learning-rate schedule, the MTP loss weight per step, and what the settings make of the model
config, the LoRA spec and the trunk options of a step.

Loaded by every other module of `deepseek_v4.train`; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import jax.numpy as jnp
import optax

from deepseek_v4.config import ModelConfig
from deepseek_v4.options import Options


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


# ----- model construction and trunk options -------------------------------------------------------
def training_model_config(cfg: ModelConfig, tcfg: TrainConfig) -> ModelConfig:
  """bf16 compute with float32 master weights when asked (optimizer state follows the params)."""
  if tcfg.compute_dtype is None:
    return cfg
  return cfg.replace(dtype=tcfg.compute_dtype, param_dtype="float32")


def lora_spec(tcfg: TrainConfig) -> tuple[tuple[str, ...], int, float] | None:
  """(targets, rank, alpha) of a LoRA run (`lora.build_model`), None without LoRA."""
  return (tcfg.lora_targets, tcfg.lora_rank, tcfg.lora_alpha) if tcfg.lora_rank else None


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
