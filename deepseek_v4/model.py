"""The DeepSeek-V4 transformer (spec §2): embedding, mHC-wrapped blocks, mHC head, final norm,
untied LM head, and the multi-token-prediction module.

Parameter paths equal the official hub tensor names (`layers.3.attn.wq_a.weight`,
`hc_head_fn`, `mtp.0.e_proj.weight`, ...), so checkpoint conversion is a near-identity table.
Routed experts are stacked per layer (`layers.3.ffn.experts.w1` = every `experts.E.w1.weight`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from deepseek_v4 import sharding
from deepseek_v4.config import SWA_RATIO, ModelConfig
from deepseek_v4.layers import mhc
from deepseek_v4.layers.attention import Attention
from deepseek_v4.layers.moe import MoE
from deepseek_v4.layers.norms import RMSNorm, rms_norm
from deepseek_v4.layers.params import Linear, normal, param


# Logical activation axes at block boundaries (resolved by sharding.py's activation rules).
_STREAMS = ("batch", "seq", "streams", "embed")
_LOGITS = ("batch", "seq", "vocab")


class Block(nnx.Module):
  """Attention and MoE, each inside its own mHC connection and pre-norm (spec §2.2)."""

  def __init__(self, cfg: ModelConfig, ratio: int, hashed: bool, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = mhc.init_site(
      rngs, cfg.hc_mix_dim, cfg.hc_mult, cfg.d_model, 3, cfg.init_std)
    self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = mhc.init_site(
      rngs, cfg.hc_mix_dim, cfg.hc_mult, cfg.d_model, 3, cfg.init_std)
    self.attn = Attention(cfg, ratio, rngs=rngs)
    self.ffn = MoE(cfg, hashed, rngs=rngs)

  def _site(self, x: Array, which: str):
    c = self.cfg
    fn, base, scale = (getattr(self, f"hc_{which}_{n}")[...] for n in ("fn", "base", "scale"))
    return mhc.hc_weights(x, fn, base, scale, iters=c.hc_sinkhorn_iters, eps=c.hc_eps,
                          norm_eps=c.rms_eps)

  def attn_site(self, x: Float[Array, "B T M D"], attn_fn) -> Array:
    """mHC around attention; `attn_fn(u)` runs the attention (full sequence or cached)."""
    pre, post, comb = self._site(x, "attn")
    y = attn_fn(self.attn_norm(mhc.hc_collapse(x, pre)))
    return mhc.hc_expand(x, y, post, comb)

  def ffn_site(self, x: Float[Array, "B T M D"], ids: Int[Array, "B T"]) -> tuple[Array, dict]:
    pre, post, comb = self._site(x, "ffn")
    y, stats = self.ffn(self.ffn_norm(mhc.hc_collapse(x, pre)), ids)
    return mhc.hc_expand(x, y, post, comb), stats

  def __call__(self, x: Float[Array, "B T M D"], ids: Int[Array, "B T"],
               positions: Int[Array, "B T"], segments: Int[Array, "B T"] | None = None,
               ) -> tuple[Array, dict]:
    x = self.attn_site(x, lambda u: self.attn(u, positions, segments))
    return self.ffn_site(x, ids)


class Embedding(nnx.Module):
  """Token embedding table `embed.weight` [V, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.weight = param(normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std,
                               jnp.dtype(cfg.param_dtype)), ("vocab", "embed"))


def _head_params(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
  module.hc_head_fn = param(normal(rngs, (cfg.hc_mult, cfg.hc_mult * cfg.d_model), cfg.init_std,
                                  jnp.float32), ("hc_mix", "hc_embed"))
  module.hc_head_base = param(jnp.zeros((cfg.hc_mult,), jnp.float32), ("hc_mix",))
  module.hc_head_scale = param(jnp.ones((1,), jnp.float32), (None,))
  module.norm = RMSNorm(cfg.d_model, cfg.rms_eps)


def _collapse_and_norm(module: nnx.Module, cfg: ModelConfig, x: Array) -> Array:
  h = mhc.hc_head(x, module.hc_head_fn[...], module.hc_head_base[...],
                  module.hc_head_scale[...], eps=cfg.hc_eps, norm_eps=cfg.rms_eps)
  return module.norm(h)


class MTPBlock(Block):
  """Multi-token prediction, depth 1 (spec §2.6): a sliding-only block plus input/output glue.

  For position i it combines the trunk streams at i with the embedding of token i+1 and predicts
  token i+2. It shares the trunk's embedding table and LM head.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, SWA_RATIO, False, rngs=rngs)
    lin = dict(std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.e_proj = Linear(cfg.d_model, cfg.d_model, axes=("embed", "embed_in"), **lin)
    self.h_proj = Linear(cfg.d_model, cfg.d_model, axes=("embed", "embed_in"), **lin)
    self.enorm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.hnorm = RMSNorm(cfg.d_model, cfg.rms_eps)
    _head_params(self, cfg, rngs)

  def mix_inputs(self, streams: Float[Array, "B T M D"], next_emb: Float[Array, "B T D"]) -> Array:
    """Z = e_proj(enorm(e_{i+1})) broadcast over streams + h_proj(hnorm(X_i)) per stream."""
    e = self.e_proj(self.enorm(next_emb))
    return e[:, :, None, :] + self.h_proj(self.hnorm(streams))

  def hidden(self, streams: Array, next_ids: Array, next_emb: Array, positions: Array,
             segments: Array | None = None):
    z, stats = Block.__call__(self, self.mix_inputs(streams, next_emb), next_ids, positions,
                              segments)
    return _collapse_and_norm(self, self.cfg, z), stats


class Transformer(nnx.Module):
  """DeepSeek-V4 causal LM. `model(input_ids)` maps int32 [B, T] to float32 logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = Embedding(cfg, rngs=rngs)
    self.layers = nnx.List([
      Block(cfg, r, cfg.is_hash_layer(i), rngs=rngs) for i, r in enumerate(cfg.compress_ratios)
    ])
    _head_params(self, cfg, rngs)
    self.head = Linear(cfg.d_model, cfg.vocab_size, axes=("vocab", "embed"), std=cfg.init_std,
                       param_dtype=pd, rngs=rngs)
    self.mtp = nnx.List([MTPBlock(cfg, rngs=rngs) for _ in range(cfg.num_mtp_layers)])

  # ----- pieces --------------------------------------------------------------------------------
  def embed_tokens(self, ids: Int[Array, "B T"]) -> Array:
    return self.embed.weight[...][ids].astype(jnp.dtype(self.cfg.dtype))

  def logits(self, h: Float[Array, "B T D"]) -> Array:
    """LM head in float32 (spec §2.5)."""
    y = self.head(h, jnp.float32)  # [B, T, V] or, at one position per row, [B, V]
    return sharding.constrain(y, _LOGITS if y.ndim == 3 else _LOGITS[::2])

  def trunk(self, ids: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None,
            segments: Int[Array, "B T"] | None = None) -> tuple[Array, list[dict]]:
    """Final mHC streams X^L [B, T, M, D] (before the head collapse) and per-layer MoE stats.

    Packed documents (spec §7.2, sample-level masking): `segments` [B, T] gives each token's
    document id (non-decreasing along a row); every document must start at a row offset that is a
    multiple of `packing_alignment(cfg)`, so compression windows never straddle documents.
    Tokens then attend only inside their document, each document is compressed on its own, and
    `positions` (default: derived from `segments`) count from 0 at each document's start.
    """
    B, T = ids.shape
    if segments is not None:
      if tuple(segments.shape) != (B, T):
        raise ValueError(f"segments shape {tuple(segments.shape)} must equal ids shape {(B, T)}")
      if positions is None:
        positions = document_positions(segments)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    e = self.embed_tokens(ids)
    x = jnp.broadcast_to(e[:, :, None, :], (B, T, self.cfg.hc_mult, self.cfg.d_model))
    x = sharding.constrain(x, _STREAMS)
    stats = []
    for layer in self.layers:
      x, s = layer(x, ids, positions, segments)
      x = sharding.constrain(x, _STREAMS)  # block boundary (a no-op without a mesh)
      stats.append(s)
    return x, stats

  def final_hidden(self, streams: Float[Array, "B T M D"]) -> Array:
    return _collapse_and_norm(self, self.cfg, streams)

  def mtp_logits(self, streams: Float[Array, "B T M D"], ids: Int[Array, "B T"],
                 positions: Int[Array, "B T"] | None = None,
                 segments: Int[Array, "B T"] | None = None) -> Array:
    """MTP logits [B, T-1, V]: position i (< T-1) predicts token i+2 from X^L_i and token i+1.

    With packed documents (`segments`, see `trunk`) the MTP block attends inside documents; the
    caller ignores targets that cross a document boundary.
    """
    if not len(self.mtp):
      raise ValueError("this config has num_mtp_layers=0; there is no MTP module")
    B, T = ids.shape
    nxt = ids[:, 1:]
    seg = None if segments is None else segments[:, :-1]
    if positions is None:
      positions = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)) if segments is None
                   else document_positions(segments))
    h, _ = self.mtp[0].hidden(streams[:, :-1], nxt, self.embed_tokens(nxt), positions[:, :-1],
                              seg)
    return self.logits(h)

  def __call__(self, input_ids: Int[Array, "B T"]) -> Float[Array, "B T V"]:
    validate_input_ids(input_ids, self.cfg)
    streams, _ = self.trunk(input_ids)
    return self.logits(self.final_hidden(streams))


def packing_alignment(cfg: ModelConfig) -> int:
  """Packed documents must start at multiples of this (the largest compression ratio, >= 4)."""
  return max(cfg.compress_ratios + (4,))


def document_positions(segments: Int[Array, "B T"]) -> Array:
  """Position of each token inside its document: 0 where the segment id changes, then +1."""
  B, T = segments.shape
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  start = jnp.concatenate([jnp.ones((B, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - first


def validate_input_ids(ids, cfg: ModelConfig) -> None:
  """Clear errors for wrong dtype, rank, length or (for concrete arrays) out-of-vocab ids."""
  if not hasattr(ids, "dtype") or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"input_ids must be an integer array of shape [B, T]; got "
                    f"{getattr(ids, 'dtype', type(ids).__name__)}")
  if ids.ndim != 2:
    raise ValueError(f"input_ids must have rank 2 [B, T]; got shape {tuple(ids.shape)}")
  B, T = ids.shape
  if B < 1 or T < 1:
    raise ValueError(f"input_ids shape {tuple(ids.shape)} is empty; need B >= 1 and T >= 1")
  if T > cfg.max_position_embeddings:
    raise ValueError(f"sequence length T={T} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  if not isinstance(ids, jax.core.Tracer):
    arr = np.asarray(ids)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
      bad = int(arr[(arr < 0) | (arr >= cfg.vocab_size)].ravel()[0])
      raise ValueError(f"input_ids contains id {bad} outside the vocabulary [0, {cfg.vocab_size})")
