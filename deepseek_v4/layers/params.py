"""Parameter creation with logical axis names (STYLE.md §5) and the plain linear map.

Every parameter carries `out_sharding` metadata (the logical axes of its dimensions). The sharding
module maps those names to mesh axes; layers never name physical axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RouterBias(nnx.Variable):
  """Aux-loss-free balancing bias of a learned router: state, not a gradient-trained parameter."""


class HashTable(nnx.Variable):
  """Frozen token-id -> expert-ids table of the hash-routed layers (data, never trained)."""


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  """An nnx.Param tagged with logical axis names (one per dimension)."""
  if len(axes) != value.ndim:
    raise ValueError(f"axes={axes} has {len(axes)} names for a parameter of shape {value.shape}")
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = x W^T with W stored [out, in] (the checkpoint layout), no bias.

  Args:
    in_features / out_features: sizes.
    axes: logical names of (out, in).
  """

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               std: float, param_dtype, rngs: nnx.Rngs):
    self.weight = param(normal(rngs, (out_features, in_features), std, param_dtype), axes)

  def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
    dtype = dtype or x.dtype
    return jnp.einsum("...i,oi->...o", x.astype(dtype), self.weight[...].astype(dtype))
