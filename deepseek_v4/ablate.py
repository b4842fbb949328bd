"""Architecture ablations: a grid of named variants x seeds over one base config and one data set.

  python -m deepseek_v4 ablate ablations/mtp.toml               # runs, resumes, reports
  python -m deepseek_v4 ablate ablations/mtp.toml --check       # validates the spec only

A spec (TOML, JSON, or YAML when PyYAML is installed) names a base (`preset`, a `[model]` table of
ModelConfig fields, a `[train]` table of TrainConfig fields, an optional `[options]` table of
`deepseek_v4.Options` fields every run uses), the data, the seeds, and the
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
A run's identity (run.json) is its configs and its data (a SHA-256 of the packed rows, so another
data file, max_bytes or tokenizer is another run): a folder holding a run of other settings or
data is refused, never reused. A run that diverges is recorded as diverged (named in the log and
in results.md, left out of the statistics) and the grid goes on. Compiled programs are cached in
the user's own cache folder (`compile_cache`), never in the results folder.

The spec format and its checks live in `deepseek_v4.ablate_spec` (re-exported here); the command
line is `deepseek_v4.ablate_cli`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Callable

from deepseek_v4 import ablate_report, evaluate, trainer
from deepseek_v4 import data as data_lib
from deepseek_v4.ablate_spec import (  # noqa: F401 - re-exported: ablate.load_spec etc.
  LOCKED_TRAIN_FIELDS,
  MODEL_FIELDS,
  SPEC_KEYS,
  TRAIN_FIELDS,
  Spec,
  SpecError,
  base_configs,
  check_spec,
  load_spec,
  one_line,
  parse_spec,
  variant_configs,
)
from deepseek_v4.config import ModelConfig
from deepseek_v4.options import drop_former_config_fields
from deepseek_v4.train import TrainConfig


# ----- running ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
  """One cell of the grid."""

  variant: str
  seed: int
  cfg: ModelConfig
  tcfg: TrainConfig
  options: tuple[tuple[str, Any], ...] = ()  # the spec's [options] (field, value) pairs

  def folder(self, out_dir: str) -> str:
    return os.path.join(out_dir, self.variant, f"seed{self.seed}")


def plan(spec: Spec, configs: dict[str, tuple[ModelConfig, TrainConfig]]) -> list[Run]:
  """The runs in order: seed-major, so an interrupted grid has whole seeds of every variant."""
  return [Run(v, s, configs[v][0], configs[v][1].replace(seed=s),
              tuple(spec.options.items()))
          for s in spec.seeds for v, _ in spec.variants]


def _read_json(path: str, what: str) -> Any:
  """A JSON file of the grid, or a SpecError naming it (a truncated or foreign file)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SpecError(f"{path}: not a valid {what} ({e}); delete it (and its run folder "
                    f"{os.path.dirname(path)!r}) to run that cell again") from None


def data_identity(spec: Spec, data: dict) -> dict[int, dict]:
  """{packing align: what the runs of that packing train and are scored on}: a SHA-256 of the
  packed training and validation rows, and max_bytes when the data is the demo corpus (the only
  source it cuts). So the data's contents, max_bytes and the tokenizer all enter a run's
  identity, while moving the files elsewhere does not."""
  out = {}
  for align, (rows, val) in data.items():
    h = hashlib.sha256()
    for part in (rows, val.rows):
      for f in dataclasses.fields(part):
        a = getattr(part, f.name)
        if a is not None:
          h.update(f"{f.name}{a.shape}{a.dtype}".encode())
          h.update(a.tobytes())
    h.update(f"{val.bytes_per_token!r} {val.documents}".encode())
    out[align] = {**({"max_bytes": spec.max_bytes} if spec.data is None else {}),
                  "rows_sha256": h.hexdigest()}
  return out


def _align(run: Run) -> int:
  return data_lib.packing_align(run.cfg) if run.tcfg.packing == "aligned" else 16


def _run_identity(run: Run, data_id: dict) -> dict:
  return {"variant": run.variant, "seed": run.seed, "model": run.cfg.to_dict(),
          **({"options": dict(run.options)} if run.options else {}),
          "train": json.loads(json.dumps(dataclasses.asdict(run.tcfg))),
          "data": data_id[_align(run)]}


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # atomic: a kill never leaves a half-written result


def _check_checkpoints(folder: str) -> bool:
  """True when `folder/checkpoints` holds checkpoints to resume from; a step folder this trainer
  did not write (no `meta` item) is refused by name instead of failing inside Orbax."""
  ck = os.path.join(folder, "checkpoints")
  if not os.path.isdir(ck):
    return False
  steps = [e for e in sorted(os.listdir(ck)) if e.isdigit()]
  for step in steps:
    if not os.path.isdir(os.path.join(ck, step, "meta")):
      raise SpecError(f"{os.path.join(ck, step)} is not a checkpoint of this trainer (it has no "
                      f"'meta' item); remove it, or delete the run folder {folder!r} to run that "
                      "cell from the start")
  return bool(steps)


def _claim(run: Run, out_dir: str, data_id: dict) -> str:
  """'done', 'resume' or 'new'; refuses a folder made by a different configuration or data."""
  folder = run.folder(out_dir)
  ident_path = os.path.join(folder, "run.json")
  ident = _run_identity(run, data_id)
  old = _read_json(ident_path, "run.json") if os.path.exists(ident_path) else None
  if old is not None and isinstance(old.get("model"), dict):
    # Runs written before the run choices moved to `Options` list them in their model config.
    old["model"] = drop_former_config_fields(old["model"], ident_path)
  if old is not None and old != ident:
    diff = []
    for part in ("model", "train", "data"):
      was = old.get(part) if isinstance(old.get(part), dict) else {}
      diff += sorted(f"{part}.{k}" if part == "data" else k for k in {*ident[part], *was}
                     if was.get(k, "-") != ident[part].get(k, "-"))
    raise SpecError(f"{folder} holds a run of variant {run.variant!r} with other settings or "
                    f"data (differing: {diff}); use another output folder or delete it")
  if os.path.exists(os.path.join(folder, "result.json")):
    if old is None:
      raise SpecError(f"{folder} holds a result.json but no run.json saying what produced it; "
                      "delete the folder to run that cell again")
    return "done"
  if old is None:
    os.makedirs(folder, exist_ok=True)
    _write_json(ident_path, ident)
  return "resume" if _check_checkpoints(folder) else "new"


def load_data(spec: Spec, configs: dict[str, tuple[ModelConfig, TrainConfig]]):
  """{packing align: (training rows, validation set)}: one load shared by all variants."""
  try:
    tok = data_lib.get_tokenizer(spec.tokenizer)
  except (OSError, ValueError) as e:
    raise SpecError(f"{spec.source}: tokenizer={spec.tokenizer!r}: {one_line(e)}") from None
  out = {}
  for name, (cfg, tcfg) in configs.items():
    align = data_lib.packing_align(cfg) if tcfg.packing == "aligned" else 16
    if align not in out:
      try:
        out[align] = evaluate.load_split(spec.data, tok, tcfg, align, max_bytes=spec.max_bytes)
      except (OSError, ValueError) as e:
        raise SpecError(f"{spec.source}: data={spec.data or 'demo'!r}: {one_line(e)}") from None
    try:
      trainer.check_vocab(cfg, out[align][0])
    except ValueError as e:
      raise SpecError(f"{spec.source}: variant {name!r}, field 'vocab_size': {e}") from None
  return out


def _finish(run: Run, folder: str, result: trainer.RunResult, val=None) -> dict:
  from deepseek_v4 import speculative

  # Drafting quality of the MTP block (docs/speculative.md): None without MTP or held-out rows.
  accept = (None if val is None or result.model is None else speculative.mtp_acceptance(
    result.model, val.rows.inputs[:run.tcfg.eval_rows]))
  record = {"mtp_acceptance": accept, "variant": run.variant, "seed": run.seed, "status": "done", "steps": result.steps,
            "tokens": result.steps * run.tcfg.batch_size * run.tcfg.seq_len,
            "val_loss": result.last_val_loss, "val_bpb": result.last_val_bpb,
            "train_loss": result.last_lm_loss, "tokens_per_s": result.tokens_per_s,
            "wall_s": result.wall_s, **ablate_report.model_costs(run.cfg, run.tcfg)}
  record["train_flops"] = 3.0 * record["flops_per_token"] * record["tokens"]
  _write_json(os.path.join(folder, "result.json"), record)
  return record


def _diverged(run: Run, folder: str, e: trainer.TrainingDiverged, wall_s: float) -> dict:
  """The record of a run that diverged: kept as a result (rerunning the same settings diverges
  the same way), listed in results.md and left out of the statistics."""
  record = {"variant": run.variant, "seed": run.seed, "status": "diverged", "steps": e.step,
            "tokens": e.step * run.tcfg.batch_size * run.tcfg.seq_len, "val_loss": None,
            "val_bpb": None, "train_loss": None, "tokens_per_s": None, "wall_s": wall_s,
            "error": one_line(e), **ablate_report.model_costs(run.cfg, run.tcfg)}
  record["train_flops"] = 3.0 * record["flops_per_token"] * record["tokens"]
  _write_json(os.path.join(folder, "result.json"), record)
  return record


def check_out_dir(out_dir: str) -> None:
  """Refuses an output path that is a file (or under one)."""
  path = out_dir
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  if path and not os.path.isdir(path):
    raise SpecError(f"--out {out_dir!r}: {path!r} is a file, not a folder; name a folder for "
                    "the grid's results")


def run_grid(spec: Spec, out_dir: str, *, progress: bool = True,
             log: Callable[[str], None] | None = None,
             fit: Callable[..., trainer.RunResult] | None = None, mesh=None, rules=None,
             capacity_factor: float | None = None) -> list[dict]:
  """Checks the spec, then runs every (variant, seed) not yet finished and writes the report.

  A run that diverges (`trainer.TrainingDiverged`) is recorded as diverged (its variant and seed
  named in the log and in results.md) and the grid goes on. A finished grid in a folder that is
  not writable is only read (its report is returned by `ablate_report.markdown`, not rewritten).

  Args:
    spec: the ablation (see `load_spec`).
    out_dir: the output folder (created; an earlier grid there continues).
    progress: a tqdm bar over the grid.
    log: where one-line messages go (default stderr).
    fit: the training function (default `trainer.fit`; tests interrupt it).
    mesh, rules: train every run on this device mesh under these sharding rules (`trainer.fit`);
      None = one device. `capacity_factor`: of the expert-parallel MoE (default dropless).
  Returns:
    The result record of every run, in grid order.
  """
  import time

  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  fit = fit or trainer.fit
  check_out_dir(out_dir)
  configs = check_spec(spec)
  data = load_data(spec, configs)
  data_id = data_identity(spec, data)
  runs = plan(spec, configs)
  options = spec.run_options()
  if mesh is not None:
    from deepseek_v4 import parallel

    options = options.replace(moe=parallel.moe_impl(mesh, rules, capacity_factor=capacity_factor))
  placement = {} if mesh is None else {"mesh": mesh, "rules": rules}
  os.makedirs(out_dir, exist_ok=True)
  states = [_claim(r, out_dir, data_id) for r in runs]
  writable = os.access(out_dir, os.W_OK)
  if not writable and states.count("done") < len(runs):
    raise SpecError(f"{out_dir}: the folder is not writable and {len(runs) - states.count('done')}"
                    " run(s) of the grid are not finished; use another --out")
  spec_path = os.path.join(out_dir, "spec.json")
  spec_doc = json.loads(json.dumps(spec.to_dict()))
  if writable and (not os.path.exists(spec_path) or _read_json(spec_path, "spec.json") != spec_doc):
    _write_json(spec_path, spec_doc)
  bar = _grid_bar(len(runs), states.count("done"), progress)
  records = []
  try:
    for run, state in zip(runs, states):
      folder = run.folder(out_dir)
      if state == "done":
        records.append(_read_json(os.path.join(folder, "result.json"), "result.json"))
        continue
      rows, val = data[_align(run)]
      label = f"{run.variant} seed {run.seed}"

      def show(step, _model, label=label, total=run.tcfg.steps):
        if bar is not None:
          bar.set_postfix_str(f"{label}: step {step}/{total}")

      if state == "resume":
        log(f"{label}: resuming from its last checkpoint")
      t0 = time.time()
      try:
        result = fit(run.cfg, run.tcfg, rows, folder, resume=state == "resume", progress=False,
                     log=log, callback=show, val=val, options=options, **placement)
      except trainer.TrainingDiverged as e:
        records.append(_diverged(run, folder, e, time.time() - t0))
        log(f"variant {run.variant!r} seed {run.seed} diverged at step {e.step}; recorded as "
            f"diverged in {os.path.join(folder, 'result.json')} (delete that folder to run it "
            f"again), going on with the grid. {one_line(e)}")
      else:
        records.append(_finish(run, folder, result, val))
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  if writable:
    ablate_report.write_report(out_dir, spec, records)
  else:
    log(f"{out_dir} is read-only: the finished grid's report was not rewritten")
  return records


def _grid_bar(total: int, done: int, enabled: bool):
  if not enabled:
    return None
  from tqdm import tqdm

  return tqdm(total=total, initial=done, unit="run", desc="ablation", dynamic_ncols=True,
              file=sys.stderr)


def user_cache_dir() -> str:
  """The per-user compilation cache: $XDG_CACHE_HOME (else ~/.cache) /deepseek_v4/jax."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "deepseek_v4", "jax")


def _private_dir(path: str) -> bool:
  """Creates `path` (mode 0700) and says whether only this user can write into it: a cache
  that someone else can write to could hand this process their compiled code."""
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
  except OSError:
    return False
  if not hasattr(os, "getuid"):  # no POSIX owners (Windows): the user's profile folder
    return True
  return st.st_uid == os.getuid() and not st.st_mode & 0o022


@contextlib.contextmanager
def compile_cache(log: Callable[[str], None] | None = None):
  """A persistent XLA cache while the grid runs: the seeds of a variant share their programs
  (the seed changes no shapes), so only the first seed of each variant compiles, and a rerun
  compiles nothing.

  The cache is the user's own (`user_cache_dir`, only used when it belongs to this user and no
  one else can write to it), never the results folder: jax loads compiled executables from it
  without checking who wrote them, and a results folder is shared and copied. A cache the user
  already set (`JAX_COMPILATION_CACHE_DIR` / `jax_compilation_cache_dir`) is kept as it is.
  The previous settings come back afterwards."""
  import jax

  log = log or (lambda s: print(s, file=sys.stderr, flush=True))
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  path = user_cache_dir()
  if not _private_dir(path):
    log(f"note: {path} is not a folder only you can write to; compiling without a persistent "
        "cache")
    yield
    return

  def reset():  # jax keeps the opened cache object until told to drop it (private API: guarded)
    try:
      from jax._src import compilation_cache
      compilation_cache.reset_cache()
    except Exception:  # noqa: BLE001 - an older/newer jax without it: the settings still apply
      pass

  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {k: getattr(jax.config, k) for k in keys}
  reset()
  jax.config.update(keys[0], path)
  jax.config.update(keys[1], 1.0)
  try:
    yield
  finally:
    for k, v in old.items():
      jax.config.update(k, v)
    reset()
