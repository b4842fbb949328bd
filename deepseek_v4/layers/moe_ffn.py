"""The routed experts' clamped SwiGLU (docs/architecture.md#swiglu) over expert-sorted rows, as
grouped matmuls, and the sort (dispatch) and weighted sum (combine) around it.

Shared by the local MoE (layers/moe.py) and the expert-parallel MoE (layers/moe_ep.py), so both run
one code path forward and backward; `gmm` names the grouped-matmul implementation
(kernels_pallas/moe_gmm/ops.py: "auto", "tiled", "ragged_dot", "reference").

Routed experts may also be kept as released (`Options.keep_quantized="experts"`,
docs/architecture.md#fp8-fp4): each weight is an `Fp4Weight` (packed E2M1 codes + 1x32 E8M0 scales)
and the FFN decodes it with `deepseek_v4/quant_codecs.py` inside the computation, one tile's expert
at a time on the tiled path. This is the one place a layer dequantizes (STYLE.md §7 keeps
dequantization in the loader): the point is that a decoded copy of every expert never exists. Kept
experts are frozen data: the backward decodes each expert again inside its tile loop, so gradients
reach the activations and the experts' LoRA adapters (`ExpertLoRA`) while no decoded expert is
saved for the backward.
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


class ExpertLoRA(NamedTuple):
  """Low-rank adapters of the routed experts, one per expert and weight (deepseek_v4/lora.py):
  `x W_e^T + scale (x A_e) B_e`. a1 [E, D, L], b1 [E, L, F] (w1); a2 [E, F, L], b2 [E, L, D]
  (w2); a3, b3 like w1. One expert's slice (no E axis) inside the tile loop."""

  a1: Array
  b1: Array
  a2: Array
  b2: Array
  a3: Array
  b3: Array


def lora_delta(a: Float[Array, "E I L"], b: Float[Array, "E L O"], scale: float) -> Array:
  """The weight update `scale (A_e B_e)^T` of every expert, [E, O, I] float32 (checkpoint
  layout)."""
  return scale * jnp.einsum("EIL,ELO->EOI", a.astype(jnp.float32), b.astype(jnp.float32))


def _project(x: Array, w: Array, a: Array | None, b: Array | None, scale: float) -> Array:
  """`x w^T (+ scale (x a) b)` in float32 for one tile and one expert (w [O, I])."""
  y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  if a is None:
    return y
  h = jnp.einsum("TI,IL->TL", x, a.astype(x.dtype), preferred_element_type=jnp.float32)
  return y + scale * jnp.einsum("TL,LO->TO", h, b.astype(jnp.float32))


def _adapted_swiglu(xt: Array, ws: tuple[Array, Array, Array], ad, *, limit: float,
                    scale: float) -> Array:
  """One tile of one expert: the clamped SwiGLU FFN with its adapters (if any), float32."""
  w1, w2, w3 = ws
  a = ExpertLoRA(*([None] * 6)) if ad == () else ad
  g = _project(xt, w1, a.a1, a.b1, scale)
  v = _project(xt, w3, a.a3, a.b3, scale)
  h = swiglu(g, v, limit).astype(xt.dtype)
  return _project(h, w2, a.a2, a.b2, scale)


def expert_ffn(xs: Float[Array, "R D"], sizes: Int[Array, "E"], w1: Float[Array, "E F D"],
               w2: Float[Array, "E D F"], w3: Float[Array, "E F D"], limit: float,
               gmm: str = "auto", lora: ExpertLoRA | None = None,
               lora_scale: float = 1.0) -> Float[Array, "R D"]:
  """Expert_{e(r)}(xs[r]) for rows sorted by expert (`sizes` rows each; rows past them give 0).

  Weights stay in the checkpoint layouts (w1, w3 [E, F, D]; w2 [E, D, F]): the grouped matmul
  contracts their last dimension, so no transposed copy is made. SwiGLU runs in float32; the
  "tiled" path runs the whole FFN in one loop over row tiles (kernels_pallas/moe_gmm/tiled.py).
  `lora` (with `lora_scale`) adds per-expert adapters: over float weights as the merged weight
  `w + lora_delta` (differentiable), over kept FP4 weights inside the tile loop.
  """
  if isinstance(w1, Fp4Weight):
    return kept_expert_ffn(xs, sizes, w1, w2, w3, limit, gmm, lora, lora_scale)
  if lora is not None:
    w1, w2, w3 = (w.astype(jnp.float32) + lora_delta(a, b, lora_scale)
                  for w, a, b in ((w1, lora.a1, lora.b1), (w2, lora.a2, lora.b2),
                                  (w3, lora.a3, lora.b3)))
  return gmm_ops.grouped_swiglu_ffn(xs, w1, w2, w3, sizes, limit=limit, impl=gmm)


def kept_expert_ffn(xs: Float[Array, "R D"], sizes: Int[Array, "E"], w1: Fp4Weight,
                    w2: Fp4Weight, w3: Fp4Weight, limit: float, gmm: str = "auto",
                    lora: ExpertLoRA | None = None,
                    lora_scale: float = 1.0) -> Float[Array, "R D"]:
  """`expert_ffn` over FP4-kept experts, decoded inside the computation (see the module doc).

  The codes and scales are frozen data; gradients flow to `xs` and to `lora`. Forward: on
  "tiled" each expert is decoded once, at its first tile; on "ragged_dot"/"reference" (without
  adapters) all experts of this call (one layer) up front. Backward: always the tile loop of
  `kernels_pallas/moe_gmm/tiled.stored_ffn`, which decodes each expert again, so no decoded
  expert weight is saved between the forward and the backward.
  """
  dt = xs.dtype

  def decode(ws):  # one expert's (w1, w2, w3) as stored -> its matrices in the compute dtype
    return tuple(decode_fp4(w, dt) for w in ws)

  def every_expert(x, s, stored, _):  # the forward over all experts decoded at once
    one = functools.partial(decode_fp4, dtype=dt)
    return gmm_ops.grouped_swiglu_ffn_decoded(x, *stored, s, decode=one, limit=limit, impl=gmm)

  forward = every_expert if lora is None and gmm_ops.resolve_impl(gmm) != "tiled" else None
  tile_fn = functools.partial(_adapted_swiglu, limit=limit, scale=lora_scale)
  return gmm_ops.grouped_ffn_stored(xs, (w1, w2, w3), () if lora is None else lora, sizes,
                                    decode=decode, tile_fn=tile_fn, forward=forward)
