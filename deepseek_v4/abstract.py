"""The model built abstractly: every variable's shape, dtype and logical axes, no weights.

One place builds it, for every caller that needs shapes without memory: `summary` and `plan`
(counts and bytes), `parallel` (the shardings parameters are born in, restore targets), the
checkpoint readers (expected tensors, restore targets), training's resume and the ahead-of-time
compiler (deepseek_v4/aot/).

`build(fn)` runs `fn(rngs)` under `nnx.eval_shape` with `ShapeOnlyRngs` standing in for
`nnx.Rngs`; `model(cfg, lora=...)` is the Transformer (LoRA-wrapped if asked), `train_state(cfg,
tcfg)` a training run's model and optimizer.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

from deepseek_v4 import lora as lora_lib
from deepseek_v4.config import ModelConfig
from deepseek_v4.model import Transformer
from deepseek_v4.options import Options

T = TypeVar("T")


class ShapeOnlyRngs:
  """Stands in for `nnx.Rngs` when only shapes matter: every stream returns the same key.

  `nnx.Rngs` bumps a traced counter per draw, and flax's `set_value` then asks the tracer for its
  sharding, which builds an error message by walking the whole jaxpr: quadratic in the number of
  parameters (Flash takes ~10 s, Pro longer). Shapes do not depend on the keys, so the seed given
  to the constructor (as to `nnx.Rngs(seed)`) is ignored.
  """

  def __init__(self, seed: int = 0):
    del seed

  def __call__(self) -> jax.Array:
    return jax.random.key(0)

  def split(self, n: int) -> nnx.Rngs:  # the stacks of scanned layers (vmapped keys)
    return nnx.Rngs(jax.random.split(jax.random.key(0), n))

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    return self.__call__


def build(fn: Callable[[ShapeOnlyRngs], T]) -> T:
  """`fn(rngs)` built under `nnx.eval_shape` (no memory, nothing computed), `rngs` a
  `ShapeOnlyRngs`. Build it outside any mesh context: under one, the parameters' logical axis
  names would be read as mesh axes."""
  return nnx.eval_shape(lambda: fn(ShapeOnlyRngs()))


def model(cfg: ModelConfig, *, lora: tuple[tuple[str, ...], int, float] | None = None,
          options: Options = Options()) -> Transformer:
  """The abstract `Transformer(cfg, options=options)`; with `lora=(targets, rank, alpha)` its
  LoRA-wrapped form (`deepseek_v4.lora.build_model`, as training builds it), as a LoRA run or
  checkpoint holds it."""
  if not isinstance(cfg, ModelConfig):
    raise TypeError(f"cfg must be a ModelConfig; got {type(cfg).__name__}")
  return build(lambda rngs: lora_lib.build_model(cfg, lora, rngs=rngs, options=options))


def train_state(cfg: ModelConfig, tcfg, options: Options = Options()
                ) -> tuple[Transformer, nnx.Optimizer]:
  """The abstract (model, optimizer) of a training run: `train.build(cfg, tcfg)` (LoRA-wrapped,
  frozen parameters left out of the optimizer, as `tcfg` asks), shapes only."""
  from deepseek_v4 import train

  return nnx.eval_shape(lambda: train.build(cfg, tcfg, rngs=ShapeOnlyRngs, options=options))
