"""KV compressor (docs/architecture.md#compressor) vs a direct NumPy loop over windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4.layers import compressor as comp_lib
from tests.tolerances import F32_FUNCTION

EPS = 1e-6


def _np_softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def _np_pool(c, z, m, overlap):
  """One entry per complete window; loops over batch, windows and channels' slots.

  HCA: channel-wise softmax over the m tokens of window i.
  CSA: one softmax over 2m slots: window i-1 through the first half A, window i through the
  second half B; for i = 0 the previous slots are empty (weight 0).
  """
  c = np.asarray(c, np.float64)
  z = np.asarray(z, np.float64)
  B, S, K = c.shape
  n = S // m
  w = K // 2 if overlap else K
  out = np.zeros((B, n, w))
  for b in range(B):
    for i in range(n):
      cur = range(m * i, m * i + m)
      if not overlap:
        wts = _np_softmax(z[b, cur], axis=0)  # [m, K]
        out[b, i] = np.sum(wts * c[b, cur], axis=0)
        continue
      vals = [c[b, j, w:] for j in cur]
      logits = [z[b, j, w:] for j in cur]
      if i > 0:
        prev = range(m * (i - 1), m * i)
        vals = [c[b, j, :w] for j in prev] + vals
        logits = [z[b, j, :w] for j in prev] + logits
      wts = _np_softmax(np.stack(logits), axis=0)  # [m or 2m, w]
      out[b, i] = np.sum(wts * np.stack(vals), axis=0)
  return out


def _np_rms(x, weight):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight


def _np_rope_last(x, pos, freqs):
  """Interleaved rotation of the last 2*len(freqs) channels; x [B, n, W], pos [n]."""
  r = 2 * len(freqs)
  out = np.array(x, np.float64)
  z = out[..., -r:][..., 0::2] + 1j * out[..., -r:][..., 1::2]
  z = z * np.exp(1j * pos[:, None] * np.asarray(freqs, np.float64))
  out[..., -r:][..., 0::2] = z.real
  out[..., -r:][..., 1::2] = z.imag
  return out


# ----- pool_windows -------------------------------------------------------------------------------
@pytest.mark.parametrize("m,overlap", [(4, True), (4, False), (3, False), (2, True)],
                         ids=["csa4", "hca4", "hca3", "csa2"])
def test_pool_windows_matches_numpy(m, overlap):
  rng = np.random.default_rng(0)
  B, n, w = 2, 5, 6
  K = (2 if overlap else 1) * w
  c = rng.normal(size=(B, n * m, K)).astype(np.float32)
  z = (2 * rng.normal(size=(B, n * m, K))).astype(np.float32)
  out = comp_lib.pool_windows(jnp.asarray(c), jnp.asarray(z), m, overlap)
  assert out.shape == (B, n, w)
  np.testing.assert_allclose(np.asarray(out), _np_pool(c, z, m, overlap), rtol=F32_FUNCTION,
                             atol=F32_FUNCTION)


def test_pool_windows_csa_explicit_prev():
  # An explicit `prev` equals pooling the sequence that starts one window earlier.
  rng = np.random.default_rng(1)
  B, m, w = 1, 4, 3
  c = rng.normal(size=(B, 4 * m, 2 * w)).astype(np.float32)
  z = rng.normal(size=(B, 4 * m, 2 * w)).astype(np.float32)
  full = np.asarray(comp_lib.pool_windows(jnp.asarray(c), jnp.asarray(z), m, True))
  prev = (jnp.asarray(c[:, :m, :w]), jnp.asarray(z[:, :m, :w]))
  part = comp_lib.pool_windows(jnp.asarray(c[:, m:]), jnp.asarray(z[:, m:]), m, True, prev)
  np.testing.assert_allclose(np.asarray(part), full[:, 1:], rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_pool_windows_csa_entry0_ignores_previous_half():
  # Entry 0 has no previous window: only the second halves of window 0 matter.
  rng = np.random.default_rng(2)
  c = rng.normal(size=(1, 8, 4)).astype(np.float32)
  z = rng.normal(size=(1, 8, 4)).astype(np.float32)
  c2, z2 = c.copy(), z.copy()
  c2[:, :4, :2] += 100.0
  z2[:, :4, :2] += 100.0  # first halves of window 0: only used by entry 1
  a = np.asarray(comp_lib.pool_windows(jnp.asarray(c), jnp.asarray(z), 4, True))
  b = np.asarray(comp_lib.pool_windows(jnp.asarray(c2), jnp.asarray(z2), 4, True))
  np.testing.assert_array_equal(a[:, 0], b[:, 0])
  assert np.abs(a[:, 1] - b[:, 1]).max() > 1.0


def test_pool_windows_hca_is_convex_combination():
  rng = np.random.default_rng(3)
  c = rng.normal(size=(1, 8, 5)).astype(np.float32)
  z = rng.normal(size=(1, 8, 5)).astype(np.float32)
  out = np.asarray(comp_lib.pool_windows(jnp.asarray(c), jnp.asarray(z), 4, False))
  cw = c.reshape(1, 2, 4, 5)
  assert (out <= cw.max(axis=2) + F32_FUNCTION).all()
  assert (out >= cw.min(axis=2) - F32_FUNCTION).all()


# ----- Compressor module --------------------------------------------------------------------------
def _np_compressor(x, wkv, wgate, ape, norm_w, m, overlap, freqs):
  x = np.asarray(x, np.float64)
  T = x.shape[1]
  n = T // m
  x = x[:, : n * m]  # the incomplete tail is dropped
  c = x @ np.asarray(wkv, np.float64).T
  z = x @ np.asarray(wgate, np.float64).T
  z = z + np.asarray(ape, np.float64)[np.arange(n * m) % m]  # ape[j mod m] on the gate logits
  pooled = _np_pool(c, z, m, overlap)
  return _np_rope_last(_np_rms(pooled, np.asarray(norm_w, np.float64)), m * np.arange(n), freqs)


def _make(m, overlap, seed=0, D=16, width=12):
  module = comp_lib.Compressor(D, m, width, overlap, EPS, std=0.3, param_dtype=jnp.float32,
                               rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed + 100)
  module.ape[...] = jnp.asarray(rng.normal(size=module.ape.shape).astype(np.float32))
  module.norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, size=(width,)).astype(np.float32))
  return module


FREQS = np.array([1.0, 0.3, 0.05, 0.01], np.float32)  # rope over the last 8 channels


@pytest.mark.parametrize("m,overlap,T", [(4, True, 16), (4, False, 16), (4, True, 19),
                                         (3, False, 14), (4, True, 3)],
                         ids=["csa", "hca4", "csa_tail", "hca3_tail", "csa_no_window"])
def test_compressor_matches_numpy(m, overlap, T):
  module = _make(m, overlap)
  x = np.random.default_rng(4).normal(size=(2, T, 16)).astype(np.float32)
  out = jax.jit(lambda mod, v: mod(v, FREQS))(module, jnp.asarray(x))
  assert out.shape == (2, T // m, 12) and out.dtype == jnp.float32
  ref = _np_compressor(x, module.wkv.weight[...], module.wgate.weight[...], module.ape[...],
                       module.norm.weight[...], m, overlap, FREQS.astype(np.float64))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_compressor_tail_does_not_matter():
  module = _make(4, True, seed=1)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1, 14, 16)).astype(np.float32)
  y = x.copy()
  y[:, 12:] = rng.normal(size=(1, 2, 16))
  a, b = module(jnp.asarray(x), FREQS), module(jnp.asarray(y), FREQS)
  assert a.shape == (1, 3, 12)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compressor_ape_slot_is_position_mod_m():
  # A large ape[2] puts (almost) all of each window's weight on its token in slot 2 = j mod 4.
  module = _make(4, False, seed=2)
  module.ape[...] = jnp.zeros_like(module.ape[...]).at[2].set(50.0)
  x = np.random.default_rng(6).normal(size=(1, 8, 16)).astype(np.float32)
  out = np.asarray(comp_lib.pool_windows(*module.project(jnp.asarray(x)), 4, False))
  c = np.asarray(module.project(jnp.asarray(x))[0])
  np.testing.assert_allclose(out[0, 0], c[0, 2], rtol=F32_FUNCTION, atol=F32_FUNCTION)
  np.testing.assert_allclose(out[0, 1], c[0, 6], rtol=F32_FUNCTION, atol=F32_FUNCTION)
