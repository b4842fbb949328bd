"""Held-out evaluation: the split is by document and fixed, the trainer logs validation loss and
bits per byte at its interval and reports them (deepseek_v4.evaluate, trainer.fit(val=...))."""

import json
import math

import pytest

from deepseek_v4 import data as data_lib
from deepseek_v4 import evaluate, trainer
from deepseek_v4.config import tiny
from deepseek_v4.train import TrainConfig


def _docs(n):
  return [data_lib.Document(f"document {i}: " + "abc " * (20 + i)) for i in range(n)]


def test_split_is_by_document_fixed_and_disjoint():
  docs = _docs(20)
  train, val = evaluate.split_documents(docs, fraction=0.2)
  assert len(val) == 4 and len(train) == 16
  assert not set(d.text for d in train) & set(d.text for d in val)
  assert evaluate.split_documents(docs, fraction=0.2) == (train, val)  # same split every time
  _, by_count = evaluate.split_documents(docs, count=3)
  assert len(by_count) == 3
  assert evaluate.split_documents(docs) == (docs, [])


def test_split_refuses_what_cannot_be_split():
  with pytest.raises(ValueError, match="by document"):
    evaluate.split_documents(_docs(1), fraction=0.5)
  with pytest.raises(ValueError, match="hold out 5 of 5"):
    evaluate.split_documents(_docs(5), count=5)


@pytest.mark.parametrize("fields, match", [
  ({"val_fraction": 1.0}, "val_fraction"),
  ({"val_fraction": -0.1}, "val_fraction"),
  ({"val_documents": -1}, "val_documents"),
  ({"val_fraction": 0.1, "val_documents": 2}, "not both"),
  ({"eval_every": 0}, "eval_every"),
], ids=["fraction-1", "fraction-negative", "count-negative", "both", "eval-every-0"])
def test_train_config_refuses_bad_validation_settings(fields, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**fields)


def test_bits_per_byte_of_the_byte_tokenizer(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"text": t.text}) + "\n" for t in _docs(10)))
  tok = data_lib.byte_tokenizer()
  tcfg = TrainConfig(seq_len=16, batch_size=2, val_documents=2)
  rows, val = evaluate.load_split(str(path), tok, tcfg)
  # one EOS (no bytes) per document: slightly under one byte per scored token
  docs = [d for d in _docs(10) if d.text in {dd.text for dd in evaluate.split_documents(
    _docs(10), count=2)[1]}]
  n_bytes = sum(len(d.text) for d in docs)
  assert val.bytes_per_token == pytest.approx(n_bytes / (n_bytes + 2))
  assert val.documents == 2 and len(rows) > len(val.rows)


@pytest.mark.slow  # ~40 s; the ablate grid test logs validation too
def test_fit_logs_validation_at_its_interval_and_reports_it(tmp_path):
  tok = data_lib.byte_tokenizer()
  cfg = tiny(vocab_size=tok.vocab_size, compress_ratios=(0, 4), num_hash_layers=1, d_model=32,
             num_experts=4, num_mtp_layers=0)
  tcfg = TrainConfig(seq_len=32, batch_size=2, steps=3, eval_every=2, eval_rows=2,
                     val_fraction=0.2, save_every=10, learning_rate=3e-3, warmup_steps=1)
  rows, val = evaluate.load_split(None, tok, tcfg, max_bytes=60_000)
  result = trainer.fit(cfg, tcfg, rows, str(tmp_path), progress=False, val=val)
  metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  evals = [m for m in metrics if "val_loss" in m]
  assert [m["step"] for m in evals] == [2, 3]
  for m in evals:
    assert math.isfinite(m["val_loss"])
    assert m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2) / val.bytes_per_token)
  assert result.last_val_loss == evals[-1]["val_loss"]
  assert "validation loss" in trainer.summary(result)


def _jsonl(tmp_path):
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": f"note {i}: " + "the cat sat. " * (8 + i)}) + "\n"
                          for i in range(24)))
  return data


def test_train_cli_validation_flags_are_checked(tmp_path, capsys):
  from deepseek_v4 import cli

  data = _jsonl(tmp_path)
  assert cli.main(["train", "--data", str(data), "--val-fraction", "1.5", "--steps", "1"]) == 2
  assert "val_fraction" in capsys.readouterr().err


@pytest.mark.slow  # a two-step training run through the CLI (about a minute)
def test_train_cli_holds_out_documents_and_logs_validation(tmp_path, capsys):
  from deepseek_v4 import cli

  data = _jsonl(tmp_path)
  out = tmp_path / "run"
  rc = cli.main(["train", "--data", str(data), "--out", str(out), "--steps", "2", "--seq-len",
                 "32", "--batch-size", "2", "--val-documents", "4", "--eval-every", "1",
                 "--sample", "0", "--no-progress", "--set", "num_mtp_layers=0"])
  assert rc == 0
  assert "4 documents held out for validation" in capsys.readouterr().err
  evals = [m for m in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in m]
  assert [m["step"] for m in evals] == [1, 2]
  assert all(math.isfinite(m["val_loss"]) and m["val_bpb"] > 0 for m in evals)
