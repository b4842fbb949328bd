"""Grouped matmul as a loop over row tiles, one group per tile: exact, static shapes, fast on CPU.

XLA:CPU lowers `jax.lax.ragged_dot` as a masked dense product over every group (O(M K N E)). Here
the sorted rows are scattered into a padded layout where every group starts on a tile boundary
(group e takes ceil(size_e / tile) tiles), so each tile holds rows of exactly one group and is one
[tile, K] x [K, N] matmul. The number of tiles is static: sum_e ceil(size_e / tile) is at most
min(M, (M + min(E, M) * (tile - 1)) // tile); a `fori_loop` runs only the tiles in use. Nothing is
dropped, and each output element is the same single dot product as in `ragged_dot`.

`swiglu_ffn_decoded` runs the same forward loop over weights kept in a stored form (packed FP4
codes and scales), decoding each expert inside the loop body when its first tile comes.

The backward pass is a custom VJP made of the same two loops (measured about twice as fast as
autodiff through a tile scan, whose weight cotangent is a full [E, K, N] add per tile):
  dx = gmm(dy, w^T)   (the forward loop with the other weight layout)
  dw[e] = sum over the tiles t of group e of x_t^T dy_t   (`tgmm`, accumulated in float32)

The fused FFN's backward loop runs `BWD_UNROLL` tiles per iteration, written out one after another:
XLA:CPU runs each small matmul on one core and the iterations of a loop one after another, but
it overlaps independent matmuls inside one iteration. Measured on 2 cores (E=64,
12288 rows, tile 64): the fused FFN backward 63 -> 47-49 ms with 4 tiles per iteration; 2 gave
no gain and 8 or 16 were slower again. The forward loop gained nothing from it and stays one tile
per iteration. The extra tiles past `used` are padding (zero rows), so they add zeros.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.moe_gmm.reference import swiglu


class Tiles(NamedTuple):
  """Where the sorted rows sit in the padded, tile-aligned layout of P = num_tiles * tile rows."""

  expert: Int[Array, "T"]  # group of each tile (meaningful for the first `used` tiles)
  used: Int[Array, ""]  # tiles that hold rows
  src: Int[Array, "P"]  # sorted row feeding each padded row; M = padding (reads as 0)
  dest: Int[Array, "M"]  # padded row of each sorted row; P = a row past every group (gives 0)


def num_tiles(m: int, groups: int, tile: int) -> int:
  """Static bound on sum_e ceil(size_e / tile) over group sizes summing to at most m."""
  return min(m, (m + min(groups, m) * (tile - 1)) // tile)


def default_tile(m: int, groups: int) -> int:
  """The power of two nearest the mean group size (in log scale), clamped to [8, 128].

  Larger tiles make each matmul more efficient, smaller ones waste fewer padding rows. Measured on
  2 CPU cores (the fused FFN forward+backward, D=256, F=128, median ms):
    mean 12 (768 rows, 64 groups):     tile 8 14.2, 16 12.1, 32 12.2, 64 14.0
    mean 24 (1536 rows, 64 groups):    16 14.2-16.9, 32 13.3-13.7, 64 14.7-19.8
    mean 48 (12288 rows, 256 groups):  16 108.5, 32 71.9-101.4, 64 54.3-62.8, 128 96.0
    mean 96 (6144 rows, 64 groups):    32 35.9-37.4, 64 22.9-24.1, 128 24.6, 256 42.2
    mean 192 (12288 rows, 64 groups):  32 73.6, 64 48.9-51.8, 128 40.7-48.8, 256 42.3
    mean 512 (4096 rows, 8 groups):    128 10.1, 256 13.5
  The rule before (half the mean, rounded down) picked tiles 2-4x smaller than the best.
  """
  mean = m / max(groups, 1)
  if mean <= 8:
    return 8
  return int(min(128, 1 << round(math.log2(mean))))


def tile_layout(group_sizes: Int[Array, "E"], m: int, tile: int) -> Tiles:
  """The padded layout of `m` rows sorted into groups of `group_sizes` (sum <= m)."""
  E = group_sizes.shape[0]
  nt = num_tiles(m, E, tile)
  sizes = group_sizes.astype(jnp.int32)
  per = (sizes + tile - 1) // tile  # tiles of each group
  tile_end = jnp.cumsum(per)
  tile_start = tile_end - per
  row_end = jnp.cumsum(sizes)
  row_start = row_end - sizes
  expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(nt), side="right"), E - 1)
  p = jnp.arange(nt * tile)
  t = p // tile
  e = expert[t]
  r = (t - tile_start[e]) * tile + p % tile  # rank of padded row p inside its group
  src = jnp.where((t < tile_end[-1]) & (r < sizes[e]), row_start[e] + r, m)
  rows = jnp.arange(m)
  g = jnp.searchsorted(row_end, rows, side="right")  # group of each sorted row (E = none)
  gc = jnp.minimum(g, E - 1)
  dest = jnp.where(g < E, tile_start[gc] * tile + rows - row_start[gc], nt * tile)
  # Materialize the layout: otherwise XLA fuses its index arithmetic into the row gathers that
  # use it and recomputes it for every element of a row (measured: the FFN forward at E=64,
  # 12288 rows, 29 -> 24 ms).
  return Tiles(*jax.lax.optimization_barrier((expert.astype(jnp.int32), tile_end[-1],
                                               src.astype(jnp.int32), dest.astype(jnp.int32))))


def pad_rows(x: Float[Array, "M K"], tiles: Tiles, tile: int) -> Float[Array, "T tile K"]:
  """Sorted rows -> padded tiles (padding rows are 0)."""
  xp = jnp.take(x, tiles.src, axis=0, mode="fill", fill_value=0)
  return xp.reshape(-1, tile, x.shape[1])


def unpad_rows(yp: Float[Array, "T tile N"], tiles: Tiles) -> Float[Array, "M N"]:
  """Padded tiles -> sorted rows (rows past every group are 0)."""
  return jnp.take(yp.reshape(-1, yp.shape[-1]), tiles.dest, axis=0, mode="fill", fill_value=0)


def _zeros(shape: tuple[int, ...], dtype, *like: Array) -> Array:
  """Zeros that vary over the same manual mesh axes as `like` (a loop carry inside shard_map must
  keep one type)."""
  z = sum(jnp.zeros_like(a, dtype=dtype, shape=()) for a in like)
  return jnp.broadcast_to(z, shape)


def _tile_gmm(xp: Array, w: Array, tiles: Tiles, transpose_rhs: bool) -> Array:
  """yp[t] = xp[t] @ w[expert[t]] (or @ w[expert[t]].T) for the tiles in use; the rest stay 0."""
  nt, tile, _ = xp.shape
  N = w.shape[1] if transpose_rhs else w.shape[2]
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))

  def body(t, yp):
    y = jax.lax.dot_general(xp[t], w[tiles.expert[t]], dims, preferred_element_type=jnp.float32)
    return yp.at[t].set(y.astype(yp.dtype))

  return jax.lax.fori_loop(0, tiles.used, body, _zeros((nt, tile, N), xp.dtype, xp, w))


BWD_UNROLL = 4  # tiles per iteration of the fused FFN's backward loop (see the module doc)


def _unrolled(tiles: Tiles, m: int, tile: int, unroll: int) -> tuple[Tiles, Array]:
  """(`tiles` extended by empty tiles to a multiple of `unroll` tiles, number of iterations), so
  that iteration c can run tiles c*unroll .. c*unroll+unroll-1. Only the index arrays grow: the
  extra tiles repeat the last tile's expert and read row `m` (padding: zeros), so `pad_rows`
  builds the longer layout in its one gather and their products are zeros."""
  extra = -tiles.expert.shape[0] % unroll
  grown = tiles._replace(expert=jnp.pad(tiles.expert, (0, extra), mode="edge"),
                         src=jnp.pad(tiles.src, (0, extra * tile), constant_values=m))
  return grown, (tiles.used + unroll - 1) // unroll


def _tile_tgmm(xp: Array, dp: Array, tiles: Tiles, groups: int) -> Array:
  """dw[e] = sum_{t: expert[t] = e} xp[t]^T dp[t], float32 [E, K, N]. One tile per iteration:
  unrolling this loop measured slower (20.6 -> 23.3 ms at E=64, 12288 rows)."""
  K, N = xp.shape[2], dp.shape[2]

  def body(t, dw):
    g = jax.lax.dot_general(xp[t], dp[t], (((0,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)  # [K, N]
    return dw.at[tiles.expert[t]].add(g)

  return jax.lax.fori_loop(0, tiles.used, body, _zeros((groups, K, N), jnp.float32, xp, dp))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def gmm(x: Float[Array, "M K"], w: Array, group_sizes: Int[Array, "E"], tile: int,
        transpose_rhs: bool) -> Float[Array, "M N"]:
  """y[m] = x[m] @ w[g(m)] over expert-sorted rows (w [E, K, N], or [E, N, K] transposed)."""
  return _gmm_fwd(x, w, group_sizes, tile, transpose_rhs)[0]


def _gmm_fwd(x, w, group_sizes, tile, transpose_rhs):
  tiles = tile_layout(group_sizes, x.shape[0], tile)
  y = unpad_rows(_tile_gmm(pad_rows(x, tiles, tile), w, tiles, transpose_rhs), tiles)
  return y, (x, w, group_sizes)


def _gmm_bwd(tile, transpose_rhs, res, dy):
  x, w, group_sizes = res
  tiles = tile_layout(group_sizes, x.shape[0], tile)
  xp, dp = pad_rows(x, tiles, tile), pad_rows(dy.astype(x.dtype), tiles, tile)
  dx = unpad_rows(_tile_gmm(dp, w, tiles, not transpose_rhs), tiles)
  E = w.shape[0]
  dw = _tile_tgmm(dp, xp, tiles, E) if transpose_rhs else _tile_tgmm(xp, dp, tiles, E)
  return dx, dw.astype(w.dtype), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tgmm(x: Float[Array, "M K"], dy: Float[Array, "M N"], group_sizes: Int[Array, "E"],
         tile: int) -> Float[Array, "E K N"]:
  """Per-group x^T dy (the weight gradient of `gmm`) by the tile loop, in x's dtype."""
  tiles = tile_layout(group_sizes, x.shape[0], tile)
  dw = _tile_tgmm(pad_rows(x, tiles, tile), pad_rows(dy, tiles, tile), tiles,
                  group_sizes.shape[0])
  return dw.astype(x.dtype)


# ----- the whole expert FFN in one tile loop -----------------------------------------------------
def _dot(a: Array, b: Array, ca: int, cb: int) -> Array:
  """a . b contracting dimension ca of a with cb of b (2-D operands), float32 result."""
  return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def swiglu_ffn(x: Float[Array, "M D"], w1: Float[Array, "E F D"], w2: Float[Array, "E D F"],
               w3: Float[Array, "E F D"], group_sizes: Int[Array, "E"], tile: int,
               limit: float) -> Float[Array, "M D"]:
  """`reference.swiglu_ffn` with one loop over row tiles: per tile the two input matmuls, the
  SwiGLU and the output matmul run back to back on cache-resident [tile, F] blocks, and the rows
  are padded and unpadded once instead of once per matmul. Custom VJP: one backward loop that
  recomputes the tile's SwiGLU inputs and accumulates dw1, dw2, dw3 in float32."""
  return _ffn_fwd(x, w1, w2, w3, group_sizes, tile, limit)[0]


def _ffn_loop(x: Array, group_sizes: Array, tile: int, limit: float,
              expert: Callable[[Array], tuple[Array, Array, Array]], *like: Array,
              reuse: bool = False) -> Array:
  """The forward tile loop; `expert(e)` gives expert e's (w1 [F, D], w2 [D, F], w3 [F, D]) in
  x's dtype (`like`: the weight arrays, whose manual mesh axes the carry must share). `reuse`
  carries the last expert's matrices and calls `expert` only when the tile's expert changes (an
  expert's tiles are consecutive, so each expert is produced once): for a costly `expert` such as
  decoding stored weights."""
  tiles = tile_layout(group_sizes, x.shape[0], tile)
  xp = pad_rows(x, tiles, tile)
  nt, _, D = xp.shape

  def ffn(xt, w1, w2, w3):
    h = swiglu(_dot(xt, w1, 1, 1), _dot(xt, w3, 1, 1), limit).astype(xt.dtype)
    return _dot(h, w2, 1, 1)

  yp = _zeros((nt, tile, D), x.dtype, xp, *like)
  if not reuse:
    def body(t, yp):
      return yp.at[t].set(ffn(xp[t], *expert(tiles.expert[t])).astype(yp.dtype))

    return unpad_rows(jax.lax.fori_loop(0, tiles.used, body, yp), tiles)

  def body_reuse(t, carry):
    yp, last, ws = carry
    e = tiles.expert[t]
    ws = jax.lax.cond(e == last, lambda: ws, lambda: tuple(expert(e)))
    return yp.at[t].set(ffn(xp[t], *ws).astype(yp.dtype)), e, ws

  shapes = jax.eval_shape(expert, tiles.expert[0])
  ws = tuple(_zeros(a.shape, a.dtype, xp, *like) for a in shapes)
  last = tiles.expert[0] * 0 - 1  # no expert yet (shares the layout's mesh axes)
  yp, _, _ = jax.lax.fori_loop(0, tiles.used, body_reuse, (yp, last, ws))
  return unpad_rows(yp, tiles)


def _ffn_fwd(x, w1, w2, w3, group_sizes, tile, limit):
  y = _ffn_loop(x, group_sizes, tile, limit, lambda e: (w1[e], w2[e], w3[e]), w1)
  return y, (x, w1, w2, w3, group_sizes)


def _ffn_bwd(tile, limit, res, dy, unroll: int = BWD_UNROLL):
  x, w1, w2, w3, group_sizes = res
  tiles = tile_layout(group_sizes, x.shape[0], tile)
  grown, steps = _unrolled(tiles, x.shape[0], tile, unroll)
  xq, dq = pad_rows(x, grown, tile), pad_rows(dy.astype(x.dtype), grown, tile)
  expert, dt = grown.expert, x.dtype

  def one_tile(t):
    """(dx [tile, D], dw1 [F, D], dw2 [D, F], dw3 [F, D]) of tile t, recomputing its SwiGLU."""
    e, xt, dyt = expert[t], xq[t], dq[t]
    h, swiglu_vjp = jax.vjp(lambda g, v: swiglu(g, v, limit), _dot(xt, w1[e], 1, 1),
                            _dot(xt, w3[e], 1, 1))  # [tile, F] float32
    dh = _dot(dyt, w2[e], 1, 0)  # [tile, F]
    dg, dv = (a.astype(dt) for a in swiglu_vjp(dh))
    dx = _dot(dg, w1[e], 1, 0) + _dot(dv, w3[e], 1, 0)  # [tile, D]
    return dx.astype(dt), _dot(dg, xt, 0, 0), _dot(dyt, h.astype(dt), 0, 0), _dot(dv, xt, 0, 0)

  def body(c, carry):
    dxq, dw1, dw2, dw3 = carry
    t0 = c * unroll
    outs = [one_tile(t0 + i) for i in range(unroll)]  # independent: XLA may overlap them
    for i, (_, g1, g2, g3) in enumerate(outs):
      e = expert[t0 + i]
      dw1, dw2, dw3 = dw1.at[e].add(g1), dw2.at[e].add(g2), dw3.at[e].add(g3)
    dxq = jax.lax.dynamic_update_slice_in_dim(dxq, jnp.stack([o[0] for o in outs]), t0, 0)
    return dxq, dw1, dw2, dw3

  init = (_zeros(xq.shape, dt, xq, dq, w1), _zeros(w1.shape, jnp.float32, xq, dq, w1),
          _zeros(w2.shape, jnp.float32, xq, dq, w1), _zeros(w3.shape, jnp.float32, xq, dq, w1))
  dxq, dw1, dw2, dw3 = jax.lax.fori_loop(0, steps, body, init)
  # `tiles.dest` points into the first nt tiles, or at row nt * tile for rows past every group:
  # a zero row of an extra tile (or past the end: filled with 0), so no slice is needed.
  return (unpad_rows(dxq, tiles), dw1.astype(w1.dtype), dw2.astype(w2.dtype),
          dw3.astype(w3.dtype), None)


swiglu_ffn.defvjp(_ffn_fwd, _ffn_bwd)


# ----- stored (e.g. FP4) weights, decoded one expert at a time -----------------------------------
def swiglu_ffn_decoded(x: Float[Array, "M D"], w1: Any, w2: Any, w3: Any,
                       group_sizes: Int[Array, "E"], tile: int, limit: float,
                       decode: Callable[[Any], Array]) -> Float[Array, "M D"]:
  """`swiglu_ffn` over weights kept in a stored form: w1, w2, w3 are pytrees of arrays with a
  leading expert axis, and `decode(one expert's leaves)` gives its matrix in x's dtype.

  The loop decodes an expert when its first tile comes (its tiles are consecutive) and keeps it
  for the rest, so each expert is decoded once and at most one expert's three decoded matrices
  exist at a time (never a decoded copy of every expert). Forward only: the stored
  weights are inference constants (callers refuse differentiation, layers/moe_ffn.py).
  """
  def expert(e):
    return tuple(decode(jax.tree.map(lambda a: a[e], w)) for w in (w1, w2, w3))

  return _ffn_loop(x, group_sizes, tile, limit, expert, *jax.tree.leaves((w1, w2, w3)),
                   reuse=True)


# ----- stored weights with trainable per-expert adapters: forward and backward ------------------
def _stored_loop(xp: Array, tiles: Tiles, stored: Any, decode: Callable[[Any], Any],
                 step: Callable, init: Any, *like: Array) -> Any:
  """fori_loop over the tiles in use with `carry = (last expert, its decoded weights, acc)`:
  decodes an expert when its first tile comes (an expert's tiles are consecutive) and calls
  `step(t, e, ws, acc) -> acc`. Only one expert's decoded weights exist at a time."""
  def expert(e):
    return decode(jax.tree.map(lambda a: a[e], stored))

  def body(t, carry):
    last, ws, acc = carry
    e = tiles.expert[t]
    ws = jax.lax.cond(e == last, lambda: ws, lambda: expert(e))
    return e, ws, step(t, e, ws, acc)

  shapes = jax.eval_shape(expert, tiles.expert[0])
  ws = jax.tree.map(lambda a: _zeros(a.shape, a.dtype, xp, *like), shapes)
  last = tiles.expert[0] * 0 - 1  # no expert yet (shares the layout's mesh axes)
  return jax.lax.fori_loop(0, tiles.used, body, (last, ws, init))[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def stored_ffn(x: Float[Array, "M D"], group_sizes: Int[Array, "E"], stored: Any, adapters: Any,
               tile: int, decode: Callable[[Any], Any], tile_fn: Callable,
               forward: Callable | None = None) -> Float[Array, "M D"]:
  """Rows through `tile_fn(x_tile, decode(stored[e]), adapters[e])` of their expert e, over
  weights kept in a stored form (`stored`: a pytree of arrays with a leading expert axis, e.g.
  FP4 codes and scales) with small trainable per-expert `adapters` (a pytree with a leading
  expert axis, or `()`).

  Differentiable in `x` and `adapters`; `stored` is frozen data (zero cotangent). The forward
  saves only its inputs; the backward is a second tile loop that decodes each expert again and
  differentiates one tile at a time (`jax.vjp` of `tile_fn`), so no decoded expert weight is ever
  a residual and at most one expert's decoded weights are alive. `forward(x, group_sizes,
  stored, adapters)`, when given, replaces the forward loop (e.g. a grouped matmul over all
  experts decoded at once on accelerators); the backward is the tile loop either way.
  """
  if forward is not None:
    return forward(x, group_sizes, stored, adapters)
  tiles = tile_layout(group_sizes, x.shape[0], tile)
  xp = pad_rows(x, tiles, tile)
  like = jax.tree.leaves((stored, adapters))

  def step(t, e, ws, yp):
    ad = jax.tree.map(lambda a: a[e], adapters)
    return yp.at[t].set(tile_fn(xp[t], ws, ad).astype(yp.dtype))

  yp = _stored_loop(xp, tiles, stored, decode, step, _zeros(xp.shape, x.dtype, xp, *like), *like)
  return unpad_rows(yp, tiles)


def _stored_fwd(x, group_sizes, stored, adapters, tile, decode, tile_fn, forward):
  y = stored_ffn(x, group_sizes, stored, adapters, tile, decode, tile_fn, forward)
  return y, (x, group_sizes, stored, adapters)  # inputs only: the backward decodes again


def _stored_bwd(tile, decode, tile_fn, forward, res, dy):
  x, group_sizes, stored, adapters = res
  tiles = tile_layout(group_sizes, x.shape[0], tile)
  xp, dp = pad_rows(x, tiles, tile), pad_rows(dy.astype(x.dtype), tiles, tile)
  like = jax.tree.leaves((stored, adapters))

  def step(t, e, ws, acc):
    dxp, dad = acc
    ad = jax.tree.map(lambda a: a[e], adapters)
    _, vjp = jax.vjp(lambda xt, a: tile_fn(xt, ws, a), xp[t], ad)  # recomputes this tile
    dxt, dad_e = vjp(dp[t].astype(jnp.float32))
    dad = jax.tree.map(lambda acc_, g: acc_.at[e].add(g.astype(jnp.float32)), dad, dad_e)
    return dxp.at[t].set(dxt.astype(dxp.dtype)), dad

  init = (_zeros(xp.shape, x.dtype, xp, dp, *like),
          jax.tree.map(lambda a: _zeros(a.shape, jnp.float32, xp, dp, *like), adapters))
  dxp, dad = _stored_loop(xp, tiles, stored, decode, step, init, dp, *like)
  dad = jax.tree.map(lambda g, a: g.astype(a.dtype), dad, adapters)
  return unpad_rows(dxp, tiles), None, None, dad


stored_ffn.defvjp(_stored_fwd, _stored_bwd)
