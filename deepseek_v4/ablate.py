"""Architecture ablations: a grid of named variants x seeds over one base config and one data set.

  python -m deepseek_v4 ablate ablations/mtp.toml               # runs, resumes, reports
  python -m deepseek_v4 ablate ablations/mtp.toml --check       # validates the spec only

A spec (TOML, JSON, or YAML when PyYAML is installed) names a base (`preset`, a `[model]` table of
ModelConfig fields, a `[train]` table of TrainConfig fields), the data, the seeds, and the
variants: each a name and the fields it changes, e.g. `mtp_off = { num_mtp_layers = 0 }`; a field
is found by its name in ModelConfig or TrainConfig (`{}` is the base itself). See `ablations/`.

Fairness: every run trains on the same documents for the same number of tokens (a variant may
not change steps, seq_len, batch_size, packing, seed or the validation settings), seed s of every
variant draws the same batches, and all are scored on the same held-out documents.

Every spec is checked before anything runs: unknown fields, values a config refuses, settings
that cannot run together, and a variant whose training step does not trace (its shapes are
checked abstractly with `jax.eval_shape`, no compute) are refused, naming the variant and field.

Output folder: `<variant>/seed<s>/` per run (the trainer's checkpoints, metrics.jsonl, loss.png,
and result.json once finished), then results.csv, results.md and curves.png (`ablate_report`).
Runs go one after another; a finished run (result.json) is never redone, an interrupted one
resumes from its last checkpoint, so rerunning the same command after a kill continues the grid.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
import tomllib
from typing import Any, Callable

from deepseek_v4 import config as config_lib
from deepseek_v4 import data as data_lib
from deepseek_v4 import evaluate, train, trainer
from deepseek_v4.config import ModelConfig
from deepseek_v4.train import TrainConfig

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Run settings every variant shares: equal tokens, data, batches and held-out set for all.
LOCKED_TRAIN_FIELDS = ("steps", "seq_len", "batch_size", "packing", "seed", "val_fraction",
                       "val_documents", "eval_every", "eval_rows")
SPEC_KEYS = ("name", "description", "preset", "data", "max_bytes", "tokenizer", "seeds",
             "baseline", "model", "train", "variants")


class SpecError(ValueError):
  """A spec that cannot run; the message names the variant and field."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed ablation spec.

  Attributes:
    name / description: shown in results.md.
    preset: the base ModelConfig preset; `model` / `train`: base field overrides.
    data: a .txt / .jsonl / folder path (relative to the spec's folder), None = the demo corpus,
      of which `max_bytes` are used.
    tokenizer: "bytes" or a tokenizer.json path.
    seeds: the seeds each variant runs with (TrainConfig.seed: init and batch order).
    baseline: the variant the others are compared with.
    variants: (name, {field: value}) pairs in spec order.
  """

  name: str
  description: str
  preset: str
  model: dict[str, Any]
  train: dict[str, Any]
  data: str | None
  max_bytes: int
  tokenizer: str
  seeds: tuple[int, ...]
  baseline: str
  variants: tuple[tuple[str, dict[str, Any]], ...]

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["variants"] = {name: dict(fields) for name, fields in self.variants}
    d["seeds"] = list(self.seeds)
    return d


# ----- reading ------------------------------------------------------------------------------------
def load_spec(path: str) -> Spec:
  """Reads and parses a .toml / .json / .yaml spec (not yet checked against the configs).

  Raises:
    SpecError: unreadable or malformed spec (missing / unknown keys, bad seeds, no baseline).
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    if path.endswith(".toml"):
      doc = tomllib.loads(raw.decode("utf-8"))
    elif path.endswith(".json"):
      doc = json.loads(raw)
    elif path.endswith((".yaml", ".yml")):
      try:
        import yaml
      except ImportError:
        raise SpecError(f"{path}: a .yaml spec needs PyYAML (pip install pyyaml); or use .toml "
                        "/ .json") from None
      doc = yaml.safe_load(raw)
    else:
      raise SpecError(f"{path}: expected a .toml, .json or .yaml spec")
  except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SpecError(f"{path}: not a valid spec file ({e})") from None
  spec = parse_spec(doc, source=path)
  if spec.data not in (None, "demo") and not os.path.isabs(spec.data):
    spec = dataclasses.replace(spec, data=os.path.join(os.path.dirname(path) or ".", spec.data))
  return spec


def parse_spec(doc: Any, source: str = "spec") -> Spec:
  """A Spec from the parsed document (a dict); the structure is checked, the fields are not."""
  if not isinstance(doc, dict):
    raise SpecError(f"{source}: expected a table of settings, got {type(doc).__name__}")
  unknown = sorted(set(doc) - set(SPEC_KEYS))
  if unknown:
    raise SpecError(f"{source}: unknown key(s) {unknown}; known: {list(SPEC_KEYS)}")
  variants = doc.get("variants")
  if not isinstance(variants, dict) or not variants:
    raise SpecError(f"{source}: 'variants' must be a table of name = {{field = value, ...}}")
  for name, fields in variants.items():
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
      raise SpecError(f"{source}: variant name {name!r} must be letters, digits, _ . + - only "
                      "(it names a folder)")
    if not isinstance(fields, dict):
      raise SpecError(f"{source}: variant {name!r} must be a table of field = value, got "
                      f"{fields!r}")
  seeds = doc.get("seeds", [0])
  if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
      or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
    raise SpecError(f"{source}: seeds={seeds!r} must be a non-empty list of distinct integers "
                    ">= 0")
  baseline = doc.get("baseline", next(iter(variants)))
  if baseline not in variants:
    raise SpecError(f"{source}: baseline={baseline!r} is not a variant; variants: "
                    f"{list(variants)}")
  preset = doc.get("preset", "tiny")
  if preset not in config_lib.PRESETS:
    raise SpecError(f"{source}: preset={preset!r}; known: {sorted(config_lib.PRESETS)}")
  for key in ("model", "train"):
    if not isinstance(doc.get(key, {}), dict):
      raise SpecError(f"{source}: [{key}] must be a table of field = value")
  data = doc.get("data")
  return Spec(name=str(doc.get("name", os.path.splitext(os.path.basename(source))[0])),
              description=str(doc.get("description", "")), preset=preset,
              model=dict(doc.get("model", {})), train=dict(doc.get("train", {})),
              data=None if data in (None, "demo") else str(data),
              max_bytes=int(doc.get("max_bytes", 300_000)),
              tokenizer=str(doc.get("tokenizer", "bytes")), seeds=tuple(seeds),
              baseline=baseline, variants=tuple((k, dict(v)) for k, v in variants.items()))


# ----- checking -----------------------------------------------------------------------------------
def _coerce(current: Any, value: Any) -> Any:
  """A spec value in the field's own type: lists become tuples, integers become floats."""
  if isinstance(value, list):
    return tuple(value)
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _unknown(where: str, name: str) -> SpecError:
  close = difflib.get_close_matches(name, sorted(MODEL_FIELDS | TRAIN_FIELDS), n=3)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  return SpecError(f"{where}: unknown field {name!r} (not a ModelConfig or TrainConfig field)"
                   f"{hint}")


def _apply(cfg: Any, fields: dict[str, Any], where: str) -> Any:
  """`cfg` with `fields` set; on failure each field is tried alone to name the bad one."""
  try:
    return dataclasses.replace(cfg, **{k: _coerce(getattr(cfg, k), v) for k, v in fields.items()})
  except (ValueError, TypeError) as e:
    together = e
  for name, value in fields.items():
    try:
      dataclasses.replace(cfg, **{name: _coerce(getattr(cfg, name), value)})
    except (ValueError, TypeError) as e:
      raise SpecError(f"{where}, field {name!r} = {value!r}: {e}") from None
  raise SpecError(f"{where}, fields {sorted(fields)} together: {together}") from None


def base_configs(spec: Spec) -> tuple[ModelConfig, TrainConfig]:
  """The base ModelConfig (preset + [model]) and TrainConfig ([train])."""
  for table, known in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
    for name in getattr(spec, table):
      if name not in known:
        raise SpecError(f"[{table}]: unknown {'ModelConfig' if table == 'model' else 'TrainConfig'}"
                        f" field {name!r}; known: {sorted(known)}")
  cfg = _apply(config_lib.PRESETS[spec.preset](), spec.model, "[model]")
  return cfg, _apply(TrainConfig(), spec.train, "[train]")


def variant_configs(spec: Spec, name: str) -> tuple[ModelConfig, TrainConfig]:
  """The configs of one variant: the base with the variant's fields (each found by name)."""
  cfg, tcfg = base_configs(spec)
  fields = dict(spec.variants)[name]
  where = f"variant {name!r}"
  model, run = {}, {}
  for field, value in fields.items():
    if field in MODEL_FIELDS:
      model[field] = value
    elif field in TRAIN_FIELDS:
      if field in LOCKED_TRAIN_FIELDS:
        raise SpecError(f"{where}, field {field!r}: every variant shares it (equal tokens, data "
                        f"and held-out set); set it in [train] for all, not per variant")
      run[field] = value
    else:
      raise _unknown(where, field)
  return _apply(cfg, model, where), _apply(tcfg, run, where)


def _trace_step(cfg: ModelConfig, tcfg: TrainConfig) -> None:
  """One training loss traced with abstract values (`jax.eval_shape`): shapes only, no compute."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from deepseek_v4.model import Transformer

  B, T = tcfg.batch_size // tcfg.grad_accum, tcfg.seq_len

  def loss():
    model = Transformer(train.training_model_config(cfg, tcfg), rngs=nnx.Rngs(0))
    ids = jnp.zeros((B, T), jnp.int32)
    return train.loss_fn(model, {"inputs": ids, "targets": ids}, tcfg)[0]

  jax.eval_shape(loss)


def check_spec(spec: Spec, trace: bool = True) -> dict[str, tuple[ModelConfig, TrainConfig]]:
  """Every variant's configs, or a SpecError naming the variant and field that cannot run."""
  base_cfg, base_tcfg = base_configs(spec)
  if not (base_tcfg.val_fraction or base_tcfg.val_documents):
    raise SpecError("[train]: set val_fraction (or val_documents): the results are validation "
                    "losses on held-out documents")
  out = {}
  for name, fields in spec.variants:
    cfg, tcfg = variant_configs(spec, name)
    where = f"variant {name!r}" + (f" (fields {sorted(fields)})" if fields else "")
    entries = tcfg.seq_len // config_lib.CSA_RATIO
    if "csa" in cfg.layer_kinds() and cfg.index_topk > entries:
      raise SpecError(f"{where}, field 'index_topk' = {cfg.index_topk}: larger than the {entries} "
                      f"compressed entries a CSA layer holds at seq_len={tcfg.seq_len} (seq_len / "
                      f"{config_lib.CSA_RATIO}), so the top-k selects nothing; lower it")
    try:
      trainer.check_settings(cfg, tcfg)
      if trace:
        _trace_step(cfg, tcfg)
    except Exception as e:  # noqa: BLE001 - any failure to build or trace means it cannot run
      raise SpecError(f"{where} cannot run: {type(e).__name__}: {trainer_one_line(e)}") from None
    out[name] = (cfg, tcfg)
  return out


def trainer_one_line(e: Exception) -> str:
  text = " ".join(str(e).split())
  return text if len(text) < 400 else text[:397] + "..."


# ----- running ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
  """One cell of the grid."""

  variant: str
  seed: int
  cfg: ModelConfig
  tcfg: TrainConfig

  def folder(self, out_dir: str) -> str:
    return os.path.join(out_dir, self.variant, f"seed{self.seed}")


def plan(spec: Spec, configs: dict[str, tuple[ModelConfig, TrainConfig]]) -> list[Run]:
  """The runs in order: seed-major, so an interrupted grid has whole seeds of every variant."""
  return [Run(v, s, configs[v][0], configs[v][1].replace(seed=s))
          for s in spec.seeds for v, _ in spec.variants]


def _run_identity(run: Run) -> dict:
  return {"variant": run.variant, "seed": run.seed, "model": run.cfg.to_dict(),
          "train": json.loads(json.dumps(dataclasses.asdict(run.tcfg)))}


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # atomic: a kill never leaves a half-written result


def _claim(run: Run, out_dir: str) -> str:
  """'done', 'resume' or 'new'; refuses a folder made by a different configuration."""
  folder = run.folder(out_dir)
  ident_path = os.path.join(folder, "run.json")
  ident = _run_identity(run)
  if os.path.exists(ident_path):
    with open(ident_path) as f:
      old = json.load(f)
    if old != ident:
      diff = sorted(k for part in ("model", "train") for k in ident[part]
                    if old.get(part, {}).get(k) != ident[part][k])
      raise SpecError(f"{folder} holds a run of variant {run.variant!r} with other settings "
                      f"(differing: {diff}); use another output folder or delete it")
  if os.path.exists(os.path.join(folder, "result.json")):
    return "done"
  os.makedirs(folder, exist_ok=True)
  _write_json(ident_path, ident)
  ck = os.path.join(folder, "checkpoints")
  return "resume" if os.path.isdir(ck) and os.listdir(ck) else "new"


def load_data(spec: Spec, configs: dict[str, tuple[ModelConfig, TrainConfig]]):
  """{packing align: (training rows, validation set)}: one load shared by all variants."""
  tok = data_lib.get_tokenizer(spec.tokenizer)
  out = {}
  for name, (cfg, tcfg) in configs.items():
    align = data_lib.packing_align(cfg) if tcfg.packing == "aligned" else 16
    if align not in out:
      out[align] = evaluate.load_split(spec.data, tok, tcfg, align, max_bytes=spec.max_bytes)
    try:
      trainer.check_vocab(cfg, out[align][0])
    except ValueError as e:
      raise SpecError(f"variant {name!r}, field 'vocab_size': {e}") from None
  return out


def _finish(run: Run, folder: str, result: trainer.RunResult) -> dict:
  from deepseek_v4 import ablate_report

  record = {"variant": run.variant, "seed": run.seed, "steps": result.steps,
            "tokens": result.steps * run.tcfg.batch_size * run.tcfg.seq_len,
            "val_loss": result.last_val_loss, "val_bpb": result.last_val_bpb,
            "train_loss": result.last_lm_loss, "tokens_per_s": result.tokens_per_s,
            "wall_s": result.wall_s, **ablate_report.model_costs(run.cfg, run.tcfg)}
  record["train_flops"] = 3.0 * record["flops_per_token"] * record["tokens"]
  _write_json(os.path.join(folder, "result.json"), record)
  return record


def run_grid(spec: Spec, out_dir: str, *, progress: bool = True,
             log: Callable[[str], None] | None = None,
             fit: Callable[..., trainer.RunResult] | None = None) -> list[dict]:
  """Checks the spec, then runs every (variant, seed) not yet finished and writes the report.

  Args:
    spec: the ablation (see `load_spec`).
    out_dir: the output folder (created; an earlier grid there continues).
    progress: a tqdm bar over the grid.
    log: where one-line messages go (default stderr).
    fit: the training function (default `trainer.fit`; tests interrupt it).
  Returns:
    The result record of every run, in grid order.
  """
  from deepseek_v4 import ablate_report

  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  fit = fit or trainer.fit
  configs = check_spec(spec)
  data = load_data(spec, configs)
  runs = plan(spec, configs)
  os.makedirs(out_dir, exist_ok=True)
  states = [_claim(r, out_dir) for r in runs]
  _write_json(os.path.join(out_dir, "spec.json"), spec.to_dict())
  bar = _grid_bar(len(runs), states.count("done"), progress)
  records = []
  try:
    for run, state in zip(runs, states):
      folder = run.folder(out_dir)
      if state == "done":
        with open(os.path.join(folder, "result.json")) as f:
          records.append(json.load(f))
        continue
      align = data_lib.packing_align(run.cfg) if run.tcfg.packing == "aligned" else 16
      rows, val = data[align]
      label = f"{run.variant} seed {run.seed}"

      def show(step, _model, label=label, total=run.tcfg.steps):
        if bar is not None:
          bar.set_postfix_str(f"{label}: step {step}/{total}")

      if state == "resume":
        log(f"{label}: resuming from its last checkpoint")
      result = fit(run.cfg, run.tcfg, rows, folder, resume=state == "resume", progress=False,
                   log=log, callback=show, val=val)
      records.append(_finish(run, folder, result))
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  ablate_report.write_report(out_dir, spec, records)
  return records


def _grid_bar(total: int, done: int, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm

  return tqdm(total=total, initial=done, unit="run", desc="ablation", dynamic_ncols=True,
              file=sys.stderr)


# ----- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("spec", help="ablation spec: .toml, .json (or .yaml with PyYAML)")
  parser.add_argument("--out", metavar="DIR",
                      help="output folder (default runs/ablations/<spec name>); rerunning the "
                           "command continues an interrupted grid there")
  parser.add_argument("--check", action="store_true",
                      help="check the spec (every variant traced abstractly), print the grid, "
                           "run nothing")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
  spec = load_spec(args.spec)
  out = args.out or os.path.join("runs", "ablations", spec.name)
  if args.check:
    configs = check_spec(spec)
    load_data(spec, configs)
    tcfg = next(iter(configs.values()))[1]
    print(f"{spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = "
          f"{len(spec.variants) * len(spec.seeds)} runs of {tcfg.steps} steps x "
          f"{tcfg.batch_size * tcfg.seq_len} tokens; all variants trace. Output: {out}")
    return 0
  with _compile_cache(out):
    run_grid(spec, out, progress=not args.no_progress)
  print(f"results: {os.path.join(out, 'results.md')}  curves: {os.path.join(out, 'curves.png')}")
  with open(os.path.join(out, "results.md")) as f:
    print(f.read())
  return 0


@contextlib.contextmanager
def _compile_cache(out: str):
  """A persistent XLA cache in the output folder while the grid runs: the seeds of a variant
  share their programs (the seed changes no shapes), so only the first seed of each variant
  compiles. The previous settings come back afterwards (the folder may be deleted later, and a
  process-wide cache pointing at a deleted folder aborts later compilations)."""
  import jax

  def reset():  # jax keeps the opened cache object until told to drop it (private API: guarded)
    try:
      from jax._src import compilation_cache
      compilation_cache.reset_cache()
    except Exception:  # noqa: BLE001 - an older/newer jax without it: the settings still apply
      pass

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  reset()
  jax.config.update(keys[0], os.path.join(out, ".jax_cache"))
  jax.config.update(keys[1], 1.0)
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    reset()
