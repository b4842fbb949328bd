"""Rough edges of generation: max_new_tokens=0, an int stop token, text cut at the stop
token (CLI stream, `trainer.sample_text`), and the generate CLI on a `train --out` folder; NumPy
scalars as sampling settings, no prompts, a non-UTF-8 `--prompt`."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cli, decoding, generate_cli, lora, tokenizer, train, trainer
from deepseek_v4.checkpoint.io import Checkpointer
from tests.hf_oracle import randomize_params

# One CSA layer keeps the compile short; the byte tokenizer needs vocab >= 270.
CFG = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, num_mtp_layers=0)
TOK = tokenizer.ByteTokenizer()


@pytest.fixture(scope="module")
def model():
  return randomize_params(deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(0)), seed=3)


def test_zero_new_tokens_returns_the_prompts(model):
  out = decoding.generate(model, [[5, 6, 7], [8]], 0)
  eos = CFG.eos_token_id
  np.testing.assert_array_equal(np.asarray(out), [[5, 6, 7], [8, eos, eos]])
  ids, logits = decoding.generate(model, [[5, 6, 7]], 0, return_logits=True)
  assert ids.shape == (1, 3) and logits.shape == (1, 0, CFG.vocab_size)
  with pytest.raises(ValueError, match="max_new_tokens=-1"):
    decoding.generate(model, [[5]], -1)


def test_an_int_stop_token_is_one_stop_id(model):
  prompt = TOK.encode("def f(x):")
  free = np.asarray(decoding.generate(model, [prompt], 4))[0, len(prompt):]
  stop = int(free[1])  # greedy: the second token comes again, and now stops the row
  as_int = np.asarray(decoding.generate(model, [prompt], 4, stop_tokens=stop))
  as_tuple = np.asarray(decoding.generate(model, [prompt], 4, stop_tokens=(stop,)))
  np.testing.assert_array_equal(as_int, as_tuple)
  gen = as_int[0, len(prompt):]
  first = int(np.flatnonzero(free == stop)[0])
  np.testing.assert_array_equal(gen[:first + 1], free[:first + 1])
  assert (gen[first + 1:] == CFG.eos_token_id).all()  # a stopped row is filled with pad_id
  for bad in ("x", 1.5, [1.5]):
    with pytest.raises(ValueError, match="stop_tokens="):
      decoding.generate(model, [prompt], 2, stop_tokens=bad)


def test_cut_at_stop():
  np.testing.assert_array_equal(decoding.cut_at_stop([4, 5, 1, 1, 1], 1), [4, 5])
  np.testing.assert_array_equal(decoding.cut_at_stop([4, 5, 6], (1, 2)), [4, 5, 6])
  np.testing.assert_array_equal(decoding.cut_at_stop([2, 5, 1], (1, 2)), [])


def test_sample_text_ends_at_the_stop_token(model, monkeypatch):
  eos = TOK.eos_id
  prompt = "ab"
  row = TOK.encode(prompt) + TOK.encode("xyz") + [eos] * 6  # what generate returns after a stop

  def fake_generate(m, ids, n, **kw):
    assert kw["stop_tokens"] == (eos,)
    return np.asarray([row])

  monkeypatch.setattr(decoding, "generate", fake_generate)
  assert trainer.sample_text(model, TOK, prompt, 9) == "xyz"


def test_streamed_text_ends_before_the_stop_token():
  # A decoder that shows special tokens: the stop token and the padding after it must not print.
  out = io.StringIO()
  dec = tokenizer.StreamDecoder(TOK, skip_special_tokens=False)
  stream = generate_cli.printer(dec, out)
  eos = TOK.eos_id
  for i, (t, done) in enumerate([(TOK.encode("h")[0], False), (TOK.encode("i")[0], False),
                                 (eos, True), (eos, True), (eos, True)]):
    stream(i, np.asarray([t]), np.asarray([done]))
  assert out.getvalue() + dec.flush() == "hi"


# ----- generate on a folder written by `train --out` (Orbax) --------------------------------------
def _expected(m, prompt: str, n: int) -> str:
  ids = TOK.encode(prompt)
  out = np.asarray(decoding.generate(m, [ids], n, stop_tokens=(TOK.eos_id,)))[0, len(ids):]
  return TOK.decode(decoding.cut_at_stop(out, TOK.eos_id), skip_special_tokens=True)


def _cli_text(*argv) -> str:
  args = cli.build_parser("generate").parse_args(["generate", *argv])
  out = io.StringIO()
  assert generate_cli.run(args, out=out) == 0
  return out.getvalue()


def test_generate_reads_a_training_folder(model, tmp_path, capsys):
  other = randomize_params(deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(0)), seed=4)
  ck = Checkpointer(tmp_path / "run" / "checkpoints")
  ck.save(3, model, train_config=train.TrainConfig())
  ck.save(5, other, train_config=train.TrainConfig())
  ck.close()
  run = str(tmp_path / "run")
  flags = ["--prompt", "def ", "--max-new-tokens", "6"]
  assert _cli_text("--checkpoint", run, *flags) == _expected(other, "def ", 6) + "\n"  # latest
  assert _cli_text("--checkpoint", run, "--step", "3", *flags) == _expected(model, "def ", 6) + "\n"
  assert cli.main(["generate", "--checkpoint", run, "--step", "4", *flags]) == cli.USAGE_ERROR
  assert "no checkpoint of step 4" in capsys.readouterr().err


def test_generate_merges_the_lora_adapters_of_a_training_folder(model, tmp_path):
  tuned = nnx.clone(model)
  tcfg = train.TrainConfig(lora_rank=2, lora_alpha=4.0, lora_targets=("wq_a", "wo_b"))
  lora.apply_lora(tuned, tcfg.lora_targets, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  for m in lora.lora_modules(tuned):  # B starts at zero: give the adapters an effect
    m.lora_b.set_value(0.5 * np.ones(m.lora_b.shape, np.float32))
  ck = Checkpointer(tmp_path / "checkpoints")
  ck.save(7, tuned, train_config=tcfg)
  ck.close()
  merged = nnx.clone(tuned)
  lora.strip_lora(merged)
  text = _cli_text("--checkpoint", str(tmp_path), "--prompt", "def ", "--max-new-tokens", "6")
  assert text == _expected(merged, "def ", 6) + "\n"
  assert text != _expected(model, "def ", 6) + "\n"  # the adapters changed the output


# ----- NumPy scalars, no prompts, a prompt that is not UTF-8 -----------------------------
def test_numpy_scalars_are_accepted_for_sampling(model):
  prompt = TOK.encode("def f(x):")
  kw = dict(temperature=0.7, top_k=5, top_p=float(np.float32(0.9)), seed=3)
  want = np.asarray(decoding.generate(model, [prompt], 4, **kw))
  got = decoding.generate(model, [prompt], 4, temperature=np.float32(0.7), top_k=np.int64(5),
                          top_p=np.float32(0.9), seed=np.int32(3))
  np.testing.assert_array_equal(np.asarray(got), want)
  s = decoding.Sampler(np.float64(0.7), np.int16(5), np.float32(0.9))
  assert s == decoding.Sampler(0.7, 5, float(np.float32(0.9)))  # one compiled loop for both
  assert type(s.temperature) is float and type(s.top_k) is int and type(s.top_p) is float
  for bad in (dict(top_k=True), dict(top_p=np.bool_(True)), dict(temperature="0.7")):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name}="):
      decoding.Sampler(**bad)
  with pytest.raises(ValueError, match="seed=0.5"):
    decoding.generate(model, [prompt], 2, seed=0.5)


def test_no_prompts_is_named(model):
  for empty in ([], ()):
    with pytest.raises(ValueError, match="no prompts given"):
      decoding.generate(model, empty, 4)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    decoding.generate(model, [[5], []], 4)


def test_a_prompt_that_is_not_utf8_names_the_flag(tmp_path, capsys):
  # Undecodable argv bytes reach Python as lone surrogates (PEP 383); the check runs before the
  # checkpoint is read, so no checkpoint is needed to see it.
  prompt = os.fsdecode("é".encode() + b"\xff!")
  code = cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", prompt])
  err = capsys.readouterr().err
  assert code == cli.USAGE_ERROR
  assert "--prompt is not valid UTF-8 text: byte 0xff at byte offset 2" in err
  assert "codec" not in err
