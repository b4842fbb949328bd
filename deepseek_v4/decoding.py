"""Incremental decoding (docs/architecture.md#decode-update): chunked prefill, the decode step,
sampling, `generate`.

Everything runs through one function, `forward_chunk`: T new tokens per row, row b starting at its
own position `cache.lengths[b]`, only its first `n_valid[b]` tokens real. Prefill is a chunk from
position 0 (or several chunks of any size), a decode step is a chunk of one token. Prompts of
different lengths are right-padded (compression windows are anchored at position 0, so left padding
is not an option, docs/architecture.md#decode-update); the padding writes nothing into the cache,
and every row then decodes from its own position. All buffers have a fixed capacity
(`deepseek_v4.cache`), so one compiled step serves every position.

`generate` runs prefill and the whole sampling loop in one `jax.jit` (a `lax.while_loop`);
streaming uses an ordered `jax.debug.callback` from inside the loop, so there is no per-token
Python round trip beyond the callback itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from deepseek_v4 import parallel, sharding, speculative
from deepseek_v4.cache import Cache, capacity_multiple, init_cache
from deepseek_v4.config import ModelConfig
from deepseek_v4.model import under_trace
from deepseek_v4.options import Options


# ----- the model on a chunk ---------------------------------------------------------------------
def forward_chunk(model, cache: Cache, ids: Int[Array, "B T"], n_valid: Int[Array, "B"],
                  options: Options | None = None, *, context_chunk: bool = False
                  ) -> tuple[Float[Array, "B T D"], Cache]:
  """Final hidden states (after the mHC head and final norm) of a chunk, and the new cache.

  Row b's tokens get positions `cache.lengths[b] + arange(T)`; its tokens past `n_valid[b]` are
  padding: their outputs are garbage and they change nothing in the cache. The model's one
  trunk runs the chunk, with the cache scanned alongside the stacked layers. `options`: the
  run's `Options` (e.g. `parallel.options(mesh, rules)` on a mesh that splits the experts; None =
  `model.options`). `context_chunk`: the chunk is a prefill chunk whose rows start on a
  multiple of every compression ratio (`prefill` checks it), so a context-parallel
  `options.context` splits it along the sequence (docs/context_parallel.md#prefill); otherwise
  the context layout is dropped.
  """
  T = ids.shape[1]
  if options is not None and options.context is not None and not context_chunk:
    # Context parallelism splits `prefill`'s chunks; decode steps run on the gathered cache as
    # usual.
    options = options.replace(context=None)
  positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
  x, _, groups = model.trunk(ids, positions, cache=cache, n_valid=n_valid, options=options)
  new_cache = cache.replace(groups=groups, lengths=cache.lengths + n_valid)
  return model.final_hidden(x), new_cache


def _last_valid(h: Float[Array, "B T D"], n_valid: Int[Array, "B"]) -> Array:
  """h at each row's last real token: [B, D]."""
  return h[jnp.arange(h.shape[0]), jnp.maximum(n_valid - 1, 0)]


@functools.partial(jax.jit, static_argnames=("graphdef", "last_only", "options", "context_chunk"),
                   donate_argnames=("cache",))
def _extend_jit(graphdef, state, cache, ids, n_valid, last_only: bool,
                options: Options | None = None, context_chunk: bool = False):
  model = nnx.merge(graphdef, state)
  h, cache = forward_chunk(model, cache, ids, n_valid, options, context_chunk=context_chunk)
  if last_only:  # [B, D] -> [B, V]; the head always sees [B, T, D] (its sharding names)
    return model.logits(_last_valid(h, n_valid)[:, None])[:, 0], cache
  return model.logits(h), cache


# ----- input checks (clear errors that name the value) -------------------------------------------
def _as_lengths(lengths, B: int, T: int) -> np.ndarray:
  if lengths is None:
    return np.full((B,), T, np.int32)
  lengths = np.asarray(lengths)
  if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"lengths must be {B} integers (one per row); got {lengths!r}")
  bad = (lengths < 0) | (lengths > T)
  if bad.any():
    raise ValueError(f"lengths[{int(np.argmax(bad))}]={int(lengths[bad][0])} is outside [0, {T}]"
                     f" (T={T} tokens per row)")
  return lengths.astype(np.int32)


def _check_ids(ids: np.ndarray, lengths: np.ndarray, vocab: int) -> None:
  if ids.ndim != 2:
    raise ValueError(f"token ids must have shape [B, T]; got shape {ids.shape}")
  if not np.issubdtype(ids.dtype, np.integer):
    raise TypeError(f"token ids must be integers; got dtype {ids.dtype}")
  real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
  bad = real & ((ids < 0) | (ids >= vocab))
  if bad.any():
    b, t = map(int, np.argwhere(bad)[0])
    raise ValueError(f"token id {int(ids[b, t])} (row {b}, position {t}) is outside the "
                     f"vocabulary [0, {vocab})")


def _traced_lengths(lengths, B: int, T: int) -> Array:
  """`_as_lengths` under a trace: the shape and dtype are checked, the values cannot be."""
  if lengths is None:
    return jnp.full((B,), T, jnp.int32)
  lengths = jnp.asarray(lengths)
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be {B} integers (one per row); got shape {lengths.shape}, "
                     f"dtype {lengths.dtype}")
  return lengths.astype(jnp.int32)


def _nan_rows(logits: Array, bad: Array) -> Array:
  """Under a trace the host-side checks cannot run: rows that would have failed them (lengths
  outside [0, T], more tokens than the cache holds) get NaN logits, as out-of-vocabulary ids do
  through the embedding, so a bad input never looks like a plausible result."""
  return jnp.where(bad.reshape((-1,) + (1,) * (logits.ndim - 1)), jnp.nan, logits)


def _check_room(cache: Cache, extra: np.ndarray, what: str) -> None:
  end = np.asarray(cache.lengths) + extra
  if (end > cache.max_len).any():
    b = int(np.argmax(end > cache.max_len))
    raise ValueError(f"{what}: row {b} would hold {int(end[b])} tokens, more than the cache "
                     f"capacity max_len={cache.max_len}")


# ----- public prefill / decode step --------------------------------------------------------------
def prefill(model, cache: Cache, ids, lengths=None, *, chunk_size: int | None = None,
            logits: Literal["all", "last"] = "all", options: Options | None = None
            ) -> tuple[Array, Cache]:
  """Feeds prompts (any length, optionally in chunks of any size) into `cache`.

  Args:
    model: a `Transformer`.
    cache: from `init_cache`; may already hold tokens (this call continues each row).
    ids: int [B, T], right-padded; row b's real tokens are `ids[b, :lengths[b]]`.
    lengths: [B] real tokens per row (default: all T).
    chunk_size: feed T in chunks of this many tokens (the last chunk is padded, so one compiled
      step serves every chunk).
    logits: "all" returns [B, T, V] (entries past a row's length are garbage); "last" returns
      [B, V] at each row's last real token (garbage for rows with length 0).
    options: the run's `Options` (default `model.options`), e.g. `parallel.options(mesh, rules)`
      under a mesh whose rules split the experts. With a context layout (`options.context`, a
      mesh with a `context` axis) every chunk is split along the sequence and the cache stays
      gathered (docs/context_parallel.md#prefill): chunk_size (when T needs more than one chunk)
      and each row's start `cache.lengths[b]` must then be multiples of the lcm of the model's
      compression ratios.
  Returns:
    (logits, new cache). The input cache is donated (do not reuse it).

  Inside a user's `jax.jit` / `nnx.jit` (traced ids, lengths or cache) the value checks cannot
  run on the host: an out-of-vocabulary id gives its row NaN logits (through the embedding), and
  so does a row whose length is outside [0, T] or that overflows the cache.
  """
  traced = under_trace(ids, lengths, cache.lengths)
  xp = jnp if traced else np
  ids = xp.asarray(ids)
  if ids.ndim != 2 or ids.shape[1] == 0:
    raise ValueError(f"prefill needs token ids of shape [B, T] with T >= 1; got {ids.shape}")
  B, T = ids.shape
  if B != cache.batch:
    raise ValueError(f"ids have B={B} rows but the cache holds {cache.batch}")
  if traced:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"token ids must be integers; got dtype {ids.dtype}")
    lengths = _traced_lengths(lengths, B, T)
    bad = (lengths < 0) | (lengths > T) | (cache.lengths + lengths > cache.max_len)
  else:
    lengths = _as_lengths(lengths, B, T)
    _check_ids(ids, lengths, model.cfg.vocab_size)
    _check_room(cache, lengths, "prefill")
  if logits not in ("all", "last"):
    raise ValueError(f"logits={logits!r}; expected 'all' or 'last'")
  chunk = T if chunk_size is None else int(chunk_size)
  if chunk < 1:
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer")
  n_chunks = -(-T // chunk)
  split = options is not None and options.context is not None
  if split:  # context-parallel chunks (docs/context_parallel.md#prefill)
    align = capacity_multiple(model.cfg)
    if n_chunks > 1 and chunk % align:
      raise ValueError(f"chunk_size={chunk} with a context-parallel options.context must be a "
                       f"multiple of {align} (the lcm of the compression ratios), so that every "
                       "chunk starts on a compression-window boundary")
    misaligned = (cache.lengths % align != 0) & (lengths > 0)
    if traced:
      bad = bad | misaligned
    elif np.asarray(misaligned).any():
      b = int(np.argmax(np.asarray(misaligned)))
      raise ValueError(f"context-parallel prefill continues row {b} at position "
                       f"P={int(cache.lengths[b])}, which must be a multiple of {align} (the lcm "
                       "of the compression ratios); continue it with "
                       "options.replace(context=None)")
  real = xp.where(xp.arange(T)[None, :] < lengths[:, None], ids, 0).astype(xp.int32)
  padded = xp.pad(real, ((0, 0), (0, n_chunks * chunk - T)))  # [B, n_chunks * chunk]
  graphdef, state = nnx.split(model)
  outs, last = [], None
  for c in range(n_chunks):
    n_valid = xp.clip(lengths - c * chunk, 0, chunk).astype(xp.int32)
    part = jnp.asarray(padded[:, c * chunk:(c + 1) * chunk])
    out, cache = _extend_jit(graphdef, state, cache, part, jnp.asarray(n_valid),
                             last_only=logits == "last", options=options, context_chunk=split)
    if logits == "last":
      has = jnp.asarray(n_valid > 0)[:, None]
      last = out if last is None else jnp.where(has, out, last)
    else:
      outs.append(out)
  out = last if logits == "last" else jnp.concatenate(outs, axis=1)[:, :T]
  return (_nan_rows(out, bad) if traced else out), cache


def decode_step(model, cache: Cache, ids, active=None, *, options: Options | None = None
                ) -> tuple[Float[Array, "B V"], Cache]:
  """One token per row at each row's own position.

  Args:
    ids: [B] (or [B, 1]) the previous token of each row.
    active: optional [B] bool; inactive rows are not advanced and write nothing.
    options: the run's `Options` (see `prefill`).
  Returns:
    (logits [B, V] float32, new cache). The input cache is donated (do not reuse it).

  Works inside a user's `jax.jit` / `nnx.jit`; there an out-of-vocabulary id or a row past the
  cache's capacity gives that row NaN logits instead of the ValueError of a concrete call.
  """
  traced = under_trace(ids, active, cache.lengths)
  xp = jnp if traced else np
  ids = xp.asarray(ids).reshape(-1, 1)
  B = ids.shape[0]
  if B != cache.batch:
    raise ValueError(f"ids have B={B} rows but the cache holds {cache.batch}")
  if active is not None and xp.shape(active) not in ((B,), (B, 1)):
    raise ValueError(f"active must be {B} booleans (one per row); got shape {xp.shape(active)}")
  n_valid = (xp.ones((B,), xp.int32) if active is None
             else xp.asarray(active).reshape(B).astype(xp.int32))
  if traced:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"token ids must be integers; got dtype {ids.dtype}")
    bad = cache.lengths + n_valid > cache.max_len
  else:
    _check_ids(ids, n_valid, model.cfg.vocab_size)
    _check_room(cache, n_valid, "decode_step")
  graphdef, state = nnx.split(model)
  # The same compiled step as a one-token prefill chunk (T = 1, every position kept).
  logits, cache = _extend_jit(graphdef, state, cache, jnp.asarray(ids, jnp.int32),
                              jnp.asarray(n_valid), last_only=False, options=options)
  return (_nan_rows(logits[:, 0], bad) if traced else logits[:, 0]), cache


def step_fn(model, last_only: bool = False, options: Options | None = None) -> Callable:
  """A low-overhead jitted step for loops that manage their own inputs (no checks, no per-call
  `nnx.split`): `fn(cache, ids [B, T], n_valid [B]) -> (logits, cache)`. The cache is donated."""
  graphdef, state = nnx.split(model)

  def fn(cache: Cache, ids, n_valid):
    return _extend_jit(graphdef, state, cache, ids, n_valid, last_only=last_only,
                       options=options)

  return fn


# ----- sampling ----------------------------------------------------------------------------------
def _is_real(x, integral: bool = False) -> bool:
  """A Python or NumPy real number (an integer one with `integral`), never a bool."""
  kind = numbers.Integral if integral else numbers.Real
  return isinstance(x, kind) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Next-token choice from logits. temperature 0 = greedy (argmax, lowest id on ties).

  Attributes:
    temperature: >= 0; logits are divided by it before top-k / top-p.
    top_k: keep the k largest logits (None = all).
    top_p: nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
      (None or 1 = all). Must be in (0, 1].
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if not (_is_real(t) and np.isfinite(t) and t >= 0):
      raise ValueError(f"temperature={t!r} must be a finite number >= 0")
    if k is not None and not (_is_real(k, integral=True) and k >= 1):
      raise ValueError(f"top_k={k!r} must be a positive integer or None")
    if p is not None and not (_is_real(p) and 0 < p <= 1):
      raise ValueError(f"top_p={p!r} must be in (0, 1]")
    # Python numbers from here on (NumPy scalars are accepted): the sampler is a jit static
    # argument, so equal settings must hash alike whatever type they came in.
    object.__setattr__(self, "temperature", float(t))
    object.__setattr__(self, "top_k", None if k is None else int(k))
    object.__setattr__(self, "top_p", None if p is None else float(p))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def filter(self, logits: Float[Array, "B V"]) -> Array:
    """Temperature, then top-k, then top-p; removed tokens get -inf."""
    x = logits.astype(jnp.float32) / self.temperature
    if self.top_k is not None and self.top_k < x.shape[-1]:
      kth = jax.lax.top_k(x, self.top_k)[0][..., -1:]
      x = jnp.where(x >= kth, x, -jnp.inf)
    if self.top_p is not None and self.top_p < 1:
      desc = jnp.sort(x, axis=-1)[..., ::-1]
      probs = jax.nn.softmax(desc, axis=-1)
      keep = (jnp.cumsum(probs, axis=-1) - probs) < self.top_p  # the first token always stays
      cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
      x = jnp.where(x >= cut, x, -jnp.inf)
    return x

  def sample(self, logits: Float[Array, "B V"], key: Array) -> Int[Array, "B"]:
    """One token per row; row b draws with `fold_in(key, b)`."""
    if self.greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = self.filter(logits)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(x.shape[0]))
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, x).astype(jnp.int32)


# ----- generate -----------------------------------------------------------------------------------
def _prefill_in_loop(model, cache: Cache, ids: Array, lengths: Array, chunk: int,
                     options: Options | None = None):
  """Prefill inside jit, `chunk` tokens per scan step; returns (h at each row's last token)."""
  B, T = ids.shape
  n = T // chunk
  xs = jnp.moveaxis(ids.reshape(B, n, chunk), 1, 0)  # [n, B, chunk]

  def step(carry, args):
    cache, h_last = carry
    c, part = args
    n_valid = jnp.clip(lengths - c * chunk, 0, chunk)
    # A context layout splits each prefill chunk along the sequence (`generate` checks the
    # chunk's alignment); the decode steps drop it.
    h, cache = forward_chunk(model, cache, part, n_valid, options,
                             context_chunk=options is not None and options.context is not None)
    local = lengths - 1 - c * chunk
    here = ((local >= 0) & (local < chunk))[:, None]
    h_last = jnp.where(here, h[jnp.arange(B), jnp.clip(local, 0, chunk - 1)], h_last)
    return (cache, h_last), None

  h0 = jnp.zeros((B, model.cfg.d_model), jnp.dtype(model.cfg.dtype))
  (cache, h_last), _ = jax.lax.scan(step, (cache, h0), (jnp.arange(n), xs))
  return h_last, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new", "sampler", "max_len", "chunk",
                                             "stream", "keep_logits", "options", "layout"))
def _generate_jit(graphdef, state, ids, lengths, stops, pad_id, key, *, n_new: int,
                  sampler: Sampler, max_len: int, chunk: int, stream, keep_logits: bool,
                  options: Options | None = None, layout=None):
  # `layout`: the active `sharding.use(mesh, rules)` (or None), which `constrain` reads while
  # tracing; a static argument so that another layout compiles its own program.
  model = nnx.merge(graphdef, state)
  B, T = ids.shape
  rows = jnp.arange(B)
  # Under `sharding.use(mesh, rules)` the cache and the outputs are pinned batch-sharded.
  cache = sharding.constrain_cache(init_cache(model, B, max_len))
  h_last, cache = _prefill_in_loop(model, cache, ids, lengths, chunk, options)
  out = jnp.full((B, T + n_new), pad_id, jnp.int32)  # row b: prompt, then tokens from lengths[b]
  out = out.at[:, :T].set(jnp.where(jnp.arange(T)[None, :] < lengths[:, None], ids, pad_id))
  out = sharding.constrain(out, ("batch", None))

  V = model.cfg.vocab_size
  scores = jnp.zeros((B, n_new if keep_logits else 0, V), jnp.float32)

  def emit(i, done, out, scores, key, logits):
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, pad_id, sampler.sample(logits, sub))
    out = out.at[rows, lengths + i].set(nxt)
    if keep_logits:
      scores = jax.lax.dynamic_update_slice_in_dim(scores, logits[:, None], i, axis=1)
    done = done | jnp.isin(nxt, stops)
    if stream is not None:  # JAX orders callbacks on one device only (see `generate`'s stream)
      jax.debug.callback(stream, i, nxt, done, ordered=layout is None)
    return nxt, done, out, scores, key

  done = jnp.zeros((B,), bool)
  first = model.logits(h_last[:, None])[:, 0]  # [B, V]
  tok, done, out, scores, key = emit(0, done, out, scores, key, first)

  def cond(s):
    i, done = s[0], s[3]
    return (i < n_new) & ~jnp.all(done)

  def body(s):
    i, cache, tok, done, out, scores, key = s
    # Finished rows feed nothing (n_valid = 0): their cache stays as it was.
    h, cache = forward_chunk(model, cache, tok[:, None], (~done).astype(jnp.int32), options)
    cache = sharding.constrain_cache(cache)
    tok, done, out, scores, key = emit(i, done, out, scores, key, model.logits(h)[:, 0])
    return i + 1, cache, tok, done, out, scores, key

  s = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok, done, out, scores, key))
  return sharding.constrain(s[4], ("batch", None)), sharding.constrain(s[5], ("batch", None, None))


def _as_prompts(prompt_ids, lengths) -> tuple[np.ndarray, np.ndarray]:
  """Ragged lists or a padded [B, T] array (+ lengths) -> (padded int32 [B, T], lengths [B])."""
  if isinstance(prompt_ids, (list, tuple)) and not len(prompt_ids):
    raise ValueError(f"prompt_ids={prompt_ids!r}: no prompts given (pass a list of prompts, "
                     "each a list of token ids, or one [B, T] array)")
  if isinstance(prompt_ids, (list, tuple)) and prompt_ids and not np.isscalar(prompt_ids[0]):
    rows = [np.asarray(r).reshape(-1) for r in prompt_ids]
    if lengths is not None:
      raise ValueError("lengths is only for a padded [B, T] array, not for a list of prompts")
    lengths = np.array([len(r) for r in rows], np.int32)
    T = int(lengths.max(initial=0))
    ids = np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
      if r.size and not np.issubdtype(r.dtype, np.integer):
        raise TypeError(f"prompt {b} has non-integer dtype {r.dtype}")
      ids[b, :len(r)] = r
  else:
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
      ids = ids[None, :]
    if ids.ndim != 2:
      raise ValueError(f"prompt_ids must be [B, T] or a list of 1-D prompts; got shape {ids.shape}")
    lengths = _as_lengths(lengths, ids.shape[0], ids.shape[1])
  if ids.shape[0] == 0:
    raise ValueError("prompt_ids is empty: no prompts given")
  if ids.shape[1] == 0 or (lengths == 0).any():
    b = int(np.argmin(lengths)) if lengths.size else 0
    raise ValueError(f"prompt {b} is empty (length 0); every prompt needs at least one token")
  return ids, lengths


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: int | Sequence[int] = (), *, lengths=None, pad_id: int | None = None,
             max_len: int | None = None, prefill_chunk: int | None = None,
             stream: Callable | None = None, return_logits: bool = False,
             options: Options | None = None, mesh: jax.sharding.Mesh | None = None,
             rules: str | sharding.Rules | None = None, draft: str | None = None,
             num_draft: int = 1, stats: bool = False):
  """Greedy or sampled continuation of a batch of prompts, the whole loop under one jit.

  Args:
    model: a `Transformer`.
    prompt_ids: int [B, T] (right-padded, with `lengths`), a single 1-D prompt, or a list of 1-D
      prompts of different lengths.
    max_new_tokens: N >= 0, tokens to generate per row (fewer if a stop token comes first);
      0 returns the prompts alone.
    temperature, top_k, top_p: see `Sampler` (temperature 0 = greedy).
    seed: PRNG seed of the sampler.
    stop_tokens: one id or a sequence of ids; a row stops after emitting one of these (the stop
      token is kept, and every later position of the row holds `pad_id`).
    lengths: [B] prompt lengths when `prompt_ids` is a padded array.
    pad_id: fills each row after its end: after its stop token, or after its prompt when the
      prompt is shorter than T (default `cfg.eos_token_id`, so with the default pad a stopped
      row looks like a run of end-of-sequence tokens: cut it with `cut_at_stop` before
      decoding).
    max_len: cache capacity (default T + N); at least every row's prompt + N tokens.
    prefill_chunk: prefill in chunks of this many tokens (bounds prefill memory).
    stream: optional `fn(step, tokens [B], done [B])`, called from inside the jitted loop as
      each token is produced (an ordered `jax.debug.callback`). Pass the same function object
      across calls to reuse the compiled loop. On a mesh (`mesh=` or `sharding.use`) JAX
      allows no ordered callback over several devices, so calls may come out of order: each
      carries its step index (`generate_cli.printer` puts them back in order).
    return_logits: also return the float32 logits [B, N, V] each token was drawn from (before
      temperature / filtering; zeros after a row has stopped).
    options: the run's `Options` (see `prefill`); on a mesh whose rules split the experts, pass
      `parallel.options(mesh, rules)` (the local MoE's global sort of a batch-sharded token set
      cannot be partitioned, and XLA replicates it).
    mesh, rules: run on this device mesh (`sharding.make_mesh`) by this rule table (`"fsdp"`,
      `"fsdp_tp"`, `"fsdp_ep"` or a `sharding.Rules`), both or neither. The parameters are put
      in their shards (no copy where they already are: `parallel.init_model`,
      `checkpoint.io.load_model(..., mesh=, rules=)`, `load_hf_checkpoint(..., mesh=, rules=)`);
      the prompts, the cache and the output are split over the rules' batch axes where B divides
      them, else replicated (a single prompt is); `options` defaults to the model's own with the
      mesh's MoE (`parallel.moe_impl`: expert-parallel when the rules split the experts) and, on
      a mesh with a `context` axis, the context-parallel layout: each prefill chunk is split
      along the sequence (`prefill_chunk` a multiple of the compression ratios' lcm when the
      prompt needs several; not with `draft`), docs/context_parallel.md#prefill. Tokens
      equal the one-device run's up to float rounding of the sharded sums. Without `mesh`, an
      enclosing `sharding.use(mesh, rules)` is followed (then pass `options` yourself).
    draft: None (plain decoding) or "mtp": self-speculative decoding (`deepseek_v4.speculative`,
      docs/speculative.md): the model's MTP block drafts `num_draft` tokens per round and the
      trunk verifies them in one call; greedy output equals plain greedy, sampled output follows
      the same distribution. `stream` is then called once per token index a round fills.
    num_draft: k, drafts per round (1 .. speculative.MAX_DRAFT); the cache needs k positions
      beyond the last token (default max_len grows by k).
    stats: with `draft`, also return the speculative statistics (`speculative.stats_dict`:
      acceptance per draft position, mean accepted length, tokens per verify call, tokens/s).
  Returns:
    int32 [B, T + N]: row b holds its prompt (`lengths[b]` tokens), then its generated tokens
    (up to and including a stop token), then `pad_id` to the end of the row. With
    `return_logits`, the pair (ids, logits); with `stats`, the pair (ids, statistics).
  """
  cfg: ModelConfig = model.cfg
  if (mesh is None) != (rules is None):
    raise ValueError(f"generate: mesh and rules go together; got mesh={mesh!r}, rules={rules!r}")
  if rules is not None:
    rules = sharding.get_rules(rules)  # an unknown name fails here, naming the known ones
  k = 0
  if draft is not None:
    k = speculative.check_draft(cfg, draft, num_draft)
    if return_logits:
      raise ValueError("return_logits=True is not supported with draft='mtp' (a round keeps "
                       "several tokens); use plain decoding to get the logits")
  elif stats:
    raise ValueError("stats=True needs draft='mtp' (the statistics are the speculative ones)")
  ids, lengths = _as_prompts(prompt_ids, lengths)
  B, T = ids.shape
  if not (isinstance(max_new_tokens, (int, np.integer)) and not isinstance(max_new_tokens, bool)
          and max_new_tokens >= 0):
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
  sampler = Sampler(temperature, top_k, top_p)
  if not _is_real(seed, integral=True):
    raise ValueError(f"seed={seed!r} must be an integer")
  _check_ids(ids, lengths, cfg.vocab_size)
  N = int(max_new_tokens)
  need = int(lengths.max()) + N - 1  # the last generated token is never fed back
  if need > cfg.max_position_embeddings:
    raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {N} needs {need} "
                     f"positions; the model has max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  max_len = T + N + k if max_len is None else int(max_len)
  max_len = min(max_len, cfg.max_position_embeddings)
  if need > max_len or T > max_len:
    raise ValueError(f"prompt length {max(T, int(lengths.max()))} + max_new_tokens {N} does not "
                     f"fit the cache capacity max_len={max_len}")
  if k and need + k > max_len:
    raise ValueError(f"num_draft={k}: the verify call looks {k} positions past the last token, "
                     f"so prompt length {int(lengths.max())} + max_new_tokens {N} + num_draft "
                     f"{k} needs {need + k} cache positions; the cache holds max_len={max_len} "
                     f"(max_position_embeddings={cfg.max_position_embeddings})")
  pad_id = cfg.eos_token_id if pad_id is None else int(pad_id)
  stop_tokens = _as_stop_tokens(stop_tokens)
  for s in stop_tokens:
    if not (0 <= s < cfg.vocab_size):
      raise ValueError(f"stop token {s!r} is outside the vocabulary [0, {cfg.vocab_size})")
  if N == 0:  # nothing to generate: the prompts, laid out as a generated batch would be
    out = jnp.asarray(np.where(np.arange(T)[None, :] < lengths[:, None], ids, pad_id), jnp.int32)
    if stats:
      empty = np.zeros((k,), np.int64)
      return out, speculative.stats_dict(k, np.zeros((B,), np.int64), np.zeros((B,), np.int64),
                                         empty, empty, 0.0)
    return (out, jnp.zeros((B, 0, cfg.vocab_size), jnp.float32)) if return_logits else out
  stops = np.asarray(list(stop_tokens) or [-1], np.int32)
  chunk = T if prefill_chunk is None else max(1, min(int(prefill_chunk), T))
  Tp = -(-T // chunk) * chunk  # padding tokens of the last chunk write nothing
  padded = np.zeros((B, Tp), np.int32)
  padded[:, :T] = np.where(np.arange(T)[None, :] < lengths[:, None], ids, 0)
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    if options is None:  # the mesh's MoE and, with a context axis, context-parallel prefill
      options = parallel.mesh_options(model, mesh, rules)
  if options is not None and options.context is not None:
    if k:  # the verify and draft steps run on the gathered cache; the prompt is not split
      options = options.replace(context=None)
    elif Tp > chunk and chunk % capacity_multiple(cfg):
      raise ValueError(f"prefill_chunk={chunk} with a context-parallel mesh must be a multiple of "
                       f"{capacity_multiple(cfg)} (the lcm of the compression ratios) when the "
                       f"prompt ({T} tokens) needs more than one chunk "
                       "(docs/context_parallel.md#prefill)")
  if k:
    with contextlib.nullcontext() if mesh is None else sharding.use(mesh, rules):
      out, info = speculative.generate(graphdef, state, padded, lengths, stops, pad_id, seed,
                                       n_new=N, sampler=sampler, max_len=max_len, chunk=chunk,
                                       num_draft=k, stream=stream, options=options)
    return (out[:, :T + N], info) if stats else out[:, :T + N]
  with contextlib.nullcontext() if mesh is None else sharding.use(mesh, rules):
    out, scores = _generate_jit(
      graphdef, state, sharding.place_batch(padded), sharding.place_batch(lengths),
      jnp.asarray(stops), jnp.int32(pad_id), jax.random.key(seed), n_new=N, sampler=sampler,
      max_len=max_len, chunk=chunk, stream=stream, keep_logits=bool(return_logits),
      options=options, layout=sharding.context.current())
  out = out[:, :T + N]  # generated tokens sit at lengths[b] + i < T + N
  return (out, scores) if return_logits else out


def _as_stop_tokens(stop_tokens) -> tuple[int, ...]:
  """One id or a sequence of ids -> a tuple of ints (None = no stop token)."""
  if stop_tokens is None:
    return ()
  if isinstance(stop_tokens, (int, np.integer)) and not isinstance(stop_tokens, bool):
    return (int(stop_tokens),)
  try:
    values = tuple(np.asarray(stop_tokens).reshape(-1).tolist())
  except (TypeError, ValueError):
    values = None
  if values is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise ValueError(f"stop_tokens={stop_tokens!r} must be a token id or a sequence of token ids")
  return values


def cut_at_stop(tokens, stop_tokens: int | Sequence[int] = ()) -> np.ndarray:
  """The generated tokens of one row up to (not including) its first stop token: what `generate`
  wrote after a stop is padding, not text.

  Args:
    tokens: int [N], one row's generated tokens (the part after its prompt).
    stop_tokens: the ids passed to `generate` as `stop_tokens`.
  Returns:
    int [n] with n <= N.
  """
  tokens = np.asarray(tokens).reshape(-1)
  stops = np.asarray(_as_stop_tokens(stop_tokens), np.int64)
  hits = np.flatnonzero(np.isin(tokens, stops))
  return tokens[:hits[0]] if hits.size else tokens
