"""Self-speculative decoding with the MTP block (deepseek_v4/speculative.py, docs/speculative.md).

Oracles: plain `generate` (greedy: the same tokens; sampling: the same distribution, chi-square),
and for the rollback, the cache plain decoding builds (prefill, then one decode step per kept
token) and the MTP ring an MTP pass over the whole kept sequence builds from the full forward's
streams. Compilation dominates on CPU: the default tests share one small-vocabulary model (so
greedy drafts are sometimes accepted and both paths of a round run) and one generate shape.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import decoding, speculative
from tests.hf_oracle import randomize_params
from tests.tolerances import CHI2_QUANTILE_REL, F32_DECODE_REL, rel_err

HCA = 16  # tiny()'s HCA ratio
VOCAB = 8  # small enough that random drafts are accepted now and then


@pytest.fixture(scope="module")
def model():
  """A CSA and an HCA layer (each also has the sliding window) and the MTP block: the default
  tests' model (two layers keep the compiles short)."""
  cfg = deepseek_v4.tiny(vocab_size=VOCAB, compress_ratios=(4, HCA), num_hash_layers=1)
  return randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), seed=3)


@pytest.fixture(scope="module")
def full_model():
  """tiny() itself (every layer kind, scanned groups), for the slow tests."""
  cfg = deepseek_v4.tiny(vocab_size=VOCAB)
  assert HCA in cfg.compress_ratios and 4 in cfg.compress_ratios and cfg.num_mtp_layers == 1
  return randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), seed=3)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


# ----- greedy: exactly plain greedy's tokens ------------------------------------------------------
@pytest.fixture(scope="module")
def ragged(model):
  """Three ragged prompts and plain greedy's continuations (20 tokens)."""
  prompts = _prompts((5, 18, 31))
  return prompts, np.asarray(decoding.generate(model, prompts, 20, max_len=56))


def _spec(model, prompts, n, k, **kw):
  return decoding.generate(model, prompts, n, draft="mtp", num_draft=k, stats=True, max_len=56,
                           **kw)


def test_greedy_equals_plain_ragged_batch(model, ragged):
  prompts, plain = ragged
  out, stats = _spec(model, prompts, 20, 2)
  np.testing.assert_array_equal(np.asarray(out), plain)
  # Both paths of a round ran: some drafts were accepted, some rejected.
  assert 0 < stats["mean_accepted"] < 2, stats
  assert stats["tokens"] == 3 * 20
  assert stats["verify_calls"] < 3 * 19  # fewer verify calls than plain's decode steps
  assert stats["tokens_per_call"] == pytest.approx(
    (stats["tokens"] - 3) / stats["verify_calls"])


def test_greedy_stop_token_inside_a_draft(model, ragged):
  """Stop tokens taken from row 1's continuation (so some fall inside a kept draft) end each row
  where plain greedy ends it."""
  prompts, plain = ragged
  gen = plain[1, len(prompts[1]):]
  for j in range(3, 9):
    stop = int(gen[j])
    ref = np.asarray(decoding.generate(model, prompts, 20, stop_tokens=[stop], max_len=56))
    assert (ref != plain).any()  # some row was cut
    out, _ = _spec(model, prompts, 20, 2, stop_tokens=[stop])
    np.testing.assert_array_equal(np.asarray(out), ref, err_msg=f"stop token {stop}")


@pytest.mark.slow
def test_greedy_on_a_mesh_equals_plain(model, ragged):
  """On 8 devices (fsdp x expert, the expert-parallel MoE), the speculative loop keeps plain
  one-device greedy's tokens (the state is placed in its shards by generate)."""
  from deepseek_v4 import sharding

  prompts, plain = ragged
  mesh = sharding.make_mesh(fsdp=4, expert=2)
  out, stats = decoding.generate(model, prompts, 20, draft="mtp", num_draft=2, stats=True,
                                 max_len=56, mesh=mesh, rules="fsdp_ep")
  np.testing.assert_array_equal(np.asarray(out), plain)
  assert stats["mean_accepted"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_plain_every_residue(full_model, k):
  """Prompt lengths covering every residue mod 4 and mod the HCA ratio, one batch."""
  rng = np.random.default_rng(1)
  lengths = rng.permutation(HCA) + HCA * rng.integers(0, 2, HCA) + 1
  prompts = _prompts(lengths, seed=2)
  n = 24
  plain = np.asarray(decoding.generate(full_model, prompts, n))
  out, stats = decoding.generate(full_model, prompts, n, draft="mtp", num_draft=k, stats=True)
  np.testing.assert_array_equal(np.asarray(out), plain[:, :out.shape[1]])
  assert stats["mean_accepted"] > 0


# ----- rollback: the cache after a rejecting verify is plain decoding's ------------------------
def _jitted(model, fn):
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
  return lambda *a: f(state, *a)


def _assert_same_tree(ours, ref, what):
  la, ta = jax.tree.flatten_with_path(ours)
  lb, tb = jax.tree.flatten_with_path(ref)
  assert ta == tb, what
  for (path, a), (_, b) in zip(la, lb):
    a, b = np.asarray(a), np.asarray(b)
    name = f"{what}{jax.tree_util.keystr(path)}"
    assert a.shape == b.shape and a.dtype == b.dtype, name
    if not np.issubdtype(a.dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=name)
    fin = np.isfinite(b)
    if fin.any() and np.abs(b[fin]).max() > 0:
      assert rel_err(a[fin], b[fin]) <= F32_DECODE_REL, (name, rel_err(a[fin], b[fin]))
    else:
      np.testing.assert_array_equal(a[fin], b[fin], err_msg=name)


def test_rollback_equals_plain_decoding(model):
  """k = 3 drafts, rows accepting 1, 0, 2 and 3 of them. Row 0 (next position 13) and row 1 (29)
  reject the token at position 15 / 31, which closes a CSA window (ratio 4) and an HCA window
  (ratio 16); row 2 (6) keeps position 7, closing a CSA window, and rejects 9."""
  cfg, k, B = model.cfg, 3, 4
  lengths = np.array([13, 29, 6, 10], np.int32)
  want = np.array([1, 0, 2, 3])
  T, max_len = int(lengths.max()), 40
  prompts = _prompts(lengths, seed=5)
  ids = np.zeros((B, T), np.int32)
  for b, p in enumerate(prompts):
    ids[b, :len(p)] = p
  opts = model.options
  greedy = decoding.Sampler()

  def start(m, ids, lengths):
    cache = cache_lib.init_cache(m, B, max_len)
    mcache = cache_lib.init_mtp_cache(cfg, B, max_len)
    logits, s_last, cache, mcache = speculative._prefill(m, cache, mcache, ids, lengths, T, opts)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    mcache = speculative._mtp_last(m, mcache, s_last[:, None], tok[:, None], lengths - 1,
                                   jnp.ones((B,), jnp.int32), opts)[2]
    return cache, mcache, tok

  cache, mcache, tok = _jitted(model, start)(jnp.asarray(ids), jnp.asarray(lengths))
  full = jnp.full((B,), k + 1, jnp.int32)
  verify = _jitted(model, lambda m, c, chunk: speculative.verify(m, c, chunk, full, opts))
  # Greedy drafts one position at a time (position j's logits see only drafts < j), then the
  # draft at each row's `want` is made wrong.
  drafts = np.zeros((B, k), np.int32)
  for j in range(k):
    logits = verify(cache, jnp.concatenate([tok[:, None], jnp.asarray(drafts)], 1))[1]
    drafts[:, j] = np.argmax(np.asarray(logits[:, j]), -1)
  for b in range(B):
    if want[b] < k:
      drafts[b, want[b]] = (drafts[b, want[b]] + 1) % VOCAB
  chunk = jnp.concatenate([tok[:, None], jnp.asarray(drafts)], 1)
  streams, logits, attn_in = verify(cache, chunk)
  acc, toks = speculative.accept(greedy, logits, jnp.asarray(drafts), jnp.zeros_like(logits[:, 1:]),
                                 jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(acc), want)

  def commit(m, cache, mcache, attn_in, streams, toks, keep):
    new = speculative.commit(m, cache, attn_in, keep, opts)
    return new, speculative._mtp_last(m, mcache, streams, toks, cache.lengths, keep, opts)[2]

  commit = _jitted(model, commit)
  keep = acc + 1
  ours, ours_m = commit(cache, mcache, attn_in, streams, toks, keep)

  # Plain decoding: prefill the prompts, then one decode step per kept token.
  kept = np.asarray(chunk)
  ref = cache_lib.init_cache(model, B, max_len)
  _, ref = decoding.prefill(model, ref, ids, lengths)
  for j in range(k + 1):
    _, ref = decoding.decode_step(model, ref, kept[:, j], active=j < np.asarray(keep))
  _assert_same_tree(ours, ref, "cache")

  # The MTP ring: an MTP pass over each row's whole kept sequence (+ its next token), on the
  # streams of the full forward.
  seq = np.zeros((B, T + k + 2), np.int32)
  n_seq = lengths + np.asarray(keep)
  for b in range(B):
    row = list(prompts[b]) + kept[b, :keep[b]].tolist() + [int(toks[b, acc[b]])]
    seq[b, :len(row)] = row

  def mtp_ref(m, seq, n_seq):
    x = m.trunk(seq)[0]
    pos = jnp.broadcast_to(jnp.arange(seq.shape[1], dtype=jnp.int32), seq.shape)
    empty = cache_lib.init_mtp_cache(cfg, B, max_len)
    return m.mtp_decode(x[:, :-1], seq[:, 1:], pos[:, :-1], empty, n_seq, opts)[2]

  ref_m = _jitted(model, mtp_ref)(jnp.asarray(seq), jnp.asarray(n_seq, jnp.int32))
  _assert_same_tree(ours_m, ref_m, "mtp")

  # The test can fail: keeping the whole chunk (no rollback) leaves another cache.
  bad, _ = commit(cache, mcache, attn_in, streams, toks, full)
  with pytest.raises(AssertionError):
    _assert_same_tree(bad, ref, "cache")


# ----- sampling: the distribution of plain sampling ----------------------------------------------
@pytest.mark.slow
def test_sampling_matches_plain_distribution(full_model):
  """2048 draws of three tokens after one prompt, temperature 1.3, top-k 6, top-p 0.95:
  chi-square homogeneity of the joint (token 2, token 3) counts, plain vs speculative k = 2."""
  B = 2048
  prompt = _prompts((7,), seed=9)[0]
  kw = dict(temperature=1.3, top_k=6, top_p=0.95, max_len=16)
  plain = np.asarray(decoding.generate(full_model, [prompt] * B, 3, seed=11, **kw))[:, 7:]
  spec, stats = decoding.generate(full_model, [prompt] * B, 3, seed=12, draft="mtp", num_draft=2,
                                  stats=True, **kw)
  spec = np.asarray(spec)[:, 7:]
  assert 0.05 < stats["mean_accepted"] < 1.95  # acceptance and rejection both ran
  table = np.stack([np.bincount(r[:, 1] * VOCAB + r[:, 2], minlength=VOCAB ** 2)
                    for r in (plain, spec)]).astype(np.float64)
  table = table[:, table.sum(0) >= 10]  # cells with a few expected counts (chi-square's domain)
  stat, df = _chi2_homogeneity(table)
  assert stat < _chi2_critical(df, z=3.09), (stat, df, table)  # p > 1e-3


def _chi2_homogeneity(table: np.ndarray) -> tuple[float, int]:
  """Pearson's statistic of a 2 x C contingency table and its degrees of freedom."""
  expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
  return float(((table - expected) ** 2 / expected).sum()), table.shape[1] - 1


def _chi2_critical(df: int, z: float) -> float:
  """Upper quantile of chi-square(df) at the standard normal quantile z (Wilson-Hilferty: the cube
  root of chi2/df is close to normal with mean 1 - 2/(9 df) and variance 2/(9 df))."""
  v = 2.0 / (9.0 * df)
  return df * (1.0 - v + z * np.sqrt(v)) ** 3


def test_chi2_critical_value():
  """The derived critical values against tabulated chi-square quantiles (p = 1e-3)."""
  for df, table_value in ((10, 29.588), (30, 59.703), (60, 99.607)):
    assert _chi2_critical(df, 3.0902) == pytest.approx(table_value, rel=CHI2_QUANTILE_REL)


# ----- bad arguments ----------------------------------------------------------------------------
def test_bad_arguments(model):
  prompts = _prompts((5,))
  for k in (0, -1, 1.5, True, speculative.MAX_DRAFT + 1):
    with pytest.raises(ValueError, match="num_draft"):
      decoding.generate(model, prompts, 4, draft="mtp", num_draft=k)
  with pytest.raises(ValueError, match="draft='eagle'"):
    decoding.generate(model, prompts, 4, draft="eagle")
  with pytest.raises(ValueError, match=r"num_draft=3.*needs 11 cache positions.*max_len=10"):
    decoding.generate(model, prompts, 4, draft="mtp", num_draft=3, max_len=10)
  with pytest.raises(ValueError, match="stats=True needs draft"):
    decoding.generate(model, prompts, 4, stats=True)
  with pytest.raises(ValueError, match="return_logits"):
    decoding.generate(model, prompts, 4, draft="mtp", return_logits=True)
  no_mtp = deepseek_v4.Transformer(deepseek_v4.tiny(vocab_size=VOCAB, num_mtp_layers=0),
                                   rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_mtp_layers=0"):
    decoding.generate(no_mtp, prompts, 4, draft="mtp")
  with pytest.raises(ValueError, match="num_mtp_layers=0"):
    cache_lib.init_mtp_cache(no_mtp.cfg, 1, 8)


# ----- the CLI ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_speculative_prints_the_plain_text_and_statistics(tmp_path, capsys):
  from deepseek_v4 import cli, generate_cli

  # One CSA layer keeps the compile short; the byte tokenizer needs vocab >= 270.
  cfg = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0)
  deepseek_v4.save_hf_checkpoint(
    randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), seed=3), tmp_path)
  base = ["generate", "--checkpoint", str(tmp_path), "--prompt", "def f", "--max-new-tokens", "9"]
  texts = []
  for extra in ([], ["--speculative", "mtp", "--num-draft", "2"]):
    out = io.StringIO()
    assert generate_cli.run(cli.build_parser("generate").parse_args(base + extra), out=out) == 0
    texts.append(out.getvalue().split("\n"))
  assert texts[1][0] == texts[0][0]  # the streamed text: plain greedy's
  assert texts[1][1].startswith("speculative (mtp, k=2): acceptance per draft position [")
  assert cli.main(base + ["--num-draft", "2"]) == cli.USAGE_ERROR
  assert "--num-draft 2 needs --speculative mtp" in capsys.readouterr().err


@pytest.mark.slow
def test_mtp_acceptance_counts_agreeing_greedy_tokens(model):
  """ablate's metric against its definition, from the full forward's and the MTP block's logits."""
  ids = np.random.default_rng(4).integers(0, VOCAB, (8, 24)).astype(np.int32)
  trunk = np.argmax(np.asarray(model(jnp.asarray(ids))), -1)
  streams = nnx.jit(lambda m, x: m.trunk(x)[0])(model, jnp.asarray(ids))
  mtp = np.argmax(np.asarray(nnx.jit(lambda m, s, x: m.mtp_logits(s, x))(model, streams,
                                                                          jnp.asarray(ids))), -1)
  want = np.mean(mtp == trunk[:, 1:])
  assert speculative.mtp_acceptance(model, ids) == pytest.approx(want, abs=1e-12)
