"""RMSNorm (docs/architecture.md#notation) vs an independent NumPy re-derivation."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_v4.layers.norms import RMSNorm, rms_norm
from tests.tolerances import BF16, F32_FUNCTION


def _np_rms_norm(x, w, eps):
  x = np.asarray(x, np.float64)
  y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return y if w is None else y * np.asarray(w, np.float64)


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 16)], ids=["1d", "3d"])
def test_rms_norm_matches_numpy(weighted, shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32) * 3.0
  w = rng.normal(size=shape[-1:]).astype(np.float32) if weighted else None
  out = rms_norm(jnp.asarray(x), None if w is None else jnp.asarray(w), 1e-6)
  assert out.dtype == jnp.float32 and out.shape == shape
  np.testing.assert_allclose(np.asarray(out), _np_rms_norm(x, w, 1e-6), rtol=F32_FUNCTION,
                             atol=F32_FUNCTION)


def test_eps_matters_for_tiny_inputs():
  # mean(x^2) = 1e-6 = eps, so the scale is 1/sqrt(2e-6) rather than 1/sqrt(1e-6).
  x = np.full((4,), 1e-3, np.float32)
  out = np.asarray(rms_norm(jnp.asarray(x), None, 1e-6))
  np.testing.assert_allclose(out, np.full(4, 1e-3 / np.sqrt(2e-6)), rtol=F32_FUNCTION)


def test_unweighted_has_unit_rms():
  x = np.random.default_rng(1).normal(size=(5, 32)).astype(np.float32)
  out = np.asarray(rms_norm(jnp.asarray(x), None, 0.0 + 1e-12))
  np.testing.assert_allclose(np.sqrt(np.mean(out**2, axis=-1)), 1.0, rtol=F32_FUNCTION)


def test_bf16_input_returns_bf16():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 3, 32)).astype(np.float32)
  w = rng.normal(size=(32,)).astype(np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  out = rms_norm(xb, jnp.asarray(w), 1e-6)
  assert out.dtype == jnp.bfloat16
  ref = _np_rms_norm(np.asarray(xb.astype(jnp.float32)), w, 1e-6)
  # Computed in f32 and rounded once to bf16.
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=BF16, atol=BF16)


def test_module_uses_its_weight():
  norm = RMSNorm(8, 1e-6)
  assert norm.weight[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(norm.weight[...]), np.ones(8))
  w = np.arange(1, 9, dtype=np.float32)
  norm.weight[...] = jnp.asarray(w)
  x = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), _np_rms_norm(x, w, 1e-6),
                             rtol=F32_FUNCTION, atol=F32_FUNCTION)
