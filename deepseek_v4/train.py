"""Training step of DeepSeek-V4 (spec §7): losses, gradient step, router-bias update.

`loss_fn(model, batch)` runs the trunk with the chosen lightning-indexer stage (spec §7.4) and
returns `(loss, aux)`:

  loss = L_LM + lambda_MTP L_MTP + sum_layers L_bal + w_idx L_indexer

`train_step` (one `nnx.jit` with the model and optimizer donated) differentiates it with respect to
the trainable parameters, accumulates gradients over micro-batches, applies the optimizer
(clipping, Muon/AdamW, schedule), then moves each learned router's balancing bias one notch toward
balance (a state update, not a gradient step; spec §7.3). It returns a dict of scalar metrics.

Choices the spec leaves open (UNVERIFIED), made here and documented:
  * balance loss and bias update apply to learned-routing layers only (and the MTP block), not to
    hash layers, whose selection is not learned; the per-layer losses are summed;
  * the load of an expert is the number of (token, slot) assignments in the whole step (all
    micro-batches), padding excluded;
  * indexer loss: KL over the CSA compressed entries, with the target taken from the main
    attention's one joint softmax (window + entries + sink), summed over heads and L1-normalized;
    averaged over queries and over CSA layers;
  * with the indexer stage "off" (ordinary training / fine-tuning) the indexer gets no gradient at
    all, so its parameters are frozen (otherwise weight decay alone would erode them; spec §7.8).
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

from deepseek_v4 import losses
from deepseek_v4.config import ModelConfig
from deepseek_v4.layers.rope import rope_angles
from deepseek_v4.model import Transformer
from deepseek_v4.optim import deepseek_optimizer

IndexerStage = Literal["off", "dense", "sparse"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Run settings (separate from the architecture's ModelConfig). Hashable: a jit static arg.

  Attributes:
    seq_len / batch_size: tokens per row and rows per optimizer step (all micro-batches).
    grad_accum: micro-batches per step (batch_size must be divisible by it).
    steps: optimizer steps of the run.
    learning_rate / warmup_steps / decay_fraction / final_lr_ratio: warmup-stable-decay schedule:
      linear warm-up, constant, then cosine decay to `final_lr_ratio * learning_rate` over the
      last `decay_fraction` of the steps (spec §7.2).
    muon_momentum / muon_rms_scale / weight_decay: Muon's mu, gamma and lambda (spec §7.1).
    adam_b1 / adam_b2 / adam_eps / adam_weight_decay: AdamW of the non-matrix groups.
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

  def __post_init__(self):
    # Every run setting has its type and range (issue 11): no negative warm-up or weight decay, no
    # NaN / inf, no bools or strings where numbers belong; the error names the field and value.
    for name in ("warmup_steps", "lora_rank", "seed"):
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
      "indexer_loss_weight": at_least_0, "lora_alpha": positive,
    }
    if self.clip_norm is not None:
      ranges["clip_norm"] = positive
    inside = {at_least_0: lambda v: v >= 0, in_0_1: lambda v: 0 <= v <= 1,
              unit: lambda v: 0 <= v < 1, positive: lambda v: v > 0}
    for name, interval in ranges.items():
      v = getattr(self, name)
      if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
          or not inside[interval](v)):
        extra = " (or None: no clipping)" if name == "clip_norm" else ""
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
                 "save_every", "keep_checkpoints"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}={v!r} must be a positive integer")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"batch_size={self.batch_size} not divisible by "
                       f"grad_accum={self.grad_accum}")
    if self.indexer_stage not in ("off", "dense", "sparse"):
      raise ValueError(f"indexer_stage={self.indexer_stage!r}; expected off, dense or sparse")
    if self.packing not in ("concat", "pad", "aligned"):
      raise ValueError(f"packing={self.packing!r}; expected concat, pad or aligned")
    if self.packing == "aligned" and self.indexer_stage != "off":
      raise ValueError(f"packing='aligned' (document masking) with indexer_stage="
                       f"{self.indexer_stage!r} is not supported; use packing 'pad' or 'concat'")
    if self.remat not in ("none", *_POLICIES):
      raise ValueError(f"remat={self.remat!r}; expected one of none, {', '.join(_POLICIES)}")
    if not (0.0 <= self.decay_fraction <= 1.0):
      raise ValueError(f"decay_fraction={self.decay_fraction} must be in [0, 1]")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"learning_rate={self.learning_rate!r} must be a positive finite number")
    if isinstance(self.freeze, list):
      object.__setattr__(self, "freeze", tuple(self.freeze))
    if isinstance(self.lora_targets, list):
      object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

  @property
  def decay_start(self) -> int:
    """First step of the LR decay phase."""
    return self.steps - int(round(self.decay_fraction * self.steps))

  def replace(self, **overrides) -> "TrainConfig":
    return dataclasses.replace(self, **overrides)


# ----- schedule -----------------------------------------------------------------------------------
def wsd_schedule(tcfg: TrainConfig) -> optax.Schedule:
  """Warmup-stable-decay (spec §7.2): linear warm-up reaching the peak at step `warmup_steps - 1`,
  constant, then cosine decay from `decay_start` to `final_lr_ratio * peak` at `steps`."""
  peak, final = tcfg.learning_rate, tcfg.final_lr_ratio
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
  """lambda of the MTP loss: 0.3 until the LR decay starts, 0.1 after (spec §7.5)."""
  return tcfg.mtp_weight if step < tcfg.decay_start else tcfg.mtp_weight_decay_phase


# ----- model / optimizer construction -------------------------------------------------------------
def training_model_config(cfg: ModelConfig, tcfg: TrainConfig) -> ModelConfig:
  """bf16 compute with float32 master weights when asked (optimizer state follows the params)."""
  if tcfg.compute_dtype is None:
    return cfg
  return cfg.replace(dtype=tcfg.compute_dtype, param_dtype="float32")


def trainable_filter(tcfg: TrainConfig):
  """The nnx filter of trained parameters: Params minus frozen patterns (LoRA: adapters only)."""
  patterns = list(tcfg.freeze)
  if tcfg.indexer_stage == "off":
    patterns.append(r"\.indexer\.")
  compiled = tuple(re.compile(p) for p in patterns)
  only_indexer = tcfg.indexer_stage == "dense"
  lora = tcfg.lora_rank > 0

  def trainable(path, value) -> bool:
    if not isinstance(value, nnx.Param):
      return False
    if lora:
      return isinstance(value, nnx.LoRAParam)
    name = ".".join(str(p) for p in path)
    if only_indexer:  # V3.2 warm-up: everything frozen except the indexer (spec §7.4)
      return ".indexer." in name
    return not any(p.search(name) for p in compiled)

  return _Filter(trainable, tuple(patterns), only_indexer, lora)


@dataclasses.dataclass(frozen=True)
class _Filter:
  """A hashable callable filter (nnx.jit caches on the optimizer's graph, which holds it)."""

  fn: Any = dataclasses.field(compare=False, hash=False)
  patterns: tuple[str, ...]
  only_indexer: bool
  lora: bool

  def __call__(self, path, value) -> bool:
    return self.fn(path, value)


@functools.lru_cache(maxsize=32)
def _transform(cfg: ModelConfig, tcfg: TrainConfig) -> optax.GradientTransformation:
  """One transformation object per (model, run) config: the optimizer's graph holds it as static
  data, so reusing the object lets `train_step` reuse its compiled program across builds."""
  return deepseek_optimizer(
    wsd_schedule(tcfg), cfg, muon_momentum=tcfg.muon_momentum,
    muon_rms_scale=tcfg.muon_rms_scale, muon_weight_decay=tcfg.weight_decay,
    adam_b1=tcfg.adam_b1, adam_b2=tcfg.adam_b2, adam_eps=tcfg.adam_eps,
    adam_weight_decay=tcfg.adam_weight_decay, clip_norm=tcfg.clip_norm,
    mu_dtype=jnp.float32)


def make_optimizer(model: Transformer, tcfg: TrainConfig) -> nnx.Optimizer:
  """nnx.Optimizer over the trainable parameters with DeepSeek's Muon/AdamW split."""
  wrt = trainable_filter(tcfg)
  if not nnx.state(model, wrt):
    raise ValueError("no trainable parameters: every parameter is frozen by "
                     f"freeze={tcfg.freeze} / indexer_stage={tcfg.indexer_stage!r} / "
                     f"lora_rank={tcfg.lora_rank}")
  return nnx.Optimizer(model, _transform(model.cfg, tcfg), wrt=wrt)


def build(cfg: ModelConfig, tcfg: TrainConfig) -> tuple[Transformer, nnx.Optimizer]:
  """A freshly initialized model (LoRA-wrapped if asked) and its optimizer."""
  from deepseek_v4 import lora as lora_lib

  model = Transformer(training_model_config(cfg, tcfg), rngs=nnx.Rngs(tcfg.seed))
  if tcfg.lora_rank:
    lora_lib.apply_lora(model, tcfg.lora_targets, rank=tcfg.lora_rank, alpha=tcfg.lora_alpha,
                        rngs=nnx.Rngs(tcfg.seed + 1))
  return model, make_optimizer(model, tcfg)


# ----- forward with the indexer stages and remat --------------------------------------------------
def _attention(attn, u, positions, segments, stage: IndexerStage, tcfg: TrainConfig):
  """One attention layer; CSA layers in the dense/sparse stage also return the indexer KL.

  `segments` (packed documents, see `loss_fn`) is supported with the indexer stage "off" only.
  """
  zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  if segments is not None:
    if stage != "off" and attn.indexer is not None:
      raise NotImplementedError(
        f"indexer_stage={stage!r} with packed-document segments (packing='aligned') is not "
        "supported; use packing 'pad' or 'concat' for the indexer warm-up/sparse stages")
    return attn(u, positions, segments=segments), zero
  if stage == "off" or attn.indexer is None:
    return attn(u, positions), zero
  freqs = attn.freqs
  cos, sin = rope_angles(positions, freqs)
  cq, q, kv = attn.project_qkv(u, cos, sin)
  comp = attn.compressor(u, freqs)
  ind = attn.indexer
  # The indexer reads a detached copy of its inputs: it learns only from its own loss (§7.4).
  us, cqs = jax.lax.stop_gradient(u), jax.lax.stop_gradient(cq)
  ikeys = ind.compressor(us, freqs)
  iq, iw = ind.queries(us, cqs, cos, sin)
  if stage == "dense":
    idx = None  # every visible compressed entry, no selection
  else:
    idx = jax.lax.stop_gradient(ind.select(iq, iw, ikeys, positions))
  o = attn.core(q, positions, kv, comp=comp, comp_idx=idx)
  sg = jax.lax.stop_gradient
  kl = losses.indexer_loss(
    sg(q), positions, sg(kv), sg(attn.attn_sink[...]), sg(comp), iq, iw, ikeys, idx,
    scale=1.0 / math.sqrt(attn.cfg.head_dim), window=attn.cfg.window, ratio=attn.ratio,
    block=attn.cfg.attn_block)
  return attn.output(o, cos, sin), kl


def _block(layer, x, ids, positions, segments, stage: IndexerStage, tcfg: TrainConfig):
  kl = []

  def attn_fn(u):
    y, k = _attention(layer.attn, u, positions, segments, stage, tcfg)
    kl.append(k)
    return y

  x = layer.attn_site(x, attn_fn)
  x, stats = layer.ffn_site(x, ids)
  return x, stats, kl[0]


def _remat(fn, module, tcfg: TrainConfig):
  """`fn(module, *args)` under jax.checkpoint with the configured policy (functional NNX)."""
  if tcfg.remat == "none":
    return lambda *args: fn(module, *args)
  graphdef, state = nnx.split(module)

  def pure(state, *args):
    return fn(nnx.merge(graphdef, state), *args)

  ck = jax.checkpoint(pure, policy=_POLICIES[tcfg.remat], prevent_cse=True)
  return lambda *args: ck(state, *args)


def forward(model: Transformer, ids, positions, tcfg: TrainConfig, segments=None):
  """Trunk streams, per-layer MoE stats and the indexer KL (sum, count) over CSA layers.

  The same computation as `Transformer.trunk(ids, positions, segments)`, block by block (with
  remat and the indexer stages)."""
  cfg = model.cfg
  B, T = ids.shape
  e = model.embed_tokens(ids)
  x = jnp.broadcast_to(e[:, :, None, :], (B, T, cfg.hc_mult, cfg.d_model))
  stats, kl_sum, kl_n, n_csa = [], jnp.zeros(()), jnp.zeros((), jnp.int32), 0
  for layer in model.layers:
    fn = lambda lyr, x: _block(lyr, x, ids, positions, segments, tcfg.indexer_stage, tcfg)
    x, s, (ks, kn) = _remat(fn, layer, tcfg)(x)
    stats.append(s)
    if layer.attn.indexer is not None:
      n_csa += 1
      kl_sum = kl_sum + ks / jnp.maximum(kn, 1)
      kl_n = kl_n + kn
  indexer = kl_sum / max(n_csa, 1)
  return x, stats, indexer


def _mtp(model: Transformer, streams, ids, tcfg: TrainConfig, positions=None, segments=None):
  """MTP hidden states [B, T-1, D] for positions i < T-1 (input token i+1) and its MoE stats.

  As `Transformer.mtp_logits`: with packed documents, position i keeps its own position and
  segment (the caller ignores targets across a document boundary)."""
  B, T = ids.shape
  nxt = ids[:, 1:]
  if segments is None:
    pos = jnp.broadcast_to(jnp.arange(T - 1, dtype=jnp.int32), (B, T - 1))

    def fn(mtp, streams):
      return mtp.hidden(streams, nxt, model.embed_tokens(nxt), pos)
  else:
    pos, seg = positions[:, :-1], segments[:, :-1]

    def fn(mtp, streams):
      return mtp.hidden(streams, nxt, model.embed_tokens(nxt), pos, segments=seg)

  return _remat(fn, model.mtp[0], tcfg)(streams[:, :-1])


def learned_layers(cfg: ModelConfig) -> list[str]:
  """Names of the learned-routing MoE layers, in the order of `aux['loads']`."""
  names = [f"layers.{i}" for i in range(cfg.num_layers) if not cfg.is_hash_layer(i)]
  return names + [f"mtp.{i}" for i in range(cfg.num_mtp_layers)]


def document_positions(segments: jax.Array) -> jax.Array:
  """Position of each token inside its segment: 0 where the segment id changes, then +1."""
  B, T = segments.shape
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  start = jnp.concatenate([jnp.ones((B, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def mtp_targets(targets: jax.Array, segments: jax.Array | None = None) -> jax.Array:
  """Targets of the MTP positions i < T-1 (token i+2 = targets[i+1]); with packed documents,
  -1 where input i+1 belongs to another segment than input i (a cross-document prediction)."""
  t = targets[:, 1:]
  if segments is None:
    return t
  return jnp.where(segments[:, 1:] == segments[:, :-1], t, -1)


def loss_fn(model: Transformer, batch: dict, tcfg: TrainConfig = TrainConfig(),
            mtp_weight: float | jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Total training loss and its parts.

  Args:
    model: the Transformer.
    batch: {"inputs": int [B, T], "targets": int [B, T] (next tokens, -1 = not scored),
      optional "input_mask": [B, T] (1 = a real token; routing statistics skip padding),
      optional "segments" / "positions": int [B, T] (packed documents, `data.pack(...,
      "aligned")`: document id per token and position inside the document; attention stays
      inside a document and MTP targets across a document boundary are ignored)}.
    tcfg: run settings (loss weights, indexer stage, remat, CE chunk).
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
  if segments is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    streams, stats, indexer = forward(model, ids, positions, tcfg)
  else:
    segments = segments.astype(jnp.int32)
    positions = batch.get("positions")
    positions = (document_positions(segments) if positions is None
                 else positions.astype(jnp.int32))
    streams, stats, indexer = forward(model, ids, positions, tcfg, segments=segments)
  head = model.head.weight[...]
  lm_sum, ntok = losses.chunked_cross_entropy(model.final_hidden(streams), head, targets,
                                              tcfg.ce_chunk)
  lm = lm_sum / jnp.maximum(ntok, 1)
  learned = [s for i, s in enumerate(stats) if not cfg.is_hash_layer(i)]
  masks = [mask] * len(learned)
  mtp = jnp.zeros(())
  if cfg.num_mtp_layers and T > 1:
    h, mtp_stats = _mtp(model, streams, ids, tcfg, positions, segments)
    mtp = losses.mean_cross_entropy(h, head, mtp_targets(targets, segments), tcfg.ce_chunk)
    learned.append(mtp_stats)
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
def _grads(model: Transformer, wrt, batch: dict, tcfg: TrainConfig, mtp_weight):
  """Loss, aux and gradients, averaged over `grad_accum` micro-batches (a lax.scan)."""
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def pure_loss(params, mb):
    return loss_fn(nnx.merge(graphdef, params, rest), mb, tcfg, mtp_weight)

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
  """Aux-loss-free balancing after the step: one sign step per learned router (spec §7.3)."""
  gates = [model.layers[i].ffn.gate for i in range(model.cfg.num_layers)
           if not model.cfg.is_hash_layer(i)]
  gates += [m.ffn.gate for m in model.mtp]
  for gate, load in zip(gates, loads):
    gate.bias.set_value(losses.router_bias_update(gate.bias[...], load, speed))


def _train_step(model: Transformer, optimizer: nnx.Optimizer, batch: dict, mtp_weight,
                tcfg: TrainConfig) -> dict[str, jax.Array]:
  loss, aux, grads = _grads(model, optimizer.wrt, batch, tcfg, mtp_weight)
  lr = wsd_schedule(tcfg)(optimizer.step[...])
  grad_norm = optax.tree.norm(grads)
  optimizer.update(model, grads)
  loads = aux["loads"]
  if loads.shape[0]:
    update_router_biases(model, loads, tcfg.bias_update_speed)
    imbalance = jnp.mean(jax.vmap(losses.load_imbalance)(loads))
  else:
    imbalance = jnp.ones(())
  return dict(loss=loss, lm_loss=aux["lm_loss"], mtp_loss=aux["mtp_loss"],
              balance_loss=aux["balance_loss"], indexer_loss=aux["indexer_loss"],
              grad_norm=grad_norm, lr=lr, load_imbalance=imbalance, tokens=aux["tokens"])


train_step = nnx.jit(_train_step, static_argnames=("tcfg",),
                     donate_argnames=("model", "optimizer"))
train_step.__doc__ = """One optimizer step (jitted; `model` and `optimizer` are donated).

Args:
  model, optimizer: updated in place.
  batch: see `loss_fn`; leading axis batch_size (split into grad_accum micro-batches).
  mtp_weight: lambda of the MTP loss for this step (a traced scalar: no recompiles).
  tcfg: run settings (static).
Returns:
  {loss, lm_loss, mtp_loss, balance_loss, indexer_loss, grad_norm (before clipping), lr (of this
  step), load_imbalance (max/mean expert load, mean over learned layers), tokens}.
"""


@nnx.jit(static_argnames=("tcfg",))
def eval_step(model: Transformer, batch: dict, tcfg: TrainConfig) -> dict[str, jax.Array]:
  """Loss parts without a gradient step."""
  loss, aux = loss_fn(model, batch, tcfg)
  return dict(loss=loss, lm_loss=aux["lm_loss"], mtp_loss=aux["mtp_loss"])


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
