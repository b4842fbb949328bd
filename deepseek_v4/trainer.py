"""The training loop around `train.train_step`: data, checkpoints, metrics, loss curve, and the
CPU demo (a tiny V4 trained on the Python standard library's sources, then sampled).

Outputs in `out_dir`: `checkpoints/<step>/` (Orbax), `metrics.jsonl` (one JSON object per logged
step: step, loss, its parts, grad_norm, lr, tokens_per_s, load_imbalance), `loss.png`.

Divergence: a step whose loss or gradient norm is NaN / inf, or far above its running level
(`DivergenceCheck`), stops the run. Before a checkpoint is written, the loss of the parameters it
would hold is measured on the next batch, so a blown-up state is never saved: the checkpoints that
are kept all come from before the divergence, and `fit(..., resume_step=N)` continues from any.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import difflib
import math
import os
import re
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from deepseek_v4 import data as data_lib
from deepseek_v4 import distributed, evaluate, layout, parallel, train
from deepseek_v4.checkpoint.io import Checkpointer
from deepseek_v4.config import ModelConfig
from deepseek_v4.layers import context_parallel
from deepseek_v4.options import Options
from deepseek_v4.sharding import Rules, batch_sharding, get_rules, make_mesh, use


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm blew up; nothing after the last good checkpoint is saved.

  Attributes:
    step: the step at which the divergence was seen.
    resume_step: the latest kept checkpoint (all come from before the divergence), or None.
  """

  def __init__(self, message: str, step: int, resume_step: int | None):
    super().__init__(message)
    self.step, self.resume_step = step, resume_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class DivergenceCheck:
  """When a run counts as diverged, besides a NaN / inf loss or gradient norm.

  The running level of a quantity is the median of its last `window` finite values (a median, so
  one spike does not raise it). After `warm_in` values, a loss above
  `max(loss_factor * level, level + min_rise)` or a gradient norm above `grad_norm_factor * level`
  is a divergence. `inf` turns a check off.

  Attributes:
    loss_factor: allowed ratio of a loss to its running level (> 1).
    min_rise: a loss is never flagged when less than this many nats above its level (>= 0);
      keeps small losses (fine-tuning) from tripping on ordinary batch-to-batch noise.
    grad_norm_factor: allowed ratio of a gradient norm (before clipping) to its level (> 1).
    warm_in: values needed before the level checks start (>= 1).
    window: steps in the running level (>= 1).
  """

  loss_factor: float = 3.0
  min_rise: float = 3.0
  grad_norm_factor: float = 100.0
  warm_in: int = 1
  window: int = 20

  def __post_init__(self):
    for name in ("loss_factor", "grad_norm_factor"):
      v = getattr(self, name)
      if not (isinstance(v, (int, float)) and v > 1):
        raise ValueError(f"{name}={v!r} must be a number > 1 (inf turns the check off)")
    if not (isinstance(self.min_rise, (int, float)) and self.min_rise >= 0):
      raise ValueError(f"min_rise={self.min_rise!r} must be a number >= 0")
    for name in ("warm_in", "window"):
      v = getattr(self, name)
      if not (isinstance(v, int) and v >= 1):
        raise ValueError(f"{name}={v!r} must be an integer >= 1")


class _Levels:
  """Running medians of the recent loss and gradient norm, and the verdict on new values."""

  def __init__(self, check: DivergenceCheck, history: list[dict]):
    self.check = check
    self.loss = collections.deque(maxlen=check.window)
    self.grad_norm = collections.deque(maxlen=check.window)
    for row in history[-check.window:]:
      self.add(row)

  def add(self, m: dict) -> None:
    for name, values in (("loss", self.loss), ("grad_norm", self.grad_norm)):
      if name in m and math.isfinite(m[name]):
        values.append(m[name])

  def problem(self, name: str, value: float) -> str | None:
    """Why `value` (of "loss" / "grad_norm") counts as diverged, or None."""
    if not math.isfinite(value):
      return f"{name}={value}"
    values = self.loss if name == "loss" else self.grad_norm
    if len(values) < self.check.warm_in:
      return None
    level = statistics.median(values)
    if name == "loss":
      limit = max(self.check.loss_factor * level, level + self.check.min_rise)
      rule = f"{self.check.loss_factor:g} x, and at least +{self.check.min_rise:g} over,"
    else:
      limit = self.check.grad_norm_factor * level
      rule = f"{self.check.grad_norm_factor:g} x"
    if value > limit:
      return f"{name}={value:.4g}, above {limit:.4g} ({rule} its running level {level:.4g})"
    return None


@dataclasses.dataclass
class RunResult:
  """Summary of a run: first / last logged loss, steps done, wall time, throughput."""

  steps: int
  first_loss: float | None
  last_loss: float | None
  first_lm_loss: float | None
  last_lm_loss: float | None
  wall_s: float
  tokens_per_s: float
  out_dir: str | None
  losses: list[float]
  model: object = None
  last_val_loss: float | None = None
  last_val_bpb: float | None = None
  throughput_includes_compile: bool = False


class _Progress:
  """tqdm when installed, otherwise a line every few seconds on stderr."""

  def __init__(self, total: int, initial: int, enabled: bool):
    self.bar = None
    self.enabled = enabled
    self.last = 0.0
    if enabled:
      try:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        file=sys.stderr)
      except ImportError:
        pass
    self.total = total

  def update(self, step: int, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix_str(text, refresh=False)
    elif time.time() - self.last > 5 or step == self.total:
      print(f"step {step}/{self.total} {text}", file=sys.stderr, flush=True)
      self.last = time.time()

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _read_metrics(path: str) -> list[dict]:
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_metrics(path: str, rows: list[dict]) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def plot_losses(metrics_path: str, png_path: str) -> bool:
  """Loss curve of a metrics.jsonl as a PNG; False when matplotlib is not installed."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  rows = _read_metrics(metrics_path)
  if not rows:
    return False
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [r["step"] for r in rows]
  ax.plot(steps, [r["loss"] for r in rows], label="total loss")
  if "lm_loss" in rows[0]:
    ax.plot(steps, [r["lm_loss"] for r in rows], label="next-token loss", alpha=0.7)
  evals = [r for r in rows if "val_loss" in r]
  if evals:
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
            label="validation loss (held-out documents)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
  return True


def check_vocab(cfg: ModelConfig, rows: data_lib.PackedRows) -> None:
  top = int(max(rows.inputs.max(), rows.targets.max()))
  if top >= cfg.vocab_size:
    raise ValueError(f"the data holds token id {top} but the model's vocab_size is "
                     f"{cfg.vocab_size}; use a larger vocab_size (--set vocab_size=...)")


def fit(cfg: ModelConfig, tcfg: train.TrainConfig, rows: data_lib.PackedRows,
        out_dir: str | None = None, *, resume: bool = False, resume_step: int | None = None,
        stop_after: int | None = None, progress: bool = True,
        log: Callable[[str], None] | None = None, init_model: Callable | None = None,
        callback: Callable[[int, object], None] | None = None,
        divergence: DivergenceCheck = DivergenceCheck(),
        val: evaluate.ValidationSet | None = None,
        options: Options = Options(), mesh: Mesh | None = None,
        rules: str | Rules | None = None) -> RunResult:
  """Trains for `tcfg.steps` optimizer steps (or until `stop_after`), checkpointing in `out_dir`.

  One loop serves one device and a device mesh of one or many processes: the model is built in
  its shards, each step is `parallel.jit_train_step` of `train.train_step_fn`, and each batch is
  assembled from the rows each process's devices hold (`distributed.global_batch`). The rows
  and their order do not depend on the mesh, so the losses of a mesh run equal the one-device
  run's (up to float reassociation), and a checkpoint resumes on any mesh.

  Args:
    cfg, tcfg: model and run configuration.
    rows: packed training rows (the same on every process: each reads only its share per batch).
    out_dir: output folder (checkpoints, metrics.jsonl, loss.png); None = keep nothing. With
      several processes it must be storage every process sees.
    resume: continue from the latest checkpoint in `out_dir` (model, optimizer, step, data
      position, RNG), producing exactly the losses an uninterrupted run would. `out_dir` must
      exist. The checkpoint may come from another mesh or device count.
    resume_step: continue from this kept checkpoint instead of the latest (implies `resume`);
      the checkpoints after it (of the abandoned run) are deleted.
    stop_after: stop (after saving) once this step is reached, as an interruption would.
    progress: show a progress bar (process 0 only).
    log: where one-line messages go (default: stderr of process 0).
    init_model: optional `fn(model)` applied to the fresh model before the optimizer sees it
      (e.g. loading pre-trained weights for fine-tuning; on a mesh the model is already sharded).
    callback: optional `fn(step, model)` called before each step (1-based step about to run).
    divergence: when the run counts as diverged (see `DivergenceCheck`).
    val: held-out rows (`evaluate.load_split`): their loss and bits per byte are logged (val_loss,
      val_bpb) every `tcfg.eval_every` steps and at the last step, and reported at the end.
    options: the model's `Options` (kernels, attn_block, scan_layers; on a mesh best built once
      with `parallel.options(mesh, rules, ...)`): it is built with them and every step and
      evaluation runs with them. On a mesh, `moe=None` becomes the mesh's MoE (`moe_impl`).
    mesh: the device mesh (`distributed.mesh_and_rules`); None = this process's first device.
    rules: the sharding rule table (or its name) of `mesh`; required with it.
  Raises:
    TrainingDiverged: the loss or gradient norm is NaN / inf or far above its running level;
      checkpoints from before it are kept, the diverged state is never saved.
    CheckpointMismatch: `resume` with a checkpoint of another configuration.
    ValueError: bad data or settings.
  """
  lead = distributed.is_lead()
  log = log or ((lambda s: print(s, file=sys.stderr, flush=True)) if lead else (lambda s: None))
  resume = resume or resume_step is not None
  mesh, rules, options = _placement(mesh, rules, options, tcfg)
  check_settings(cfg, tcfg)
  check_vocab(cfg, rows)
  check_resume(out_dir, resume)
  if len(rows) < tcfg.batch_size:
    log(f"note: {len(rows)} rows < batch_size {tcfg.batch_size}; rows repeat within a batch")
  model = parallel.init_sharded(lambda: train.build_model(cfg, tcfg, options=options), mesh,
                                rules)
  check_freeze(model, tcfg)
  if init_model is not None:
    init_model(model)
  optimizer = train.make_optimizer(model, tcfg)
  step_fn = parallel.jit_train_step(functools.partial(_step, tcfg=tcfg), model, optimizer, mesh,
                                    rules, options=options)
  run = _Run(out_dir, tcfg, log, lead)
  step, data_state, rng = run.start(model, optimizer, resume, resume_step)
  if data_state and data_state.get("num_rows", len(rows)) != len(rows):
    raise ValueError(f"the checkpoint's data position is for {data_state['num_rows']} rows but "
                     f"the data now packs into {len(rows)}: resume with the same data and "
                     "--seq-len / --packing")
  batches = data_lib.Batches(rows, tcfg.batch_size, seed=tcfg.seed, state=data_state)

  def run_step(picks, step, apply: bool) -> dict[str, float]:
    batch = distributed.global_batch(rows, picks, mesh, rules)
    m = step_fn(model, optimizer, batch, jnp.float32(train.mtp_weight_at(tcfg, step)),
                jnp.bool_(apply))
    return {k: float(v) for k, v in jax.device_get(m).items()}

  end = min(tcfg.steps, stop_after) if stop_after is not None else tcfg.steps
  bar = _Progress(tcfg.steps, step, progress and lead)
  speed = _Throughput()
  levels = _Levels(divergence, run.metrics)
  losses = []
  try:
    while step < end:
      picks = batches.next_picks()
      if callback is not None:
        callback(step + 1, model)
      m = run_step(picks, step, True)
      run.check_step(m, step + 1, levels)
      levels.add(m)
      step += 1
      losses.append(m["loss"])
      tokens_per_s = speed.update(m["tokens"])
      bar.update(step, f"loss {m['loss']:.3f} {tokens_per_s:,.0f} tok/s")
      if val is not None and (step % tcfg.eval_every == 0 or step == end):
        with use(mesh, rules):
          m.update(evaluate.evaluate(model, val, tcfg, options, place=functools.partial(
            distributed.global_batch, val.rows, mesh=mesh, rules=rules)))
      if step % tcfg.log_every == 0 or step in (1, end) or "val_loss" in m:
        run.log_metrics(step, m, tokens_per_s)
      if run.ck is not None and (step % tcfg.save_every == 0 or step == end):
        # The parameters about to be saved, measured on the next batch without drawing it or
        # changing anything (the step's own program with apply=False): exactly what step
        # `step + 1` will see, so a state with a sane loss but a NaN gradient is never saved.
        probe = run_step(data_lib.Batches(rows, tcfg.batch_size, seed=tcfg.seed,
                                          state=batches.state()).next_picks(), step, False)
        run.check_before_save(step, probe, levels)
        run.save(step, model, optimizer, {**batches.state(), "num_rows": len(rows)}, rng)
  finally:
    bar.close()
    run.close()
  first, last = (run.metrics[0], run.metrics[-1]) if run.metrics else ({}, {})
  evals = [r for r in run.metrics if "val_loss" in r]
  return RunResult(steps=step, first_loss=first.get("loss"), last_loss=last.get("loss"),
                   first_lm_loss=first.get("lm_loss"), last_lm_loss=last.get("lm_loss"),
                   wall_s=time.time() - run.t_start, tokens_per_s=speed.value, out_dir=out_dir,
                   losses=losses, model=model,
                   last_val_loss=evals[-1]["val_loss"] if evals else None,
                   last_val_bpb=evals[-1]["val_bpb"] if evals else None,
                   throughput_includes_compile=speed.includes_compile)


def _placement(mesh: Mesh | None, rules, options: Options, tcfg: train.TrainConfig):
  """(mesh, rules, options) of a run: this process's first device when `mesh` is None, and on a
  mesh the MoE implementation of the strategy unless `options` names one, and the
  context-parallel layout when the mesh splits the sequence (docs/context_parallel.md)."""
  if mesh is None:
    if rules is not None:
      raise ValueError(f"rules={rules!r} given without a mesh; pass mesh= as well (or neither)")
    return make_mesh(devices=jax.local_devices()[:1]), get_rules("fsdp"), options
  if rules is None:
    raise ValueError("a mesh needs its sharding rules: rules='fsdp', 'fsdp_tp' or 'fsdp_ep'")
  rules = get_rules(rules)
  try:
    batch_sharding(mesh, rules, (tcfg.batch_size, tcfg.seq_len))
  except ValueError as e:
    raise ValueError(f"batch_size={tcfg.batch_size} cannot be split over the batch axes of mesh "
                     f"{dict(mesh.shape)} under rules {rules.name!r}: {e}") from None
  if options.moe is None:
    options = options.replace(moe=parallel.moe_impl(mesh, rules))
  if options.context is None:  # a mesh whose rules split the sequence: context-parallel
    options = options.replace(context=context_parallel.context_parallel_layout(mesh, rules))
  return mesh, rules, options


def _step(model, optimizer, batch, mtp_weight, apply, *, tcfg, options):
  """The training step `fit` jits (`parallel.jit_train_step`): `train.train_step_fn` with the
  update applied only where `apply` (a traced bool: the step and the save-time probe share one
  compiled program)."""
  return train.train_step_fn(model, optimizer, batch, mtp_weight, tcfg, options, apply)


def check_settings(cfg: ModelConfig, tcfg: train.TrainConfig) -> None:
  """Run settings that cannot work with this model, refused before any work."""
  if tcfg.seq_len > cfg.max_position_embeddings:
    raise ValueError(f"seq_len={tcfg.seq_len} is above the model's max_position_embeddings="
                     f"{cfg.max_position_embeddings} (inference would refuse such a sequence); "
                     "use a shorter --seq-len")


def check_resume(out_dir: str | None, resume: bool) -> None:
  """Refuses to resume in an output folder that does not exist (a typo would start afresh)."""
  if resume and out_dir is not None and not os.path.isdir(out_dir):
    raise ValueError(f"--resume: the output folder {out_dir!r} does not exist, so there is no "
                     "run to continue; drop --resume to begin a new run there")


def parameter_names(model) -> list[str]:
  """The official per-layer names of the model's parameters (`layers.7.attn.wq_a.weight`; a
  stacked parameter of scanned layers gives one name per layer), as freeze patterns see them."""
  names = []
  for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names += [n for n, _ in layout.official(model.cfg, path, model.options.scan_layers)]
  return names


def check_freeze(model, tcfg: train.TrainConfig) -> None:
  """Refuses a freeze pattern that matches no parameter name (a typo would train everything).

  Raises:
    ValueError: naming the pattern, with the closest parameter names.
  """
  if not tcfg.freeze:
    return
  names = parameter_names(model)
  for pattern in tcfg.freeze:
    if not any(re.search(pattern, n) for n in names):
      close = difflib.get_close_matches(pattern.replace("\\", ""), names, n=3, cutoff=0.3)
      raise ValueError(f"--freeze '{pattern}' matches no parameter (patterns are searched in "
                       f"names such as {', '.join(close or names[:3])}); fix the pattern")


def frozen_name(tcfg: train.TrainConfig):
  """`fn(official name) -> bool`: whether a trainable parameter's slice of that name is held
  fixed. A stacked parameter of scanned layers trains when any of its layers does, and the
  frozen layers' slices are then zeroed (`train.freeze_mask`); this says which. With LoRA or the
  dense indexer stage nothing inside the trained tensors is held."""
  if tcfg.lora_rank or tcfg.indexer_stage == "dense":
    return lambda name: False
  patterns = train.freeze_patterns(tcfg)  # the one definition of the patterns
  return lambda name: any(p.search(name) for p in patterns)


class _Throughput:
  """Tokens per second, timed from the end of the first step (which includes compilation). With
  a single step there is nothing after it, so that step's own rate is reported, compilation
  included (`includes_compile`), rather than 0."""

  def __init__(self):
    self.t_start = time.time()
    self.t0, self.tokens, self.value = None, 0.0, 0.0
    self.includes_compile = False

  def update(self, tokens: float) -> float:
    if self.t0 is None:
      self.t0 = time.time()
      self.value = tokens / max(self.t0 - self.t_start, 1e-9)
      self.includes_compile = True
    else:
      self.tokens += tokens
      self.value = self.tokens / max(time.time() - self.t0, 1e-9)
      self.includes_compile = False
    return self.value


class _Run:
  """The output folder of a run: checkpoints, metrics.jsonl and loss.png (None: keep nothing)."""

  def __init__(self, out_dir: str | None, tcfg: train.TrainConfig, log: Callable[[str], None],
               lead: bool = True):
    """`lead`: this process writes metrics.jsonl and loss.png (every process writes its own
    shards of each checkpoint)."""
    self.out_dir, self.tcfg, self.log, self.lead = out_dir, tcfg, log, lead
    self.metrics: list[dict] = []
    self.ck = self.metrics_path = None
    self.t_start = time.time()
    if out_dir is not None:
      os.makedirs(out_dir, exist_ok=True)
      self.ck = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=tcfg.keep_checkpoints)
      self.metrics_path = os.path.join(out_dir, "metrics.jsonl")

  def start(self, model, optimizer, resume: bool, resume_step: int | None = None):
    """(step, data position, rng) of a fresh run, or restored from the latest checkpoint (or
    `resume_step`'s, deleting the later ones)."""
    step, data_state, rng = 0, None, jax.random.key(self.tcfg.seed)
    if self.ck is None:
      return step, data_state, rng
    steps = self.ck.all_steps()
    if steps:
      if not resume:
        raise ValueError(f"{self.out_dir!r} already holds checkpoints (latest step "
                         f"{self.ck.latest_step()}); pass --resume to continue, or choose "
                         "another --out")
      if resume_step is not None and resume_step not in steps:
        raise ValueError(f"resume step {resume_step}: no checkpoint of that step in "
                         f"{self.ck.directory!r}; kept steps: {sorted(steps)}")
      meta = self.ck.restore(model, optimizer, step=resume_step, train_config=self.tcfg)
      step, data_state = meta["step"], meta["data_state"]
      rng = rng if meta["rng"] is None else meta["rng"]
      later = sorted(s for s in steps if s > step)
      for s in later:  # the abandoned continuation: the run now continues from `step`
        self.ck.manager.delete(s)
      self.metrics = [r for r in _read_metrics(self.metrics_path) if r["step"] <= step]
      self.log(f"resumed from step {step} ({self.ck.directory})" +
               (f"; deleted the later checkpoints of steps {later}" if later else ""))
    elif resume_step is not None:
      raise ValueError(f"resume step {resume_step}: {self.ck.directory!r} holds no checkpoint")
    elif resume:
      self.log(f"note: {self.out_dir!r} holds no checkpoint yet; starting from step 0")
    distributed.barrier("metrics read")  # every process has the history before it is rewritten
    if self.lead:
      _write_metrics(self.metrics_path, self.metrics)  # drops lines past the restored step
    return step, data_state, rng

  def _diverged(self, step: int, what: str) -> TrainingDiverged:
    """The error, with advice that works: resume from the latest kept checkpoint."""
    steps = sorted(self.ck.all_steps()) if self.ck else []
    if not steps:
      advice = ("no checkpoint had been saved before it, so start again (same --out) with a "
                "lower learning rate")
      return TrainingDiverged(f"{what}. {advice}.", step, None)
    good = steps[-1]
    return TrainingDiverged(
      f"{what}. The last good checkpoint (step {good}) in {self.ck.directory!r} was kept (kept "
      f"steps: {steps}, all from before the divergence). Lower the learning rate (or check the "
      f"data), then continue from step {good}: --resume --resume-step {good} "
      f"(fit(..., resume_step={good})).", step, good)

  def check_step(self, m: dict, step: int, levels: _Levels) -> None:
    """Raises TrainingDiverged when this step's loss or gradient norm blew up."""
    why = [w for w in (levels.problem("loss", m["loss"]),
                       levels.problem("grad_norm", m["grad_norm"])) if w]
    if why:
      raise self._diverged(step, f"training diverged at step {step}: {'; '.join(why)}; stopped "
                                 f"without saving step {step}")

  def check_before_save(self, step: int, probe: dict, levels: _Levels) -> None:
    """Raises TrainingDiverged when the parameters about to be saved as `step` give a blown-up
    loss or gradient norm on the next batch (what step `step + 1` would see)."""
    why = "; ".join(w for w in (levels.problem("loss", probe["loss"]),
                                levels.problem("grad_norm", probe["grad_norm"])) if w)
    if why:
      raise self._diverged(step + 1, f"training diverged at step {step + 1}: the parameters after "
                                     f"step {step} give {why} on the next batch; stopped "
                                     f"without saving step {step}")

  def log_metrics(self, step: int, m: dict, tokens_per_s: float) -> None:
    row = {"step": step, **{k: v for k, v in m.items() if k != "tokens"},
           "tokens_per_s": tokens_per_s, "time_s": time.time() - self.t_start}
    self.metrics.append(row)
    if self.metrics_path and self.lead:
      with open(self.metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")

  def save(self, step: int, model, optimizer, data_state: dict, rng) -> None:
    if self.ck is None:
      return
    # A finite loss was computed before this step's update: check what would be saved.
    if not bool(_all_finite(nnx.state(model, nnx.Param))):
      raise self._diverged(step, f"parameters became NaN / inf at step {step}: not saving")
    self.ck.save(step, model, optimizer, data_state=data_state, rng=rng, train_config=self.tcfg)

  def close(self) -> None:
    if self.ck is not None:
      self.ck.close()
    if self.metrics_path and self.lead:
      plot_losses(self.metrics_path, os.path.join(self.out_dir, "loss.png"))


def summary(result: RunResult) -> str:
  """One line: the held-out loss when there is one, else the first and last training loss; time,
  throughput."""
  if result.first_loss is None:
    return "no step was logged"
  rate = f"{result.tokens_per_s:,.0f} tokens/s" + (
    " (a single step: compilation included)" if result.throughput_includes_compile else "")
  if result.last_val_loss is not None:
    return (f"validation loss {result.last_val_loss:.4f} nats/token ({result.last_val_bpb:.4f} "
            f"bits/byte) after {result.steps} steps (training loss {result.last_loss:.4f}); "
            f"{result.wall_s:.0f} s, {rate}")
  return (f"loss {result.first_loss:.4f} -> {result.last_loss:.4f} (next-token "
          f"{result.first_lm_loss:.4f} -> {result.last_lm_loss:.4f}) after {result.steps} steps; "
          f"{result.wall_s:.0f} s, {rate}")


def sample_text(model, tok, prompt: str, max_new_tokens: int = 200, temperature: float = 0.7,
                seed: int = 0, mesh: Mesh | None = None, rules: str | Rules | None = None) -> str:
  """A continuation of `prompt` from the trained model (the project's decoding loop), cut before
  the end-of-sequence token when one was produced (what follows it in the row is padding). On a
  mesh (`mesh`, `rules`) every process runs the decoding program."""
  from deepseek_v4 import decoding

  ids = np.asarray(tok.encode(prompt), np.int32)[None, :]
  stops = tuple(i for i in (tok.eos_id,) if i is not None and 0 <= i < model.cfg.vocab_size)
  out = decoding.generate(model, ids, max_new_tokens, temperature=temperature, seed=seed,
                          stop_tokens=stops, mesh=mesh, rules=rules)
  return tok.decode(decoding.cut_at_stop(np.asarray(out)[0, ids.shape[1]:], stops))


# ----- the CPU demo -------------------------------------------------------------------------------
def demo_configs(vocab_size: int, steps: int = 500) -> tuple[ModelConfig, train.TrainConfig]:
  """A tiny V4 (every layer kind) and a run that lowers the loss clearly in minutes on 2 cores."""
  from deepseek_v4.config import tiny

  cfg = tiny(vocab_size=vocab_size, compress_ratios=(0, 4, 16), num_hash_layers=1,
             max_position_embeddings=1024)
  tcfg = train.TrainConfig(seq_len=128, batch_size=8, steps=steps, learning_rate=4e-3,
                           warmup_steps=20, decay_fraction=0.2, log_every=10, save_every=100)
  return cfg, tcfg


def demo(out_dir: str | None = "runs/demo", steps: int = 500, progress: bool = True,
         sample_tokens: int = 200) -> RunResult:
  """Trains the demo model on the embedded corpus, prints start/end loss and a sample."""
  tok = data_lib.byte_tokenizer()
  cfg, tcfg = demo_configs(tok.vocab_size, steps)
  rows = data_lib.load_rows(None, tok, tcfg.seq_len)
  result = fit(cfg, tcfg, rows, out_dir, resume=out_dir is not None and os.path.isdir(
    os.path.join(out_dir, "checkpoints")), progress=progress)
  print(summary(result))
  if sample_tokens:
    print("sample:\n" + sample_text(result.model, tok, "def ", sample_tokens))
  return result
