"""`Options`: how a model is built and run, apart from what it is (docs/architecture.md#forward).

`ModelConfig` is the architecture (what config.json holds); `Options` holds the run and load
choices: which kernels, how the layers are stacked, how weights are stored, the MoE
implementation of a mesh, the training stages. One frozen, hashable value travels whole through
every entry point (`model(ids, options=...)`, `decoding.*`, `train.*`, `parallel.*`, the loaders),
and is static under `jax.jit`. Its checks live here and nowhere else.

Two fields shape the module tree (`BUILD_FIELDS`): a model is built with them
(`Transformer(cfg, rngs=..., options=...)`) and refuses to run with other values.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import jax

log = logging.getLogger(__name__)

REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

KERNEL_IMPLS = ("reference", "pallas", "auto")
INDEXER_STAGES = ("off", "dense", "sparse")
KEEP_QUANTIZED = (None, "experts")

# Fields fixed when the model is built: they change the parameter tree, not only the computation.
BUILD_FIELDS = ("scan_layers", "keep_quantized")

# Fields that `ModelConfig` (and config.json under "deepseek_v4_jax") held before they moved here.
FORMER_CONFIG_FIELDS = ("kernel_impl", "scan_layers", "attn_block", "keep_quantized")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """Run and load choices of one model (frozen, hashable: a static argument of jit).

  Attributes:
    moe: the MoE implementation (`deepseek_v4.layers.moe.MoEImpl`, e.g. from
      `parallel.options(mesh, rules)`); None = the local default (every expert on each device's
      tokens).
    context: the context-parallel layout (`deepseek_v4.layers.context_parallel.ContextParallel`,
      from `parallel.options(mesh, rules)` when the mesh has a `context` axis): full-sequence
      attention then runs on sequence slices (docs/context_parallel.md); None = one slice.
    kernel_impl: attention/indexer implementation behind `kernels_pallas/*/ops.py`: "reference"
      (pure JAX, the oracle), "pallas", or "auto" (Pallas on GPU/TPU, the reference elsewhere).
    attn_block: queries per block in the gather-based attention and the indexer (a memory knob:
      the numbers do not depend on it).
    scan_layers: build repeated layers as stacked parameters run under `jax.lax.scan` (compile
      time independent of depth); False unrolls every layer (same numbers, easier to debug).
      A build-time field.
    keep_quantized: storage of released low-precision weights (docs/architecture.md#fp8-fp4):
      None (every matrix in param_dtype) or "experts" (routed experts held as their packed FP4
      codes and E8M0 scales, decoded one expert at a time inside the MoE; inference only).
      A build-time (load) field.
    indexer_stage: "off" (inference, ordinary training), "dense" or "sparse": the lightning
      indexer's training stages (docs/architecture.md#indexer-training); CSA layers then return
      the indexer's KL.
    remat: rematerialization of each block (or scanned period): none, full (save nothing), dots,
      dots_no_batch.
    capture: also hand back each block's attention input in `BlockOut.attn_input` (what
      deepseek_v4/inspect.py reads); off, the program returns nothing extra.
  """

  moe: Any = None
  context: Any = None
  kernel_impl: Literal["reference", "pallas", "auto"] = "reference"
  attn_block: int = 128
  scan_layers: bool = True
  keep_quantized: Literal[None, "experts"] = None
  indexer_stage: Literal["off", "dense", "sparse"] = "off"
  remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
  capture: bool = False

  def __post_init__(self):
    _validate(self)

  def replace(self, **overrides) -> "Options":
    """A copy with `overrides` (validated again)."""
    names = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - names)
    if unknown:
      raise ValueError(f"unknown Options field(s) {unknown}; expected some of {sorted(names)}")
    return dataclasses.replace(self, **overrides)

  def build(self) -> dict[str, Any]:
    """The build-time fields (`BUILD_FIELDS`) and their values."""
    return {name: getattr(self, name) for name in BUILD_FIELDS}

  def check_build(self, built: "Options") -> None:
    """Raises ValueError naming the first build-time field where these options differ from the
    ones a model was `built` with."""
    for name in BUILD_FIELDS:
      mine, theirs = getattr(self, name), getattr(built, name)
      if mine != theirs:
        raise ValueError(f"options {name}={mine!r} but the model was built with {name}={theirs!r}; "
                         f"{name} shapes the module tree: build the model with it "
                         f"(Transformer(cfg, rngs=..., options=...)) or run with "
                         f"model.options.replace(...)")


def _validate(o: Options) -> None:
  """The one check of every field: ValueError naming the field, its value and what is expected."""
  if o.kernel_impl not in KERNEL_IMPLS:
    raise ValueError(f"kernel_impl={o.kernel_impl!r}; expected one of {', '.join(KERNEL_IMPLS)}")
  if isinstance(o.attn_block, bool) or not isinstance(o.attn_block, int) or o.attn_block <= 0:
    raise ValueError(f"attn_block={o.attn_block!r} must be a positive integer")
  if not isinstance(o.scan_layers, bool):
    raise ValueError(f"scan_layers={o.scan_layers!r} must be True or False")
  if o.keep_quantized not in KEEP_QUANTIZED:
    raise ValueError(f"keep_quantized={o.keep_quantized!r}; expected one of None, 'experts'")
  if o.indexer_stage not in INDEXER_STAGES:
    raise ValueError(f"indexer_stage={o.indexer_stage!r}; expected off, dense or sparse")
  if o.remat not in ("none", *REMAT_POLICIES):
    raise ValueError(f"remat={o.remat!r}; expected one of none, {', '.join(REMAT_POLICIES)}")
  if not isinstance(o.capture, bool):
    raise ValueError(f"capture={o.capture!r} must be True or False")
  try:
    hash(o.moe)
  except TypeError:
    raise ValueError(f"moe={o.moe!r} must be hashable (an MoEImpl, static under jit)") from None
  try:
    hash(o.context)
  except TypeError:
    raise ValueError(f"context={o.context!r} must be hashable (a ContextParallel layout, static "
                     "under jit)") from None


def drop_former_config_fields(fields: dict[str, Any], source: str) -> dict[str, Any]:
  """`fields` without the keys that moved from `ModelConfig` to `Options` (files this project
  wrote earlier still carry them); one INFO line names the ones dropped."""
  old = [k for k in FORMER_CONFIG_FIELDS if k in fields]
  if old:
    log.info("%s: ignoring %s: run choices now passed as deepseek_v4.Options, not stored in the "
             "config", source, ", ".join(old))
  return {k: v for k, v in fields.items() if k not in FORMER_CONFIG_FIELDS}


__all__ = ["BUILD_FIELDS", "FORMER_CONFIG_FIELDS", "Options", "REMAT_POLICIES",
           "drop_former_config_fields"]
