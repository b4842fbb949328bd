"""Ablation specs (see `deepseek_v4.ablate`): reading a .toml / .json / .yaml file, its structure,
and each variant's configs checked against ModelConfig and TrainConfig.

`ablate` (the runner) and `ablate_report` (the report) both import this module; neither imports
the other's internals, so there is no import cycle.

Every refusal is a `SpecError` that names the spec file, the variant and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import tomllib
from typing import Any

from deepseek_v4 import config as config_lib
from deepseek_v4.config import ModelConfig
from deepseek_v4.options import Options
from deepseek_v4.train import TrainConfig

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# Run settings every variant shares: equal tokens, data, batches and held-out set for all.
LOCKED_TRAIN_FIELDS = ("steps", "seq_len", "batch_size", "packing", "seed", "val_fraction",
                       "val_documents", "eval_every", "eval_rows")
SPEC_KEYS = ("name", "description", "preset", "data", "max_bytes", "tokenizer", "seeds",
             "baseline", "model", "train", "options", "variants")
DEFAULT_MAX_BYTES = 300_000
# A variant or spec name becomes a folder name: plain characters, and no leading dot (`.`, `..`
# and hidden folders would leave or hide inside the output folder).
_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*")
_BYTE_TOKENIZERS = (None, "", "bytes", "byte")


class SpecError(ValueError):
  """A spec that cannot run; the message names the file, the variant and the field."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed ablation spec.

  Attributes:
    name / description: shown in results.md; `name` is the default output folder's name.
    preset: the base ModelConfig preset; `model` / `train`: base field overrides.
    data: a .txt / .jsonl / folder path (relative paths resolve against the spec's folder),
      None = the demo corpus, of which `max_bytes` (> 0) are used.
    tokenizer: "bytes" or a tokenizer.json path (resolved like `data`).
    seeds: the seeds each variant runs with (TrainConfig.seed: init and batch order).
    baseline: the variant the others are compared with.
    variants: (name, {field: value}) pairs in spec order.
    options: `deepseek_v4.Options` fields every run uses ([options], e.g. attn_block = 16).
    source: the file the spec came from (named in error messages; not part of `to_dict`).
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
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  source: str = dataclasses.field(default="spec", compare=False)

  def run_options(self) -> Options:
    """The `Options` of every run of the grid (SpecError naming a bad field)."""
    try:
      return Options(**self.options)
    except (TypeError, ValueError) as e:
      raise SpecError(f"{self.source}: [options]: {one_line(e)}") from None

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    del d["source"]
    d["variants"] = {name: dict(fields) for name, fields in self.variants}
    d["seeds"] = list(self.seeds)
    return d


# ----- reading ------------------------------------------------------------------------------------
def _unique_keys(source: str):
  """A json `object_pairs_hook` refusing a key given twice (json keeps the last silently)."""

  def hook(pairs):
    seen = {}
    for key, value in pairs:
      if key in seen:
        raise SpecError(f"{source}: key {key!r} is given twice (the second would silently "
                        "replace the first); give each key once")
      seen[key] = value
    return seen

  return hook


def _load_yaml(raw: bytes, source: str) -> Any:
  try:
    import yaml
  except ImportError:
    raise SpecError(f"{source}: a .yaml spec needs PyYAML (pip install pyyaml); or use .toml "
                    "/ .json") from None

  class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a mapping key given twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
      seen = set()
      for key_node, _ in node.value:
        key = self.construct_object(key_node, deep=True)
        if key in seen:
          raise SpecError(f"{source}, line {key_node.start_mark.line + 1}: key {key!r} is given "
                          "twice (the second would silently replace the first); give each key "
                          "once")
        seen.add(key)
      return super().construct_mapping(node, deep)

  try:
    return yaml.load(raw, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
  except yaml.YAMLError as e:
    raise SpecError(f"{source}: not a valid spec file ({' '.join(str(e).split())})") from None


def _resolve(path: str | None, folder: str) -> str | None:
  if path in _BYTE_TOKENIZERS or path == "demo" or os.path.isabs(path):
    return path
  return os.path.join(folder, path)


def load_spec(path: str) -> Spec:
  """Reads and parses a .toml / .json / .yaml spec (not yet checked against the configs).

  Relative `data` and `tokenizer` paths resolve against the spec's folder (not the current
  directory), so a spec runs the same from anywhere.

  Raises:
    SpecError: unreadable or malformed spec (missing / unknown / repeated keys, bad seeds, names
      or max_bytes, no baseline).
  """
  if os.path.isdir(path):
    raise SpecError(f"{path}: is a folder; expected a .toml, .json or .yaml spec file")
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise SpecError(f"{path}: cannot read the spec ({e.strerror})") from None
  try:
    if path.endswith(".toml"):
      doc = tomllib.loads(raw.decode("utf-8"))  # TOML itself refuses a repeated key
    elif path.endswith(".json"):
      doc = json.loads(raw, object_pairs_hook=_unique_keys(path))
    elif path.endswith((".yaml", ".yml")):
      doc = _load_yaml(raw, path)
    else:
      raise SpecError(f"{path}: expected a .toml, .json or .yaml spec")
  except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SpecError(f"{path}: not a valid spec file ({e})") from None
  spec = parse_spec(doc, source=path)
  folder = os.path.dirname(path) or "."
  return dataclasses.replace(spec, data=_resolve(spec.data, folder),
                             tokenizer=_resolve(spec.tokenizer, folder))


def check_name(name: Any, what: str, source: str) -> str:
  """`name` when it can name a folder inside the output folder, else a SpecError."""
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise SpecError(f"{source}: {what} {name!r} must be letters, digits and _ . + - , not "
                    "starting with '.' (it names a folder inside the output folder)")
  return name


def _max_bytes(value: Any, source: str) -> int:
  if isinstance(value, float) and value.is_integer():
    value = int(value)  # JSON / YAML write 3e5 as a float
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise SpecError(f"{source}: max_bytes={value!r} must be a whole number of bytes > 0")
  return value


def _text(doc: dict, key: str, default: Any, source: str) -> Any:
  value = doc.get(key, default)
  if value is not None and not isinstance(value, str):
    raise SpecError(f"{source}: {key}={value!r} must be a string")
  return value


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
    check_name(name, "variant name", source)
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
  for key in ("model", "train", "options"):
    if not isinstance(doc.get(key, {}), dict):
      raise SpecError(f"{source}: [{key}] must be a table of field = value")
  default_name = os.path.splitext(os.path.basename(source))[0]
  name = doc.get("name", default_name)
  check_name(name, "name" if "name" in doc else f"name (from the file name; set `name`)", source)
  data = _text(doc, "data", None, source)
  return Spec(name=name, description=str(doc.get("description", "")), preset=preset,
              model=dict(doc.get("model", {})), train=dict(doc.get("train", {})),
              data=None if data in (None, "demo") else data,
              max_bytes=_max_bytes(doc.get("max_bytes", DEFAULT_MAX_BYTES), source),
              tokenizer=_text(doc, "tokenizer", "bytes", source) or "bytes", seeds=tuple(seeds),
              baseline=baseline, variants=tuple((k, dict(v)) for k, v in variants.items()),
              options=dict(doc.get("options", {})), source=source)


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
  """`cfg` with `fields` set, or a SpecError naming the bad field(s) with the values they have.

  The error of all fields applied together is the one reported (it quotes the values the run
  would have, e.g. the spec's batch_size, never a default); the fields it names are those of
  `fields` the message mentions, else the one that fails on its own.
  """
  try:
    return dataclasses.replace(cfg, **{k: _coerce(getattr(cfg, k), v) for k, v in fields.items()})
  except (ValueError, TypeError) as e:
    together = " ".join(str(e).split())
  named = [k for k in fields if re.search(rf"\b{re.escape(k)}\b", together)]
  if not named:
    for name, value in fields.items():
      try:
        dataclasses.replace(cfg, **{name: _coerce(getattr(cfg, name), value)})
      except (ValueError, TypeError):
        named = [name]
        break
  if len(named) == 1:
    raise SpecError(f"{where}, field {named[0]!r} = {fields[named[0]]!r}: {together}") from None
  if named:
    given = ", ".join(f"{k} = {fields[k]!r}" for k in named)
    raise SpecError(f"{where}, fields {given}: {together}") from None
  raise SpecError(f"{where}, fields {sorted(fields)} together: {together}") from None


def base_configs(spec: Spec) -> tuple[ModelConfig, TrainConfig]:
  """The base ModelConfig (preset + [model]) and TrainConfig ([train])."""
  for table, known in (("model", MODEL_FIELDS), ("train", TRAIN_FIELDS)):
    for name in getattr(spec, table):
      if name not in known:
        raise SpecError(f"{spec.source}: [{table}]: unknown "
                        f"{'ModelConfig' if table == 'model' else 'TrainConfig'} field {name!r}; "
                        f"known: {sorted(known)}")
  cfg = _apply(config_lib.PRESETS[spec.preset](), spec.model, f"{spec.source}: [model]")
  return cfg, _apply(TrainConfig(), spec.train, f"{spec.source}: [train]")


def variant_configs(spec: Spec, name: str) -> tuple[ModelConfig, TrainConfig]:
  """The configs of one variant: the base with the variant's fields (each found by name)."""
  cfg, tcfg = base_configs(spec)
  fields = dict(spec.variants)[name]
  where = f"{spec.source}: variant {name!r}"
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


def _trace_step(cfg: ModelConfig, tcfg: TrainConfig, options: Options = Options()) -> None:
  """One training loss traced with abstract values (`jax.eval_shape`): shapes only, no compute."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from deepseek_v4 import lora, train

  B, T = tcfg.batch_size // tcfg.grad_accum, tcfg.seq_len

  def loss():  # the model as training builds it, LoRA adapters included
    model = lora.build_model(train.training_model_config(cfg, tcfg), train.lora_spec(tcfg),
                             rngs=nnx.Rngs(0), options=options)
    ids = jnp.zeros((B, T), jnp.int32)
    return train.loss_fn(model, {"inputs": ids, "targets": ids}, tcfg)[0]

  jax.eval_shape(loss)


def one_line(e: Exception) -> str:
  text = " ".join(str(e).split())
  return text if len(text) < 400 else text[:397] + "..."


def check_spec(spec: Spec, trace: bool = True) -> dict[str, tuple[ModelConfig, TrainConfig]]:
  """Every variant's configs, or a SpecError naming the file, variant and field that cannot run."""
  from deepseek_v4 import trainer

  base_cfg, base_tcfg = base_configs(spec)
  spec.run_options()  # a bad [options] field is refused by name
  if not (base_tcfg.val_fraction or base_tcfg.val_documents):
    raise SpecError(f"{spec.source}: [train]: set val_fraction (or val_documents): the results "
                    "are validation losses on held-out documents")
  out = {}
  for name, fields in spec.variants:
    cfg, tcfg = variant_configs(spec, name)
    where = (f"{spec.source}: variant {name!r}" +
             (f" (fields {sorted(fields)})" if fields else ""))
    for kind in dict.fromkeys(cfg.layer_kinds):
      problem = kind.seq_len_problem(cfg, tcfg.seq_len)
      if problem:
        raise SpecError(f"{where}, {problem}")
    try:
      trainer.check_settings(cfg, tcfg)
      if trace:
        _trace_step(cfg, tcfg, spec.run_options())
    except Exception as e:  # noqa: BLE001 - any failure to build or trace means it cannot run
      raise SpecError(f"{where} cannot run: {type(e).__name__}: {one_line(e)}") from None
    out[name] = (cfg, tcfg)
  return out
