"""The ablation runner: bad specs refused before anything runs (naming variant and field), a
killed grid resumes without redoing finished runs, and the report files (deepseek_v4.ablate)."""

import csv
import json
import math
import os

import pytest

from deepseek_v4 import ablate, ablate_report, cli, trainer

BASE = {
  "name": "t", "preset": "tiny", "seeds": [0],
  "model": {"compress_ratios": [0, 4], "num_hash_layers": 1, "d_model": 32, "num_experts": 4,
            "num_mtp_layers": 0},
  "train": {"seq_len": 32, "batch_size": 2, "steps": 3, "eval_every": 2, "eval_rows": 2,
            "save_every": 1, "val_fraction": 0.2, "warmup_steps": 1},
  "max_bytes": 60_000,
}


def _spec(variants, **top):
  return ablate.parse_spec({**BASE, **top, "variants": variants})


@pytest.mark.parametrize("variants, match", [
  ({"a": {}, "b": {"num_mtp_layer": 0}},
   "variant 'b': unknown field 'num_mtp_layer'.*did you mean num_mtp_layers"),
  ({"a": {}, "b": {"kernel_impl": "magic"}}, "variant 'b', field 'kernel_impl' = 'magic'"),
  ({"a": {}, "b": {"num_hash_layers": 7}}, "variant 'b', field 'num_hash_layers' = 7"),
  ({"a": {}, "b": {"learning_rate": -1}}, "variant 'b', field 'learning_rate' = -1"),
  ({"a": {}, "b": {"steps": 10}}, "variant 'b', field 'steps': every variant shares it"),
  ({"a": {}, "b": {"index_topk": 64}}, "variant 'b'.*field 'index_topk' = 64: larger than the 8"),
], ids=["unknown-field", "unknown-value", "out-of-range", "bad-train-value", "unequal-tokens",
        "topk-above-entries"])
def test_bad_variant_refused_naming_variant_and_field(variants, match, tmp_path):
  calls = []
  with pytest.raises(ablate.SpecError, match=match):
    ablate.run_grid(_spec(variants), str(tmp_path / "out"), progress=False,
                    fit=lambda *a, **k: calls.append(a))
  assert not calls and not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.parametrize("doc, match", [
  ({"variants": {}}, "variants"),
  ({"variants": {"a": {}}, "seeds": [0, 0]}, "seeds"),
  ({"variants": {"a": {}}, "baseline": "z"}, "baseline='z' is not a variant"),
  ({"variants": {"a": {}}, "preset": "huge"}, "preset='huge'"),
  ({"variants": {"a/b": {}}}, "variant name"),
  ({"variants": {"a": {}}, "colour": 1}, "unknown key"),
], ids=["no-variants", "repeated-seed", "baseline", "preset", "folder-name", "unknown-key"])
def test_malformed_spec_refused(doc, match):
  with pytest.raises(ablate.SpecError, match=match):
    ablate.parse_spec({**{k: v for k, v in BASE.items() if k != "seeds"}, **doc})


def test_base_tables_and_validation_required():
  with pytest.raises(ablate.SpecError, match=r"\[model\]: unknown ModelConfig field 'widht'"):
    ablate.check_spec(ablate.parse_spec({**BASE, "model": {"widht": 3}, "variants": {"a": {}}}))
  train = {k: v for k, v in BASE["train"].items() if k != "val_fraction"}
  with pytest.raises(ablate.SpecError, match="val_fraction"):
    ablate.check_spec(ablate.parse_spec({**BASE, "train": train, "variants": {"a": {}}}))


def test_spec_files_toml_json_and_cli_check(tmp_path, capsys):
  spec = {**BASE, "variants": {"a": {}, "b": {"learning_rate": 1e-3}}}
  (tmp_path / "s.json").write_text(json.dumps(spec))
  toml = ['name = "t"', "seeds = [0, 1]", 'baseline = "b"', "[model]", "d_model = 32",
          "[train]", "val_fraction = 0.1", "seq_len = 32", "[variants]", "a = {}",
          "b = { num_mtp_layers = 0 }"]
  (tmp_path / "s.toml").write_text("\n".join(toml))
  s = ablate.load_spec(str(tmp_path / "s.toml"))
  assert s.seeds == (0, 1) and s.baseline == "b" and dict(s.variants)["b"] == {"num_mtp_layers": 0}
  assert ablate.load_spec(str(tmp_path / "s.json")).variants[1] == ("b", {"learning_rate": 1e-3})
  assert cli.main(["ablate", str(tmp_path / "s.json"), "--check"]) == 0
  assert "2 variants x 1 seeds" in capsys.readouterr().out
  (tmp_path / "bad.json").write_text(json.dumps({**spec, "variants": {"a": {"nope": 1}}}))
  assert cli.main(["ablate", str(tmp_path / "bad.json"), "--check"]) == 2
  assert "variant 'a': unknown field 'nope'" in capsys.readouterr().err


def test_paired_difference_and_t_interval():
  recs = [{"variant": v, "seed": s, "val_loss": loss, "val_bpb": 1.0, "tokens_per_s": 1.0,
           "tokens": 10, "train_flops": 1.0, "wall_s": 1.0, "params_total": 1,
           "params_active": 1, "flops_per_token": 1.0}
          for v, losses in (("base", [2.0, 2.2, 2.1]), ("x", [1.9, 2.0, 2.05]))
          for s, loss in enumerate(losses)]
  rows = {r["variant"]: r for r in ablate_report.variant_rows(recs, ["base", "x"], "base")}
  d = [-0.1, -0.2, -0.05]
  mean = sum(d) / 3
  sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
  assert rows["x"]["diff"] == pytest.approx(mean)
  assert rows["x"]["ci"] == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
  assert rows["base"]["std"] == pytest.approx(0.1)
  assert math.isnan(rows["base"]["diff"])


class _Killed(Exception):
  pass


def test_killed_grid_resumes_without_redoing_finished_runs(tmp_path):
  # Both variants have the same effective settings, so the test compiles one training step.
  spec = _spec({"a": {}, "b": {"balance_alpha": 1e-4}})
  out = str(tmp_path / "grid")
  calls = []

  def killed_in_b(cfg, tcfg, rows, folder, **kw):
    calls.append((os.path.basename(os.path.dirname(folder)), kw["resume"]))
    if "/b/" in folder + "/":
      trainer.fit(cfg, tcfg, rows, folder, stop_after=1, **kw)  # saves step 1, then "dies"
      raise _Killed
    return trainer.fit(cfg, tcfg, rows, folder, **kw)

  with pytest.raises(_Killed):
    ablate.run_grid(spec, out, progress=False, fit=killed_in_b)
  assert os.path.exists(os.path.join(out, "a", "seed0", "result.json"))
  assert not os.path.exists(os.path.join(out, "b", "seed0", "result.json"))
  done_a = os.path.getmtime(os.path.join(out, "a", "seed0", "result.json"))

  def spy(*a, **kw):
    calls.append((os.path.basename(os.path.dirname(a[3])), kw["resume"]))
    return trainer.fit(*a, **kw)

  records = ablate.run_grid(spec, out, progress=False, fit=spy)
  assert calls == [("a", False), ("b", False), ("b", True)]  # a never redone, b resumed
  assert os.path.getmtime(os.path.join(out, "a", "seed0", "result.json")) == done_a
  steps = [json.loads(line)["step"] for line in open(os.path.join(out, "b", "seed0",
                                                                   "metrics.jsonl"))]
  assert steps == [1, 2, 3]  # continued from the step-1 checkpoint
  assert [r["variant"] for r in records] == ["a", "b"] and all(r["steps"] == 3 for r in records)
  # Equal settings, same seed: the resumed run matches the uninterrupted one.
  assert records[1]["val_loss"] == pytest.approx(records[0]["val_loss"], rel=1e-5)

  for name in ("results.csv", "results.md", "curves.png", "spec.json"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
  assert [r["variant"] for r in rows] == ["a", "b"] and float(rows[0]["tokens"]) == 3 * 2 * 32
  md = open(os.path.join(out, "results.md")).read()
  assert "| a | (base) |" in md and "| b | balance_alpha=0.0001 |" in md and "Student t" in md
  again, recs = ablate_report.read_results(out)
  assert again.baseline == "a" and len(recs) == 2

  # A changed variant in the same folder is refused, naming the differing field.
  with pytest.raises(ablate.SpecError, match="learning_rate"):
    ablate.run_grid(_spec({"a": {"learning_rate": 1e-3}}), out, progress=False, fit=spy)
