"""LoRA fine-tuning (Hu et al., 2021, arXiv:2106.09685) on chosen projections of the model.

`build_model(cfg, (targets, rank, alpha), rngs=...)` is the one construction of a model with its
adapters (training, the abstract builds for checkpoint restore and the train command's checks all
call it). `apply_lora(model, targets, rank, alpha)` swaps each targeted `Linear` for a `LoRALinear` that keeps
the original weight (same parameter path, so checkpoints of the base model still load) and adds
`lora_a` [r, in] (random) and `lora_b` [out, r] (zeros): `y = x W^T + (alpha / r) x A^T B^T`.
The adapters are `nnx.LoRAParam`s, so a filter selects them for training. `merge_lora` folds the
adapters into the weights (for export or fast inference); `unmerge_lora` takes them out again.

Targets are matched by module name (`wq_a`, `wq_b`, `wkv`, `wo_b`, `head`, `shared_experts.w1`,
...) on modules the model calls as `Linear`s. `wo_a` (read as a grouped weight), compressor
projections and stacked experts are read as raw weights by the layers and cannot take an adapter
(so `wkv` means the attention's K=V projection, never a compressor's).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_v4 import layout
from deepseek_v4.config import ModelConfig
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
  matching = [(n, p, m) for n, p, m in _named_linears(model) if _matches(n, targets)]
  # Same-named projections the layers read raw (a compressor's `wkv`) are skipped.
  found = [(n, p, m) for n, p, m in matching if not _RAW_WEIGHT.search(n)]
  for t in targets:
    if not any(_matches(n, [t]) for n, _, _ in found):
      if any(_matches(n, [t]) for n, _, _ in matching):
        raise ValueError(f"LoRA cannot wrap {t!r}: the layers read these weights directly")
      known = sorted({n.split(".")[-1] for n, _, _ in _named_linears(model)})
      raise ValueError(f"LoRA target {t!r} matches no Linear module; known names: {known}")
  wrapped = []
  for name, path, module in found:
    if isinstance(module, LoRALinear):
      continue
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    setattr(parent, path[-1], LoRALinear(module, rank, alpha, rngs=rngs))
    wrapped.extend(_official(model, name))
  return wrapped


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


def merge_lora(model: nnx.Module) -> None:
  """W <- W + (alpha/r) B A for every adapter not yet merged (the adapters are kept)."""
  for m in lora_modules(model):
    if not m.merged:
      m.weight.set_value((m.weight[...].astype(jnp.float32) + m.delta()).astype(m.weight.dtype))
      m.merged = True


def unmerge_lora(model: nnx.Module) -> None:
  """Inverse of `merge_lora`: W <- W - (alpha/r) B A."""
  for m in lora_modules(model):
    if m.merged:
      m.weight.set_value((m.weight[...].astype(jnp.float32) - m.delta()).astype(m.weight.dtype))
      m.merged = False


def strip_lora(model: nnx.Module) -> None:
  """Merges the adapters and puts plain Linears back (the base model's exact parameter tree)."""
  merge_lora(model)
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
