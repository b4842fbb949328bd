"""Partial interleaved rotary embedding with the two thetas and YaRN (docs/architecture.md#rope).

Only the LAST `rope_dim` channels of a head rotate; inside them, channels (2k, 2k+1) form one complex
number rotated by `p * w_k`. Compressed (CSA/HCA) layers use `compress_rope_theta` with YaRN on the
frequencies and no magnitude factor; sliding-only layers use `rope_theta` without YaRN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from deepseek_v4.config import ModelConfig


@functools.lru_cache(maxsize=64)
def _inv_freq(rope_dim: int, theta: float, factor: float, orig: int, beta_fast: float,
              beta_slow: float) -> np.ndarray:
  """Per-pair angular frequencies `w_k`, k = 0 .. rope_dim/2 - 1 (float32, as transformers)."""
  k = np.arange(0, rope_dim, 2, dtype=np.float32)
  base = (1.0 / (theta ** (k / rope_dim))).astype(np.float32)
  if factor == 1.0:
    return base

  def correction(n_rot: float) -> float:  # ĉ(n) = r ln(orig / (2 pi n)) / (2 ln theta)
    return rope_dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

  lo = max(math.floor(correction(beta_fast)), 0)
  hi = min(math.ceil(correction(beta_slow)), rope_dim - 1)
  if lo == hi:
    hi += 0.001
  ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
  return (base / factor * ramp + base * (1 - ramp)).astype(np.float32)


def inv_freq(cfg: ModelConfig, compressed: bool) -> np.ndarray:
  """Frequencies of a layer: compressed layers (CSA/HCA) use the YaRN table."""
  if compressed:
    return _inv_freq(cfg.rope_dim, cfg.compress_rope_theta, cfg.rope_factor,
                     cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow)
  return _inv_freq(cfg.rope_dim, cfg.rope_theta, 1.0, 1, 1.0, 1.0)


def rope_angles(positions: Int[Array, "*P"], freqs: np.ndarray) -> tuple[Array, Array]:
  """cos, sin of `positions * w_k` in float32, shape [*P, rope_dim/2]."""
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: Float[Array, "B T *heads H"], cos: Float[Array, "B T R2"],
               sin: Float[Array, "B T R2"], inverse: bool = False) -> Array:
  """Rotates the last 2*R2 channels of `x` (interleaved pairs) at the given angles.

  `cos`/`sin` have the leading [B, T] of `x` (B may be 1); head axes in between are broadcast.
  `inverse=True` rotates by the negative angle (the output de-rotation of
  docs/architecture.md#output-projection).

  Written as one elementwise pass over all H channels, `x * c + swap(x) * s` with `swap` exchanging
  the two channels of each pair, kept only on the rotated channels: slicing the rotated part off and
  concatenating it back made XLA:CPU copy the tensor twice (the attention queries are [T, N, H]).
  """
  r = 2 * cos.shape[-1]
  H = x.shape[-1]
  if (H - r) % 2:
    raise ValueError(f"apply_rope: the unrotated channels must be even in number, got {H - r}")
  extra = x.ndim - cos.ndim  # head axes between T and the channel axis
  shape = cos.shape[:-1] + (1,) * extra + (H,)
  if inverse:
    sin = -sin
  pad = [(0, 0)] * (cos.ndim - 1) + [(H - r, 0)]
  # Per channel: (cos, cos) and (-sin, +sin) for each pair; the unrotated channels get (1, 0).
  c = jnp.pad(jnp.repeat(cos, 2, axis=-1), pad, constant_values=1.0).reshape(shape)
  s = jnp.pad(jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], r), pad).reshape(shape)
  x32 = x.astype(jnp.float32)
  swapped = x32.reshape(*x.shape[:-1], H // 2, 2)[..., ::-1].reshape(x.shape)
  rotated = jnp.arange(H) >= H - r
  return jnp.where(rotated, x32 * c + swapped * s, x32).astype(x.dtype)
