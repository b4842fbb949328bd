"""The optimizer of training (docs/architecture.md#optimizer): which parameters train (freeze
patterns, LoRA adapters, the indexer stage), the mask that holds frozen layers of a scanned stack
fixed, and the Muon/AdamW (or AdamW-only) transformation under the warmup-stable-decay schedule.

Choice the spec leaves open (UNVERIFIED), made here and documented: with the indexer stage "off"
(ordinary training / fine-tuning) the indexer gets no gradient at all, so its parameters are frozen
(otherwise weight decay alone would erode them; docs/architecture.md#fine-tuning).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_v4 import layout
from deepseek_v4.config import ModelConfig
from deepseek_v4.model import Transformer
from deepseek_v4.optim import adamw_optimizer, deepseek_optimizer
from deepseek_v4.train.config import TrainConfig, wsd_schedule


def freeze_patterns(tcfg: TrainConfig) -> tuple[re.Pattern, ...]:
  """The compiled patterns of frozen parameters: `tcfg.freeze`, plus the indexer when the indexer
  stage is "off" (the one definition; `trainer.frozen_name` reads it too)."""
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
  compiled = freeze_patterns(tcfg)
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
  compiled = freeze_patterns(tcfg)

  def mask(path, x):
    names = layout.official(cfg, path, scan_layers)
    keep = [not any(p.search(n) for p in compiled) for n, _ in names]
    if all(keep) or names[0][1] is None:
      return x
    m = jnp.asarray(keep, x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * m

  return jax.tree_util.tree_map_with_path(mask, tree)


@functools.lru_cache(maxsize=32)
def gradient_transform(cfg: ModelConfig, tcfg: TrainConfig, scan_layers: bool = True
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


def check_kept(model: Transformer, tcfg: TrainConfig) -> None:
  """Refuses a run that would train weights held as their released FP4 codes
  (`Options.keep_quantized`): they are frozen data, so only LoRA (whose adapters train, QLoRA)
  or a run whose freeze patterns cover every kept weight can use them."""
  if not model.options.keep_quantized or tcfg.lora_rank or tcfg.indexer_stage == "dense":
    return
  from deepseek_v4.layers.moe import KeptWeight

  compiled = freeze_patterns(tcfg)
  names = [n for path, _ in nnx.to_flat_state(nnx.state(model, KeptWeight))
           for n, _ in layout.official(model.cfg, path, model.options.scan_layers)]
  trained = [n.removesuffix("_scale") for n in names if not any(p.search(n) for p in compiled)]
  if trained:
    raise ValueError(
      f"keep_quantized={model.options.keep_quantized!r} holds the routed experts as frozen FP4 "
      f"codes, which cannot be trained, but this run would train them ({trained[0]!r} and "
      f"{len(set(trained)) - 1} more are not frozen): fine-tune with LoRA (--lora-rank R), "
      r"freeze them (--freeze 'ffn\.experts\.'), or load with keep_quantized=None for a full "
      "fine-tune")


def make_optimizer(model: Transformer, tcfg: TrainConfig) -> nnx.Optimizer:
  """nnx.Optimizer over the trainable parameters with DeepSeek's Muon/AdamW split (or AdamW
  everywhere with tcfg.optimizer="adamw").

  Raises:
    ValueError: the run would train routed experts kept as FP4 codes (`check_kept`).
  """
  check_kept(model, tcfg)
  scan_layers = model.options.scan_layers
  wrt = trainable_filter(tcfg, model.cfg, scan_layers)
  if not nnx.state(model, wrt):
    raise ValueError("no trainable parameters: every parameter is frozen by "
                     f"freeze={tcfg.freeze} / indexer_stage={tcfg.indexer_stage!r} / "
                     f"lora_rank={tcfg.lora_rank}")
  return nnx.Optimizer(model, gradient_transform(model.cfg, tcfg, scan_layers), wrt=wrt)
