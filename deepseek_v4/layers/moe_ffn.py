"""The routed experts' clamped SwiGLU (docs/architecture.md#swiglu) over expert-sorted rows, as
grouped matmuls, and the sort (dispatch) and weighted sum (combine) around it.

Shared by the local MoE (layers/moe.py) and the expert-parallel MoE (layers/moe_ep.py), so both run
one code path forward and backward; `gmm` names the grouped-matmul implementation
(kernels_pallas/moe_gmm/ops.py: "auto", "tiled", "ragged_dot", "reference").

Routed experts may also be kept as released (`Options.keep_quantized="experts"`,
docs/architecture.md#fp8-fp4): each weight is an `Fp4Weight` (packed E2M1 codes + 1x32 E8M0 scales)
and the FFN decodes it with `deepseek_v4/quant_codecs.py` inside the computation, one tile's expert
at a time on the tiled
path. This is the one place a layer dequantizes (STYLE.md §7 keeps dequantization in the loader):
the point is that a decoded copy of every expert never exists. Kept experts are inference-only:
differentiating through them raises (`InferenceOnlyError`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from deepseek_v4 import quant_codecs
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
  """`silu(min(g, limit)) * clip(v, -limit, limit)` (docs/architecture.md#swiglu)."""
  return jax.nn.silu(jnp.minimum(g, limit)) * jnp.clip(v, -limit, limit)


class Fp4Weight(NamedTuple):
  """Stacked expert weights as the official checkpoints store them (docs/architecture.md#fp8-fp4):
  `codes` [E, R, C/2] uint8, two E2M1 values per byte (low nibble first), and `scale` [E, R,
  ceil(C/32)] float8_e8m0fnu, one power of two per 1x32 block. `shape` is the logical [E, R, C]."""

  codes: Array
  scale: Array

  @property
  def shape(self) -> tuple[int, int, int]:
    E, R, half = self.codes.shape
    return (E, R, 2 * half)


def decode_fp4(w: Fp4Weight, dtype) -> Array:
  """One expert's weight [R, C] in `dtype` (exact for float32 and bfloat16; quant_codecs.py)."""
  return quant_codecs.dequantize_fp4(w.codes, w.scale, dtype=jnp.dtype(dtype))


class InferenceOnlyError(TypeError):
  """Differentiation through routed experts kept quantized (`keep_quantized="experts"`)."""


def _inference_only(fn):
  """`fn` with reverse-mode differentiation refused by a clear error (forward unchanged)."""
  @jax.custom_vjp
  def guarded(*args):
    return fn(*args)

  def bwd(_, g):
    raise InferenceOnlyError(
      "the routed experts are kept quantized (keep_quantized='experts'), which is inference-only: "
      "gradients through them are not supported. Load with keep_quantized=None to train or "
      "fine-tune.")

  guarded.defvjp(lambda *args: (fn(*args), None), bwd)
  return guarded


def expert_ffn(xs: Float[Array, "R D"], sizes: Int[Array, "E"], w1: Float[Array, "E F D"],
               w2: Float[Array, "E D F"], w3: Float[Array, "E F D"], limit: float,
               gmm: str = "auto") -> Float[Array, "R D"]:
  """Expert_{e(r)}(xs[r]) for rows sorted by expert (`sizes` rows each; rows past them give 0).

  Weights stay in the checkpoint layouts (w1, w3 [E, F, D]; w2 [E, D, F]): the grouped matmul
  contracts their last dimension, so no transposed copy is made. SwiGLU runs in float32; the
  "tiled" path runs the whole FFN in one loop over row tiles (kernels_pallas/moe_gmm/tiled.py).
  """
  if isinstance(w1, Fp4Weight):
    return kept_expert_ffn(xs, sizes, w1, w2, w3, limit, gmm)
  return gmm_ops.grouped_swiglu_ffn(xs, w1, w2, w3, sizes, limit=limit, impl=gmm)


def kept_expert_ffn(xs: Float[Array, "R D"], sizes: Int[Array, "E"], w1: Fp4Weight,
                    w2: Fp4Weight, w3: Fp4Weight, limit: float,
                    gmm: str = "auto") -> Float[Array, "R D"]:
  """`expert_ffn` over FP4-kept experts, decoded inside the computation (see the module doc):
  on "tiled" each expert once, at its first tile; on "ragged_dot"/"reference" all experts of this
  call (one layer) up front.
  Forward only: differentiation raises `InferenceOnlyError`."""
  decode = functools.partial(decode_fp4, dtype=xs.dtype)
  run = functools.partial(gmm_ops.grouped_swiglu_ffn_decoded, decode=decode, limit=limit,
                          impl=gmm)
  return _inference_only(run)(xs, w1, w2, w3, sizes)
