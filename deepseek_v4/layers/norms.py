"""RMSNorm (docs/architecture.md#notation): float32 inside, weight applied in float32, cast back
once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from deepseek_v4.layers.params import param


def rms_norm(x: Float[Array, "... D"], weight: Float[Array, "D"] | None, eps: float) -> Array:
  """`w * x / sqrt(mean(x^2) + eps)` over the last axis; `weight=None` is the unweighted norm."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  """Weighted RMSNorm; the weight is kept in float32 (docs/architecture.md#dtypes)."""

  def __init__(self, dim: int, eps: float, *, axis_name: str | None = "embed"):
    self.eps = eps
    self.weight = param(jnp.ones((dim,), jnp.float32), (axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.weight[...], self.eps)
