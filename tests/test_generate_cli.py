"""`python -m deepseek_v4 generate`: loads a checkpoint, streams the generated text."""

import io

import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cli, generate_cli, tokenizer
from tests.hf_oracle import randomize_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  # One CSA layer keeps the compile short; the byte tokenizer needs vocab >= 270.
  cfg = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, num_mtp_layers=0)
  model = randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), seed=3)
  path = tmp_path_factory.mktemp("ckpt")
  deepseek_v4.save_hf_checkpoint(model, path)
  return str(path)


def test_generate_streams_the_text(checkpoint, monkeypatch):
  path = checkpoint
  streamed = []
  printer = generate_cli.printer

  def recording_printer(dec, out):  # records what the jitted loop hands to the callback
    inner = printer(dec, out)

    def stream(step, tokens, done):
      streamed.append((int(step), int(tokens[0]), bool(done[0])))
      inner(step, tokens, done)

    return stream

  monkeypatch.setattr(generate_cli, "printer", recording_printer)
  args = cli.build_parser("generate").parse_args(
    ["generate", "--checkpoint", path, "--prompt", "héllo", "--max-new-tokens", "12"])
  out = io.StringIO()
  assert generate_cli.run(args, out=out) == 0
  steps = [s for s, _, _ in streamed]
  assert steps == list(range(len(steps))) and 1 <= len(steps) <= 12  # in order, as produced
  assert len(steps) == 12 or streamed[-1][2]  # all tokens, or stopped at EOS
  tok = tokenizer.ByteTokenizer()
  ids = [t for _, t, _ in streamed]
  assert out.getvalue() == tok.decode(ids, skip_special_tokens=True) + "\n"


def test_generate_cli_errors(checkpoint, capsys):
  path = checkpoint
  assert cli.main(["generate", "--checkpoint", path, "--prompt", "x", "--temperature", "1",
                   "--top-p", "1.5"]) == cli.USAGE_ERROR
  assert "top_p=1.5" in capsys.readouterr().err
  assert cli.main(["generate", "--checkpoint", path + "/missing", "--prompt", "x"]) != 0
