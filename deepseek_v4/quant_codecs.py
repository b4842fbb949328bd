"""FP8 / FP4 weight formats of the official checkpoints (docs/architecture.md#fp8-fp4): dequantize
(JAX), quantize.

* FP8: `W[a, b] = e4m3fn(Wq[a, b]) * 2^(u[a // 128, b // 128] - 127)`, edge blocks partial
  (the scale grid is the ceil division of the weight shape).
* FP4 (routed experts): int8 `[out, in / 2]`, the low nibble is element 2k and the high nibble
  element 2k+1, each an E2M1 code; `W[a, b] = e2m1(code[a, b]) * 2^(u[a, b // 32] - 127)`.
* `u` is an E8M0 byte (`float8_e8m0fnu`; 255 is NaN). The stored scale is a multiplier under both
  namings (hub `.scale`, transformers `.weight_scale_inv`).

Dequantization is exact in float32 and bfloat16 (an E4M3 or E2M1 value times a power of two is
representable in both unless it leaves their exponent range), so it runs directly in the target
dtype: no float32 copy of a bfloat16 tensor is ever made. Float16's narrower range would round,
so float16 results are computed in float32 and cast.

The quantizers pick for each block the smallest power-of-two scale whose rounded values do not
overflow (FP8: max |W| / s <= 464, which rounds to 448; FP4: max |W| / s < 7, which rounds to
6). Unlike DeepSeek's `amax / 448` rule this is idempotent: quantizing a dequantized tensor gives
back the same bytes, so load -> save round trips are byte-identical.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_BLOCK = (128, 128)
FP4_BLOCK = (1, 32)
Format = Literal["fp8", "fp4"]


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How a stored weight decodes: `fmt`, its block, and the logical (dequantized) shape."""
  fmt: Format
  shape: tuple[int, int]

  @property
  def block(self) -> tuple[int, int]:
    return FP8_BLOCK if self.fmt == "fp8" else FP4_BLOCK

  @property
  def scale_shape(self) -> tuple[int, int]:
    return tuple(-(-n // b) for n, b in zip(self.shape, self.block))

  @property
  def stored_shape(self) -> tuple[int, int]:
    return self.shape if self.fmt == "fp8" else (self.shape[0], self.shape[1] // 2)


def _compute_dtype(dtype) -> jnp.dtype:
  dtype = jnp.dtype(dtype)
  return dtype if dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)) else jnp.dtype(jnp.float32)


def _expand(scale: jax.Array, block: tuple[int, int], shape: tuple[int, int], offset: tuple[int, int]):
  """Per-element scales of the `shape` window starting at `offset` (relative to the first block
  row/column of `scale`)."""
  s = jnp.repeat(jnp.repeat(scale, block[0], axis=0), block[1], axis=1)
  return s[offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]]


@functools.partial(jax.jit, static_argnames=("dtype", "offset"))
def dequantize_fp8(weight: jax.Array, scale: jax.Array, dtype=jnp.float32,
                   offset: tuple[int, int] = (0, 0)) -> jax.Array:
  """E4M3 `weight` [m, n] times its 128x128 E8M0 block `scale` (ceil grid) -> `dtype`.

  `offset` places a window of a larger tensor: `weight` starts `offset` elements into the first
  block of `scale` (used to dequantize a shard without the rest of the tensor).
  """
  ct = _compute_dtype(dtype)
  s = _expand(scale.astype(ct), FP8_BLOCK, weight.shape, offset)
  return (weight.astype(ct) * s).astype(dtype)


def unpack_fp4(packed: jax.Array) -> jax.Array:
  """int8/uint8 [m, n/2] -> float4_e2m1fn [m, n]: low nibble first (element 2k), then high."""
  u = jax.lax.bitcast_convert_type(packed, jnp.uint8) if packed.dtype == jnp.int8 else packed
  codes = jnp.stack([u & 0xF, u >> 4], axis=-1).reshape(*u.shape[:-1], 2 * u.shape[-1])
  return jax.lax.bitcast_convert_type(codes.astype(jnp.uint4), jnp.float4_e2m1fn)


# The 16 E2M1 values by code (sign bit 3): a table lookup decodes them about 1.6x faster on
# XLA:CPU than a float4 conversion (measured at 32 x 512 x 512, 134 -> 83 ms), and exactly.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.partial(jax.jit, static_argnames=("dtype", "offset"))
def dequantize_fp4(packed: jax.Array, scale: jax.Array, dtype=jnp.float32,
                   offset: tuple[int, int] = (0, 0)) -> jax.Array:
  """Packed E2M1 `packed` [m, n/2] times its 1x32 E8M0 `scale` [m, ceil(n/32)] -> [m, n]."""
  ct = _compute_dtype(dtype)
  m, n = packed.shape[0], 2 * packed.shape[1]
  if offset == (0, 0) and n % FP4_BLOCK[1] == 0:  # whole blocks: a lookup and a broadcast
    u = jax.lax.bitcast_convert_type(packed, jnp.uint8) if packed.dtype == jnp.int8 else packed
    codes = jnp.stack([u & 0xF, u >> 4], axis=-1).reshape(m, n)  # low nibble first
    w = jnp.asarray(_E2M1, ct)[codes].reshape(m, n // 32, 32)  # [m, blocks, 32]
    return (w * scale.astype(ct)[:, :, None]).reshape(m, n).astype(dtype)
  w = unpack_fp4(packed)
  s = _expand(scale.astype(ct), FP4_BLOCK, w.shape, offset)
  return (w.astype(ct) * s).astype(dtype)


def dequantize(spec: QuantSpec, weight, scale, dtype=jnp.float32, offset=(0, 0)) -> jax.Array:
  fn = dequantize_fp8 if spec.fmt == "fp8" else dequantize_fp4
  return fn(jnp.asarray(weight), jnp.asarray(scale), dtype=jnp.dtype(dtype), offset=tuple(offset))


# ----- quantization (NumPy, on save) --------------------------------------------------------------
def _e8m0(exponent: np.ndarray) -> np.ndarray:
  return (np.clip(exponent, -127, 127) + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


def _block_amax(w: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  m, n = w.shape
  gm, gn = -(-m // block[0]), -(-n // block[1])
  pad = np.zeros((gm * block[0], gn * block[1]), np.float32)
  pad[:m, :n] = np.abs(w)
  return pad.reshape(gm, block[0], gn, block[1]).max(axis=(1, 3))


def _scale_exponent(amax: np.ndarray, limit: float, strict: bool) -> np.ndarray:
  """Smallest k with amax / 2^k <= limit (strict: < limit), from exact frexp arithmetic."""
  mant, exp = np.frexp(amax.astype(np.float64) / limit)  # x = mant * 2^exp, mant in [0.5, 1)
  k = np.where(mant == 0.5, exp - 1, exp) if not strict else exp
  return np.where(amax > 0, k, 0)


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float [m, n] -> (float8_e4m3fn [m, n], float8_e8m0fnu [ceil(m/128), ceil(n/128)])."""
  w = np.asarray(w, np.float32)
  k = _scale_exponent(_block_amax(w, FP8_BLOCK), 464.0, strict=False)
  scale = _e8m0(k)
  s = np.repeat(np.repeat(scale.astype(np.float32), 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]
  return (w / s).astype(ml_dtypes.float8_e4m3fn), scale


def quantize_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float [m, n] (n even) -> (int8 [m, n/2] nibble pairs, float8_e8m0fnu [m, ceil(n/32)])."""
  w = np.asarray(w, np.float32)
  if w.shape[1] % 2:
    raise ValueError(f"FP4 packing needs an even input width, got shape {w.shape}")
  k = _scale_exponent(_block_amax(w, FP4_BLOCK), 7.0, strict=True)
  scale = _e8m0(k)
  s = np.repeat(scale.astype(np.float32), 32, 1)[:, :w.shape[1]]
  codes = (w / s).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
  return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8), scale


def quantize(fmt: Format, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return quantize_fp8(w) if fmt == "fp8" else quantize_fp4(w)


# ----- FP4 experts -> FP8 without loss (docs/architecture.md#fp8-fp4) -----------------------------
def fp4_to_fp8(packed: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """An FP4 expert weight as an exactly equal FP8 128x128-block weight.

  Per block, `s8 = max(sub-scales) / 2^6`, and each E2M1 value is multiplied by its 1x32 sub-scale
  / s8 (a power of two <= 64; 6 * 64 = 384 < 448). Exact when the sub-scales of every 128x128 block
  span at most 2^6; otherwise a ValueError names the first block that does not.
  """
  u = np.asarray(scale).view(np.uint8).astype(np.int32)
  m, n = packed.shape[0], packed.shape[1] * 2
  gm, gn = -(-m // 128), -(-n // 128)
  pad = np.full((gm * 128, gn * 4), -1, np.int32)
  pad[:m, :u.shape[1]] = u
  blocks = pad.reshape(gm, 128, gn, 4)
  top = blocks.max(axis=(1, 3))
  low = np.where(blocks >= 0, blocks, 255).min(axis=(1, 3))
  bad = np.argwhere(top - low > 6)
  if len(bad):
    i, j = bad[0]
    raise ValueError(f"FP4 -> FP8 is not lossless: block ({i}, {j}) has sub-scales spanning "
                     f"2^{top[i, j] - low[i, j]} > 2^6 ({len(bad)} such blocks)")
  s8 = top - 6
  ratio = u - np.repeat(np.repeat(s8, 128, 0), 4, 1)[:m, :u.shape[1]]  # exponent in [0, 6]
  values = np.asarray(unpack_fp4(jnp.asarray(packed))).astype(np.float32)
  values = values * np.repeat(np.exp2(ratio).astype(np.float32), 32, 1)[:, :n]
  return values.astype(ml_dtypes.float8_e4m3fn), _e8m0(s8 - 127)
