"""Partial interleaved rotary embedding with the two thetas and YaRN (spec §3.3).

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
  `inverse=True` rotates by the negative angle (the output de-rotation of spec §3.11).
  """
  r = 2 * cos.shape[-1]
  extra = x.ndim - cos.ndim  # head axes between T and the channel axis
  shape = cos.shape[:-1] + (1,) * extra + cos.shape[-1:]
  cos, sin = cos.reshape(shape), sin.reshape(shape)
  if inverse:
    sin = -sin
  nope, rot = x[..., :-r], x[..., -r:].astype(jnp.float32)
  even, odd = rot[..., 0::2], rot[..., 1::2]  # [..., R2]
  out_even = even * cos - odd * sin
  out_odd = even * sin + odd * cos
  rot = jnp.stack([out_even, out_odd], axis=-1).reshape(rot.shape)
  return jnp.concatenate([nope, rot.astype(x.dtype)], axis=-1)
