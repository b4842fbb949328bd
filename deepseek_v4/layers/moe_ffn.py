"""The routed experts' clamped SwiGLU (spec §4.4) over expert-sorted rows, as grouped matmuls, and
the sort (dispatch) and weighted sum (combine) around it.

Shared by the local MoE (layers/moe.py) and the expert-parallel MoE (layers/moe_ep.py), so both run
one code path forward and backward; `gmm` names the grouped-matmul implementation
(kernels_pallas/moe_gmm/ops.py: "auto", "tiled", "ragged_dot", "reference").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.moe_gmm import ops as gmm_ops


def sort_by(keys: Int[Array, "N"], num_keys: int) -> tuple[Array, Array, Array]:
  """(stable order by key, count of each key [num_keys], rank of each element among its key)."""
  order = jnp.argsort(keys, stable=True)
  counts = jnp.bincount(keys, length=num_keys).astype(jnp.int32)
  start = jnp.cumsum(counts) - counts
  ranked = jnp.arange(keys.shape[0], dtype=jnp.int32) - start[keys[order]]
  rank = jnp.zeros_like(ranked).at[order].set(ranked, unique_indices=True)
  return order, counts, rank


def combine(y: Float[Array, "N D"], w: Float[Array, "T X"]) -> Float[Array, "T D"]:
  """sum_k w_k y_{t,k} in float32; y holds the pairs token-major."""
  T, X = w.shape
  return jnp.einsum("TXD,TX->TD", y.reshape(T, X, -1).astype(jnp.float32),
                    w.astype(jnp.float32))


def swiglu(g: Array, v: Array, limit: float) -> Array:
  """`silu(min(g, limit)) * clip(v, -limit, limit)` (spec §4.4)."""
  return jax.nn.silu(jnp.minimum(g, limit)) * jnp.clip(v, -limit, limit)


def expert_ffn(xs: Float[Array, "R D"], sizes: Int[Array, "E"], w1: Float[Array, "E F D"],
               w2: Float[Array, "E D F"], w3: Float[Array, "E F D"], limit: float,
               gmm: str = "auto") -> Float[Array, "R D"]:
  """Expert_{e(r)}(xs[r]) for rows sorted by expert (`sizes` rows each; rows past them give 0).

  Weights stay in the checkpoint layouts (w1, w3 [E, F, D]; w2 [E, D, F]): the grouped matmul
  contracts their last dimension, so no transposed copy is made. SwiGLU runs in float32; the
  "tiled" path runs the whole FFN in one loop over row tiles (kernels_pallas/moe_gmm/tiled.py).
  """
  return gmm_ops.grouped_swiglu_ffn(xs, w1, w2, w3, sizes, limit=limit, impl=gmm)
