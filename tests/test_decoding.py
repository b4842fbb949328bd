"""Prefill + decode with the KV cache equals the full forward (docs/architecture.md#decode-update),
batches of prompts of different lengths equal each prompt alone, greedy generation equals
transformers', and bad input gets clear errors.

Compilation dominates the time on CPU, so the tests share compiled shapes: one batch of 16 rows
(lengths covering every residue mod 4 and mod the HCA ratio 16) for prefill / decode / chunked
prefill, and one [B, T] shape for the batch-vs-alone and transformers comparisons.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import decoding
from tests.hf_oracle import randomize_params
from tests.tolerances import F32_DECODE_REL, rel_err

HCA = 16  # tiny()'s HCA ratio
DECODE_STEPS = 3 * HCA


@pytest.fixture(scope="module")
def model():
  cfg = deepseek_v4.tiny()
  assert HCA in cfg.compress_ratios and cfg.index_topk == 4
  return randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), seed=1)


@pytest.fixture(scope="module")
def ragged(model):
  """16 prompts whose lengths cover every residue mod 16 (hence mod 4), continuation tokens, and
  the full-forward logits of every row on prompt + continuation."""
  rng = np.random.default_rng(0)
  res = rng.permutation(HCA)
  lengths = (res + HCA * rng.integers(0, 4, HCA)).astype(np.int32)
  lengths[lengths == 0] = HCA
  T = int(lengths.max())
  V = model.cfg.vocab_size
  tokens = rng.integers(0, V, (HCA, T + DECODE_STEPS)).astype(np.int32)
  full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens)))
  return lengths, tokens, full


def _prefill_and_decode(model, lengths, tokens, chunk_size):
  """Max relative error per call: prefill logits of each row's prompt, then every decode step."""
  B = len(lengths)
  T = int(lengths.max())
  cache = cache_lib.init_cache(model.cfg, B, T + DECODE_STEPS)
  prompt = np.where(np.arange(T)[None] < lengths[:, None], tokens[:, :T], 0)
  logits, cache = decoding.prefill(model, cache, prompt, lengths, chunk_size=chunk_size)
  return np.asarray(logits), cache


def _check_run(model, ragged, chunk_size):
  lengths, tokens, full = ragged
  B = len(lengths)
  logits, cache = _prefill_and_decode(model, lengths, tokens, chunk_size)
  errs = [max(rel_err(logits[b, :lengths[b]], full[b, :lengths[b]]) for b in range(B))]
  rows = np.arange(B)
  for i in range(DECODE_STEPS):
    step, cache = decoding.decode_step(model, cache, tokens[rows, lengths + i])
    step = np.asarray(step)
    errs.append(max(rel_err(step[b], full[b, lengths[b] + i]) for b in range(B)))
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + DECODE_STEPS)
  print(f"\nchunk_size={chunk_size}: prefill rel err {errs[0]:.2e}, "
        f"decode max rel err {max(errs[1:]):.2e} over {DECODE_STEPS} steps")
  assert max(errs) < F32_DECODE_REL, errs


def test_prefill_then_decode_equals_full_forward(model, ragged):
  """Each row of a right-padded batch, every step, vs its own full forward."""
  _check_run(model, ragged, chunk_size=None)


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_chunked_prefill_equals_full_forward(model, ragged, chunk_size):
  _check_run(model, ragged, chunk_size)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [3, 4, 16, 20])
def test_chunked_prefill_more_sizes(model, ragged, chunk_size):
  _check_run(model, ragged, chunk_size)


def test_prefill_leaves_the_state_of_spec_5_2(model, ragged):
  """After a prefill of S tokens: the window holds the last min(S, W) positions, the compressor
  tails hold S mod m tokens, and untouched rows of a batch hold nothing."""
  lengths, tokens, _ = ragged
  lengths = lengths.copy()
  lengths[0] = 0  # a row that receives no tokens at all
  _, cache = _prefill_and_decode(model, lengths, tokens, chunk_size=1)
  W = model.cfg.window
  for i, r in enumerate(model.cfg.compress_ratios):
    lc = cache.layer(i)
    pos = np.sort(np.asarray(lc.window.pos), axis=1)
    for b, n in enumerate(lengths):
      want = np.arange(max(0, n - W), n)
      np.testing.assert_array_equal(pos[b, W - len(want):], want)
      assert (pos[b, :W - len(want)] < 0).all()
    if lc.compressor is not None:
      filled = np.isfinite(np.asarray(lc.compressor.pending_z)).all(axis=-1).sum(axis=1)
      np.testing.assert_array_equal(filled, lengths % r)
      written = np.abs(np.asarray(lc.entries)).sum(axis=-1) > 0
      np.testing.assert_array_equal(written.sum(axis=1), lengths // r)


# ----- generate: batch vs alone, transformers, stop tokens ----------------------------------------
PROMPT_LENS = (5, 22, 12, 31)
NEW = 3 * HCA


@pytest.fixture(scope="module")
def prompts(model):
  rng = np.random.default_rng(7)
  return [rng.integers(2, model.cfg.vocab_size, n).astype(np.int32) for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def batch_run(model, prompts):
  return decoding.generate(model, prompts, NEW, return_logits=True)


def _alone(model, prompt, T):
  """One prompt, alone in a batch of one (right-padded to T, so one compiled shape serves all)."""
  padded = np.zeros((1, T), np.int32)
  padded[0, :len(prompt)] = prompt
  return decoding.generate(model, padded, NEW, lengths=[len(prompt)], return_logits=True)


def test_batch_equals_alone(model, prompts, batch_run):
  ids, logits = map(np.asarray, batch_run)
  T = max(PROMPT_LENS)
  assert ids.shape == (len(prompts), T + NEW)
  errs = []
  for b, p in enumerate(prompts):
    ids1, logits1 = map(np.asarray, _alone(model, p, T))
    n = len(p)
    np.testing.assert_array_equal(ids[b, :n], p)
    np.testing.assert_array_equal(ids[b, :n + NEW], ids1[0, :n + NEW])
    assert (ids[b, n + NEW:] == model.cfg.eos_token_id).all()  # padding after the row's end
    errs.append(rel_err(logits[b], logits1[0]))
  print(f"\nbatch vs alone: max rel err of the logits {max(errs):.2e}")
  assert max(errs) < F32_DECODE_REL


@pytest.mark.slow
def test_generate_logits_equal_full_forward(model, prompts, batch_run):
  """The logits generate sampled from equal the full forward on the generated sequence."""
  ids, logits = map(np.asarray, batch_run)
  b = 1
  n = len(prompts[b])
  seq = ids[b:b + 1, :n + NEW]
  full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(seq)))
  err = rel_err(logits[b], full[0, n - 1:n + NEW - 1])
  print(f"\ngenerate vs full forward: rel err {err:.2e}")
  assert err < F32_DECODE_REL


def test_stop_tokens(model, prompts, batch_run):
  ids, _ = batch_run
  ids = np.asarray(ids)
  n0 = len(prompts[0])
  stop = int(ids[0, n0 + 3])  # the 4th token row 0 generates
  out = np.asarray(decoding.generate(model, prompts, NEW, stop_tokens=(stop,),
                                     return_logits=True)[0])
  pad = model.cfg.eos_token_id
  for b, p in enumerate(prompts):
    n = len(p)
    gen = ids[b, n:n + NEW]
    hits = np.flatnonzero(gen == stop)
    end = hits[0] + 1 if hits.size else NEW
    np.testing.assert_array_equal(out[b, n:n + end], gen[:end])
    assert (out[b, n + end:] == pad).all()
  assert (out[0, n0 + 4:] == pad).all()


@pytest.mark.parity
def test_greedy_equals_transformers(model, prompts):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests.hf_oracle import hf_model

  prompt = prompts[int(np.argmax(PROMPT_LENS))]  # the longest prompt: no padding at all
  n = len(prompt)
  hf_new = 2 * HCA  # greedy is prefix-consistent: compare our first 2*HCA tokens (CPU time)
  ids = np.asarray(_alone(model, prompt, n)[0])[0, :n + hf_new]
  ref = hf_model(model)
  ref.generation_config.eos_token_id = None  # no early stop: compare every token
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny matrices: more threads only thrash on the shared CPU
  try:
    with torch.no_grad():
      out = ref.generate(torch.as_tensor(prompt[None], dtype=torch.long), max_new_tokens=hf_new,
                         do_sample=False, use_cache=True)
  finally:
    torch.set_num_threads(threads)
  theirs = out[0].numpy()
  print(f"\ngreedy: ours {ids[n:].tolist()}\n      theirs {theirs[n:].tolist()}")
  np.testing.assert_array_equal(ids, theirs)


# ----- sampling -----------------------------------------------------------------------------------
def test_sampler_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  s = decoding.Sampler(temperature=1.0, top_k=2)
  assert np.isfinite(np.asarray(s.filter(logits))).sum() == 2
  s = decoding.Sampler(temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach 0.7: two tokens stay
  np.testing.assert_array_equal(np.isfinite(np.asarray(s.filter(logits)))[0], [1, 1, 0, 0])
  s = decoding.Sampler(temperature=1.0, top_p=0.5)
  np.testing.assert_array_equal(np.isfinite(np.asarray(s.filter(logits)))[0], [1, 0, 0, 0])
  draws = decoding.Sampler(1.0, top_k=2).sample(jnp.tile(logits, (4000, 1)), jax.random.key(0))
  counts = np.bincount(np.asarray(draws), minlength=4)  # each row draws with its own key
  assert counts[2:].sum() == 0
  np.testing.assert_allclose(counts[0] / counts.sum(), 0.5 / 0.8, atol=0.04)
  assert int(decoding.Sampler().sample(logits, jax.random.key(0))[0]) == 0


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.1),
                                dict(top_k=0), dict(temperature=-1.0)])
def test_sampler_rejects(kw):
  name, value = next(iter(kw.items()))
  with pytest.raises(ValueError, match=f"{name}={value}"):
    decoding.Sampler(**{"temperature": 1.0, **kw})


# ----- bad input ----------------------------------------------------------------------------------
def test_generate_bad_input(model):
  V = model.cfg.vocab_size
  ok = np.array([[2, 3, 4]], np.int32)
  with pytest.raises(ValueError, match="top_p=1.5"):
    decoding.generate(model, ok, 4, temperature=1.0, top_p=1.5)
  with pytest.raises(ValueError, match="top_p=0"):
    decoding.generate(model, ok, 4, temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match=f"token id {V} "):
    decoding.generate(model, np.array([[2, V, 4]]), 4)
  with pytest.raises(ValueError, match="token id -3 "):
    decoding.generate(model, [[2, 3], [4, -3, 5]], 4)
  with pytest.raises(ValueError, match="empty"):
    decoding.generate(model, [[2, 3], []], 4)
  with pytest.raises(ValueError, match="empty"):
    decoding.generate(model, np.zeros((1, 0), np.int32), 4)
  with pytest.raises(ValueError, match="max_len=8"):
    decoding.generate(model, np.full((1, 6), 2), 4, max_len=8)
  P = model.cfg.max_position_embeddings
  with pytest.raises(ValueError, match=f"max_position_embeddings={P}"):
    decoding.generate(model, np.full((1, P), 2), 4)
  with pytest.raises(ValueError, match="max_new_tokens=-1"):  # 0 returns the prompt
    decoding.generate(model, ok, -1)


def test_prefill_bad_input(model):
  cache = cache_lib.init_cache(model.cfg, 1, 8)
  with pytest.raises(ValueError, match="capacity max_len=8"):
    decoding.prefill(model, cache, np.full((1, 9), 2))
  with pytest.raises(ValueError, match="token id 512 "):
    decoding.prefill(model, cache, np.array([[1, 512]]))
  with pytest.raises(ValueError, match="T >= 1"):
    decoding.prefill(model, cache, np.zeros((1, 0), np.int32))
  with pytest.raises(ValueError, match="max_len=100000"):
    cache_lib.init_cache(model.cfg, 1, 100000)


@pytest.mark.slow
def test_generate_chunked_prefill_and_seeded_sampling(model, prompts, batch_run):
  ids, _ = batch_run
  chunked = decoding.generate(model, prompts, NEW, prefill_chunk=7)
  np.testing.assert_array_equal(np.asarray(chunked), np.asarray(ids))
  kw = dict(temperature=1.0, top_k=40, top_p=0.9, seed=5)
  a = np.asarray(decoding.generate(model, prompts, NEW, **kw))
  np.testing.assert_array_equal(a, np.asarray(decoding.generate(model, prompts, NEW, **kw)))
  assert not np.array_equal(a, np.asarray(ids))


# ----- prefill / decode_step inside a user's jit ----------------------------------------
# Its own small model (every attention kind, both routers) keeps the extra compiles short.
JIT_CFG = deepseek_v4.tiny(compress_ratios=(0, 4, 16), num_hash_layers=1, num_mtp_layers=0)


@pytest.fixture(scope="module")
def jit_run():
  """A ragged batch prefilled in chunks and decoded for 3 steps, un-jitted: the reference."""
  model = randomize_params(deepseek_v4.Transformer(JIT_CFG, rngs=nnx.Rngs(0)), seed=2)
  rng = np.random.default_rng(3)
  lengths = np.array([11, 4, 7], np.int32)
  ids = rng.integers(0, JIT_CFG.vocab_size, (3, 11)).astype(np.int32)
  nxt = rng.integers(0, JIT_CFG.vocab_size, (3, 3)).astype(np.int32)
  logits, cache = decoding.prefill(model, cache_lib.init_cache(JIT_CFG, 3, 24), ids, lengths,
                                   chunk_size=4)
  steps = []
  for i in range(3):
    step, cache = decoding.decode_step(model, cache, nxt[:, i])
    steps.append(np.asarray(step))
  return model, lengths, ids, nxt, np.asarray(logits), steps, cache


def _close(a, b) -> bool:
  return rel_err(a, b) < F32_DECODE_REL


def test_prefill_and_decode_step_inside_jit(jit_run):
  model, lengths, ids, nxt, ref_logits, ref_steps, ref_cache = jit_run
  # prefill under jax.jit, the model closed over: ids, lengths and the cache are tracers.
  prefill = jax.jit(lambda c, x, n: decoding.prefill(model, c, x, n, chunk_size=4))
  logits, cache = prefill(cache_lib.init_cache(JIT_CFG, 3, 24), jnp.asarray(ids),
                          jnp.asarray(lengths))
  for b, n in enumerate(lengths):
    assert _close(logits[b, :n], ref_logits[b, :n])
  # decode_step under nnx.jit with the model as an argument (its parameters are tracers too).
  step = nnx.jit(lambda m, c, x: decoding.decode_step(m, c, x))
  for i in range(3):
    out, cache = step(model, cache, jnp.asarray(nxt[:, i]))
    assert _close(out, ref_steps[i])
  np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 3)
  for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(ref_cache)):
    got, want = np.asarray(got), np.asarray(want)
    if np.issubdtype(want.dtype, np.floating):
      fin = np.isfinite(want)  # empty slots hold -inf / NaN markers in both
      np.testing.assert_array_equal(np.isfinite(got), fin)
      assert not fin.any() or _close(got[fin], want[fin])
    else:
      np.testing.assert_array_equal(got, want)


def test_inside_jit_bad_rows_give_nan(jit_run):
  """What the host checks refuse in a concrete call turns the row's logits into NaN under a
  trace; the other rows are untouched."""
  model, lengths, ids, nxt, ref_logits, ref_steps, _ = jit_run
  V = JIT_CFG.vocab_size
  bad = ids.copy()
  bad[1, 2] = V  # out of the vocabulary, inside row 1's length 4
  prefill = jax.jit(lambda c, x, n: decoding.prefill(model, c, x, n, chunk_size=4))
  logits, cache = prefill(cache_lib.init_cache(JIT_CFG, 3, 24), jnp.asarray(bad),
                          jnp.asarray(lengths))
  logits = np.asarray(logits)
  assert np.isnan(logits[1, 2:4]).all()  # (masked attention weights times NaN values: earlier
  # positions of the row may turn NaN as well, as in the full forward)
  for b in (0, 2):
    assert _close(logits[b, :lengths[b]], ref_logits[b, :lengths[b]])
  with pytest.raises(ValueError, match=f"token id {V} "):  # the concrete call still refuses
    decoding.prefill(model, cache_lib.init_cache(JIT_CFG, 3, 24), bad, lengths, chunk_size=4)
  # A row past the cache's capacity: the room check cannot run under the trace.
  full = jax.jit(lambda c, x, n: decoding.prefill(model, c, x, n, chunk_size=4))(
    cache_lib.init_cache(JIT_CFG, 3, 10), jnp.asarray(ids), jnp.asarray(lengths))[0]
  full = np.asarray(full)
  assert np.isnan(full[0]).all()  # 11 tokens into a cache of 10
  assert np.isfinite(full[1, :4]).all() and np.isfinite(full[2, :7]).all()
  step = jax.jit(lambda c, x: decoding.decode_step(model, c, x))
  _, cache = decoding.prefill(model, cache_lib.init_cache(JIT_CFG, 3, 11), ids, lengths)
  out = np.asarray(step(cache, jnp.asarray(nxt[:, 0]))[0])
  assert np.isnan(out[0]).all() and np.isfinite(out[1:]).all()  # row 0 is full
