"""Lightning indexer of CSA layers (docs/architecture.md#indexer): picks each query's top-k
compressed entries.

Keys are the indexer compressor's own entries (width c_I, overlapping CSA windows); queries come
from the normalized query latent c^Q; head weights from the attention input. Selection is not
differentiable: the indexer trains through its own loss, never through the LM loss.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from deepseek_v4.config import ModelConfig
from deepseek_v4.layers.compressor import Compressor
from deepseek_v4.layers.params import Linear
from deepseek_v4.layers.rope import apply_rope
from deepseek_v4.options import Options
from kernels_pallas.indexer_topk import ops as indexer_ops


class Indexer(nnx.Module):
  """Parameters: wq_b [H_I*c_I, d_c], weights_proj [H_I, D] and a compressor at width c_I."""

  def __init__(self, cfg: ModelConfig, ratio: int, *, rngs: nnx.Rngs):
    self.ratio = ratio  # the CSA layer's compression ratio, which its indexer keys share
    self.heads = cfg.index_heads
    self.head_dim = cfg.index_head_dim
    self.topk = cfg.index_topk
    pd = jax.numpy.dtype(cfg.param_dtype)
    self.wq_b = Linear(cfg.q_lora_rank, self.heads * self.head_dim,
                       axes=("index_heads", "q_lora"), std=cfg.init_std, param_dtype=pd, rngs=rngs)
    self.weights_proj = Linear(cfg.d_model, self.heads, axes=(None, "embed"), std=cfg.init_std,
                               param_dtype=pd, rngs=rngs)
    self.compressor = Compressor(cfg.d_model, ratio, self.head_dim, True, cfg.rms_eps,
                                 std=cfg.init_std, param_dtype=pd, rngs=rngs)

  def queries(self, x: Float[Array, "B T D"], cq: Float[Array, "B T L"], cos: Array,
              sin: Array) -> tuple[Array, Array]:
    """Roped queries [B,T,I,J] and scaled head weights [B,T,I] (float32)."""
    B, T, _ = x.shape
    q = self.wq_b(cq).reshape(B, T, self.heads, self.head_dim)  # [B, T, I, J]
    q = apply_rope(q, cos, sin)
    scale = 1.0 / math.sqrt(self.head_dim * self.heads)
    w = self.weights_proj(x, jax.numpy.float32) * scale  # [B, T, I]
    return q, w

  def select(self, q: Array, w: Array, keys: Array, positions: Array, q_seg: Array | None = None,
             k_seg: Array | None = None, impl: str = Options.kernel_impl,
             block: int = Options.attn_block) -> Array:
    """Top-k indices [B, T, min(k_I, C)] with -1 for none (see indexer_topk); `impl` and `block`
    are the kernel implementation and queries per block (`Options`, like the attention's)."""
    return indexer_ops.indexer_topk(q, w, keys, positions, ratio=self.ratio, topk=self.topk,
                                    block=block, q_seg=q_seg, k_seg=k_seg, impl=impl)

  def encode(self, x: Array, cq: Array, cos: Array, sin: Array, freqs: np.ndarray,
             segments: Array | None = None, doc_positions: Array | None = None):
    """Full sequence from position 0: (keys [B, C, J], queries [B, T, I, J], weights [B, T, I]).

    With packed documents, `segments` and `doc_positions` (positions inside each document) as in
    `Compressor.__call__`.
    """
    keys = self.compressor(x, freqs, doc_positions, segments)  # [B, C, J]
    q, w = self.queries(x, cq, cos, sin)
    return keys, q, w

  def extend(self, x: Array, cq: Array, positions: Array, cos: Array, sin: Array,
             freqs: np.ndarray, n_valid: Array, state, keys: Array, impl: str = Options.kernel_impl,
             block: int = Options.attn_block):
    """Decode / chunked-prefill step (docs/architecture.md#decode-update step 3): stores the keys
    of every indexer window the chunk closes, then selects among all stored keys (visibility from
    `positions`).

    Returns (selected indices [B, T, min(k_I, capacity)], keys, new compressor state).
    """
    keys, state = self.compressor.extend(x, positions[:, 0], n_valid, state, keys, freqs)
    q, w = self.queries(x, cq, cos, sin)
    idx = self.select(q, w, keys, positions, impl=impl, block=block)
    return jax.lax.stop_gradient(idx), keys, state
