"""Self-speculative decoding with V4's MTP block (docs/speculative.md).

Each round, per row: the MTP block drafts k tokens (the first from the trunk's streams of the last
kept token, the others by feeding the block its own output streams), the trunk verifies
[last token, d1 .. dk] in one chunk of 1 + k positions, and the row keeps the longest agreeing
prefix plus one token of the trunk's own (the correction, or the bonus token after k accepted
drafts). Greedy rounds keep exactly plain greedy's tokens; sampled rounds use the standard
acceptance rule (accept d_j with probability min(1, p/q), else draw from the normalized residual
max(p - q, 0)), so the output distribution is plain sampling's, with the same `Sampler`.

State (docs/speculative.md#rollback): the verify call is read-only. Its forward is the chunked
decode forward, but the cache it would write is dropped; the commit then re-runs only the
cache-writing half of every attention layer (K=V projection, compressors, indexer keys, window
ring) from the cache before the verify, on the attention inputs the verify captured, with
`n_valid = 1 + accepted`. So a rejected token never touches the cache, and the committed cache is
by construction the one plain decoding builds for the kept tokens. The MTP block's ring is
committed the same way: one MTP chunk over the kept positions with the trunk's true streams, whose
last position is the next round's first draft.

Everything runs in one `jax.jit` (a `lax.while_loop` of rounds), like `decoding.generate`.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from deepseek_v4 import sharding
from deepseek_v4.cache import Cache, LayerCache, init_cache, init_mtp_cache
from deepseek_v4.layers.attention import write_window
from deepseek_v4.layers.rope import rope_angles
from deepseek_v4.options import Options

DRAFTS = ("mtp",)
MAX_DRAFT = 8  # more drafts than this only lengthen the verify chunk (acceptance decays per token)


def check_draft(cfg, draft: str, num_draft) -> int:
  """`num_draft` as an int after the checks of `generate(draft=..., num_draft=...)`."""
  if draft not in DRAFTS:
    raise ValueError(f"draft={draft!r}; supported: {DRAFTS} (or None for plain decoding)")
  if cfg.num_mtp_layers == 0:
    raise ValueError("draft='mtp' needs the model's MTP block, but its config has "
                     "num_mtp_layers=0")
  if not (isinstance(num_draft, (int, np.integer)) and not isinstance(num_draft, bool)
          and 1 <= num_draft <= MAX_DRAFT):
    raise ValueError(f"num_draft={num_draft!r} must be an integer in [1, {MAX_DRAFT}]")
  return int(num_draft)


# ----- the trunk: read-only verify, then commit ---------------------------------------------------
def verify(model, cache: Cache, ids: Int[Array, "B T"], n_valid: Int[Array, "B"],
           options: Options) -> tuple[Array, Array, tuple[Array, ...]]:
  """The trunk on a chunk at each row's own position, without writing the cache.

  Returns (final streams [B, T, M, D], logits [B, T, V] float32, each layer's attention input
  [B, T, D] in official order); `commit` writes the kept part. The new cache the trunk computes is
  dropped (XLA removes the dead writes).
  """
  T = ids.shape[1]
  positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
  x, outs, _ = model.trunk(ids, positions, cache=cache, n_valid=n_valid,
                           options=options.replace(capture=True))
  return x, model.logits(model.final_hidden(x)), tuple(o.attn_input for o in outs)


def _write_layer(attn, cache: LayerCache, x: Array, positions: Array, n_valid: Array,
                 options: Options) -> LayerCache:
  """The cache-writing half of `Attention._extend` (same calls, same order): the kind's entries
  and state, then the window ring. The core attention is not run."""
  freqs = attn.freqs
  cos, sin = rope_angles(positions, freqs)
  cq, _, kv = attn.project_qkv(x, cos, sin)
  _, new = attn.kind.extend_entries(attn, x, cq, positions, cos, sin, freqs, n_valid, cache,
                                    options.kernel_impl, options.attn_block)
  new["window"] = write_window(cache.window, kv, positions, n_valid)
  return cache.replace(**new)


def commit(model, cache: Cache, attn_inputs: tuple[Array, ...], n_valid: Int[Array, "B"],
           options: Options) -> Cache:
  """`cache` with the first `n_valid[b]` tokens of a verified chunk written, from the attention
  inputs `verify` captured: the cache plain decoding builds after feeding those tokens."""
  T = attn_inputs[0].shape[1]
  positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
  groups = []
  for group, gcache in zip(model.groups, cache.groups):
    spec = group.spec
    if spec.scanned:
      xs = tuple(jnp.stack([attn_inputs[spec.layer(r, s)] for r in range(spec.count)])
                 for s in range(len(spec.kinds)))
    else:
      xs = tuple(attn_inputs[spec.layer(0, s)] for s in range(len(spec.kinds)))
    graphdef, state = nnx.split(group.blocks)

    def period(st, caches, xs, graphdef=graphdef):
      blocks = nnx.merge(graphdef, st)
      return tuple(_write_layer(b.attn, c, x, positions, n_valid, options)
                   for b, c, x in zip(blocks, caches, xs))

    if spec.scanned:
      new = jax.lax.scan(lambda _, a: (None, period(*a)), None, (state, gcache, xs))[1]
    else:
      new = period(state, gcache, xs)
    groups.append(new)
  return cache.replace(groups=tuple(groups), lengths=cache.lengths + n_valid)


# ----- acceptance ---------------------------------------------------------------------------------
def _row_keys(key: Array, B: int) -> Array:
  return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(B))


def accept(sampler, logits: Float[Array, "B K1 V"], drafts: Int[Array, "B K"],
           draft_logits: Float[Array, "B K V"], key: Array) -> tuple[Array, Array]:
  """How many drafts each row keeps, and its kept tokens.

  Args:
    sampler: the run's `decoding.Sampler`.
    logits: the trunk's logits at [last token, d1 .. dk] (position j predicts the token after
      d_j): K1 = K + 1.
    drafts: d1 .. dk; draft_logits: the MTP logits each was drawn from.
  Returns:
    (accepted [B] in 0..K, tokens [B, K + 1]: d_1 .. d_acc, then the trunk's token; later
    entries are not kept).
  """
  B, K = drafts.shape
  if sampler.greedy:
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, K + 1]
    ok = drafts == target[:, :K]
    acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    last = target[jnp.arange(B), acc]
  else:
    p = jax.nn.softmax(sampler.filter(logits.reshape(B * (K + 1), -1)), -1).reshape(logits.shape)
    q = jax.nn.softmax(sampler.filter(draft_logits.reshape(B * K, -1)), -1).reshape(
      draft_logits.shape)
    k_u, k_r = jax.random.split(key)
    u = jax.random.uniform(k_u, (B, K))
    pick = lambda a: jnp.take_along_axis(a[:, :K], drafts[..., None], -1)[..., 0]  # noqa: E731
    ok = u * pick(q) < pick(p)  # u < p/q, i.e. accept with probability min(1, p/q)
    acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    rows = jnp.arange(B)
    p_at = p[rows, acc]
    q_at = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[rows, acc]  # bonus: q = 0
    resid = jnp.maximum(p_at - q_at, 0.0)
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_at)
    last = jax.vmap(jax.random.categorical)(_row_keys(k_r, B), jnp.log(resid)).astype(jnp.int32)
  j = jnp.arange(K + 1)[None, :]
  padded = jnp.concatenate([drafts, drafts[:, :1]], axis=1)
  return acc, jnp.where(j < acc[:, None], padded, last[:, None])


# ----- the loop -------------------------------------------------------------------------------------
@struct.dataclass
class _Round:
  """The loop state between rounds. Row b has kept `cache.lengths[b]` tokens, has emitted
  `n_out[b]` (the last of which, `tok`, is not fed yet), and holds its next first draft."""

  cache: Cache
  mcache: LayerCache
  tok: Array  # [B]
  d_logits: Array  # [B, V] MTP logits of the first draft
  d_streams: Array  # [B, M, D] the MTP block's output streams there
  n_out: Array  # [B]
  done: Array  # [B]
  out: Array  # [B, T + N]
  key: Array
  calls: Array  # [B] verify calls per row
  reached: Array  # [K] verify calls that reached draft position j
  accepted: Array  # [K] of which draft j was accepted


def _mtp_last(model, mcache, streams, next_ids, start, n_valid, options):
  """MTP chunk at positions start + arange(T) (writing its ring), and the logits / output streams
  at each row's last real position."""
  T = next_ids.shape[1]
  positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)
  h, z, mcache = model.mtp_decode(streams, next_ids, positions, mcache, n_valid, options)
  at = jnp.maximum(n_valid - 1, 0)
  rows = jnp.arange(h.shape[0])
  return model.logits(h[rows, at][:, None])[:, 0], z[rows, at], mcache


def _prefill(model, cache, mcache, ids, lengths, chunk, options):
  """Trunk and MTP prefill in chunks: the trunk takes every prompt token, the MTP block every
  position but each row's last (whose next token is not known yet). Returns (logits and streams
  at each row's last token, caches)."""
  B, T = ids.shape
  n = T // chunk
  nxt = jnp.concatenate([ids[:, 1:], jnp.zeros((B, 1), ids.dtype)], axis=1)
  xs = (jnp.arange(n), jnp.moveaxis(ids.reshape(B, n, chunk), 1, 0),
        jnp.moveaxis(nxt.reshape(B, n, chunk), 1, 0))
  cfg = model.cfg

  def step(carry, args):
    cache, mcache, s_last = carry
    c, part, part_next = args
    n_valid = jnp.clip(lengths - c * chunk, 0, chunk)
    positions = cache.lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)
    x, _, groups = model.trunk(part, positions, cache=cache, n_valid=n_valid, options=options)
    cache = cache.replace(groups=groups, lengths=cache.lengths + n_valid)
    m_valid = jnp.clip(lengths - 1 - c * chunk, 0, chunk)
    _, _, mcache = model.mtp_decode(x, part_next, positions, mcache, m_valid, options)
    local = lengths - 1 - c * chunk
    here = ((local >= 0) & (local < chunk))[:, None, None]
    s_last = jnp.where(here, x[jnp.arange(B), jnp.clip(local, 0, chunk - 1)], s_last)
    return (sharding.constrain_cache(cache), mcache, s_last), None

  s0 = jnp.zeros((B, cfg.num_streams, cfg.d_model), jnp.dtype(cfg.dtype))
  (cache, mcache, s_last), _ = jax.lax.scan(step, (cache, mcache, s0), xs)
  logits = model.logits(model.final_hidden(s_last[:, None]))[:, 0]
  return logits, s_last, cache, mcache


def _draft(model, sampler, r: _Round, k: int, key, options):
  """d1 .. dk and their MTP logits: d1 from the state, each later one from the MTP block fed its
  own output streams (on a scratch copy of its ring, dropped after the round)."""
  keys = jax.random.split(key, k)
  logits, streams, mcache = [r.d_logits], r.d_streams, r.mcache
  drafts = [sampler.sample(r.d_logits, keys[0])]
  active = (~r.done).astype(jnp.int32)
  for j in range(1, k):
    lg, streams, mcache = _mtp_last(model, mcache, streams[:, None], drafts[-1][:, None],
                                    r.cache.lengths + j - 1, active, options)
    logits.append(lg)
    drafts.append(sampler.sample(lg, keys[j]))
  return jnp.stack(drafts, 1), jnp.stack(logits, 1)


def _round(model, sampler, r: _Round, k: int, n_new: int, stops, pad_id, lengths0, stream,
           ordered: bool, options) -> _Round:
  """One draft / verify / commit round."""
  B = r.tok.shape[0]
  rows = jnp.arange(B)
  key, k_draft, k_acc = jax.random.split(r.key, 3)
  active = ~r.done
  drafts, d_logits = _draft(model, sampler, r, k, k_draft, options)
  chunk = jnp.concatenate([r.tok[:, None], drafts], axis=1)  # [B, 1 + k]
  streams, logits, attn_in = verify(model, r.cache, chunk, active.astype(jnp.int32) * (k + 1),
                                    options)
  acc, toks = accept(sampler, logits, drafts, d_logits, k_acc)
  # The tokens a row emits: 1 + acc, cut at the budget and after a stop token.
  j = jnp.arange(k + 1)[None, :]
  cnt = jnp.minimum(acc + 1, n_new - r.n_out)
  stop = jnp.isin(toks, stops) & (j < cnt[:, None])
  cnt = jnp.where(jnp.any(stop, 1), jnp.argmax(stop, 1) + 1, cnt)
  cnt = jnp.where(active, cnt, 0)
  idx = jnp.where(j < cnt[:, None], (lengths0 + r.n_out)[:, None] + j, r.out.shape[1])
  out = r.out.at[rows[:, None], idx].set(toks, mode="drop")
  n_out = r.n_out + cnt
  stopped = jnp.any(stop, 1)
  done = r.done | stopped | (n_out >= n_new)
  if stream is not None:  # `done` as plain decoding streams it: set by a stop token
    for i in range(k + 1):
      jax.lax.cond(jnp.any(i < cnt), lambda i=i: jax.debug.callback(
        stream, jnp.max(r.n_out) + i, jnp.where(i < cnt, toks[:, i], pad_id),
        r.done | ((i == cnt - 1) & stopped), ordered=ordered), lambda: None)
  # Commit the kept tokens (the last token and the accepted drafts); finished rows stay put.
  keep = jnp.where(active & ~done, acc + 1, 0)
  cache = sharding.constrain_cache(commit(model, r.cache, attn_in, keep, options))
  d_log, d_str, mcache = _mtp_last(model, r.mcache, streams, toks, r.cache.lengths, keep, options)
  moved = (keep > 0)
  reach = active[:, None] & (acc[:, None] >= jnp.arange(k)[None, :])
  return _Round(
    cache=cache, mcache=mcache, tok=jnp.where(moved, toks[rows, acc], r.tok),
    d_logits=jnp.where(moved[:, None], d_log, r.d_logits),
    d_streams=jnp.where(moved[:, None, None], d_str, r.d_streams), n_out=n_out, done=done,
    out=out, key=key, calls=r.calls + active.astype(jnp.int32),
    reached=r.reached + jnp.sum(reach, 0),
    accepted=r.accepted + jnp.sum(reach & (acc[:, None] > jnp.arange(k)[None, :]), 0))


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new", "sampler", "max_len", "chunk",
                                             "k", "stream", "options", "layout"))
def _generate_jit(graphdef, state, ids, lengths, stops, pad_id, key, *, n_new: int, sampler,
                  max_len: int, chunk: int, k: int, stream, options: Options | None = None,
                  layout=None):
  # `layout`: the active `sharding.use(mesh, rules)` or None (as in decoding._generate_jit): a
  # static argument so that another layout compiles its own program; stream callbacks are
  # ordered only off a mesh (JAX refuses ordered callbacks over several devices).
  model = nnx.merge(graphdef, state)
  options = model.run_options(options)
  B, T = ids.shape
  cache = sharding.constrain_cache(init_cache(model, B, max_len))
  mcache = init_mtp_cache(model.cfg, B, max_len)
  logits, s_last, cache, mcache = _prefill(model, cache, mcache, ids, lengths, chunk, options)
  out = jnp.full((B, T + n_new), pad_id, jnp.int32)
  out = out.at[:, :T].set(jnp.where(jnp.arange(T)[None, :] < lengths[:, None], ids, pad_id))
  out = sharding.constrain(out, ("batch", None))
  key, sub = jax.random.split(key)
  tok = sampler.sample(logits, sub)
  out = out.at[jnp.arange(B), lengths].set(tok)
  done = jnp.isin(tok, stops)
  if stream is not None:
    jax.debug.callback(stream, 0, tok, done, ordered=layout is None)
  done = done | (n_new <= 1)
  # The MTP block's position L-1 (streams X_{L-1}, token L) drafts the first round's d1.
  d_logits, d_streams, mcache = _mtp_last(model, mcache, s_last[:, None], tok[:, None],
                                          lengths - 1, jnp.ones((B,), jnp.int32), options)
  zeros = jnp.zeros((k,), jnp.int32)
  r = _Round(cache=cache, mcache=mcache, tok=tok, d_logits=d_logits, d_streams=d_streams,
             n_out=jnp.ones((B,), jnp.int32), done=done, out=out, key=key,
             calls=jnp.zeros((B,), jnp.int32), reached=zeros, accepted=zeros)
  body = functools.partial(_round, model, sampler, k=k, n_new=n_new, stops=stops, pad_id=pad_id,
                           lengths0=lengths, stream=stream, ordered=layout is None,
                           options=options)
  r = jax.lax.while_loop(lambda r: ~jnp.all(r.done), body, r)
  return r.out, r.n_out, r.calls, r.reached, r.accepted


def generate(graphdef, state, ids: np.ndarray, lengths: np.ndarray, stops: np.ndarray,
             pad_id: int, seed: int, *, n_new: int, sampler, max_len: int, chunk: int,
             num_draft: int, stream: Callable | None = None, options: Options | None = None
             ) -> tuple[Array, dict[str, Any]]:
  """The speculative loop behind `decoding.generate(draft="mtp", ...)`, which checks and pads
  the inputs (`ids` [B, Tp] padded to a multiple of `chunk`), splits the model and, on a mesh,
  places its state and enters `sharding.use`. Returns (tokens [B, T + N], statistics: see
  `stats_dict`)."""
  t0 = time.perf_counter()
  out, n_out, calls, reached, accepted = _generate_jit(
    graphdef, state, sharding.place_batch(ids), sharding.place_batch(lengths), jnp.asarray(stops),
    jnp.int32(pad_id), jax.random.key(seed), n_new=n_new, sampler=sampler, max_len=max_len,
    chunk=chunk, k=num_draft, stream=stream, options=options,
    layout=sharding.context.current())
  out.block_until_ready()
  seconds = time.perf_counter() - t0
  return out, stats_dict(num_draft, np.asarray(n_out), np.asarray(calls), np.asarray(reached),
                         np.asarray(accepted), seconds)


def stats_dict(k: int, n_out, calls, reached, accepted, seconds: float) -> dict[str, Any]:
  """What `generate(..., stats=True)` returns beside the tokens.

  Keys: num_draft; tokens (emitted, all rows); verify_calls (rounds summed over rows);
  acceptance (per draft position j = 1..k: accepted / rounds that reached it, i.e. the rate
  given every earlier draft was accepted; NaN where none reached it); mean_accepted (drafts kept
  per round); tokens_per_call (tokens per verify call, the first token from the prefill not
  counted); seconds (wall time of the call, compilation included) and tokens_per_s.
  """
  calls_total = int(calls.sum())
  gen = int(n_out.sum())
  with np.errstate(invalid="ignore", divide="ignore"):
    rate = np.where(reached > 0, accepted / np.maximum(reached, 1), np.nan)
  return dict(num_draft=k, tokens=gen, verify_calls=calls_total,
              acceptance=[float(x) for x in rate],
              mean_accepted=float(accepted.sum() / calls_total) if calls_total else float("nan"),
              tokens_per_call=float((gen - len(n_out)) / calls_total) if calls_total
              else float("nan"),
              seconds=seconds, tokens_per_s=gen / seconds if seconds > 0 else float("nan"))


def format_stats(stats: dict[str, Any]) -> str:
  """One line for the CLI."""
  acc = ", ".join(f"{a:.2f}" for a in stats["acceptance"])
  return (f"speculative (mtp, k={stats['num_draft']}): acceptance per draft position [{acc}], "
          f"mean accepted {stats['mean_accepted']:.2f}, {stats['tokens_per_call']:.2f} tokens "
          f"per verify call, {stats['tokens']} tokens in {stats['seconds']:.2f} s "
          f"({stats['tokens_per_s']:.1f} tokens/s, compilation included)")


# ----- a model's drafting quality without generating ------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _first_draft_hits(graphdef, state, ids):
  model = nnx.merge(graphdef, state)
  streams = model.trunk(ids)[0]
  trunk = jnp.argmax(model.logits(model.final_hidden(streams)), -1)  # [B, T]: token i+1
  mtp = jnp.argmax(model.mtp_logits(streams, ids), -1)  # [B, T-1]: token i+2
  return jnp.sum(mtp == trunk[:, 1:]), mtp.size  # both predict token i+2 (i = 0 .. T-2)


def mtp_acceptance(model, ids, batch: int = 8) -> float | None:
  """Teacher-forced greedy acceptance of the first draft on text `ids` [N, T] (e.g. validation
  rows): the fraction of positions where the MTP block's argmax for token i+2 equals the trunk's
  argmax at position i+1, which is when a k = 1 greedy round keeps its draft given that context.
  None for a model without MTP (nothing to draft with). Whole batches of `batch` rows."""
  if model.cfg.num_mtp_layers == 0:
    return None
  ids = np.asarray(ids, np.int32)
  n = max(len(ids) // batch, 1) * batch
  graphdef, state = nnx.split(model)
  hits = total = 0
  for i in range(0, min(n, len(ids)), batch):
    h, t = _first_draft_hits(graphdef, state, jnp.asarray(ids[i:i + batch]))
    hits, total = hits + int(h), total + int(t)
  return hits / total if total else None
