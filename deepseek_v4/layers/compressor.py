"""KV compressor (spec §3.6): gated softmax pooling of every window of `m` tokens into one entry.

HCA (ratio != 4): non-overlapping windows, one projection series. CSA (ratio 4): each token's
projection has two halves; entry i pools the previous window through the first half (A) and the
current window through the second half (B): 2m slots per channel under one softmax. The learned
positional bias `ape[j mod m]` is added to the gate logits. Entries are RMS-normed, then roped at
the fixed position `m * i`. The projections run in float32 (the reference does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from deepseek_v4.layers.norms import RMSNorm
from deepseek_v4.layers.params import Linear, param
from deepseek_v4.layers.rope import apply_rope, rope_angles


def project(x: Float[Array, "B T D"], wkv: Array, wgate: Array, ape: Array,
            start: int | Array = 0) -> tuple[Array, Array]:
  """Per-token values `C_j` and biased gate logits `Z_j + ape[j mod m]` (float32).

  `start` is the absolute position of x[:, 0] (for chunked prefill and decoding).
  """
  x32 = x.astype(jnp.float32)
  c = jnp.einsum("BTD,KD->BTK", x32, wkv.astype(jnp.float32))
  z = jnp.einsum("BTD,KD->BTK", x32, wgate.astype(jnp.float32))
  m = ape.shape[0]
  slot = (start + jnp.arange(x.shape[1])) % m
  return c, z + ape.astype(jnp.float32)[slot]


def pool_windows(c: Float[Array, "B S K"], z: Float[Array, "B S K"], ratio: int, overlap: bool,
                 prev: tuple[Array, Array] | None = None) -> Array:
  """Pools S = n*m window-aligned tokens into n entries (float32, before norm and RoPE).

  Args:
    c, z: values and biased gate logits, `K = (1 + overlap) * width`.
    ratio: m.
    overlap: CSA two-series pooling.
    prev: CSA only: (values, logits) [B, m, width] of the first halves of the window just before
      c[:, 0]; None means "no previous window" (value 0, logit -inf, so weight 0).
  Returns:
    [B, n, width].
  """
  B, S, K = c.shape
  n = S // ratio
  c = c.reshape(B, n, ratio, K)
  z = z.reshape(B, n, ratio, K)
  if not overlap:
    return jnp.sum(jax.nn.softmax(z, axis=2) * c, axis=2)
  w = K // 2
  if prev is None:
    prev = (jnp.zeros((B, ratio, w), c.dtype), jnp.full((B, ratio, w), -jnp.inf, z.dtype))
  # Series A of window i-1 and series B of window i share one softmax over 2m slots.
  prev_c = jnp.concatenate([prev[0][:, None], c[:, :-1, :, :w]], axis=1)  # [B, n, m, w]
  prev_z = jnp.concatenate([prev[1][:, None], z[:, :-1, :, :w]], axis=1)
  vals = jnp.concatenate([prev_c, c[..., w:]], axis=2)  # [B, n, 2m, w]
  logits = jnp.concatenate([prev_z, z[..., w:]], axis=2)
  return jnp.sum(jax.nn.softmax(logits, axis=2) * vals, axis=2)


class Compressor(nnx.Module):
  """Owns wkv, wgate, ape and the entry norm of one compressor (main or indexer)."""

  def __init__(self, d_model: int, ratio: int, width: int, overlap: bool, eps: float, *,
               std: float, param_dtype, rngs: nnx.Rngs):
    self.ratio = ratio
    self.overlap = overlap
    k = (2 if overlap else 1) * width
    self.wkv = Linear(d_model, k, axes=("comp_width", "embed"), std=std,
                      param_dtype=param_dtype, rngs=rngs)
    self.wgate = Linear(d_model, k, axes=("comp_width", "embed"), std=std,
                        param_dtype=param_dtype, rngs=rngs)
    self.ape = param(jnp.zeros((ratio, k), jnp.float32), (None, "comp_width"))
    self.norm = RMSNorm(width, eps, axis_name="head_dim")

  def project(self, x: Array, start: int | Array = 0) -> tuple[Array, Array]:
    return project(x, self.wkv.weight[...], self.wgate.weight[...], self.ape[...], start)

  def finish(self, pooled: Float[Array, "B n W"], first_entry: int | Array, freqs: np.ndarray,
             dtype) -> Array:
    """Norm, then RoPE at positions `m * (first_entry + i)`; returns entries in `dtype`."""
    entries = self.norm(pooled.astype(dtype))
    pos = (first_entry + jnp.arange(pooled.shape[1])) * self.ratio
    cos, sin = rope_angles(pos[None, :], freqs)
    return apply_rope(entries, cos, sin)

  def __call__(self, x: Float[Array, "B T D"], freqs: np.ndarray) -> Array:
    """All complete windows of a sequence that starts at position 0 -> [B, T // m, width]."""
    B, T, _ = x.shape
    n = T // self.ratio
    if n == 0:
      return jnp.zeros((B, 0, self.norm.weight.shape[0]), x.dtype)
    c, z = self.project(x[:, : n * self.ratio])
    return self.finish(pool_windows(c, z, self.ratio, self.overlap), 0, freqs, x.dtype)
