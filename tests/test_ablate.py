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
  ({"a": {}, "b": {"score_func": "magic"}}, "variant 'b', field 'score_func' = 'magic'"),
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


# ----- spec files, run identity, divergence, foreign folders ----------------------------
def _fake_fit(diverge=()):
  """A stand-in for trainer.fit (these tests are about the grid, not training): a run's result is
  a fixed function of its variant and seed; (variant, seed) pairs in `diverge` raise."""
  calls = []

  def fit(cfg, tcfg, rows, folder, **kw):
    variant, seed = os.path.basename(os.path.dirname(folder)), tcfg.seed
    calls.append((variant, seed))
    if (variant, seed) in diverge:
      raise trainer.TrainingDiverged("training diverged at step 2: loss=nan", 2, None)
    loss = 2.0 + 0.1 * len(variant) + 0.01 * seed
    return trainer.RunResult(steps=tcfg.steps, first_loss=5.0, last_loss=loss, first_lm_loss=5.0,
                             last_lm_loss=loss, wall_s=1.0, tokens_per_s=100.0, out_dir=folder,
                             losses=[loss], last_val_loss=loss, last_val_bpb=loss / 2)

  fit.calls = calls
  return fit


def _write_spec(tmp_path, name="s.json", **changes):
  doc = {**BASE, "variants": {"a": {}, "bb": {"learning_rate": 1e-3}}, **changes}
  path = tmp_path / name
  path.write_text(json.dumps(doc))
  return str(path)


@pytest.mark.parametrize("ext, text, key", [
  (".json", '{"name": "t", "variants": {"a": {}, "b": {}, "a": {"d_model": 32}}}', "'a'"),
  (".json", '{"name": "t", "name": "u", "variants": {"a": {}}}', "'name'"),
  (".yaml", "name: t\nvariants:\n  a: {}\n  b: {}\n  a: {d_model: 32}\n", "'a'"),
], ids=["json-variant", "json-top-level", "yaml-variant"])
def test_duplicate_keys_refused(tmp_path, ext, text, key):
  if ext == ".yaml":
    pytest.importorskip("yaml")
  path = tmp_path / f"dup{ext}"
  path.write_text(text)
  with pytest.raises(ablate.SpecError, match=f"{key} is given twice") as info:
    ablate.load_spec(str(path))
  assert str(path) in str(info.value)


@pytest.mark.parametrize("doc, match", [
  ({"variants": {"..": {}}}, r"variant name '\.\.'"),
  ({"variants": {".": {}}}, r"variant name '\.'"),
  ({"variants": {".hidden": {}}}, r"variant name '\.hidden'"),
  ({"name": "../../../tmp/x", "variants": {"a": {}}}, r"name '\.\./\.\./\.\./tmp/x'"),
  ({"name": "..", "variants": {"a": {}}}, r"name '\.\.'"),
  ({"name": 7, "variants": {"a": {}}}, "name 7"),
], ids=["dotdot", "dot", "hidden", "spec-name-path", "spec-name-dotdot", "spec-name-number"])
def test_names_that_would_leave_the_output_folder_refused(doc, match):
  with pytest.raises(ablate.SpecError, match=match):
    ablate.parse_spec({**{k: v for k, v in BASE.items() if k != "name"}, **doc}, source="x.toml")


@pytest.mark.parametrize("value", [0, -5, "lots", True, 1.5, None], ids=str)
def test_max_bytes_must_be_a_positive_whole_number(tmp_path, value):
  path = _write_spec(tmp_path, max_bytes=value)
  with pytest.raises(ablate.SpecError, match=r"max_bytes=.* must be a whole number of bytes > 0") \
      as info:
    ablate.load_spec(path)
  assert path in str(info.value)
  assert ablate.load_spec(_write_spec(tmp_path, "ok.json", max_bytes=5e4)).max_bytes == 50_000


def test_batch_size_grad_accum_mismatch_quotes_the_specs_values_and_file(tmp_path):
  path = _write_spec(tmp_path, train={**BASE["train"], "batch_size": 10, "grad_accum": 3})
  with pytest.raises(ablate.SpecError) as info:
    ablate.check_spec(ablate.load_spec(path), trace=False)
  msg = str(info.value)
  assert path in msg and "[train]" in msg and "batch_size=10" in msg and "grad_accum=3" in msg
  assert "batch_size=8" not in msg  # not the TrainConfig default


def test_data_and_tokenizer_resolve_against_the_spec_folder(tmp_path, monkeypatch):
  folder = tmp_path / "specs"
  folder.mkdir()
  path = _write_spec(folder, data="corpus.jsonl", tokenizer="tok/tokenizer.json")
  monkeypatch.chdir(tmp_path)
  spec = ablate.load_spec(os.path.relpath(path))
  assert spec.data == os.path.join("specs", "corpus.jsonl")
  assert spec.tokenizer == os.path.join("specs", "tok/tokenizer.json")
  assert ablate.load_spec(_write_spec(folder, "b.json")).tokenizer == "bytes"


def test_changed_data_is_a_different_run(tmp_path):
  out = str(tmp_path / "demo")
  fit = _fake_fit()
  ablate.run_grid(ablate.load_spec(_write_spec(tmp_path)), out, progress=False, fit=fit)
  assert len(fit.calls) == 2
  ablate.run_grid(ablate.load_spec(_write_spec(tmp_path)), out, progress=False, fit=fit)
  assert len(fit.calls) == 2  # same spec, same data: nothing reruns
  # The demo corpus cut at another max_bytes: other rows, another run.
  with pytest.raises(ablate.SpecError, match=r"differing: \['data.max_bytes', "
                                             r"'data.rows_sha256'\]"):
    ablate.run_grid(ablate.load_spec(_write_spec(tmp_path, max_bytes=50_000)), out,
                    progress=False, fit=fit)
  # A data file whose contents changed under the same name.
  corpus, out = tmp_path / "corpus.jsonl", str(tmp_path / "file")
  corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n  return x + {i}\n"}) + "\n"
                            for i in range(600)))
  spec = _write_spec(tmp_path, data="corpus.jsonl")
  ablate.run_grid(ablate.load_spec(spec), out, progress=False, fit=fit)
  assert len(fit.calls) == 4
  corpus.write_text("".join(json.dumps({"text": f"def g{i}(y):\n  return y * {i}\n"}) + "\n"
                            for i in range(600)))
  with pytest.raises(ablate.SpecError, match=r"differing: \['data.rows_sha256'\]"):
    ablate.run_grid(ablate.load_spec(spec), out, progress=False, fit=fit)
  assert len(fit.calls) == 4


def test_diverging_variant_is_recorded_and_the_grid_goes_on(tmp_path):
  spec = _spec({"a": {}, "bb": {"learning_rate": 1e-3}, "c": {"learning_rate": 2e-3}},
               seeds=[0, 1])
  out, lines = str(tmp_path / "out"), []
  fit = _fake_fit(diverge={("bb", 0)})
  records = ablate.run_grid(spec, out, progress=False, fit=fit, log=lines.append)
  assert len(fit.calls) == 6  # every cell ran
  assert any("variant 'bb' seed 0 diverged at step 2" in line for line in lines), lines
  status = {(r["variant"], r["seed"]): r["status"] for r in records}
  assert status.pop(("bb", 0)) == "diverged" and set(status.values()) == {"done"}
  rows = {r["variant"]: r for r in ablate_report.variant_rows(records, ["a", "bb", "c"], "a")}
  assert rows["bb"]["n"] == 1 and rows["bb"]["mean"] == pytest.approx(2.2 + 0.01)
  md = open(os.path.join(out, "results.md")).read()
  assert "Diverged (left out of the table and the statistics): bb seed 0 at step 2." in md
  ablate.run_grid(spec, out, progress=False, fit=fit)  # recorded: not rerun
  assert len(fit.calls) == 6


def test_corrupt_result_json_named(tmp_path):
  spec, out = _spec({"a": {}}), str(tmp_path / "out")
  ablate.run_grid(spec, out, progress=False, fit=_fake_fit())
  bad = os.path.join(out, "a", "seed0", "result.json")
  with open(bad, "w") as f:
    f.write('{"variant": "a", "val_')
  with pytest.raises(ablate.SpecError, match="result.json: not a valid result.json") as info:
    ablate.run_grid(spec, out, progress=False, fit=_fake_fit())
  assert bad in str(info.value)
  with pytest.raises(ablate.SpecError, match="not valid JSON") as info:
    ablate_report.read_results(out)
  assert bad in str(info.value)


def test_foreign_checkpoint_folder_named(tmp_path):
  spec, out = _spec({"a": {}}), str(tmp_path / "out")
  step = os.path.join(out, "a", "seed0", "checkpoints", "3")
  os.makedirs(step)
  open(os.path.join(step, "weights.bin"), "wb").close()
  fit = _fake_fit()
  with pytest.raises(ablate.SpecError, match="is not a checkpoint of this trainer") as info:
    ablate.run_grid(spec, out, progress=False, fit=fit)
  assert step in str(info.value) and not fit.calls


def test_out_naming_a_file_refused(tmp_path, capsys):
  path = _write_spec(tmp_path)
  (tmp_path / "taken").write_text("x")
  assert cli.main(["ablate", path, "--out", str(tmp_path / "taken"), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "is a file, not a folder" in err and str(tmp_path / "taken") in err


def test_finished_read_only_grid_prints_its_report(tmp_path, capsys, monkeypatch):
  path, out = _write_spec(tmp_path), str(tmp_path / "out")
  ablate.run_grid(ablate.load_spec(path), out, progress=False, fit=_fake_fit())
  assert not os.path.exists(os.path.join(out, ".jax_cache"))
  # Read-only: every write into the folder fails (chmod alone does not stop root).
  real_open, real_access = open, os.access

  def guarded_open(file, mode="r", *a, **k):
    if str(file).startswith(out) and any(c in mode for c in "wax+"):
      raise PermissionError(13, "Permission denied", str(file))
    return real_open(file, mode, *a, **k)

  def refuse(*a, **k):
    raise PermissionError(13, "Permission denied", str(a[0]))

  monkeypatch.setattr("builtins.open", guarded_open)
  monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(out)
                      else real_access(p, m, **k))
  monkeypatch.setattr(os, "replace", refuse)
  assert cli.main(["ablate", path, "--out", out, "--no-progress"]) == 0
  printed = capsys.readouterr().out
  assert "# Ablation: t" in printed and "| bb | learning_rate=0.001 |" in printed


def test_compile_cache_is_the_users_own_never_the_results_folder(tmp_path, monkeypatch):
  import jax

  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    with ablate.compile_cache(log=lambda s: None):
      used = jax.config.jax_compilation_cache_dir
    assert used == str(tmp_path / "cache" / "deepseek_v4" / "jax")
    assert os.stat(used).st_mode & 0o777 == 0o700
    assert jax.config.jax_compilation_cache_dir is None  # restored
    os.chmod(used, 0o777)  # writable by others: not used
    notes = []
    with ablate.compile_cache(log=notes.append):
      assert jax.config.jax_compilation_cache_dir is None
    assert "not a folder only you can write to" in notes[0]
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_spec_module_breaks_the_ablate_report_cycle():
  """ablate -> ablate_report -> ablate_spec, and nothing back (function-level imports included)."""
  import ast

  def imports(module) -> set[str]:
    tree = ast.parse(open(module.__file__).read())
    out = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
      elif isinstance(node, ast.Import):
        out |= {a.name for a in node.names}
    return out

  from deepseek_v4 import ablate_spec

  assert "deepseek_v4.ablate_spec" in imports(ablate_report)
  assert not {"deepseek_v4.ablate", "deepseek_v4.ablate_report"} & imports(ablate_spec)
  assert "deepseek_v4.ablate" not in imports(ablate_report)


# ----- a grid on a device mesh ----------------------------------------------------------
def test_grid_trains_every_variant_on_the_mesh(tmp_path):
  """`run_grid(mesh=, rules=)` (`ablate SPEC --mesh ... --rules ...`) hands every run the mesh,
  its rules and the mesh's MoE (expert parallel under fsdp_ep) through `trainer.fit`."""
  from deepseek_v4 import sharding

  mesh = sharding.make_mesh(data=1, expert=2, devices=__import__("jax").devices()[:2])
  fit = _fake_fit()
  seen = []

  def spy(cfg, tcfg, rows, folder, **kw):
    seen.append((kw["mesh"], kw["rules"], kw["options"].moe.expert_parallel))
    return fit(cfg, tcfg, rows, folder, **kw)

  ablate.run_grid(ablate.parse_spec({**BASE, "variants": {"a": {}, "bb": {"learning_rate": 1e-3}}}),
                  str(tmp_path / "out"), progress=False, fit=spy, mesh=mesh, rules="fsdp_ep")
  assert len(seen) == 2
  assert all(m is mesh and r == "fsdp_ep" and ep is not None for m, r, ep in seen)


def test_ablate_cli_refuses_a_mesh_of_the_wrong_size(tmp_path, capsys):
  spec = _write_spec(tmp_path)
  assert cli.main(["ablate", spec, "--out", str(tmp_path / "o"), "--mesh", "data=3"]) == 2
  assert "--mesh data=3: mesh data=3" in capsys.readouterr().err


@pytest.mark.slow  # ~2 min: the mesh and the one-device step compile
def test_grid_on_a_mesh_equals_the_one_device_grid(tmp_path):
  from deepseek_v4 import sharding
  from tests.tolerances import F32_SHARDED_REL

  spec = _spec({"a": {}})
  one = ablate.run_grid(spec, str(tmp_path / "one"), progress=False)
  mesh = sharding.make_mesh(data=2, devices=__import__("jax").devices()[:2])
  on_mesh = ablate.run_grid(spec, str(tmp_path / "mesh"), progress=False, mesh=mesh, rules="fsdp")
  for key in ("train_loss", "val_loss"):
    a, b = one[0][key], on_mesh[0][key]
    assert abs(a - b) <= F32_SHARDED_REL * abs(a), (key, a, b)
