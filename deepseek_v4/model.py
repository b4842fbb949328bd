"""The DeepSeek-V4 transformer (docs/architecture.md#forward): embedding, mHC-wrapped blocks, mHC
head, final norm, untied LM head, and the multi-token-prediction module.

Parameter paths equal the official hub tensor names (`layers.3.attn.wq_a.weight`,
`hc_head_fn`, `mtp.0.e_proj.weight`, ...), so checkpoint conversion is a near-identity table.
Routed experts are stacked per layer (`layers.3.ffn.experts.w1` = every `experts.E.w1.weight`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from deepseek_v4 import layout, sharding
from deepseek_v4.config import ModelConfig
from deepseek_v4.kinds import AttentionKind
from deepseek_v4.layers import mhc
from deepseek_v4.layers.attention import Attention
from deepseek_v4.layers.moe import MoE
from deepseek_v4.layers.norms import RMSNorm, rms_norm
from deepseek_v4.layers.params import Linear, normal, param
from deepseek_v4.options import REMAT_POLICIES, Options
from kernels_pallas import common as kernels_common


# Logical activation axes at block boundaries (resolved by the activation rules, sharding/rules.py).
_STREAMS = ("batch", "seq", "streams", "embed")
_LOGITS = ("batch", "seq", "vocab")

@struct.dataclass
class BlockOut:
  """What a block hands back besides its streams.

  Attributes:
    moe: routing statistics for the losses ({"scores": [B, T, E], "experts": [B, T, X]}).
    indexer_kl: [2] = (indexer KL summed over queries, number of queries); zeros unless a CSA
      layer runs an indexer training stage.
    cache: the layer's new `LayerCache` when one came in, else None.
    attn_input: with `Options(capture=True)`, the normed attention input u' [B, T, D] (after the
      mHC collapse and attn_norm); else None.
  """

  moe: dict
  indexer_kl: Array
  cache: Any = None
  attn_input: Any = None


class Block(nnx.Module):
  """Attention and MoE, each inside its own mHC connection and pre-norm (docs/architecture.md#mhc).

  `cfg.residual` picks the connection (layers/mhc.py): "mhc", "hc" (same tensors, other maps) or
  "plain" (one stream, no hc_* tensors: x + attn(norm(x)), then x + moe(norm(x))).
  """

  def __init__(self, cfg: ModelConfig, kind: AttentionKind, hashed: bool, *, rngs: nnx.Rngs,
               options: Options = Options()):
    self.cfg = cfg
    self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
    if cfg.residual != "plain":
      site = (rngs, cfg.hc_mix_dim, cfg.hc_mult, cfg.d_model, 3, cfg.init_std,
              cfg.residual == "mhc")
      self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = mhc.init_site(*site)
      self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = mhc.init_site(*site)
    self.attn = Attention(cfg, kind, rngs=rngs)
    self.ffn = MoE(cfg, hashed, rngs=rngs, keep_quantized=options.keep_quantized)

  def _site(self, x: Array, which: str):
    """(pre, post, comb) of one connection; (None, None, None) for the plain residual."""
    c = self.cfg
    if c.residual == "plain":
      return None, None, None
    fn, base, scale = (getattr(self, f"hc_{which}_{n}")[...] for n in ("fn", "base", "scale"))
    return mhc.hc_weights(x, fn, base, scale, iters=c.hc_sinkhorn_iters, eps=c.hc_eps,
                          norm_eps=c.rms_eps, constrained=c.residual == "mhc")

  def __call__(self, x: Float[Array, "B T M D"], ids: Int[Array, "B T"],
               positions: Int[Array, "B T"], *, segments: Int[Array, "B T"] | None = None,
               cache=None, n_valid: Int[Array, "B"] | None = None,
               options: Options = Options()) -> tuple[Array, BlockOut]:
    """New streams and the block's outputs (see `Attention.__call__` for segments / cache)."""
    pre, post, comb = self._site(x, "attn")
    a = self.attn_norm(mhc.hc_collapse(x, pre))
    y, new_cache, kl = self.attn(
      a, positions, segments=segments, cache=cache,
      n_valid=n_valid, indexer_stage=options.indexer_stage, impl=options.kernel_impl,
      block=options.attn_block, context=options.context)
    x = mhc.hc_expand(x, y, post, comb)
    pre, post, comb = self._site(x, "ffn")
    u = self.ffn_norm(mhc.hc_collapse(x, pre))
    y, stats = self.ffn(u, ids) if options.moe is None else self.ffn(u, ids, options.moe)
    return mhc.hc_expand(x, y, post, comb), BlockOut(stats, kl, new_cache,
                                                     a if options.capture else None)


def _rematted(fn, options: Options):
  return fn if options.remat == "none" else jax.checkpoint(
    fn, policy=REMAT_POLICIES[options.remat], prevent_cse=True)


class Group(nnx.Module):
  """A period of blocks repeated `count` times (`deepseek_v4.layout`): stacked on a leading
  `layers` axis and run under `jax.lax.scan` when count > 1, a plain list of blocks otherwise."""

  def __init__(self, cfg: ModelConfig, spec: layout.Group, *, rngs: nnx.Rngs,
               options: Options = Options()):
    self.spec = spec

    def make(rngs):
      return nnx.List([Block(cfg, k, h, rngs=rngs, options=options)
                       for k, h in zip(spec.kinds, spec.hashed)])

    if spec.scanned:
      make = nnx.vmap(make, in_axes=0, out_axes=0, axis_size=spec.count,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
      self.blocks = make(rngs.split(spec.count))
    else:
      self.blocks = make(rngs)

  def __call__(self, x, ids, positions, *, segments, cache, n_valid, options: Options):
    """Streams after the group, one BlockOut per slot (leading [count] axis when scanned)."""

    def period(blocks, x, caches):
      outs = []
      for slot, block in enumerate(blocks):
        x, out = block(x, ids, positions, segments=segments, n_valid=n_valid, options=options,
                       cache=None if caches is None else caches[slot])
        x = sharding.constrain(x, _STREAMS)  # block boundary (a no-op without a mesh)
        outs.append(out)
      return x, tuple(outs)

    graphdef, state = nnx.split(self.blocks)
    step = _rematted(lambda st, x, c: period(nnx.merge(graphdef, st), x, c), options)
    if not self.spec.scanned:
      return step(state, x, cache)
    return jax.lax.scan(lambda x, sc: step(sc[0], x, sc[1]), x, (state, cache))


class Embedding(nnx.Module):
  """Token embedding table `embed.weight` [V, D]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.weight = param(normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std,
                               jnp.dtype(cfg.param_dtype)), ("vocab", "embed"))


def _head_params(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
  """The final collapse of the streams (none with residual="plain") and its norm."""
  module.norm = RMSNorm(cfg.d_model, cfg.rms_eps)
  if cfg.residual == "plain":
    return
  module.hc_head_fn = param(normal(rngs, (cfg.hc_mult, cfg.hc_mult * cfg.d_model), cfg.init_std,
                                  jnp.float32), ("hc_mix", "hc_embed"))
  module.hc_head_base = param(jnp.zeros((cfg.hc_mult,), jnp.float32), ("hc_mix",))
  module.hc_head_scale = param(jnp.ones((1,), jnp.float32), (None,))


def _collapse_and_norm(module: nnx.Module, cfg: ModelConfig, x: Array) -> Array:
  """norm(streams collapsed by the mHC head) (docs/architecture.md#mhc-head); norm(x) of the one
  plain stream. residual="hc" keeps V4's head: the switch changes the per-layer connections only."""
  if cfg.residual == "plain":
    return module.norm(mhc.hc_collapse(x, None))
  h = mhc.hc_head(x, module.hc_head_fn[...], module.hc_head_base[...],
                  module.hc_head_scale[...], eps=cfg.hc_eps, norm_eps=cfg.rms_eps)
  return module.norm(h)


class MTPBlock(Block):
  """Multi-token prediction, depth 1 (docs/architecture.md#mtp): a sliding-only block plus
  input/output glue.

  For position i it combines the trunk streams at i with the embedding of token i+1 and predicts
  token i+2. It shares the trunk's embedding table and LM head.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, options: Options = Options()):
    super().__init__(cfg, cfg.mtp_kind, False, rngs=rngs, options=options)
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


class Transformer(nnx.Module):
  """DeepSeek-V4 causal LM. `model(input_ids)` maps int32 [B, T] to float32 logits [B, T, V].

  Called outside any trace (a notebook's `model(ids)`), the forward runs compiled and cached (see
  `__call__`); inside a user's `jit` / `nnx.jit` / `grad` it traces as part of that program.
  `trunk` is the one loop over layers: the full forward, chunked prefill and the decode step
  (`deepseek_v4.decoding`), and the training step (`deepseek_v4.train`) all call it.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, options: Options = Options()):
    if not isinstance(options, Options):
      raise TypeError(f"options must be a deepseek_v4.Options; got {type(options).__name__}")
    self.cfg = cfg
    self.options = options  # the build-time fields (Options.BUILD_FIELDS) are fixed from here on
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = Embedding(cfg, rngs=rngs)
    groups = layout.layer_groups(cfg, options.scan_layers)
    self.groups = nnx.List([Group(cfg, g, rngs=rngs, options=options) for g in groups])
    _head_params(self, cfg, rngs)
    self.head = Linear(cfg.d_model, cfg.vocab_size, axes=("vocab", "embed"), std=cfg.init_std,
                       param_dtype=pd, rngs=rngs)
    self.mtp = nnx.List([MTPBlock(cfg, rngs=rngs, options=options)
                         for _ in range(cfg.num_mtp_layers)])

  def run_options(self, options: Options | None) -> Options:
    """The options a call runs with: `self.options` for None, else `options`, which must agree
    with the model's build-time fields (ValueError naming the field otherwise)."""
    if options is None:
      return self.options
    if not isinstance(options, Options):
      raise TypeError(f"options must be a deepseek_v4.Options; got {type(options).__name__}")
    options.check_build(self.options)
    return options

  # ----- pieces --------------------------------------------------------------------------------
  def embed_tokens(self, ids: Int[Array, "B T"]) -> Array:
    """Embedding rows; an id outside [0, vocab) gives a NaN row (never a clamped real row), so a
    tokenizer / model mismatch inside jit shows up as NaN logits instead of plausible ones."""
    w = self.embed.weight[...]
    # A negative id is moved past the table first: `take` wraps negatives before `fill` applies.
    ids = jnp.where(ids < 0, w.shape[0], ids)
    e = jnp.take(w, ids, axis=0, mode="fill", fill_value=jnp.nan)
    return e.astype(jnp.dtype(self.cfg.dtype))

  def logits(self, h: Float[Array, "B T D"]) -> Array:
    """LM head in float32 (docs/architecture.md#lm-head)."""
    y = self.head(h, jnp.float32)  # [B, T, V] or, at one position per row, [B, V]
    return sharding.constrain(y, _LOGITS if y.ndim == 3 else _LOGITS[::2])

  def layer(self, i: int) -> Block:
    """Official layer `i` as a Block (for inspection: a scanned layer is a detached copy)."""
    g, r, s = layout.locate(tuple(g.spec for g in self.groups), i)
    group = self.groups[g]
    if not group.spec.scanned:
      return group.blocks[s]
    graphdef, state = nnx.split(group.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))[s]

  def trunk(self, ids: Int[Array, "B T"], positions: Int[Array, "B T"] | None = None, *,
            segments: Int[Array, "B T"] | None = None, cache=None,
            n_valid: Int[Array, "B"] | None = None, options: Options | None = None,
            ) -> tuple[Array, tuple[BlockOut, ...], Any]:
    """Final mHC streams X^L [B, T, M, D] (before the head collapse), one `BlockOut` per layer
    (official order), and the new cache groups (None without a cache).

    Packed documents (docs/architecture.md#schedule, sample-level masking): `segments` [B, T] gives
    each token's document id (non-decreasing along a row); every document must start at a row offset
    that is a multiple of `data.packing_align(cfg)`, so compression windows never straddle
    documents. Tokens then attend only inside their document, each document is compressed on its
    own, and `positions` (default: derived from `segments`) count from 0 at each document's start.

    With `cache` (`deepseek_v4.cache.Cache`), `positions` are `cache.lengths[:, None] +
    arange(T)` and only each row's first `n_valid[b]` tokens are real (decoding.py).

    `options` (default `self.options`) must agree with the model's build-time fields.
    """
    options = self.run_options(options)
    B, T = ids.shape
    positions = default_positions(ids, positions, segments)
    e = self.embed_tokens(ids)
    x = jnp.broadcast_to(e[:, :, None, :], (B, T, self.cfg.num_streams, self.cfg.d_model))
    x = sharding.constrain(x, _STREAMS)
    if cache is not None and cache.layer_groups != tuple(g.spec for g in self.groups):
      raise ValueError("the cache was made for another layer layout (scan_layers or layers "
                       "differ): build it with init_cache(model, ...)")
    caches = (None,) * len(self.groups) if cache is None else cache.groups
    per_layer, new_groups = [None] * self.cfg.num_layers, []
    for group, gcache in zip(self.groups, caches):
      x, outs = group(x, ids, positions, segments=segments, cache=gcache, n_valid=n_valid,
                      options=options)
      spec = group.spec
      for r in range(spec.count):
        for s, out in enumerate(outs):
          per_layer[spec.layer(r, s)] = (jax.tree.map(lambda a: a[r], out) if spec.scanned
                                         else out)
      new_groups.append(tuple(out.cache for out in outs))
    return x, tuple(per_layer), (None if cache is None else tuple(new_groups))

  def final_hidden(self, streams: Float[Array, "B T M D"]) -> Array:
    return _collapse_and_norm(self, self.cfg, streams)

  def mtp_hidden(self, streams: Float[Array, "B T M D"], ids: Int[Array, "B T"],
                 positions: Int[Array, "B T"] | None = None,
                 segments: Int[Array, "B T"] | None = None, options: Options | None = None,
                 full: bool = False) -> tuple[Array, BlockOut]:
    """MTP hidden states [B, T-1, D] (position i < T-1 predicts token i+2 from X^L_i and token
    i+1) and the MTP block's BlockOut. The block runs through `Block.__call__` like the trunk's.

    With packed documents (`segments`, see `trunk`) the MTP block attends inside documents; the
    caller ignores targets that cross a document boundary.

    `full=True` runs all T positions and returns [B, T, D]: position T-1, which has no next
    token, reads its own token in its place, and the caller masks its target and its routing
    statistics. Attention is causal, so positions < T-1 are the same; the sequence keeps the
    trunk's length, so a sequence split over a mesh axis (docs/context_parallel.md) stays split
    instead of being regathered at length T-1.
    """
    if not len(self.mtp):
      raise ValueError("this config has num_mtp_layers=0; there is no MTP module")
    options = self.run_options(options)
    positions = default_positions(ids, positions, segments)
    if full:
      nxt = jnp.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)
      seg = segments
    else:
      nxt, positions = ids[:, 1:], positions[:, :-1]
      seg = None if segments is None else segments[:, :-1]
      streams = streams[:, :-1]
    emb = self.embed_tokens(nxt)
    graphdef, state = nnx.split(self.mtp[0])

    def run(state, streams):
      mtp = nnx.merge(graphdef, state)
      z, out = Block.__call__(mtp, mtp.mix_inputs(streams, emb), nxt, positions, segments=seg,
                              options=options)
      return _collapse_and_norm(mtp, self.cfg, z), out

    return _rematted(run, options)(state, streams)

  def mtp_decode(self, streams: Float[Array, "B T M D"], next_ids: Int[Array, "B T"],
                 positions: Int[Array, "B T"], cache, n_valid: Int[Array, "B"],
                 options: Options | None = None) -> tuple[Array, Array, Any]:
    """The MTP block on a chunk against its own decode cache (`cache.init_mtp_cache`), for
    speculative decoding (docs/speculative.md): position i combines the streams X_i with token
    i+1 (`next_ids`) and predicts token i+2. Row b's first `n_valid[b]` positions are real.

    Returns (hidden [B, T, D] after the MTP head and norm, the block's output streams
    [B, T, M, D], which stand in for X_{i+1} when the block drafts again, and the new cache).
    """
    if not len(self.mtp):
      raise ValueError("this config has num_mtp_layers=0; there is no MTP module")
    options = self.run_options(options)
    mtp = self.mtp[0]
    z, out = Block.__call__(mtp, mtp.mix_inputs(streams, self.embed_tokens(next_ids)), next_ids,
                            positions, cache=cache, n_valid=n_valid, options=options)
    return _collapse_and_norm(mtp, self.cfg, z), z, out.cache

  def mtp_logits(self, streams: Float[Array, "B T M D"], ids: Int[Array, "B T"],
                 positions: Int[Array, "B T"] | None = None,
                 segments: Int[Array, "B T"] | None = None) -> Array:
    """MTP logits [B, T-1, V] (see `mtp_hidden`)."""
    h, _ = self.mtp_hidden(streams, ids, positions, segments)
    return self.logits(h)

  def __call__(self, input_ids: Int[Array, "B T"], *, options: Options | None = None,
               jit: bool = True) -> Float[Array, "B T V"]:
    """Logits [B, T, V] float32.

    Outside a trace the call runs `_compiled_forward`: one `jax.jit` whose cache is keyed by the
    model's structure (config, layers, LoRA wrappers), the ids' shape and dtype, `options` and the
    trace-time context (`sharding.use` rules, target platform). The parameters are its
    arguments, read afresh at every call, so weights changed, loaded or wrapped since the last
    call are the ones that run; a second call with the same shapes does not retrace. Where the
    ids or parameters are tracers, or a jit is tracing around the call, the forward is traced op
    by op into the caller's program exactly as `jit=False` does.

    Args:
      input_ids: int [B, T]; concrete ids outside [0, vocab) raise ValueError.
      options: static `Options` (the MoE implementation, kernels, training stages); default
        `self.options`. A build-time field (scan_layers, keep_quantized) that differs from the
        model's raises ValueError naming it.
      jit: False runs op by op even outside a trace, to step through the layers with prints or
        a debugger. It is far slower: each eager `lax.scan` compiles its body again at every
        call (`scripts/bench_eager.py`, a 12M-parameter model on 2 shared CPU cores: 34 s vs
        0.17 s per call at T=128, 40 s vs 4.1 s at T=2048).
    """
    validate_input_ids(input_ids, self.cfg)
    options = self.run_options(options)
    if jit:
      leaves, treedef = jax.tree.flatten(self)
      if not under_trace(input_ids, leaves):
        return _compiled_forward(treedef, leaves, input_ids, options=options,
                                 context=_trace_context())
    streams, _, _ = self.trunk(input_ids, options=options)
    return self.logits(self.final_hidden(streams))


def under_trace(*trees) -> bool:
  """Whether a call with these arguments is part of a JAX trace: one of their leaves is a tracer
  (jit, grad, vmap of the caller), or a jit is tracing around it with the arguments closed over
  (then even a primitive applied to a constant is staged and comes back as a tracer)."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees)):
    return True
  return isinstance(jax.lax.neg(np.int32(0)), jax.core.Tracer)


def _trace_context() -> tuple:
  """What the forward reads from context while tracing, besides what `jax.jit` keys on itself
  (mesh, config flags): the target platform (kernel choices) and the `sharding.use` rules."""
  return kernels_common.platform(), sharding.context.current()


@functools.partial(jax.jit, static_argnames=("treedef", "options", "context"))
def _compiled_forward(treedef, leaves, input_ids, *, options: Options, context: tuple) -> Array:
  """`Transformer.__call__` compiled: the model is rebuilt from its leaves inside the trace, so
  the cache holds the structure (`treedef`, static) and never a parameter value. `context` is
  only part of the cache key (`_trace_context`)."""
  del context
  model = jax.tree.unflatten(treedef, leaves)
  return model(input_ids, options=options, jit=False)


def default_positions(ids: Array, positions: Array | None, segments: Array | None) -> Array:
  """`positions` as given, else positions inside documents (`segments`), else arange(T)."""
  B, T = ids.shape
  if segments is not None and tuple(segments.shape) != (B, T):
    raise ValueError(f"segments shape {tuple(segments.shape)} must equal ids shape {(B, T)}")
  if positions is not None:
    if tuple(positions.shape) != (B, T):
      raise ValueError(f"positions shape {tuple(positions.shape)} must equal ids shape {(B, T)}")
    return positions
  if segments is not None:
    return document_positions(segments)
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


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
