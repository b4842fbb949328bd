"""V4 hybrid attention (docs/architecture.md#attention): low-rank queries, one shared K=V head,
sliding window, sink, compressed entries (CSA with the lightning indexer, or HCA), grouped low-rank
output projection.

The core softmax is `kernels_pallas/sparse_attention/ops.py` (`impl=` picks the pure-JAX reference
or the Pallas kernel). This module owns the parameters and the projections around it, and, in the
indexer training stages, returns the indexer's KL toward this attention
(docs/architecture.md#indexer-training).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from deepseek_v4 import sharding
from deepseek_v4.config import ModelConfig
from deepseek_v4.kinds import AttentionKind
from deepseek_v4.layers import context_parallel
from deepseek_v4.layers.norms import RMSNorm, rms_norm
from deepseek_v4.layers.params import Linear, param
from deepseek_v4.layers.rope import apply_rope, inv_freq, rope_angles
from deepseek_v4.losses import indexer_kl_from_attention
from deepseek_v4.options import Options
from kernels_pallas.sparse_attention import ops as attention_ops
from kernels_pallas.sparse_attention import sources

_BTGI = ("batch", "seq", None, None)  # activation layout of the grouped output projection


class Attention(nnx.Module):
  """One attention layer of `kind` (`deepseek_v4.kinds`: sliding, dense, CSA, HCA or a
  registered kind, docs/architecture.md#layer-schedule): the shared projections here, the kind's
  own submodules and entries from the kind."""

  def __init__(self, cfg: ModelConfig, kind: AttentionKind, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kind = kind
    self.ratio = kind.ratio
    N, H, G = cfg.num_heads, cfg.head_dim, cfg.o_groups
    pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
    lin = dict(std=std, param_dtype=pd, rngs=rngs)
    self.wq_a = Linear(cfg.d_model, cfg.q_lora_rank, axes=("q_lora", "embed"), **lin)
    self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_eps, axis_name="q_lora")
    self.wq_b = Linear(cfg.q_lora_rank, N * H, axes=("q_heads", "q_lora"), **lin)
    self.wkv = Linear(cfg.d_model, H, axes=("head_dim", "embed"), **lin)
    self.kv_norm = RMSNorm(H, cfg.rms_eps, axis_name="head_dim")
    self.wo_a = Linear(N * H // G, G * cfg.o_lora_rank, axes=("o_lora", "o_group_in"), **lin)
    self.wo_b = Linear(G * cfg.o_lora_rank, cfg.d_model, axes=("embed", "o_lora"), **lin)
    self.attn_sink = param(jnp.zeros((N,), jnp.float32), ("heads",))
    # The V4 slots exist on every layer (None on a sliding one); nnx.data marks each slot as a
    # (possibly empty) submodule.
    extra = {"compressor": None, "indexer": None, **kind.build(cfg, lin, rngs)}
    for name, module in extra.items():
      setattr(self, name, nnx.data(module))

  @property
  def freqs(self) -> np.ndarray:
    return inv_freq(self.cfg, compressed=self.kind.rotary_compressed())

  def project_qkv(self, x: Float[Array, "B T D"], cos: Array, sin: Array):
    """c^Q [B,T,L], roped q [B,T,N,H] and roped K=V [B,T,H] (docs/architecture.md#queries,
    #kv-head)."""
    B, T, _ = x.shape
    cq = self.q_norm(self.wq_a(x))
    q = self.wq_b(cq).reshape(B, T, self.cfg.num_heads, self.cfg.head_dim)  # [B, T, N, H]
    q = apply_rope(rms_norm(q, None, self.cfg.rms_eps), cos, sin)
    kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B, T, H]
    return cq, q, kv

  def output(self, o: Float[Array, "B T N H"], cos: Array, sin: Array) -> Array:
    """De-rotate at the query position, then the grouped low-rank projection
    (docs/architecture.md#output-projection)."""
    B, T, N, H = o.shape
    G, dg = self.cfg.o_groups, self.cfg.o_lora_rank
    o = apply_rope(o, cos, sin, inverse=True).reshape(B, T, G, N * H // G)  # [B, T, G, I]
    wo_a = self.wo_a.weight[...].astype(o.dtype).reshape(G, dg, N * H // G)
    # Batch-sharded in and out: with the weight's first axis sharded (FSDP), the partitioner would
    # otherwise split this product over G and reshard the activations around it by replicating
    # them (XLA's "involuntary full rematerialization" warnings in sharded decoding).
    o = sharding.constrain(o, _BTGI)
    # One matmul per group: as one einsum "BTGI,GOI->BTGO", XLA:CPU first copies o group-major
    # (a [G, I, B*T] transpose), 3.6x slower at T=8192; the per-group products are the same sums.
    o = jnp.stack([jnp.einsum("BTI,OI->BTO", o[:, :, g], wo_a[g]) for g in range(G)], axis=2)
    return self.wo_b(sharding.constrain(o, _BTGI).reshape(B, T, G * dg))

  def window(self, span: int) -> int:
    """W of the window branch, from the kind. A dense layer answers `span`, the number of
    positions the call can see (T of a full sequence, the ring's slots with a cache), so every
    earlier key is in the window: full causal attention, O(T^2) like any dense attention, through
    the same kernel."""
    return self.kind.window(self.cfg, span)

  def core(self, q, positions, keys: sources.KeySources, *, impl: str, block: int,
           return_lse: bool = False):
    """The joint softmax over window, compressed entries and sink (kernels_pallas seam)."""
    return attention_ops.sparse_attention(q, positions, self.attn_sink[...], keys,
                                          scale=self.scale, block=block,
                                          return_lse=return_lse, impl=impl)

  def _entries(self, comp, idx, comp_seg=None):
    """The compressed key source: each query's picks (CSA), or every visible entry (HCA, and the
    CSA layers' dense indexer warm-up); None without entries (a sliding layer)."""
    if comp is None:
      return None
    if idx is None:
      return sources.VisibleEntries(comp, self.ratio, comp_seg)
    return sources.PickedEntries(comp, idx, comp_seg)

  @property
  def scale(self) -> float:
    return 1.0 / math.sqrt(self.cfg.head_dim)

  def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "B T"], *,
               segments: Int[Array, "B T"] | None = None, cache=None,
               n_valid: Int[Array, "B"] | None = None, indexer_stage: str = "off",
               impl: str = Options.kernel_impl, block: int = Options.attn_block,
               context=Options.context) -> tuple[Array, Any, Array]:
    """One attention layer: the full sequence from position 0, or a chunk against a cache.

    Args:
      x: normed attention input.
      positions: [B, T] positions (inside each document when `segments` is given).
      segments: packed documents (full sequence only): each token's document id; every document
        starts at a row offset that is a multiple of the largest compression ratio, and tokens
        see only their own document.
      cache: this layer's `deepseek_v4.cache.LayerCache` (decode / chunked prefill,
      docs/architecture.md#decode-update);
        row b's tokens sit at `positions[b] = start[b] + arange(T)`, its first `n_valid[b]` real.
      indexer_stage: "off" (inference / ordinary training), "dense" (warm-up: every visible
        entry, the indexer learns the attention's entry distribution) or "sparse" (top-k; the
        indexer learns on its own picks), docs/architecture.md#indexer-training. Full sequence only.
      impl / block: kernel implementation and queries per block (`Options.kernel_impl`,
        `Options.attn_block`; the Block passes its options').
      context: `Options.context`: a full sequence then runs context-parallel, sliced along the
        sequence over the layout's mesh axis (layers/context_parallel.py); with a cache, the
        chunk is a prefill chunk continuing each row from a multiple of the layer's ratio
        (`decoding.prefill` checks it; docs/context_parallel.md#prefill).
    Returns:
      (output [B, T, D], new LayerCache or None, indexer KL (sum over queries, query count) [2]).
    """
    if cache is not None and indexer_stage != "off":
      raise ValueError(f"indexer_stage={indexer_stage!r} needs the full sequence, not a cache")
    # The scope names the layer kind in HLO metadata (scripts/bench_forward.py --profile).
    with jax.named_scope(f"attention_{self.kind.name}"):
      if cache is not None and context is not None:  # a prefill chunk, split along the sequence
        y, kv, new = context_parallel.prefill_attention(self, x, positions, n_valid, cache,
                                                        context, impl=impl, block=block)
        new["window"] = write_window(cache.window, kv, positions, n_valid)
        return y, cache.replace(**new), jnp.zeros((2,), jnp.float32)
      if cache is not None:
        y, new = self._extend(x, positions, n_valid, cache, impl, block)
        return y, new, jnp.zeros((2,), jnp.float32)
      if context is not None:
        return context_parallel.full_attention(self, x, positions, segments, context,
                                               stage=indexer_stage, impl=impl, block=block)
      return self._full(x, positions, segments, indexer_stage, impl, block)

  def _full(self, x, positions, segments, stage: str, impl: str, block: int):
    freqs = self.freqs
    cos, sin = rope_angles(positions, freqs)
    cq, q, kv = self.project_qkv(x, cos, sin)
    row_pos = positions  # window distance and entry visibility are measured along the row
    doc_pos = None
    if segments is not None:
      B, T = positions.shape
      row_pos, doc_pos = jnp.broadcast_to(jnp.arange(T, dtype=positions.dtype), (B, T)), positions
    src = self.kind.full_entries(self, x, cq, cos, sin, freqs, row_pos, doc_pos, segments, stage,
                                 impl, block)
    train_indexer = stage != "off" and src.indexer is not None
    entries = self._entries(src.comp, src.comp_idx, src.comp_seg)
    keys = sources.KeySources(sources.Band(kv, self.window(x.shape[1]), segments), entries=entries)
    o = self.core(q, row_pos, keys, impl=impl, block=block, return_lse=train_indexer)
    kl = jnp.zeros((2,), jnp.float32)
    if train_indexer:
      o, lse = o
      sg = jax.lax.stop_gradient
      iq, iw, ikeys = src.indexer
      kl = indexer_kl_from_attention(sg(q), sg(lse), sg(entries), iq, iw, ikeys, row_pos,
                                     scale=self.scale, block=block, segments=segments)
    return self.output(o, cos, sin), None, kl

  def _extend(self, x, positions, n_valid, cache, impl: str, block: int):
    """Cached attention of a chunk (decode step: T = 1), docs/architecture.md#decode-update.

    Order: compressors first, so an entry closed by token t is visible to t; then attention over
    the chunk's own band, the ring (keys written before the chunk), and the entries; the ring is
    updated last. Right padding (tokens past `n_valid`) writes nothing.
    """
    freqs = self.freqs
    cos, sin = rope_angles(positions, freqs)
    cq, q, kv = self.project_qkv(x, cos, sin)
    src, new = self.kind.extend_entries(self, x, cq, positions, cos, sin, freqs, n_valid, cache,
                                        impl, block)
    keys = sources.KeySources(sources.Band(kv, self.window(cache.window.kv.shape[1])),
                              ring=sources.Ring(cache.window.kv, cache.window.pos),
                              entries=self._entries(src.comp, src.comp_idx))
    o = self.core(q, positions, keys, impl=impl, block=block)
    new["window"] = write_window(cache.window, kv, positions, n_valid)
    return self.output(o, cos, sin), cache.replace(**new)


def write_window(window, kv: Float[Array, "B T H"], positions: Int[Array, "B T"],
                 n_valid: Int[Array, "B"]):
  """Writes the last min(n_valid, W) real tokens of the chunk into ring slots `p mod W`.

  Earlier tokens of a long chunk would be overwritten anyway; skipping them keeps the scatter
  free of duplicate slots (whose winner would be unspecified).
  """
  B, W, _ = window.kv.shape
  t = jnp.arange(kv.shape[1])[None, :]
  n = n_valid[:, None]
  slot = jnp.where((t < n) & (t >= n - W), positions % W, W)  # W = not written
  rows = jnp.arange(B)[:, None]
  return window.replace(
    kv=window.kv.at[rows, slot].set(kv.astype(window.kv.dtype), mode="drop"),
    pos=window.pos.at[rows, slot].set(positions.astype(window.pos.dtype), mode="drop"))
