"""Grouped matmul, the spec: row m of the expert-sorted rows uses the weight of its group.

`x` [M, K] holds rows sorted by group: the first `group_sizes[0]` rows belong to group 0, the next
`group_sizes[1]` to group 1, and so on; rows past `sum(group_sizes)` belong to no group and give 0
(the convention of `jax.lax.ragged_dot`). Written for reading: it gathers one [K, N] matrix per row
(O(M K N) memory), so only tests call it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def group_ids(group_sizes: Int[Array, "E"], m: int) -> Int[Array, "M"]:
  """Group of each of `m` sorted rows; E for rows past the last group."""
  return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right").astype(jnp.int32)


def gmm(x: Float[Array, "M K"], w: Float[Array, "E K N"], group_sizes: Int[Array, "E"], *,
        transpose_rhs: bool = False) -> Float[Array, "M N"]:
  """y[m] = x[m] @ w[g(m)] (or x[m] @ w[g(m)].T with `transpose_rhs`, w then [E, N, K])."""
  E = w.shape[0]
  g = group_ids(group_sizes, x.shape[0])
  wm = w[jnp.minimum(g, E - 1)].astype(jnp.float32)  # [M, K, N] (or [M, N, K])
  y = jnp.einsum("MNK,MK->MN" if transpose_rhs else "MKN,MK->MN", wm, x.astype(jnp.float32))
  return jnp.where((g < E)[:, None], y, 0.0).astype(x.dtype)


def tgmm(x: Float[Array, "M K"], dy: Float[Array, "M N"], group_sizes: Int[Array, "E"]
         ) -> Float[Array, "E K N"]:
  """dw[e] = sum over the rows m of group e of outer(x[m], dy[m]): the weight gradient of `gmm`."""
  E = group_sizes.shape[0]
  onehot = group_ids(group_sizes, x.shape[0])[:, None] == jnp.arange(E)[None, :]  # [M, E]
  dw = jnp.einsum("ME,MK,MN->EKN", onehot.astype(jnp.float32), x.astype(jnp.float32),
                  dy.astype(jnp.float32))
  return dw.astype(x.dtype)


def swiglu(g: Array, v: Array, limit: float) -> Array:
  """The experts' clamped SwiGLU, `silu(min(g, limit)) * clip(v, -limit, limit)`
  (docs/architecture.md#swiglu)."""
  return jax.nn.silu(jnp.minimum(g, limit)) * jnp.clip(v, -limit, limit)


def swiglu_ffn(x: Float[Array, "M D"], w1: Float[Array, "E F D"], w2: Float[Array, "E D F"],
               w3: Float[Array, "E F D"], group_sizes: Int[Array, "E"], limit: float
               ) -> Float[Array, "M D"]:
  """Expert_{g(m)}(x[m]) = swiglu(x w1^T, x w3^T) w2^T per group (checkpoint layouts), float32
  SwiGLU between matmuls in x's dtype."""
  mm = lambda a, w: gmm(a, w, group_sizes, transpose_rhs=True)  # noqa: E731
  h = swiglu(mm(x, w1).astype(jnp.float32), mm(x, w3).astype(jnp.float32), limit)
  return mm(h.astype(x.dtype), w2)
