"""Manifold-constrained hyper-connections (mHC), docs/architecture.md#mhc, #mhc-head (report §2.2,
eqs. 1-8).

The residual stream is M parallel streams `X: [B, T, M, D]`. Each sub-layer reads a collapse of
the streams (`pre`), writes its output back through `post`, and mixes the old streams through
`comb`, a doubly-stochastic matrix produced by Sinkhorn-Knopp. All of this runs in float32.

The `ModelConfig.residual` switch runs through the same functions: "hc" (hyper-connections
without the manifold constraint, `hc_weights(constrained=False)`) keeps every tensor and changes
the maps; "plain" has one stream and no weights (`pre`/`post`/`comb` None): `hc_collapse` reads
the stream and `hc_expand` adds the sub-layer output to it, x + f(norm(x)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from deepseek_v4.layers.params import normal, param


def sinkhorn(logits: Float[Array, "... M M"], iters: int, eps: float) -> Array:
  """Sinkhorn-Knopp as in the reference code (docs/architecture.md#mhc step 4).

  Row softmax, + eps, column normalization, then `iters - 1` rounds of (row, column)
  normalization, each denominator + eps. The last step normalizes columns, so columns sum to 1
  (up to eps) and rows approximately.

  The matrices are iterated with their M x M entries as the leading axes and the tokens last, so
  every row or column sum is M vector adds over the tokens (`_sum`), and the backward is written
  out (`_sinkhorn_bwd`; autodiff of this layout was slower than the plain one at long lengths).
  Measured against the plain [..., M, M] loop under autodiff (2 CPU cores): at
  [8, 128, 4, 4] forward 1.07 -> 0.11 ms, forward+backward 3.4 -> 0.68 ms; at [1, 8192, 4, 4]
  9.0 -> 0.96 ms and 79 -> 8.2 ms.
  """
  if iters < 1:
    raise ValueError(f"sinkhorn: iters={iters} must be >= 1")
  lt = jnp.moveaxis(logits.astype(jnp.float32), (-2, -1), (0, 1))  # [M(i), M(j), ...]
  return jnp.moveaxis(_sinkhorn_tm(lt, iters, eps), (0, 1), (-2, -1))


def _sum(m: Array, axis: int) -> Array:
  """Sum over the (small, leading) axis 0 or 1 as M explicit adds, keepdims: elementwise work
  that XLA fuses, where a reduce op over a major axis ran as a slow reduction on CPU."""
  parts = [jax.lax.index_in_dim(m, i, axis, keepdims=True) for i in range(m.shape[axis])]
  total = parts[0]
  for part in parts[1:]:
    total = total + part
  return total


def _normalize(m: Array, axis: int, eps: float) -> Array:
  return m / (_sum(m, axis) + eps)


def _normalize_vjp(m: Array, axis: int, eps: float, g: Array) -> Array:
  """Cotangent of m for out = m / (sum_axis(m) + eps): g / d - sum_axis(g m) / d^2."""
  d = _sum(m, axis) + eps
  return g / d - _sum(g * m, axis) / (d * d)


def _sinkhorn_steps(lt: Array, iters: int, eps: float) -> tuple[Array, Array, Array]:
  """Final matrix, softmax, and the input of every normalization after the first."""
  p = jax.nn.softmax(lt, axis=1)  # rows: axis 1 is j
  m = _normalize(p + eps, 0, eps)

  def row_then_column(m, _):
    r = _normalize(m, 1, eps)
    return _normalize(r, 0, eps), jnp.stack([m, r])

  # A loop, not an unrolled chain: 19 unrolled rounds per site dominated compile time.
  m, inputs = jax.lax.scan(row_then_column, m, None, length=iters - 1)
  return m, p, inputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn_tm(lt: Array, iters: int, eps: float) -> Array:
  return _sinkhorn_steps(lt, iters, eps)[0]


def _sinkhorn_fwd(lt, iters, eps):
  m, p, inputs = _sinkhorn_steps(lt, iters, eps)
  return m, (p, inputs)


def _sinkhorn_bwd(iters, eps, res, g):
  p, inputs = res

  def back(g, pair):  # reverse of one round: column normalization of r, row normalization of m
    m, r = pair[0], pair[1]
    return _normalize_vjp(m, 1, eps, _normalize_vjp(r, 0, eps, g)), None

  g, _ = jax.lax.scan(back, g, inputs, reverse=True)
  g = _normalize_vjp(p + eps, 0, eps, g)
  return (p * (g - _sum(g * p, 1)),)  # softmax over rows


_sinkhorn_tm.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def _mixing_logits(x: Float[Array, "B T M D"], fn: Array, norm_eps: float) -> Array:
  """`rho * (vec(X) fn^T)`: unweighted RMS over all M*D channels, then the projection (f32)."""
  B, T, M, D = x.shape
  flat = x.reshape(B, T, M * D).astype(jnp.float32)
  rho = jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + norm_eps)
  return jnp.einsum("BTK,CK->BTC", flat, fn.astype(jnp.float32)) * rho  # [B, T, C]


def hc_weights(x: Float[Array, "B T M D"], fn: Array, base: Array, scale: Array, *, iters: int,
               eps: float, norm_eps: float, constrained: bool = True
               ) -> tuple[Array, Array, Array]:
  """pre [B,T,M], post [B,T,M] and comb [B,T,M,M] of one mHC site (docs/architecture.md#mhc steps
  1-4).

  constrained=False is residual="hc": hyper-connections (Zhu et al. 2024) in the form the mHC
  paper gives them (its eq. 5), `H = scale * tanh(mu) + base` for pre, post and res alike, with
  no sigmoid and no Sinkhorn projection, so W^res is an unconstrained learned matrix (static base
  + dynamic tanh part). We chose this rather than "mHC minus Sinkhorn" because it is the baseline
  the mHC paper compares against, and its identity-like static init (`init_site`) keeps the
  unconstrained residual trainable; `iters`/`eps` are then unused.
  """
  M = x.shape[2]
  mu = _mixing_logits(x, fn, norm_eps)
  base = base.astype(jnp.float32)
  scale = scale.astype(jnp.float32)
  if not constrained:
    h = jnp.concatenate([scale[0] * jnp.tanh(mu[..., :M]), scale[1] * jnp.tanh(mu[..., M:2 * M]),
                         scale[2] * jnp.tanh(mu[..., 2 * M:])], axis=-1) + base
    return h[..., :M], h[..., M:2 * M], h[..., 2 * M:].reshape(*h.shape[:-1], M, M)
  pre = jax.nn.sigmoid(mu[..., :M] * scale[0] + base[:M]) + eps
  post = 2.0 * jax.nn.sigmoid(mu[..., M:2 * M] * scale[1] + base[M:2 * M])
  res = mu[..., 2 * M:] * scale[2] + base[2 * M:]
  comb = sinkhorn(res.reshape(*res.shape[:-1], M, M), iters, eps)  # [B, T, M, M]
  return pre, post, comb


def hc_collapse(x: Float[Array, "B T M D"], pre: Float[Array, "B T M"] | None) -> Array:
  """`u = sum_i pre_i X_i` in float32, cast to the stream dtype (docs/architecture.md#mhc step 5);
  the one stream itself when `pre` is None (residual="plain", M = 1)."""
  if pre is None:
    return x[:, :, 0]
  return _collapse(x, pre)


def hc_expand(x: Float[Array, "B T M D"], y: Float[Array, "B T D"], post: Array | None,
              comb: Array | None) -> Array:
  """`X'_j = post_j y + sum_i comb[i, j] X_i` (note: comb transposed), float32 math; the plain
  residual `x + y` when `post` and `comb` are None (residual="plain")."""
  if post is None:
    return (x.astype(jnp.float32) + y.astype(jnp.float32)[:, :, None, :]).astype(x.dtype)
  return _expand(x, y, post, comb)


# Both maps carry a hand-written backward. Autodiff's weight cotangents (d pre, d post, d comb: a
# sum over D per token) became XLA:CPU reductions that slow down sharply with the token count;
# here they are one contraction per map, with the stream and the sub-layer output stacked.
# Measured against autodiff (2 CPU cores), hc_expand forward+backward with the forward as
# multiply-adds (`_mix`): at [1, 8192, 4, 256] 186 -> 21 ms, at [8, 128, 4, 256] 3.0 -> 1.6 ms.
@jax.custom_vjp
def _collapse(x: Array, pre: Array) -> Array:
  return jnp.einsum("BTM,BTMD->BTD", pre, x.astype(jnp.float32)).astype(x.dtype)


def _collapse_fwd(x, pre):
  return _collapse(x, pre), (x, pre)


def _collapse_bwd(res, g):
  x, pre = res
  g = g.astype(jnp.float32)
  dx = pre.astype(jnp.float32)[..., None] * g[:, :, None, :]
  dpre = jnp.einsum("BTMD,BTD->BTM", x.astype(jnp.float32), g)
  return dx.astype(x.dtype), dpre.astype(pre.dtype)


_collapse.defvjp(_collapse_fwd, _collapse_bwd)


def _mix(w: Array, rows: list[Array]) -> Array:
  """sum_i w[..., i, None] * rows[i]: M multiply-adds over [B, T, D] rows. XLA fuses them into one
  loop, where the einsum over M ran as B*T tiny matmuls (hc_expand's forward at [8, 128, 4, 256]
  1.97 -> 0.39 ms, at [1, 8192, 4, 256] 15.9 -> 11.4 ms; 2 CPU cores)."""
  out = w[..., 0, None] * rows[0]
  for i in range(1, len(rows)):
    out = out + w[..., i, None] * rows[i]
  return out


@jax.custom_vjp
def _expand(x: Array, y: Array, post: Array, comb: Array) -> Array:
  M = x.shape[2]
  xs = [x[:, :, i].astype(jnp.float32) for i in range(M)]
  y32 = y.astype(jnp.float32)
  out = [post[..., j, None] * y32 + _mix(comb[..., :, j], xs) for j in range(M)]
  return jnp.stack(out, axis=2).astype(x.dtype)


def _expand_fwd(x, y, post, comb):
  return _expand(x, y, post, comb), (x, y, post, comb)


def _expand_bwd(res, g):
  x, y, post, comb = res
  M = x.shape[2]
  g = g.astype(jnp.float32)
  gs = [g[:, :, j] for j in range(M)]
  comb32 = comb.astype(jnp.float32)
  dx = jnp.stack([_mix(comb32[..., i, :], gs) for i in range(M)], axis=2)
  dy = _mix(post.astype(jnp.float32), gs)
  # d comb[i, j] = <X_i, g_j> and d post[j] = <y, g_j>: one contraction over [X; y].
  z = jnp.concatenate([x.astype(jnp.float32), y.astype(jnp.float32)[:, :, None, :]], axis=2)
  dz = jnp.einsum("BTaD,BTjD->BTaj", z, g)
  return (dx.astype(x.dtype), dy.astype(y.dtype), dz[:, :, -1].astype(post.dtype),
          dz[:, :, :-1].astype(comb.dtype))


_expand.defvjp(_expand_fwd, _expand_bwd)


def hc_head(x: Float[Array, "B T M D"], fn: Array, base: Array, scale: Array, *, eps: float,
            norm_eps: float) -> Array:
  """Final collapse of the streams (docs/architecture.md#mhc-head): sigmoid gates + eps, no
  Sinkhorn."""
  mu = _mixing_logits(x, fn, norm_eps)
  a = jax.nn.sigmoid(mu * scale.astype(jnp.float32)[0] + base.astype(jnp.float32)) + eps
  return hc_collapse(x, a)


def init_site(rngs: nnx.Rngs, rows: int, hc_mult: int, d_model: int, n_scales: int,
              std: float, constrained: bool = True) -> tuple[nnx.Param, nnx.Param, nnx.Param]:
  """(fn, base, scale) of one mHC site, initialized as transformers does
  (docs/architecture.md#init).

  constrained=False (residual="hc", a sub-layer site: rows = (2 + M) M) starts from HC's static
  connections: base = (pre 1/M each, post 1 each, res the identity) and dynamic scales 0.01, so
  each stream carries itself forward and receives the full sub-layer output. HC reads stream
  `layer mod M` (a one-hot pre); we read their mean, the same value at init, where every stream
  holds the same vector, without making the init depend on the layer index.
  """
  fn = param(normal(rngs, (rows, hc_mult * d_model), std, jnp.float32), ("hc_mix", "hc_embed"))
  if constrained:
    base = jnp.zeros((rows,), jnp.float32)
    scale = jnp.ones((n_scales,), jnp.float32)
  else:
    M = hc_mult
    base = jnp.concatenate([jnp.full((M,), 1.0 / M), jnp.ones((M,)),
                            jnp.eye(M).reshape(-1)]).astype(jnp.float32)
    scale = jnp.full((n_scales,), 0.01, jnp.float32)
  return fn, param(base, ("hc_mix",)), param(scale, (None,))
