"""Official / transformers safetensors <-> our parameter tree (spec §6.1, §6.3).

Our parameter paths ARE the official hub names (`layers.3.attn.wq_a.weight`, `hc_head_fn`,
`mtp.0.e_proj.weight`), so the table below has only two kinds of rule:
  * stacked experts: our `layers.N.ffn.experts.w1` [E, F, D] <-> hub `layers.N.ffn.experts.E.w1.weight`;
  * prefixes: transformers' `save_pretrained` writes the hub names under an optional `model.`
    prefix (it reverts its own renaming on save); both are read.
Every loaded tensor must be consumed and every expected tensor found with the right shape; all
problems are reported together in one `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4.config import ModelConfig, fields_to_hf
from deepseek_v4.layers.params import HashTable, RouterBias
from deepseek_v4.model import Transformer

log = logging.getLogger(__name__)

_EXPERT_OURS = re.compile(r"^(?P<pre>.+\.ffn\.experts)\.(?P<w>w[123])$")
_EXPERT_HUB = re.compile(r"^(?P<pre>.+\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
# MTP copies of the shared embedding / head are dropped, as the official convert.py does.
_MTP_SHARED = re.compile(r"^mtp\.\d+\.(emb|embed|head)\b")
_STATE_TYPES = (nnx.Param, RouterBias, HashTable)


class CheckpointError(ValueError):
  """A checkpoint does not match the model: lists every missing, unexpected or mis-shaped tensor."""


def _path_name(path) -> str:
  return ".".join(str(p) for p in path)


def _leaves(state) -> Iterator[tuple[str, nnx.Variable]]:
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, _STATE_TYPES):
      yield _path_name(path), var


def expected_tensors(abstract: Transformer) -> dict[str, tuple[tuple[int, ...], str]]:
  """Hub name -> (shape, our leaf path) for every tensor a checkpoint of this model holds."""
  out: dict[str, tuple[tuple[int, ...], str]] = {}
  for name, var in _leaves(nnx.state(abstract)):
    shape = tuple(var.shape)
    m = _EXPERT_OURS.match(name)
    if m:
      for e in range(shape[0]):
        out[f"{m['pre']}.{e}.{m['w']}.weight"] = (shape[1:], name)
    else:
      out[name] = (shape, name)
  return out


def to_hub_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """Our parameters under hub names (experts unstacked), as NumPy arrays."""
  out: dict[str, np.ndarray] = {}
  for name, var in _leaves(nnx.state(model)):
    value = np.asarray(jax.device_get(var[...]))
    m = _EXPERT_OURS.match(name)
    if m:
      for e in range(value.shape[0]):
        out[f"{m['pre']}.{e}.{m['w']}.weight"] = np.ascontiguousarray(value[e])
    elif isinstance(var, HashTable):
      out[name] = value.astype(np.int64)  # hub and transformers store tid2eid as int64
    else:
      out[name] = value
  return out


def _canonical(name: str) -> str:
  return name[len("model."):] if name.startswith("model.") else name


def _safetensor_files(path: str) -> list[str]:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint folder not found: {path!r}")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise FileNotFoundError(f"{index} names shard files that do not exist: {missing}")
    return [os.path.join(path, f) for f in files]
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {path!r}")
  return files


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint folder under its canonical (prefix-free) hub name."""
  from safetensors import safe_open

  tensors: dict[str, np.ndarray] = {}
  for file in _safetensor_files(path):
    with safe_open(file, framework="flax") as f:
      for key in f.keys():
        name = _canonical(key)
        if name in tensors:
          raise CheckpointError(f"tensor {name!r} appears twice (e.g. with and without 'model.')")
        tensors[name] = f.get_tensor(key)
  return tensors


def _check(tensors: dict, expected: dict) -> None:
  quantized = sorted(k for k in tensors if k.endswith(".scale") and k[: -6] + ".weight" in tensors)
  if quantized:
    raise CheckpointError(
      f"checkpoint holds {len(quantized)} FP8/FP4 quantization scales (e.g. {quantized[0]!r}); "
      "quantized checkpoints are not supported yet: dequantize them first (spec §6.2)")
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  misshaped = sorted(
    f"{k}: checkpoint {tuple(tensors[k].shape)}, expected {expected[k][0]}"
    for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k][0])
  if missing or unexpected or misshaped:
    lines = [f"checkpoint does not match the model ({len(missing)} missing, {len(unexpected)} "
             f"unexpected, {len(misshaped)} mis-shaped tensors)"]
    lines += [f"  missing: {k} {expected[k][0]}" for k in missing]
    lines += [f"  unexpected: {k} {tuple(tensors[k].shape)}" for k in unexpected]
    lines += [f"  mis-shaped: {s}" for s in misshaped]
    raise CheckpointError("\n".join(lines))


def _abstract(cfg: ModelConfig) -> Transformer:
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def from_hub_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Transformer:
  """A model of `cfg` holding exactly `tensors` (hub names); validates names and shapes."""
  tensors = {k: v for k, v in tensors.items() if not _MTP_SHARED.match(k)}
  if cfg.num_mtp_layers and not any(k.startswith("mtp.") for k in tensors):
    # transformers has no MTP module, so its save_pretrained writes none (spec §2.6).
    log.warning("checkpoint has no mtp.* tensors: loading without the MTP module")
    cfg = dataclasses.replace(cfg, num_mtp_layers=0)
  abstract = _abstract(cfg)
  expected = expected_tensors(abstract)
  _check(tensors, expected)
  graphdef, state = nnx.split(abstract)
  by_leaf: dict[str, list[str]] = {}
  for hub, (_, leaf) in expected.items():
    by_leaf.setdefault(leaf, []).append(hub)
  flat = dict(nnx.to_flat_state(state))
  for path, var in flat.items():
    name = _path_name(path)
    if name not in by_leaf:
      continue
    m = _EXPERT_OURS.match(name)
    if m:
      value = jnp.stack([jnp.asarray(tensors[f"{m['pre']}.{e}.{m['w']}.weight"])
                         for e in range(var.shape[0])])
    else:
      value = jnp.asarray(tensors[name])
    if isinstance(var, HashTable):
      v = np.asarray(value)
      if v.min() < 0 or v.max() >= cfg.num_experts:
        raise CheckpointError(f"{name}: expert ids in [{v.min()}, {v.max()}] outside "
                              f"[0, {cfg.num_experts})")
    var.set_value(value.astype(var.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf_checkpoint(path: str | os.PathLike, dtype=jnp.float32,
                       config: ModelConfig | None = None) -> Transformer:
  """Loads a folder with `config.json` and `*.safetensors` (hub or transformers naming).

  Args:
    path: the checkpoint folder.
    dtype: compute and matrix storage dtype; norms, mHC, sinks, ape and router bias stay float32.
    config: use this config instead of the folder's config.json.
  Returns:
    A ready `Transformer`.
  """
  path = os.fspath(path)
  name = jnp.dtype(dtype).name
  cfg = config or ModelConfig.from_hf(path)
  cfg = dataclasses.replace(cfg, dtype=name, param_dtype=name)
  return from_hub_tensors(cfg, read_safetensors(path))


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike) -> None:
  """Writes `config.json` (transformers form) and `model.safetensors` under hub names."""
  from safetensors.numpy import save_file

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = to_hub_tensors(model)
  # safetensors.numpy has no bfloat16 writer that round-trips everywhere: store such leaves as f32.
  tensors = {k: (v.astype(np.float32) if v.dtype == jnp.bfloat16 else v) for k, v in
             tensors.items()}
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(fields_to_hf(model.cfg), f, indent=2)
