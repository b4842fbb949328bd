"""Partial interleaved RoPE with YaRN (docs/architecture.md#rope) vs NumPy and its defining
properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_v4
from deepseek_v4.layers import rope
from tests.tolerances import F32_FUNCTION


def _np_inv_freq(r, theta, factor=1.0, orig=1, beta_fast=32.0, beta_slow=1.0):
  """docs/architecture.md#rope in float64: base w_k = theta^(-2k/r), YaRN ramp between lo and hi."""
  k = np.arange(r // 2, dtype=np.float64)
  w0 = theta ** (-2.0 * k / r)
  if factor == 1.0:
    return w0
  c_hat = lambda n: r * math.log(orig / (2 * math.pi * n)) / (2 * math.log(theta))
  lo = max(math.floor(c_hat(beta_fast)), 0)
  hi = min(math.ceil(c_hat(beta_slow)), r - 1)
  if lo == hi:
    hi += 0.001
  ramp = np.clip((k - lo) / (hi - lo), 0.0, 1.0)
  return w0 * (1 - ramp) + (w0 / factor) * ramp


def _np_rope(x, pos, w, inverse=False):
  """Rotates the LAST 2*len(w) channels as complex numbers x_{2k} + i x_{2k+1}.

  x: [B, T, ..., H]; pos: [B, T].
  """
  x = np.asarray(x, np.float64)
  r = 2 * len(w)
  ang = np.asarray(pos, np.float64)[..., None] * w  # [B, T, R2]
  ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + ang.shape[-1:])
  if inverse:
    ang = -ang
  z = x[..., -r:][..., 0::2] + 1j * x[..., -r:][..., 1::2]
  z = z * np.exp(1j * ang)
  out = x.copy()
  out[..., -r:][..., 0::2] = z.real
  out[..., -r:][..., 1::2] = z.imag
  return out


def _rope(x, pos, w, inverse=False):
  cos, sin = rope.rope_angles(jnp.asarray(pos), np.asarray(w, np.float32))
  return rope.apply_rope(jnp.asarray(x), cos, sin, inverse=inverse)


# ----- frequencies ------------------------------------------------------------------------------
def test_flash_yarn_band_is_15_to_25():
  cfg = deepseek_v4.flash()
  w = rope.inv_freq(cfg, compressed=True)
  w0 = 160000.0 ** (-2.0 * np.arange(32) / 64)
  assert w.shape == (32,) and w.dtype == np.float32
  np.testing.assert_allclose(w[:16], w0[:16], rtol=F32_FUNCTION)  # pairs <= 15 unchanged
  np.testing.assert_allclose(w[25:], w0[25:] / 16, rtol=F32_FUNCTION)  # pairs >= 25 divided by 16
  # Strictly blended in between: ramp (k - 15) / 10.
  ramp = (np.arange(16, 25) - 15) / 10
  np.testing.assert_allclose(w[16:25], w0[16:25] * (1 - ramp) + w0[16:25] / 16 * ramp,
                             rtol=F32_FUNCTION)


@pytest.mark.parametrize("preset", ["flash", "pro", "tiny"])
@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "sliding"])
def test_inv_freq_matches_numpy(preset, compressed):
  cfg = deepseek_v4.PRESETS[preset]()
  w = rope.inv_freq(cfg, compressed=compressed)
  if compressed:
    ref = _np_inv_freq(cfg.rope_dim, cfg.compress_rope_theta, cfg.rope_factor,
                       cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow)
  else:  # sliding-only layers: theta = 10000, never YaRN
    ref = _np_inv_freq(cfg.rope_dim, cfg.rope_theta)
  np.testing.assert_allclose(w, ref, rtol=F32_FUNCTION)


def test_private_inv_freq_lo_equals_hi_branch():
  # ĉ(beta_fast) and ĉ(beta_slow) both clamp to the same integer: hi gets + 0.001.
  args = (8, 10000.0, 2.0, 4, 32.0, 16.0)
  np.testing.assert_allclose(rope._inv_freq(*args), _np_inv_freq(*args), rtol=F32_FUNCTION)


def test_no_yarn_when_factor_is_one():
  cfg = deepseek_v4.tiny(rope_factor=1.0)
  np.testing.assert_allclose(rope.inv_freq(cfg, True),
                             _np_inv_freq(cfg.rope_dim, cfg.compress_rope_theta),
                             rtol=F32_FUNCTION)


# ----- rotation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 5, 3, 12), (2, 5, 12), (1, 4, 2, 3, 8)],
                         ids=["heads", "no_heads", "two_head_axes"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_apply_rope_matches_complex_rotation(shape, inverse):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  B, T = shape[:2]
  pos = rng.integers(0, 60, size=(B, T))
  w = _np_inv_freq(8, 160000.0, 4.0, 16)  # rope_dim 8: the last 8 channels rotate
  out = np.asarray(_rope(x, pos, w, inverse))
  ref = _np_rope(x, pos, w.astype(np.float32), inverse)
  np.testing.assert_allclose(out, ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)
  # The nope channels are untouched, bit for bit.
  np.testing.assert_array_equal(out[..., :-8], x[..., :-8])


def test_interleaved_not_rotate_half():
  # One pair (channels 0, 1) at angle pi/2: (1, 0) -> (0, 1); channels 2,3 (pair 1, w=0) fixed.
  x = np.array([[[1.0, 0.0, 5.0, 7.0]]], np.float32)
  out = np.asarray(_rope(x, np.array([[1]]), np.array([math.pi / 2, 0.0])))
  np.testing.assert_allclose(out, [[[0.0, 1.0, 5.0, 7.0]]], atol=F32_FUNCTION)


def test_bf16_keeps_dtype():
  x = jnp.ones((1, 3, 2, 16), jnp.bfloat16)
  out = _rope(x, np.arange(3)[None], _np_inv_freq(8, 10000.0))
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape


def test_inverse_undoes_rope():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 4, 16)).astype(np.float32)
  pos = rng.integers(0, 50, size=(2, 7))
  w = rope.inv_freq(deepseek_v4.tiny(rope_dim=8, head_dim=16), compressed=True)
  back = _rope(_rope(x, pos, w), pos, w, inverse=True)
  np.testing.assert_allclose(np.asarray(back), x, rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_rope_preserves_norm():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 9, 3, 16)).astype(np.float32)
  pos = rng.integers(0, 50, size=(2, 9))
  out = np.asarray(_rope(x, pos, _np_inv_freq(16, 10000.0)))
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=F32_FUNCTION)


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "sliding"])
def test_dot_product_depends_only_on_offset(compressed):
  cfg = deepseek_v4.tiny()
  w = rope.inv_freq(cfg, compressed)
  rng = np.random.default_rng(3)
  q = rng.normal(size=(cfg.head_dim,)).astype(np.float32)
  k = rng.normal(size=(cfg.head_dim,)).astype(np.float32)
  for delta in (0, 1, 5, 13):
    pq = np.array([delta, delta + 7, delta + 20, delta + 31])
    pk = pq - delta
    rq = np.asarray(_rope(np.broadcast_to(q, (1, 4, cfg.head_dim)), pq[None], w))
    rk = np.asarray(_rope(np.broadcast_to(k, (1, 4, cfg.head_dim)), pk[None], w))
    dots = np.sum(rq * rk, axis=-1)[0]
    np.testing.assert_allclose(dots, dots[0], rtol=F32_FUNCTION, atol=F32_FUNCTION)
  # ... and it does depend on the offset (the rope channels matter).
  d0 = np.sum(np.asarray(_rope(q[None, None], np.array([[0]]), w)) * k)
  d5 = np.sum(np.asarray(_rope(q[None, None], np.array([[5]]), w)) * k)
  assert abs(d0 - d5) > 1e-3


def test_rope_angles_shape_and_values():
  pos = jnp.arange(6).reshape(2, 3)
  w = np.array([1.0, 0.5], np.float32)
  cos, sin = rope.rope_angles(pos, w)
  assert cos.shape == (2, 3, 2) and cos.dtype == jnp.float32
  ang = np.arange(6).reshape(2, 3, 1) * np.array([1.0, 0.5])
  np.testing.assert_allclose(np.asarray(cos), np.cos(ang), atol=F32_FUNCTION)
  np.testing.assert_allclose(np.asarray(sin), np.sin(ang), atol=F32_FUNCTION)
  jax.block_until_ready(cos)
