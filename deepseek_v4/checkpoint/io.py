"""Our own training checkpoints, with Orbax (`CheckpointManager`).

One checkpoint = one step folder holding
  * `model`: `nnx.state(model)` (parameters, router biases, hash tables),
  * `optimizer`: `nnx.state(optimizer)` (step counter, Muon momenta, AdamW moments),
  * `meta` (JSON): step, data position, RNG key data, the ModelConfig and the TrainConfig.
Saves are atomic (Orbax writes a temporary folder and renames it once complete, so an interrupted
save never shadows the previous one) and only the last `keep` checkpoints are kept. Restoring
checks the saved configs against the current ones first and refuses with the mismatching fields
named. Arrays are restored into the structure (and shardings) of the freshly built model and
optimizer, so they land where the live ones are.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from deepseek_v4.config import ModelConfig
from deepseek_v4.model import Transformer
from deepseek_v4.options import BUILD_FIELDS, Options, drop_former_config_fields

# TrainConfig fields that change the structure of the saved state (which parameters exist or get
# optimizer state); others (learning rate, steps, logging) may change between runs.
STRUCTURAL_TRAIN_FIELDS = ("lora_rank", "lora_targets", "freeze", "indexer_stage")


class CheckpointMismatch(ValueError):
  """A checkpoint was written for another model or training setup."""


def _abstract(tree):
  """ShapeDtypeStructs (with the live arrays' shardings) of a pure-dict state."""
  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(one, tree)


def _jsonable(value):
  if isinstance(value, tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def config_diff(saved: dict, current: dict) -> list[str]:
  """`field: checkpoint X, current Y` for every field that differs (lists == tuples)."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = _jsonable(saved.get(key, "<absent>")), _jsonable(current.get(key, "<absent>"))
    if a != b:
      out.append(f"{key}: checkpoint {a!r}, current {b!r}")
  return out


class Checkpointer:
  """Save / restore model + optimizer + step + data position + RNG in `directory`.

  Args:
    directory: the checkpoint folder (created if missing).
    keep: how many of the most recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    self.directory = os.path.abspath(os.fspath(directory))
    os.makedirs(self.directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, model: Transformer, optimizer: nnx.Optimizer | None = None, *,
           data_state: dict | None = None, rng: jax.Array | None = None,
           train_config: Any = None, extra: dict | None = None) -> None:
    """Writes checkpoint `step` (blocking; atomic)."""
    meta = {
      "step": int(step),
      "data_state": data_state or {},
      "rng": None if rng is None else np.asarray(jax.random.key_data(rng)).tolist(),
      "model_config": model.cfg.to_dict(),
      "options": model.options.build(),  # the build-time fields the saved tree was made with
      "train_config": None if train_config is None else _jsonable(
        dataclasses.asdict(train_config)),
      "extra": extra or {},
    }
    items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model))),
             "meta": ocp.args.JsonSave(meta)}
    if optimizer is not None:
      items["optimizer"] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    try:
      self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)
      self.manager.wait_until_finished()
    except OSError as e:  # a full disk, a vanished folder: no partial step folder is left behind
      removed = self._remove_partial(int(step))
      raise OSError(e.errno, f"checkpoint step {step} was not saved in {self.directory!r}: "
                    f"{e.strerror or e}" + (f" (removed the partial {removed})" if removed else
                                            "")) from e

  def _remove_partial(self, step: int) -> list[str]:
    """Removes the temporary folders Orbax leaves for `step` when a save fails."""
    removed = []
    for name in os.listdir(self.directory):
      if name.startswith(f"{step}.orbax-checkpoint-tmp"):
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        removed.append(name)
    return removed

  def read_meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory!r}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {self.directory!r}; "
                              f"have {self.all_steps()}")
    return step

  def check_compatible(self, meta: dict, cfg: ModelConfig, train_config: Any = None) -> None:
    """Raises CheckpointMismatch naming every differing ModelConfig / structural TrainConfig
    field."""
    # A field added after the checkpoint was written (e.g. keep_quantized) reads as its default,
    # as `restore_model` builds it.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING}
    saved = {**defaults, **drop_former_config_fields(meta["model_config"], self.directory)}
    problems = config_diff(saved, cfg.to_dict())
    if train_config is not None and meta.get("train_config") is not None:
      cur = dataclasses.asdict(train_config)
      saved = meta["train_config"]
      problems += [p for p in config_diff({k: saved.get(k) for k in STRUCTURAL_TRAIN_FIELDS},
                                          {k: cur.get(k) for k in STRUCTURAL_TRAIN_FIELDS})]
    if problems:
      raise CheckpointMismatch(
        f"checkpoint in {self.directory!r} (step {meta['step']}) was written for a different "
        f"configuration; mismatching fields:\n  " + "\n  ".join(problems))

  def restore(self, model: Transformer, optimizer: nnx.Optimizer | None = None,
              step: int | None = None, train_config: Any = None) -> dict:
    """Restores into `model` (and `optimizer`) in place; returns the meta dict with `rng` as a
    key array.

    Raises:
      FileNotFoundError: no (such) checkpoint.
      CheckpointMismatch: the checkpoint's configuration differs from the model's / run's.
    """
    step = self._step(step)
    meta = self.read_meta(step)
    self.check_compatible(meta, model.cfg, train_config)
    built = _saved_options(meta).build()
    if built != model.options.build():
      raise CheckpointMismatch(
        f"checkpoint in {self.directory!r} (step {meta['step']}) holds a model built with "
        f"{built}; this model was built with {model.options.build()} (deepseek_v4.Options): "
        "build it with the checkpoint's")
    mstate = nnx.state(model)
    items = {"model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(mstate))),
             "meta": ocp.args.JsonRestore()}
    if optimizer is not None:
      ostate = nnx.state(optimizer)
      items["optimizer"] = ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(ostate)))
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(mstate, out["model"])
    nnx.update(model, mstate)
    if optimizer is not None:
      nnx.replace_by_pure_dict(ostate, out["optimizer"])
      nnx.update(optimizer, ostate)
    if meta.get("rng") is not None:
      meta["rng"] = jax.random.wrap_key_data(jnp.asarray(meta["rng"], jnp.uint32))
    return meta

  def close(self) -> None:
    self.manager.close()


def restore_model(directory: str | os.PathLike, step: int | None = None, *, mesh=None,
                  rules=None, merge_lora: bool = True,
                  options: Options | None = None) -> tuple[Transformer, dict]:
  """(model, meta) of a training checkpoint folder (latest step, or `step`), built from its saved
  config; no optimizer.

  The arrays land on this process's first device, or in their shards of `mesh` by `rules`
  (`deepseek_v4.sharding`), whatever devices or mesh wrote them: without an explicit target,
  Orbax puts each array back on the devices it was saved from and refuses ("Topology mismatch")
  when this process has fewer. LoRA adapters in the checkpoint are merged into the weights
  (`merge_lora=False` keeps them; needs no mesh), except over routed experts kept as FP4 codes
  (a QLoRA run): merging there would need a lossy requantization, so those experts keep their
  codes and their adapters run unmerged in the forward (`lora.strip_lora(keep_expert_adapters=
  True)`): the restored model computes what the trained one did; `convert --to hub --quantize
  fp4-experts` is the requantizing export. The model is built with `options` (default: the
  build-time fields the checkpoint was saved with, `Options.build`, else `Options()`).
  """
  if (mesh is None) != (rules is None):
    raise ValueError("restore_model: mesh and rules go together")
  from deepseek_v4 import abstract, lora

  ck = Checkpointer(directory)
  try:
    meta = ck.read_meta(step)
    options = options or _saved_options(meta)
    cfg = ModelConfig(**drop_former_config_fields(meta["model_config"], os.fspath(directory)))
    run = meta.get("train_config") or {}
    adapters = bool(run.get("lora_rank"))
    if adapters and mesh is not None:
      raise ValueError(f"{directory}: a LoRA checkpoint restores on one device (mesh=None); "
                       "merge and shard it afterwards")

    model = abstract.model(cfg, options=options,
                           lora=(run["lora_targets"], run["lora_rank"], run["lora_alpha"])
                           if adapters else None)
    state = nnx.state(model)
    if mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            state)
    else:
      from deepseek_v4.sharding import with_shardings

      target = with_shardings(state, mesh, rules)
    out = ck.manager.restore(meta["step"], args=ocp.args.Composite(
      model=ocp.args.StandardRestore(nnx.to_pure_dict(target))))
  finally:
    ck.close()
  nnx.replace_by_pure_dict(state, out["model"])
  nnx.update(model, state)
  if adapters and merge_lora:
    lora.strip_lora(model, keep_expert_adapters=True)
  return model, meta


def _saved_options(meta: dict) -> Options:
  """The build-time options of a checkpoint: saved under "options", or (checkpoints written
  before `Options`) inside the model config."""
  saved = meta.get("options") or meta["model_config"]
  return Options(**{k: saved[k] for k in BUILD_FIELDS if k in saved})


def load_model(directory: str | os.PathLike, step: int | None = None, *, mesh=None,
               rules=None, options: Options | None = None) -> Transformer:
  """The model of a training checkpoint folder (see `restore_model`; LoRA adapters merged)."""
  return restore_model(directory, step, mesh=mesh, rules=rules, options=options)[0]


__all__ = ["Checkpointer", "CheckpointMismatch", "config_diff", "load_model", "restore_model"]
