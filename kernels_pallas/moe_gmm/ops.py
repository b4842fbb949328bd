"""Public entry of the grouped matmul used by the routed experts; `impl=` picks the path.

  "ragged_dot": `jax.lax.ragged_dot_general`, XLA's grouped matmul (the megablox-style kernel on
                TPU). On CPU XLA runs it as a masked dense product over every group, 10-30x
                slower than the tiled path (2 CPU cores); XLA:GPU (jax 0.10) expands it the same
                way, an [rows, groups, K] operand: 51.5 GB per MoE layer at Flash's 8 x 4096
                tokens over 8 H200s (compiled, docs/plan.md).
  "tiled":      `tiled.py`: rows padded to tile-aligned groups, one matmul per tile, custom VJP.
  "reference":  `reference.py` (O(M K N) memory; tests only).
  "auto":       "tiled" on CPU and GPU, "ragged_dot" on TPU; logs once which path runs.

`grouped_swiglu_ffn_decoded` is the expert FFN over weights kept in a stored form (packed FP4
experts, layers/moe_ffn.py), decoded inside the tile loop on the tiled path.

Every path computes the same function, forward and backward (see the tests in
tests/kernels/test_moe_gmm.py).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas import common
from kernels_pallas.moe_gmm import reference, tiled

IMPLS = ("auto", "tiled", "ragged_dot", "reference")
Impl = Literal["auto", "tiled", "ragged_dot", "reference"]


def resolve_impl(impl: str) -> str:
  """The concrete path for `impl` (`common.resolve_impl`'s vocabulary with this op's paths);
  "auto" is "ragged_dot" on TPU and "tiled" elsewhere, logged once at INFO."""
  return common.resolve_impl("moe_gmm", impl, choices=IMPLS[1:],
                             auto=lambda target: "ragged_dot" if target == "tpu" else "tiled")


def _check(x, w, group_sizes, transpose_rhs: bool, tile: int | None) -> None:
  if x.ndim != 2 or w.ndim != 3:
    raise ValueError(f"grouped_matmul: x must be [M, K] and w [E, K, N]; got {x.shape}, {w.shape}")
  K = w.shape[2] if transpose_rhs else w.shape[1]
  if x.shape[1] != K:
    raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w {w.shape} "
                     f"({transpose_rhs=}) contracts K={K}")
  if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"grouped_matmul: group_sizes must be integer [E={w.shape[0]}], got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")
  if tile is not None and tile < 1:
    raise ValueError(f"grouped_matmul: tile={tile} must be >= 1")


def _same_varying_axes(*arrays: Array) -> tuple[Array, ...]:
  """Inside `shard_map`, casts the arrays to vary over the union of their manual mesh axes.

  The tiled path's custom VJP must return each cotangent with its input's type; casting first
  makes autodiff of the cast sum the weight gradient over the token axes (the expert-parallel MoE
  holds tokens split over more axes than its experts). Outside shard_map this is the identity.
  """
  axes = [jax.typeof(a).manual_axis_type.varying for a in arrays]
  union = frozenset().union(*axes)
  return tuple(jax.lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
               for a, v in zip(arrays, axes))


def grouped_matmul(
  x: Float[Array, "M K"],
  w: Float[Array, "E K N"],
  group_sizes: Int[Array, "E"],
  *,
  transpose_rhs: bool = False,
  impl: Impl = "auto",
  tile: int | None = None,
) -> Float[Array, "M N"]:
  """y[m] = x[m] @ w[g(m)] for rows sorted by group (`reference.gmm` states the convention).

  Args:
    x: rows sorted by group; rows past sum(group_sizes) give 0.
    w: one matrix per group, [E, K, N] (or [E, N, K] with `transpose_rhs`, e.g. checkpoint
      layouts, used without materializing a transpose).
    group_sizes: rows of each group (sum <= M).
    impl: see the module docstring.
    tile: rows per tile of the "tiled" path (default: `tiled.default_tile`).
  Returns:
    [M, N] in x's dtype (float32 accumulation).
  """
  _check(x, w, group_sizes, transpose_rhs, tile)
  impl = resolve_impl(impl)
  M = x.shape[0]
  N = w.shape[1] if transpose_rhs else w.shape[2]
  if M == 0:
    return jnp.zeros((0, N), x.dtype)
  w = w.astype(x.dtype)
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == "reference":
    return reference.gmm(x, w, group_sizes, transpose_rhs=transpose_rhs)
  if impl == "tiled":
    x, w = _same_varying_axes(x, w)
    return tiled.gmm(x, w, group_sizes, tile or tiled.default_tile(M, w.shape[0]), transpose_rhs)
  dims = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2 if transpose_rhs else 1,)), ((), ())),
    lhs_ragged_dimensions=(0,), rhs_group_dimensions=(0,))
  y = jax.lax.ragged_dot_general(x, w, group_sizes, dims, preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


def grouped_swiglu_ffn(
  x: Float[Array, "M D"],
  w1: Float[Array, "E F D"],
  w2: Float[Array, "E D F"],
  w3: Float[Array, "E F D"],
  group_sizes: Int[Array, "E"],
  *,
  limit: float,
  impl: Impl = "auto",
  tile: int | None = None,
) -> Float[Array, "M D"]:
  """The routed experts' SwiGLU FFN over expert-sorted rows (`reference.swiglu_ffn`).

  "tiled" runs the whole FFN in one tile loop (`tiled.swiglu_ffn`); the other paths are three
  `grouped_matmul` calls with float32 SwiGLU in between. Weights in checkpoint layouts: w1, w3
  [E, F, D], w2 [E, D, F]. Returns [M, D] in x's dtype.
  """
  E, F, D = w1.shape
  if w3.shape != w1.shape or w2.shape != (E, D, F) or x.ndim != 2 or x.shape[1] != D:
    raise ValueError(f"grouped_swiglu_ffn: need x [M, D={D}], w1 = w3 [E, F, D], w2 [E, D, F]; "
                     f"got {x.shape}, {w1.shape}, {w2.shape}, {w3.shape}")
  _check(x, w1, group_sizes, True, tile)
  impl = resolve_impl(impl)
  M = x.shape[0]
  if impl != "tiled" or M == 0:
    mm = lambda a, w: grouped_matmul(a, w, group_sizes, transpose_rhs=True,  # noqa: E731
                                     impl=impl)
    h = reference.swiglu(mm(x, w1).astype(jnp.float32), mm(x, w3).astype(jnp.float32), limit)
    return mm(h.astype(x.dtype), w2)
  x, w1, w2, w3 = _same_varying_axes(x, *(w.astype(x.dtype) for w in (w1, w2, w3)))
  return tiled.swiglu_ffn(x, w1, w2, w3, group_sizes.astype(jnp.int32),
                          tile or tiled.default_tile(M, E), float(limit))


def grouped_swiglu_ffn_decoded(
  x: Float[Array, "M D"],
  w1: Any,
  w2: Any,
  w3: Any,
  group_sizes: Int[Array, "E"],
  *,
  decode: Callable[[Any], Array],
  limit: float,
  impl: Impl = "auto",
  tile: int | None = None,
) -> Float[Array, "M D"]:
  """`grouped_swiglu_ffn` over weights kept in a stored form (inference only, no VJP).

  Args:
    w1, w2, w3: pytrees of arrays sharing a leading expert axis E (e.g. packed FP4 codes and
      their block scales); `decode` maps one expert's leaves to its matrix in checkpoint layout
      (w1, w3 -> [F, D], w2 -> [D, F]) in x's dtype.
    impl: "tiled" decodes each expert once inside the tile loop, at its first tile, and keeps it
      for that expert's other tiles, so (besides the one being decoded) one expert's matrices are
      the only decoded weights alive; "ragged_dot" and "reference" decode every expert of this
      call (one layer, or one device's experts) up front and run the float path.
  Returns:
    [M, D] in x's dtype.
  """
  def one(w):  # one expert's leaves, as shapes
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), w)

  shapes = [jax.eval_shape(decode, one(w)).shape for w in (w1, w2, w3)]
  E = {a.shape[0] for a in jax.tree.leaves((w1, w2, w3))}
  (F, D) = shapes[0]
  if len(E) != 1 or shapes[2] != (F, D) or shapes[1] != (D, F) or x.ndim != 2 or x.shape[1] != D:
    raise ValueError(f"grouped_swiglu_ffn_decoded: need x [M, D], leaves with one leading "
                     f"expert axis, decoded w1 = w3 [F, D], w2 [D, F]; got x {x.shape}, leading "
                     f"axes {sorted(E)}, decoded {shapes}")
  E = E.pop()
  if group_sizes.shape != (E,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"grouped_swiglu_ffn_decoded: group_sizes must be integer [E={E}], got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")
  impl = resolve_impl(impl)
  M = x.shape[0]
  if impl != "tiled" or M == 0:
    full = [jax.vmap(decode)(w).astype(x.dtype) for w in (w1, w2, w3)]  # [E, ...] each
    return grouped_swiglu_ffn(x, *full, group_sizes, limit=limit, impl=impl, tile=tile)
  return tiled.swiglu_ffn_decoded(x, w1, w2, w3, group_sizes.astype(jnp.int32),
                                  tile or tiled.default_tile(M, E), float(limit), decode)


def grouped_ffn_stored(
  x: Float[Array, "M D"],
  stored: Any,
  adapters: Any,
  group_sizes: Int[Array, "E"],
  *,
  decode: Callable[[Any], Any],
  tile_fn: Callable[[Array, Any, Any], Array],
  forward: Callable | None = None,
  tile: int | None = None,
) -> Float[Array, "M D"]:
  """An expert FFN over frozen stored weights with trainable per-expert adapters, differentiable
  in `x` and `adapters` (`tiled.stored_ffn`: the backward decodes each expert again inside its
  tile loop, so no decoded weight is saved for it).

  Args:
    stored: pytree of arrays sharing a leading expert axis E (frozen: zero cotangent).
    adapters: pytree of arrays with the same leading axis E (trained), or `()`.
    decode: one expert's `stored` leaves -> the weights `tile_fn` reads.
    tile_fn: `(x_tile [t, D], decoded weights, one expert's adapters) -> [t, D]` float32.
    forward: optional replacement of the forward tile loop, `(x, group_sizes, stored, adapters)
      -> [M, D]` (the same function, e.g. over every expert decoded at once).
  Returns:
    [M, D] in x's dtype.
  """
  E = {a.shape[0] for a in jax.tree.leaves((stored, adapters))}
  if len(E) != 1 or x.ndim != 2:
    raise ValueError(f"grouped_ffn_stored: need x [M, D] and stored/adapter leaves with one "
                     f"leading expert axis; got x {x.shape}, leading axes {sorted(E)}")
  E = E.pop()
  if group_sizes.shape != (E,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"grouped_ffn_stored: group_sizes must be integer [E={E}], got "
                     f"{group_sizes.dtype}{list(group_sizes.shape)}")
  M = x.shape[0]
  if M == 0:
    return jnp.zeros_like(x)
  return tiled.stored_ffn(x, group_sizes.astype(jnp.int32), stored, adapters,
                          tile or tiled.default_tile(M, E), decode, tile_fn, forward)
