"""Divergence: a blown-up state is detected before it is checkpointed, the kept
checkpoints all come from before it, and the printed advice (`--resume --resume-step N`) works."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import deepseek_v4
from deepseek_v4 import cli, train, trainer
from deepseek_v4 import data as data_lib
from deepseek_v4.checkpoint.io import Checkpointer

# One CSA layer, learned routing, no MTP: the cheapest model that trains (short compile).
MODEL_FLAGS = ["--preset", "tiny", "--set", "compress_ratios=4", "--set", "num_hash_layers=0",
               "--set", "num_mtp_layers=0"]
CFG = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, num_mtp_layers=0)
# The run settings as the CLI flags below build them (equal TrainConfigs share compiled steps).
RUN_FLAGS = ["--seq-len", "32", "--batch-size", "4", "--steps", "6", "--warmup", "1",
             "--log-every", "1", "--save-every", "1"]


def _tcfg(lr: float) -> train.TrainConfig:
  return train.TrainConfig(seq_len=32, batch_size=4, steps=6, learning_rate=lr, warmup_steps=1,
                           log_every=1, save_every=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "corpus.txt"
  path.write_text("def f(x):\n    return x + 1\n" * 40)
  tok = data_lib.get_tokenizer("bytes")
  rows = data_lib.load_rows(str(path), tok, 32, "concat", align=data_lib.packing_align(CFG))
  return str(path), rows


def _losses(out) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl"))}


@pytest.mark.slow  # ~40 s; the running-level rule is tested alone by default
def test_huge_lr_from_the_start_writes_no_checkpoint(tmp_path, corpus):
  # The trial of the issue: --lr 1e6 kept a step-1 checkpoint whose parameters were already ruined.
  with pytest.raises(trainer.TrainingDiverged, match="no checkpoint had been saved") as e:
    trainer.fit(CFG, _tcfg(1e6), corpus[1], str(tmp_path), progress=False)
  assert e.value.step == 2 and e.value.resume_step is None
  assert "the parameters after step 1 give loss=" in str(e.value)
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == []


@pytest.mark.slow  # about 200 s on 2 cores; the no-checkpoint-on-divergence test stays default
def test_advice_after_divergence_resumes_and_trains(tmp_path, corpus, capsys):
  path, rows = corpus
  out = tmp_path / "run"
  common = ["train", *MODEL_FLAGS, "--data", path, *RUN_FLAGS, "--no-progress", "--sample", "0",
            "--out", str(out)]
  # A clean run to compare with, and the same run stopped after 2 good steps.
  clean = trainer.fit(CFG, _tcfg(5e-3), rows, str(tmp_path / "clean"), progress=False)
  assert all(math.isfinite(x) for x in clean.losses)
  trainer.fit(CFG, _tcfg(5e-3), rows, str(out), stop_after=2, progress=False)

  # The learning rate blows the run up at step 3: caught before step 3 is saved.
  capsys.readouterr()
  assert cli.main(common + ["--resume", "--lr", "1e6"]) == 1
  err = capsys.readouterr().err
  assert "training diverged at step 4" in err and "without saving step 3" in err
  assert Checkpointer(out / "checkpoints").all_steps() == [1, 2]
  advised = re.search(r"--resume --resume-step (\d+)", err)
  assert advised and advised[1] == "2", err

  # The advice, with a sane rate: finite, decreasing loss, exactly the clean run's.
  assert cli.main(common + ["--resume", "--resume-step", advised[1], "--lr", "5e-3"]) == 0
  losses = _losses(out)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert all(math.isfinite(v) for v in losses.values())
  assert losses[6] < losses[3] < losses[1]
  assert [losses[s] for s in range(1, 7)] == clean.losses  # exact: as if it never diverged

  # Any kept step works, and the checkpoints after it (the abandoned continuation) are dropped.
  kept = Checkpointer(out / "checkpoints").all_steps()
  assert kept == [4, 5, 6]
  again = trainer.fit(CFG, _tcfg(5e-3), rows, str(out), resume_step=4, progress=False)
  assert again.losses == clean.losses[4:]
  with pytest.raises(ValueError, match=r"resume step 2: no checkpoint of that step.*\[4, 5, 6\]"):
    trainer.fit(CFG, _tcfg(5e-3), rows, str(out), resume_step=2, progress=False)


def test_running_level_rule():
  levels = trainer._Levels(trainer.DivergenceCheck(), [{"loss": 6.0, "grad_norm": 2.0}])
  assert levels.problem("loss", 17.0) is None  # below 3 x 6
  assert "above 18" in levels.problem("loss", 19.0)
  assert levels.problem("grad_norm", 150.0) is None
  assert "grad_norm=250, above 200" in levels.problem("grad_norm", 250.0)
  assert levels.problem("loss", math.nan) == "loss=nan"
  # Small losses (fine-tuning) need a rise of min_rise nats, not just a factor.
  low = trainer._Levels(trainer.DivergenceCheck(), [{"loss": 0.3, "grad_norm": 1.0}])
  assert low.problem("loss", 1.5) is None and low.problem("loss", 3.5) is not None
  # The level is a median: one spike in the history does not raise it.
  hist = [{"loss": v, "grad_norm": 1.0} for v in (5.0, 5.0, 9.0)]
  assert trainer._Levels(trainer.DivergenceCheck(), hist).problem("loss", 16.0) is not None
  # Before warm_in values only NaN / inf count; inf turns a check off.
  cold = trainer._Levels(trainer.DivergenceCheck(warm_in=2), [{"loss": 6.0, "grad_norm": 1.0}])
  assert cold.problem("loss", 1e9) is None
  off = trainer._Levels(trainer.DivergenceCheck(loss_factor=math.inf), [{"loss": 6.0}])
  assert off.problem("loss", 1e30) is None
  with pytest.raises(ValueError, match="loss_factor=0.5"):
    trainer.DivergenceCheck(loss_factor=0.5)


def test_resume_refuses_a_missing_folder(tmp_path, corpus, capsys):
  with pytest.raises(ValueError, match="does not exist"):
    trainer.fit(CFG, _tcfg(5e-3), corpus[1], str(tmp_path / "typo"), resume=True, progress=False)
  assert not (tmp_path / "typo").exists()
  rc = cli.main(["train", *MODEL_FLAGS, "--data", corpus[0], "--out", str(tmp_path / "typo"),
                 "--resume", "--no-progress"])
  assert rc == cli.USAGE_ERROR
  assert "'" + str(tmp_path / "typo") + "' does not exist" in capsys.readouterr().err


def test_cli_flags_configure_the_check(corpus, capsys):
  args = cli.build_parser("train").parse_args(["train", "--diverge-factor", "5",
                                               "--diverge-grad-factor", "1e3"])
  from deepseek_v4 import train_cli

  check = train_cli._divergence(args)
  assert check.loss_factor == 5 and check.grad_norm_factor == 1e3
  rc = cli.main(["train", *MODEL_FLAGS, "--data", corpus[0], "--diverge-factor", "0.5"])
  assert rc == cli.USAGE_ERROR
  assert "--diverge-factor: loss_factor=0.5" in capsys.readouterr().err
