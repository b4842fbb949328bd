"""Command-line errors: one `error:` line naming the bad value, exit status 2, no
traceback (unless --debug); `train --init` takes the architecture from the checkpoint; plan's
memory flags; the help text of --preset."""

from __future__ import annotations

import json

import pytest

import deepseek_v4
from deepseek_v4 import cli, config, config_hf, plan, train_cli


def _one_error_line(err: str, *needles: str) -> None:
  lines = [line for line in err.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1, err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in errors[0], (needle, err)


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("hello world\n" * 20)
  return str(path)


def test_train_bad_freeze_regex(tmp_path, corpus, capsys):
  rc = cli.main(["train", "--freeze", "[", "--data", corpus, "--out", str(tmp_path / "o")])
  assert rc == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, "--freeze '['", "regular expression")


def test_generate_checkpoint_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"\x00\xff" * 10)
  assert cli.main(["generate", "--checkpoint", str(path), "--prompt", "x"]) == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, repr(str(path)), "is a file")


@pytest.mark.parametrize("content", ['{"a": 1}', "not json", "\x00\x01"],
                         ids=["other-json", "invalid-json", "binary"])
def test_generate_tokenizer_that_is_not_one(tmp_path, content, capsys):
  bad = tmp_path / "tok.json"
  bad.write_text(content)
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  rc = cli.main(["generate", "--checkpoint", str(ckpt), "--tokenizer", str(bad), "--prompt", "x"])
  assert rc == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, str(bad))


def test_generate_folder_without_a_checkpoint(tmp_path, capsys):
  rc = cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"])
  assert rc == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, repr(str(tmp_path)), "train --out")


@pytest.mark.parametrize("content", ["not json {", "\x00\xff"], ids=["invalid-json", "binary"])
def test_invalid_config_json_names_the_path(tmp_path, content, capsys):
  path = tmp_path / "config.json"
  path.write_bytes(content.encode("latin-1"))
  for command in (["plan", "--config", str(path)], ["train", "--config", str(path)],
                  ["train", "--init", str(tmp_path)]):
    assert cli.main(command) == cli.USAGE_ERROR
    _one_error_line(capsys.readouterr().err, str(path))


def test_debug_shows_the_traceback(tmp_path, corpus, capsys):
  rc = cli.main(["train", "--freeze", "[", "--data", corpus, "--debug"])
  assert rc == cli.USAGE_ERROR
  err = capsys.readouterr().err
  assert "Traceback" in err and "error: --freeze '['" in err


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
  import deepseek_v4.summary_cli as summary_cli

  def boom(args):
    raise RuntimeError("boom\nsecond line")

  monkeypatch.setattr(summary_cli, "run", boom)
  assert cli.main(["summary", "--preset", "tiny"]) == 1
  _one_error_line(capsys.readouterr().err, "RuntimeError: boom; second line", "--debug")


def test_one_line_joins_a_field_list():
  assert cli.one_line("mismatching fields:\n  a: 1, 2\n  b: 3, 4") == \
    "mismatching fields: a: 1, 2; b: 3, 4"


def test_train_help_names_the_real_preset_default(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  assert "model preset (default tiny)" in " ".join(capsys.readouterr().out.split())
  args = cli.build_parser("train").parse_args(["train"])
  assert args.preset is None and cli.config_from_args(args)[1] == "tiny"
  args = cli.build_parser("plan").parse_args(["plan"])
  assert cli.config_from_args(args)[1] == "flash"


def test_train_seq_len_above_max_positions(corpus, tmp_path, capsys):
  rc = cli.main(["train", "--data", corpus, "--seq-len", "1024", "--out", str(tmp_path / "o")])
  assert rc == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, "seq_len=1024", "max_position_embeddings=512")


# ----- plan: --device-memory / --headroom --------------------------------------------------------
def test_plan_device_memory_needs_a_unit(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["plan", "--preset", "tiny", "--seq", "256", "--device-memory", "141"])
  assert e.value.code == cli.USAGE_ERROR
  assert "'141' is 141 bytes" in capsys.readouterr().err
  with pytest.raises(ValueError, match="141GB"):
    plan.parse_bytes("141")
  assert plan.parse_bytes("8e9") == 8 * 10**9  # a bare number of bytes stays readable
  assert plan.parse_bytes("512MB") == 512 * 10**6
  with pytest.raises(ValueError, match="141iB"):
    plan.parse_bytes("141iB")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1", "nan"])
def test_plan_headroom_must_be_a_fraction(value, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["plan", "--preset", "tiny", "--seq", "256", "--device-memory", "141GB",
              "--headroom", value])
  assert e.value.code == cli.USAGE_ERROR
  assert f"--headroom: {value!r} must be in [0, 1)" in capsys.readouterr().err


# ----- train --init: the architecture comes from the checkpoint -----------------------------------
@pytest.fixture
def init_dir(tmp_path):
  """A checkpoint folder's config.json whose non-shape fields differ from the tiny preset."""
  cfg = deepseek_v4.tiny(rope_theta=5000.0, window=4)
  path = tmp_path / "ckpt"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config_hf.fields_to_hf(cfg)))
  return cfg, str(path)


def _args(*argv):
  return cli.build_parser("train").parse_args(["train", *argv])


def test_init_takes_the_architecture_from_the_checkpoint(init_dir):
  _, path = init_dir
  got = train_cli.init_config(_args("--init", path))
  assert got.rope_theta == 5000.0 and got.window == 4
  cfg_from = config.ModelConfig.from_hf
  assert got == cfg_from(path)
  # Fields that change how the model runs, not what it computes, may still be set.
  got = train_cli.init_config(_args("--init", path, "--set", "init_std=0.5"))
  assert got.init_std == 0.5 and got.window == 4
  # A --config equal to the checkpoint's (the documented `--config ckpt/ --init ckpt/`) is fine.
  assert train_cli.init_config(_args("--init", path, "--config", path)) == cfg_from(path)


def test_init_refuses_contradicting_flags(init_dir, corpus, capsys):
  _, path = init_dir
  rc = cli.main(["train", "--init", path, "--preset", "tiny", "--data", corpus])
  assert rc == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, "--preset tiny contradicts", "window=8 (checkpoint 4)",
                  "rope_theta=10000.0 (checkpoint 5000.0)")
  rc = cli.main(["train", "--init", path, "--set", "rope_theta=10000", "--data", corpus])
  assert rc == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, "--set rope_theta=10000.0 (checkpoint 5000.0)")


# ----- train's rough edges --------------------------------------------------------------
@pytest.mark.parametrize("flag, value, needle", [
  ("--lora-rank", "0", "must be >= 1"),
  ("--lora-rank", "-2", "must be >= 1"),
  ("--sample", "-1", "must be >= 0"),
], ids=["lora-rank-0", "lora-rank-negative", "sample-negative"])
def test_train_flag_values_refused(tmp_path, corpus, capsys, flag, value, needle):
  with pytest.raises(SystemExit) as e:
    cli.main(["train", flag, value, "--data", corpus, "--out", str(tmp_path / "o")])
  assert e.value.code == cli.USAGE_ERROR
  err = capsys.readouterr().err
  assert flag in err and needle in err
  assert not (tmp_path / "o").exists()


def test_train_freeze_matching_nothing_refused(tmp_path, corpus, capsys):
  out = tmp_path / "o"
  rc = cli.main(["train", "--freeze", r"layer\.0\.", "--data", corpus, "--out", str(out)])
  assert rc == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, r"--freeze 'layer\.0\.'", "matches no parameter",
                  "layers.0.")
  assert not out.exists()  # refused before anything was written
  # A pattern that matches is accepted (here it stops at --print-groups).
  assert cli.main(["train", "--freeze", r"layers\.0\.", "--print-groups"]) == 0


def test_print_groups_leaves_out_frozen_slices_of_scanned_layers(capsys):
  assert cli.main(["train", "--print-groups"]) == 0
  every = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
  assert cli.main(["train", "--print-groups", "--freeze", r"layers\.3\.", "--freeze", r"^mtp\."]) \
      == 0
  trained = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
  assert trained == [n for n in every if not n.startswith(("layers.3.", "mtp."))]
  assert any(n.startswith("layers.3.") for n in every) and any(
    n.startswith("layers.4.") for n in trained)
