"""LoRA fine-tuning (Hu et al., 2021, arXiv:2106.09685) on chosen projections of the model.

`build_model(cfg, (targets, rank, alpha), rngs=...)` is the one construction of a model with its
adapters (training, the abstract builds for checkpoint restore and the train command's checks all
call it). `apply_lora(model, targets, rank, alpha)` swaps each targeted `Linear` for a `LoRALinear` that keeps
the original weight (same parameter path, so checkpoints of the base model still load) and adds
`lora_a` [r, in] (random) and `lora_b` [out, r] (zeros): `y = x W^T + (alpha / r) x A^T B^T`.
The adapters are `nnx.LoRAParam`s, so a filter selects them for training. `merge_lora` folds the
adapters into the weights (for export or fast inference); `unmerge_lora` takes them out again.

Targets are matched by module name (`wq_a`, `wq_b`, `wkv`, `wo_b`, `head`, `shared_experts.w1`,
...) on modules the model calls as `Linear`s. `wo_a` (read as a grouped weight) and compressor
projections are read as raw weights by the layers and cannot take an adapter (so `wkv` means the
attention's K=V projection, never a compressor's).

The target `experts` gives the routed experts one small adapter per expert and weight
(`layers.moe.ExpertAdapters`: A [E, in, r], B [E, r, out]), applied inside the expert loop. Over
experts kept as their released FP4 codes (`Options.keep_quantized="experts"`, QLoRA) the codes
stay frozen bytes: merging an adapted expert needs a requantization, which `strip_lora` does only
when asked (`requantize_experts=True`, as `convert --to hub --quantize fp4-experts` does): the
experts whose adapter is exactly zero keep their original bytes. For inference without that
FP4 rounding, `strip_lora(keep_expert_adapters=True)` (what `checkpoint.io.restore_model` and
`generate --checkpoint` do) merges every float adapter and leaves the kept experts' adapters
unmerged, applied in the expert loop as in training: the trained model's exact function.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_v4 import layout
from deepseek_v4.config import ModelConfig
from deepseek_v4.layers.moe import ExpertAdapters, Experts
from deepseek_v4.layers.params import Linear
from deepseek_v4.model import Transformer
from deepseek_v4.options import Options

# Linear modules whose weight the layers read directly (not through Linear.__call__): the grouped
# output projection, the compressors, and the output head (the training loss and evaluation read
# `head.weight` in their chunked cross-entropy, so an adapter there would get no gradient).
_RAW_WEIGHT = re.compile(r"(^|\.)(wo_a|compressor\.wkv|compressor\.wgate|head)$")


class LoRALinear(Linear):
  """A Linear with a low-rank adapter; `merged` says whether the adapter is in the weight."""

  def __init__(self, base: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
    # A Linear of scanned layers holds [count, out, in]: one adapter per layer, stacked the same.
    *lead, out_features, in_features = base.weight.shape
    self.weight = base.weight
    self.scale = alpha / rank
    std = 1.0 / rank ** 0.5 / in_features ** 0.5
    a = std * jax.random.normal(rngs.params(), (*lead, rank, in_features), jnp.float32)
    self.lora_a = nnx.LoRAParam(a.astype(jnp.float32))
    self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, out_features, rank), jnp.float32))
    self.merged = False

  def delta(self) -> jax.Array:
    """The adapter's weight update (alpha / r) B A, [out, in], float32."""
    return self.scale * (self.lora_b[...] @ self.lora_a[...])

  def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
    y = super().__call__(x, dtype)
    if self.merged:
      return y
    dtype = dtype or x.dtype
    h = jnp.einsum("...i,ri->...r", x.astype(dtype), self.lora_a[...].astype(dtype))
    return y + self.scale * jnp.einsum("...r,or->...o", h, self.lora_b[...].astype(dtype))


def _named_linears(model: nnx.Module):
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Linear):
      yield layout.path_name(path), path, module


def _official(model: nnx.Module, name: str) -> list[str]:
  """The official per-layer names of a module path (a scanned stack holds several layers)."""
  cfg = getattr(model, "cfg", None)
  scan_layers = model.options.scan_layers if hasattr(model, "options") else True
  return [n for n, _ in layout.official(cfg, name, scan_layers)]


def _matches(name: str, targets: Iterable[str]) -> bool:
  return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nnx.Module, targets: Iterable[str], *, rank: int, alpha: float,
               rngs: nnx.Rngs) -> list[str]:
  """Wraps every Linear whose name ends with a target; returns the wrapped modules' official
  names (`layers.3.attn.wq_b`; each layer of a scanned stack gets its own adapter slice).

  Raises:
    ValueError: a target matches nothing, or names a weight the layers read raw.
  """
  if rank < 1:
    raise ValueError(f"rank={rank} must be >= 1")
  targets = tuple(targets)
  wrapped = []
  if "experts" in targets:
    targets = tuple(t for t in targets if t != "experts")
    wrapped += _adapt_experts(model, rank, alpha, rngs)
  if not targets:
    return wrapped
  matching = [(n, p, m) for n, p, m in _named_linears(model) if _matches(n, targets)]
  # Same-named projections the layers read raw (a compressor's `wkv`) are skipped.
  found = [(n, p, m) for n, p, m in matching if not _RAW_WEIGHT.search(n)]
  for t in targets:
    if not any(_matches(n, [t]) for n, _, _ in found):
      if any(_matches(n, [t]) for n, _, _ in matching):
        raise ValueError(f"LoRA cannot wrap {t!r}: the layers read these weights directly")
      known = sorted({n.split(".")[-1] for n, _, _ in _named_linears(model)})
      raise ValueError(f"LoRA target {t!r} matches no Linear module; known names: "
                       f"{known + ['experts']}")
  for name, path, module in found:
    if isinstance(module, LoRALinear):
      continue
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    setattr(parent, path[-1], LoRALinear(module, rank, alpha, rngs=rngs))
    wrapped.extend(_official(model, name))
  return wrapped


def _routed_experts(model: nnx.Module):
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Experts):
      yield layout.path_name(path), module


def _adapt_experts(model: nnx.Module, rank: int, alpha: float, rngs: nnx.Rngs) -> list[str]:
  """Gives every routed-expert stack its `ExpertAdapters`; returns their official names."""
  found = list(_routed_experts(model))
  if not found:
    raise ValueError("LoRA target 'experts' matches no routed experts in this model")
  names = []
  for name, module in found:
    if module.lora is None:
      module.lora = ExpertAdapters(module.logical_shapes(), rank, alpha, rngs=rngs)
      names.extend(_official(model, name))
  return names


def build_model(cfg: ModelConfig, lora: tuple[Sequence[str], int, float] | None, *, rngs,
                adapter_rngs=None, options: Options = Options()) -> Transformer:
  """`Transformer(cfg, rngs=rngs, options=options)`, LoRA-wrapped when `lora = (targets, rank,
  alpha)` is given.

  Args:
    cfg: the model's config.
    lora: (targets, rank, alpha) for `apply_lora`, or None for the plain model.
    rngs: the model's `nnx.Rngs` (or `abstract.ShapeOnlyRngs` for a shapes-only build).
    adapter_rngs: where the adapters' random `lora_a` is drawn from (default `rngs`).
    options: the model's `Options` (its build-time fields shape the tree).
  """
  model = Transformer(cfg, rngs=rngs, options=options)
  if lora is not None:
    targets, rank, alpha = lora
    apply_lora(model, targets, rank=rank, alpha=alpha,
               rngs=rngs if adapter_rngs is None else adapter_rngs)
  return model


def lora_modules(model: nnx.Module) -> list[LoRALinear]:
  return [m for _, _, m in _named_linears(model) if isinstance(m, LoRALinear)]


def adapted_experts(experts: Experts) -> list[tuple[int, ...]]:
  """The (layer index in a scanned stack..., expert) positions whose adapter is not exactly zero
  (an expert never routed to keeps B = 0 under AdamW and Muon, so its update is zero)."""
  if experts.lora is None:
    return []
  nonzero = sum(jnp.any(d != 0, axis=(-2, -1)) for d in experts.lora.deltas().values())
  return [tuple(int(i) for i in ix) for ix in zip(*jax.device_get(jnp.nonzero(nonzero)))]


def _kept_refusal(name: str, count: int) -> ValueError:
  return ValueError(
    f"{name}: {count} routed experts carry a nonzero LoRA update but are kept as FP4 codes "
    "(keep_quantized='experts'); merging them needs a requantization: call "
    "strip_lora(model, requantize_experts=True) (what `convert --to hub --quantize fp4-experts` "
    "does: only the adapted experts are requantized, the others keep their bytes), or load the "
    "base with keep_quantized=None to merge in float")


def _merge_experts(model: nnx.Module, sign: float, requantize: bool = False,
                   keep: bool = False) -> None:
  """Adds (`sign` 1) or removes (-1) the routed experts' adapter updates in their weights; with
  `keep`, kept FP4 experts with a nonzero update keep their adapters unmerged."""
  for name, e in _routed_experts(model):
    if e.lora is None or e.lora.merged == (sign > 0):
      continue
    if e.kept:
      todo = adapted_experts(e)
      if todo and keep and not requantize:
        continue
      if todo and not requantize:
        raise _kept_refusal(name, len(todo))
      _requantize_experts(e, todo)
    else:
      for w, d in e.lora.deltas().items():
        var = getattr(e, w)
        var.set_value((var[...].astype(jnp.float32) + sign * d).astype(var.dtype))
    e.lora.merged = sign > 0


def _requantize_experts(e: Experts, positions: list[tuple[int, ...]]) -> None:
  """W_e <- FP4(decode(W_e) + delta_e) for the adapted experts only (quant_codecs'
  quantizer); every other expert keeps its codes and scales byte for byte."""
  import numpy as np

  from deepseek_v4 import quant_codecs

  deltas = {w: np.asarray(d) for w, d in e.lora.deltas().items()}
  for w in ("w1", "w2", "w3"):
    codes, scale = np.array(getattr(e, w)[...]), np.array(getattr(e, f"{w}_scale")[...])
    for ix in positions:
      base = np.asarray(quant_codecs.dequantize_fp4(codes[ix], scale[ix]), np.float32)
      c, s = quant_codecs.quantize_fp4(base + deltas[w][ix])
      codes[ix], scale[ix] = c.view(np.uint8), s
    getattr(e, w).set_value(jnp.asarray(codes))
    getattr(e, f"{w}_scale").set_value(jnp.asarray(scale))


def merge_lora(model: nnx.Module) -> None:
  """W <- W + (alpha/r) B A for every adapter not yet merged (the adapters are kept).

  Raises:
    ValueError: routed experts kept as FP4 codes carry a nonzero update (see `strip_lora`).
  """
  _merge_experts(model, 1.0)
  _merge_linears(model, 1.0)


def unmerge_lora(model: nnx.Module) -> None:
  """Inverse of `merge_lora`: W <- W - (alpha/r) B A."""
  _merge_experts(model, -1.0)
  _merge_linears(model, -1.0)


def _merge_linears(model: nnx.Module, sign: float) -> None:
  """Adds (`sign` 1) or removes (-1) the `LoRALinear`s' updates in their weights."""
  for m in lora_modules(model):
    if m.merged != (sign > 0):
      m.weight.set_value((m.weight[...].astype(jnp.float32) + sign * m.delta())
                         .astype(m.weight.dtype))
      m.merged = sign > 0


def detach_expert_adapters(model: nnx.Module) -> list:
  """Takes every routed-expert stack's adapters off (`Experts.lora` None) and returns them in
  module order, for `attach_expert_adapters` on a rebuilt model of the same config (a cast)."""
  held = []
  for _, e in _routed_experts(model):
    held.append(e.lora)
    e.lora = None
  return held


def attach_expert_adapters(model: nnx.Module, held: list) -> None:
  """Puts back what `detach_expert_adapters` returned, stack by stack in module order."""
  stacks = [e for _, e in _routed_experts(model)]
  if len(stacks) != len(held):
    raise ValueError(f"{len(held)} expert adapter stacks for a model with {len(stacks)} routed "
                     "expert stacks")
  for e, adapters in zip(stacks, held):
    e.lora = adapters


def kept_expert_adapters(model: nnx.Module) -> list[str]:
  """The routed-expert stacks (module names) whose adapters run unmerged over kept FP4 codes."""
  return [name for name, e in _routed_experts(model)
          if e.kept and e.lora is not None and not e.lora.merged]


def strip_lora(model: nnx.Module, requantize_experts: bool = False,
               keep_expert_adapters: bool = False) -> None:
  """Merges the adapters and puts plain Linears back (the base model's exact parameter tree).

  Args:
    requantize_experts: routed experts kept as FP4 codes with a nonzero adapter update get
      requantized (`quant_codecs.quantize_fp4` of the decoded weight plus the update; lossy by
      the FP4 rounding); the experts whose update is zero keep their bytes. Without it (and
      without `keep_expert_adapters`) such experts are refused (ValueError naming the way out).
    keep_expert_adapters: such experts keep their codes and their adapters, unmerged (the
      forward applies them in the expert loop, exactly as in training); everything that merges
      losslessly (the float Linears' and float experts' adapters) is merged. Then the tree is the
      base model's plus those `ExpertAdapters` (`kept_expert_adapters` names them).
  """
  _merge_experts(model, 1.0, requantize=requantize_experts, keep=keep_expert_adapters)
  _merge_linears(model, 1.0)
  for _, e in _routed_experts(model):
    if e.lora is not None and e.lora.merged:
      e.lora = None
  for name, path, module in list(_named_linears(model)):
    if isinstance(module, LoRALinear):
      parent = model
      for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
      setattr(parent, path[-1], _plain_linear(module))


def _plain_linear(m: LoRALinear) -> Linear:
  *_, out_features, in_features = m.weight.shape  # scanned layers: [count, out, in]
  lin = nnx.eval_shape(lambda: Linear(in_features, out_features, axes=(None, None), std=0.0,
                                      param_dtype=m.weight.dtype, rngs=nnx.Rngs(0)))
  lin.weight = m.weight
  return lin
