"""mHC (docs/architecture.md#mhc, #mhc-head): Sinkhorn, mixing weights, collapse / expand / head vs
NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_v4.layers import mhc
from tests.tolerances import BF16, F32_FUNCTION, rel_err

EPS = 1e-6
NORM_EPS = 1e-6


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_sinkhorn(logits, iters, eps):
  """docs/architecture.md#mhc step 4, one M x M matrix at a time, explicit loops over
  rows/columns."""
  logits = np.asarray(logits, np.float64)
  out = np.empty_like(logits)
  M = logits.shape[-1]
  for idx in np.ndindex(logits.shape[:-2]):
    c = logits[idx]
    m = np.empty((M, M))
    for i in range(M):  # row softmax, then + eps
      e = np.exp(c[i] - c[i].max())
      m[i] = e / e.sum() + eps
    for j in range(M):
      m[:, j] = m[:, j] / (m[:, j].sum() + eps)
    for _ in range(iters - 1):
      for i in range(M):
        m[i, :] = m[i, :] / (m[i, :].sum() + eps)
      for j in range(M):
        m[:, j] = m[:, j] / (m[:, j].sum() + eps)
    out[idx] = m
  return out


def _np_mix_logits(x, fn):
  B, T, M, D = x.shape
  flat = np.asarray(x, np.float64).reshape(B, T, M * D)  # stream-major
  rho = 1.0 / np.sqrt(np.mean(flat**2, axis=-1, keepdims=True) + NORM_EPS)
  return rho * (flat @ np.asarray(fn, np.float64).T)


def _np_hc_weights(x, fn, base, scale, iters):
  M = x.shape[2]
  mu = _np_mix_logits(x, fn)
  pre = _sigmoid(scale[0] * mu[..., :M] + base[:M]) + EPS
  post = 2.0 * _sigmoid(scale[1] * mu[..., M:2 * M] + base[M:2 * M])
  c = scale[2] * mu[..., 2 * M:] + base[2 * M:]
  comb = _np_sinkhorn(c.reshape(*c.shape[:-1], M, M), iters, EPS)  # row-major M x M
  return pre, post, comb


def _site(seed, B=2, T=3, M=4, D=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, M, D)).astype(np.float32)
  fn = (rng.normal(size=((2 + M) * M, M * D)) * 0.5).astype(np.float32)
  base = rng.normal(size=((2 + M) * M,)).astype(np.float32)
  scale = (1.0 + 0.5 * rng.normal(size=(3,))).astype(np.float32)
  return x, fn, base, scale


# ----- Sinkhorn -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spread", [0.1, 1.0, 4.0])
def test_sinkhorn_columns_sum_to_one_rows_approximately(spread):
  logits = np.random.default_rng(0).normal(size=(5, 4, 4)).astype(np.float32) * spread
  m = np.asarray(mhc.sinkhorn(jnp.asarray(logits), 20, EPS), np.float64)
  assert (m > 0).all()
  # The last step is a column normalization: columns are 1 up to eps / column sum.
  np.testing.assert_allclose(m.sum(axis=-2), 1.0, atol=F32_FUNCTION)
  # Rows only approximately: 20 rounds shrink the row error far below one round's.
  row_err = np.abs(m.sum(axis=-1) - 1).max()
  m1 = np.asarray(mhc.sinkhorn(jnp.asarray(logits), 1, EPS), np.float64)
  assert row_err < np.abs(m1.sum(axis=-1) - 1).max() / 10
  if spread <= 1.0:  # mild logits converge fully within 20 rounds
    assert row_err < F32_FUNCTION


@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_matches_numpy_loop(iters):
  logits = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32) * 2
  out = mhc.sinkhorn(jnp.asarray(logits), iters, EPS)
  assert out.dtype == jnp.float32 and out.shape == logits.shape
  np.testing.assert_allclose(np.asarray(out), _np_sinkhorn(logits, iters, EPS),
                             rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_sinkhorn_bf16_logits_compute_in_f32():
  logits = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
  lb = jnp.asarray(logits, jnp.bfloat16)
  out = mhc.sinkhorn(lb, 20, EPS)
  assert out.dtype == jnp.float32
  ref = _np_sinkhorn(np.asarray(lb.astype(jnp.float32)), 20, EPS)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


def _autodiff_sinkhorn(logits, iters, eps):
  """The spec's procedure in plain JAX ops on the [..., M, M] layout, differentiated by autodiff:
  the oracle for sinkhorn's hand-written backward."""
  import jax

  m = jax.nn.softmax(logits, axis=-1) + eps
  m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)
  for _ in range(iters - 1):
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)
  return m


@pytest.mark.parametrize("shape,iters", [((4, 4), 1), ((4, 4), 2), ((2, 3, 4, 4), 20),
                                         ((5, 3, 3), 7)])
def test_sinkhorn_gradient_matches_autodiff(shape, iters):
  import jax

  rng = np.random.default_rng(11)
  logits = jnp.asarray(2.0 * rng.normal(size=shape), jnp.float32)
  probe = jnp.asarray(rng.normal(size=shape), jnp.float32)
  got = jax.grad(lambda x: jnp.sum(mhc.sinkhorn(x, iters, EPS) * probe))(logits)
  ref = jax.grad(lambda x: jnp.sum(_autodiff_sinkhorn(x, iters, EPS) * probe))(logits)
  assert got.shape == logits.shape
  assert rel_err(got, ref) < F32_FUNCTION
  np.testing.assert_allclose(np.asarray(mhc.sinkhorn(logits, iters, EPS)),
                             np.asarray(_autodiff_sinkhorn(logits, iters, EPS)),
                             rtol=F32_FUNCTION, atol=F32_FUNCTION)
  with pytest.raises(ValueError, match="iters=0 must be >= 1"):
    mhc.sinkhorn(logits, 0, EPS)


def test_sinkhorn_equal_logits_gives_uniform():
  out = np.asarray(mhc.sinkhorn(jnp.zeros((4, 4)), 20, EPS))
  np.testing.assert_allclose(out, 0.25, atol=F32_FUNCTION)


# ----- mixing weights -----------------------------------------------------------------------------
def test_hc_weights_match_numpy():
  x, fn, base, scale = _site(3)
  pre, post, comb = mhc.hc_weights(jnp.asarray(x), jnp.asarray(fn), jnp.asarray(base),
                                   jnp.asarray(scale), iters=20, eps=EPS, norm_eps=NORM_EPS)
  ref_pre, ref_post, ref_comb = _np_hc_weights(x, fn, base, scale, 20)
  assert pre.shape == (2, 3, 4) and post.shape == (2, 3, 4) and comb.shape == (2, 3, 4, 4)
  for ours, ref in ((pre, ref_pre), (post, ref_post), (comb, ref_comb)):
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)
  # pre in (eps, 1 + eps), post in (0, 2).
  assert (np.asarray(pre) > EPS).all() and (np.asarray(post) < 2).all()


def test_hc_weights_comb_is_row_major():
  # Only base[8 + 4*i + j] is set (fn = 0): comb must be sinkhorn of base reshaped row-major.
  M, D = 4, 8
  x = np.random.default_rng(4).normal(size=(1, 1, M, D)).astype(np.float32)
  base = np.zeros(24, np.float32)
  base[8 + 4 * 0 + 3] = 5.0  # entry (0, 3) large
  _, _, comb = mhc.hc_weights(jnp.asarray(x), jnp.zeros((24, M * D)), jnp.asarray(base),
                              jnp.ones(3), iters=20, eps=EPS, norm_eps=NORM_EPS)
  comb = np.asarray(comb)[0, 0]
  assert comb[0, 3] == comb.max() and comb[3, 0] < 0.5


# ----- collapse / expand / head -------------------------------------------------------------------
def test_hc_collapse_matches_numpy():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  pre = rng.uniform(size=(2, 3, 4)).astype(np.float32)
  out = mhc.hc_collapse(jnp.asarray(x), jnp.asarray(pre))
  ref = np.einsum("btm,btmd->btd", pre.astype(np.float64), x.astype(np.float64))
  assert out.shape == (2, 3, 8) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)
  xb = jnp.asarray(x, jnp.bfloat16)
  assert mhc.hc_collapse(xb, jnp.asarray(pre)).dtype == jnp.bfloat16


def _np_collapse_expand_grads(x, y, pre, post, comb, g_u, g_out):
  """NumPy (float64) cotangents of u = sum_i pre_i X_i and X'_j = post_j y + sum_i comb[i,j] X_i,
  derived by hand: the oracle for mhc's hand-written backward."""
  x, y, pre, post, comb, g_u, g_out = (np.asarray(a, np.float64)
                                       for a in (x, y, pre, post, comb, g_u, g_out))
  return dict(
    collapse_x=pre[..., None] * g_u[:, :, None, :],
    collapse_pre=np.einsum("btmd,btd->btm", x, g_u),
    expand_x=np.einsum("btij,btjd->btid", comb, g_out),
    expand_y=np.einsum("btj,btjd->btd", post, g_out),
    expand_post=np.einsum("btd,btjd->btj", y, g_out),
    expand_comb=np.einsum("btid,btjd->btij", x, g_out),
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16_stream"])
def test_hc_collapse_and_expand_gradients_match_numpy(dtype):
  """The custom VJPs of hc_collapse / hc_expand give the exact cotangents, in each input's dtype."""
  import jax

  rng = np.random.default_rng(7)
  B, T, M, D = 2, 5, 4, 16
  x = rng.normal(size=(B, T, M, D)).astype(np.float32)
  y = rng.normal(size=(B, T, D)).astype(np.float32)
  pre = rng.uniform(size=(B, T, M)).astype(np.float32)
  post = rng.uniform(0, 2, size=(B, T, M)).astype(np.float32)
  comb = rng.uniform(size=(B, T, M, M)).astype(np.float32)
  g_u = rng.normal(size=(B, T, D)).astype(np.float32)
  g_out = rng.normal(size=(B, T, M, D)).astype(np.float32)
  xs, ys = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
  _, vjp_c = jax.vjp(mhc.hc_collapse, xs, jnp.asarray(pre))
  dx_c, dpre = vjp_c(jnp.asarray(g_u, dtype))
  _, vjp_e = jax.vjp(mhc.hc_expand, xs, ys, jnp.asarray(post), jnp.asarray(comb))
  dx_e, dy, dpost, dcomb = vjp_e(jnp.asarray(g_out, dtype))
  # The oracle sees the same (rounded) inputs the bf16 case computes from.
  ref = _np_collapse_expand_grads(np.asarray(xs, np.float32), np.asarray(ys, np.float32), pre,
                                  post, comb, np.asarray(jnp.asarray(g_u, dtype), np.float32),
                                  np.asarray(jnp.asarray(g_out, dtype), np.float32))
  tol = F32_FUNCTION if dtype == jnp.float32 else BF16
  got = dict(collapse_x=dx_c, collapse_pre=dpre, expand_x=dx_e, expand_y=dy, expand_post=dpost,
             expand_comb=dcomb)
  for name, value in got.items():
    assert rel_err(value, ref[name]) < tol, name
  assert dx_c.dtype == dx_e.dtype == dy.dtype == dtype
  assert dpre.dtype == dpost.dtype == dcomb.dtype == jnp.float32


def test_hc_expand_uses_comb_transposed():
  rng = np.random.default_rng(6)
  B, T, M, D = 2, 3, 4, 8
  x = rng.normal(size=(B, T, M, D)).astype(np.float32)
  y = rng.normal(size=(B, T, D)).astype(np.float32)
  post = rng.uniform(0, 2, size=(B, T, M)).astype(np.float32)
  comb = rng.uniform(size=(B, T, M, M)).astype(np.float32)  # deliberately not symmetric
  out = np.asarray(mhc.hc_expand(jnp.asarray(x), jnp.asarray(y), jnp.asarray(post),
                                 jnp.asarray(comb)))
  ref = np.zeros((B, T, M, D))
  for b in range(B):
    for t in range(T):
      for j in range(M):  # X'_j = post_j y + sum_i comb[i, j] X_i
        ref[b, t, j] = post[b, t, j] * y[b, t]
        for i in range(M):
          ref[b, t, j] += comb[b, t, i, j] * x[b, t, i]
  np.testing.assert_allclose(out, ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)
  # The untransposed mix gives a different answer (guards the index order).
  wrong = np.einsum("btji,btid->btjd", comb, x) + post[..., None] * y[:, :, None]
  assert np.max(np.abs(out - wrong)) > 1e-2


def test_hc_head_matches_numpy():
  rng = np.random.default_rng(7)
  B, T, M, D = 2, 3, 4, 8
  x = rng.normal(size=(B, T, M, D)).astype(np.float32)
  fn = (rng.normal(size=(M, M * D)) * 0.5).astype(np.float32)
  base = rng.normal(size=(M,)).astype(np.float32)
  scale = np.array([1.3], np.float32)
  out = mhc.hc_head(jnp.asarray(x), jnp.asarray(fn), jnp.asarray(base), jnp.asarray(scale),
                    eps=EPS, norm_eps=NORM_EPS)
  a = _sigmoid(scale[0] * _np_mix_logits(x, fn) + base) + EPS  # [B, T, M]
  ref = np.einsum("btm,btmd->btd", a, x.astype(np.float64))
  assert out.shape == (B, T, D)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=F32_FUNCTION, atol=F32_FUNCTION)


def test_mixing_logits_are_stream_major_and_scale_invariant():
  # rho makes mu invariant to scaling X (up to eps); flattening is stream-major.
  x, fn, base, scale = _site(8, B=1, T=2)
  kw = dict(iters=20, eps=EPS, norm_eps=NORM_EPS)
  w1 = mhc.hc_weights(jnp.asarray(x), jnp.asarray(fn), jnp.asarray(base), jnp.asarray(scale), **kw)
  w2 = mhc.hc_weights(jnp.asarray(10 * x), jnp.asarray(fn), jnp.asarray(base),
                      jnp.asarray(scale), **kw)
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=F32_FUNCTION, atol=F32_FUNCTION)
