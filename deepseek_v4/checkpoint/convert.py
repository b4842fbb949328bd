"""Official / transformers safetensors <-> our parameter tree (docs/architecture.md#hub-names,
#hf-names).

Our parameter paths ARE the official hub names (`layers.3.attn.wq_a.weight`, `hc_head_fn`,
`mtp.0.e_proj.weight`), so this module maps only stacked leaves: our scanned layers and stacked
experts `layers.N.ffn.experts.w1` [E, F, D] <-> hub `layers.N.ffn.experts.E.w1.weight`.
transformers' names (under an optional `model.` prefix) are mapped to hub names by `names.py`
when the files are listed (`files.hub_tensors`).
Every loaded tensor must be consumed and every expected tensor found with the right shape; all
problems are reported together in one `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import abstract as abstract_lib
from deepseek_v4 import layout, sharding
from deepseek_v4.checkpoint import files as ckpt_files
from deepseek_v4.checkpoint.safetensors_io import CheckpointError
from deepseek_v4.config import ModelConfig
from deepseek_v4.config_hf import fields_to_hf
from deepseek_v4.layers.moe import KeptWeight
from deepseek_v4.layers.params import HashTable, RouterBias
from deepseek_v4.model import Transformer
from deepseek_v4.options import Options

log = logging.getLogger(__name__)

_EXPERT_OURS = re.compile(r"^(?P<pre>.+\.ffn\.experts)\.(?P<w>w[123])(?P<scale>_scale)?$")
_EXPERT_HUB = re.compile(r"^(?P<pre>.+\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
# MTP copies of the shared embedding / head are dropped, as the official convert.py does.
_MTP_SHARED = re.compile(r"^mtp\.\d+\.(emb|embed|head)\b")
_STATE_TYPES = (nnx.Param, RouterBias, HashTable, KeptWeight)


def _leaves(state) -> Iterator[tuple[str, nnx.Variable]]:
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, _STATE_TYPES):
      yield layout.path_name(path), var


def _hub_names(model: Transformer, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """The hub tensors held by our leaf `name`: an object array over the leaf's leading axes that
  index separate tensors (the stacked-layers axis of scanned layers, then the expert axis)."""
  # [(official name, stacked index or None)] in the layer layout the model was built with
  per_layer = layout.official_names(model.cfg, name, model.options.scan_layers)
  stacked = per_layer[0][1] is not None
  rows = []
  for official, _ in per_layer:
    m = _EXPERT_OURS.match(official)
    if m:
      kind = "scale" if m["scale"] else "weight"  # kept FP4 experts: codes and their scales
      rows.append([f"{m['pre']}.{e}.{m['w']}.{kind}" for e in range(shape[int(stacked)])])
    else:
      rows.append([official])
  names = np.empty((len(rows), len(rows[0])), dtype=object)
  for i, row in enumerate(rows):
    names[i, :] = row
  if not _EXPERT_OURS.match(per_layer[0][0]):
    names = names[:, 0]
  return names if stacked else names[0, ...]


def leaf_table(abstract: Transformer) -> dict[str, np.ndarray]:
  """Our leaf path -> the hub names it holds (see `_hub_names`), for every checkpoint leaf."""
  return {name: _hub_names(abstract, name, tuple(var.shape))
          for name, var in _leaves(nnx.state(abstract))}


def expected_tensors(abstract: Transformer) -> dict[str, tuple[tuple[int, ...], str]]:
  """Hub name -> (shape, our leaf path) for every tensor a checkpoint of this model holds."""
  out: dict[str, tuple[tuple[int, ...], str]] = {}
  for name, var in _leaves(nnx.state(abstract)):
    names = _hub_names(abstract, name, tuple(var.shape))
    for hub in names.ravel() if names.ndim else [names.item()]:
      out[hub] = (tuple(var.shape)[names.ndim:], name)
  return out


def to_hub_tensors(model: Transformer) -> dict[str, np.ndarray]:
  """Our parameters under hub names (scanned layers and experts unstacked), as NumPy arrays."""
  out: dict[str, np.ndarray] = {}
  for name, var in _leaves(nnx.state(model)):
    value = np.asarray(jax.device_get(var[...]))
    if isinstance(var, HashTable):
      value = value.astype(np.int64)  # hub and transformers store tid2eid as int64
    names = _hub_names(model, name, value.shape)
    for idx in np.ndindex(names.shape):
      out[names[idx]] = np.ascontiguousarray(value[idx])
  return out


def read_safetensors(path: str, dtype=jnp.float32) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint folder under its canonical (prefix-free) hub name, quantized
  weights dequantized to `dtype` (see `files.hub_tensors` for the lazy, streamed form)."""
  return {k: np.asarray(v) for k, v in ckpt_files.hub_tensors(path, dtype=dtype).items()}


def _where(tensors: dict, name: str) -> str:
  """`file: tensor 'name'` for a tensor read from a file (a `LazyTensor`), else the name."""
  where = getattr(tensors[name], "where", None)
  return where() if callable(where) else repr(name)


def _in_file(tensors: dict, name: str) -> str:
  """` in <file>` for a tensor read from a file (a `LazyTensor`), else nothing."""
  weight = getattr(tensors[name], "weight", None)
  info = getattr(weight, "info", None)
  return f" in {info.file}" if info is not None else ""


def _check(tensors: dict, expected: dict) -> None:
  quantized = sorted(k for k in tensors if k.endswith(".scale") and k[: -6] + ".weight" in tensors
                     and k not in expected)
  if quantized:
    raise CheckpointError(
      f"{_where(tensors, quantized[0])}: {len(quantized)} FP8/FP4 quantization scales come as "
      "tensors of their own, but this model keeps no quantized weights: load the folder with "
      "load_hf_checkpoint (it dequantizes them, or keeps the routed experts with "
      "keep_quantized='experts'), or pass dequantized tensors (docs/architecture.md#fp8-fp4)")
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  misshaped = sorted(
    f"{k}: checkpoint {tuple(tensors[k].shape)}, expected {expected[k][0]}{_in_file(tensors, k)}"
    for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k][0])
  if missing or unexpected or misshaped:
    lines = [f"checkpoint does not match the model ({len(missing)} missing, {len(unexpected)} "
             f"unexpected, {len(misshaped)} mis-shaped tensors)"]
    lines += [f"  missing: {k} {expected[k][0]}" for k in missing]
    lines += [f"  unexpected: {k} {tuple(tensors[k].shape)}{_in_file(tensors, k)}"
              for k in unexpected]
    lines += [f"  mis-shaped: {s}" for s in misshaped]
    raise CheckpointError("\n".join(lines))


def _check_expert_ids(tensors: dict, names: np.ndarray, num_experts: int) -> None:
  """Every hub `tid2eid` a HashTable leaf holds maps tokens to experts in [0, num_experts)."""
  for hub in names.ravel() if names.ndim else [names.item()]:
    v = np.asarray(tensors[hub])
    if v.size and (v.min() < 0 or v.max() >= num_experts):
      raise CheckpointError(f"{_where(tensors, hub)}: expert ids in [{v.min()}, {v.max()}] "
                            f"outside [0, {num_experts}) (n_routed_experts)")


def from_hub_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, mesh=None,
                     rules=None, options: Options = Options()) -> Transformer:
  """A model of `cfg` built with `options` (`Transformer(cfg, options=...)`) holding exactly
  `tensors` (hub names); validates names and shapes.

  With `mesh` (a `sharding.make_mesh` mesh) each tensor goes straight into its shards by the
  `rules` table (default "fsdp"); no device ever holds a whole tensor.
  """
  tensors = {k: v for k, v in tensors.items() if not _MTP_SHARED.match(k)}
  if cfg.num_mtp_layers and not any(k.startswith("mtp.") for k in tensors):
    # transformers has no MTP module, so its save_pretrained writes none (docs/architecture.md#mtp).
    log.warning("checkpoint has no mtp.* tensors: loading without the MTP module")
    cfg = dataclasses.replace(cfg, num_mtp_layers=0)
  abstract = abstract_lib.model(cfg, options=options)
  expected = expected_tensors(abstract)
  _check(tensors, expected)
  graphdef, state = nnx.split(abstract)
  table = leaf_table(abstract)
  flat = dict(nnx.to_flat_state(state))
  placements = None if mesh is None else sharding.flat_shardings(state, mesh, rules or "fsdp")
  for path, var in flat.items():
    name = layout.path_name(path)
    if name not in table:
      continue
    if isinstance(var, HashTable):
      _check_expert_ids(tensors, table[name], cfg.num_experts)
    block = functools.partial(_host_block, tensors, table[name])
    if placements is not None:
      value = sharding.put_host_array(block, var.shape, var.dtype, placements[path])
    else:
      value = jnp.asarray(block(tuple(slice(None) for _ in var.shape)))
    var.set_value(value.astype(var.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _host_block(tensors: dict[str, np.ndarray], names: np.ndarray,
                idx: tuple[slice, ...]) -> np.ndarray:
  """The block `idx` of one of our leaves, read from the hub tensors it holds (`names`, over the
  leaf's leading stacked axes): only the layers and experts inside the block are touched."""
  lead = names.ndim
  rest = tuple(idx[lead:])
  # Index before converting: a lazy (memory-mapped, dequantizing) tensor reads only the block.
  if lead == 0:
    return np.asarray(tensors[names.item()][rest])
  sub = names[tuple(idx[:lead])]
  parts = [np.asarray(tensors[n][rest]) for n in sub.ravel()]
  return np.stack(parts).reshape(sub.shape + parts[0].shape)


def load_hf_checkpoint(path: str | os.PathLike, dtype=jnp.float32,
                       config: ModelConfig | None = None, *, mesh=None, rules=None,
                       num_layers: int | None = None, mtp: bool = True,
                       keep_quantized: str | None = None,
                       options: Options | None = None) -> Transformer:
  """Loads a folder with `config.json` and `*.safetensors` (hub or transformers naming, plain or
  FP8/FP4-quantized as published, docs/architecture.md#fp8-fp4), reading tensor by tensor.

  Args:
    path: the checkpoint folder.
    dtype: compute and matrix storage dtype; norms, mHC, sinks, ape and router bias stay float32.
      Quantized weights are dequantized straight into it (exact for float32 and bfloat16).
    config: use this config instead of the folder's config.json.
    mesh / rules: place every tensor directly into its shards (see `from_hub_tensors`).
    num_layers / mtp: load only the first `num_layers` layers (and the MTP block only if `mtp`);
      the returned model's config says so.
    keep_quantized: None (dequantize everything) or "experts": the routed experts stay in their
      stored FP4 form (codes and scales copied byte for byte, never decoded on the host) and are
      decoded inside the MoE (`Options.keep_quantized`; inference only). The checkpoint's
      experts must be FP4. A shorthand for `options=Options(keep_quantized=...)`.
    options: the model's `Options` (build-time fields: scan_layers, keep_quantized); the
      returned model runs with them by default.
  Returns:
    A ready `Transformer`. Any problem (a corrupt or truncated file, an index that disagrees with
    the files, a scale grid that does not fit, a NaN FP8 value, a tensor the config does not
    expect) raises one `CheckpointError` naming file and tensor; nothing half-loaded is returned.
  """
  path = os.fspath(path)
  cfg = config or ckpt_files.read_config(path)
  name = jnp.dtype(dtype).name
  options = Options() if options is None else options
  if keep_quantized is not None:
    if options.keep_quantized not in (None, keep_quantized):
      raise ValueError(f"keep_quantized={keep_quantized!r} but options.keep_quantized="
                       f"{options.keep_quantized!r}; give it once")
    options = options.replace(keep_quantized=keep_quantized)
  cfg = dataclasses.replace(cfg, dtype=name, param_dtype=name)
  cfg, keep = ckpt_files.layer_subset(cfg, num_layers, mtp)
  tensors = ckpt_files.hub_tensors(path, dtype=dtype, keep=keep,
                                   keep_quantized=options.keep_quantized)
  return from_hub_tensors(cfg, tensors, mesh=mesh, rules=rules, options=options)


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike, *,
                       quantize: str | None = None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `config.json` (transformers form) and the weights under hub names.

  Args:
    quantize: None (weights as the model holds them), "fp8" (every linear the official
      checkpoints quantize, experts included, in FP8 128x128 blocks) or "fp4-experts" (routed
      experts in FP4 1x32 blocks, the other linears FP8): the official format
      (docs/architecture.md#fp8-fp4), with `quantization_config` in config.json.
    max_shard_bytes: files above this are split into `model-0000i-of-0000n.safetensors` shards
      with a `model.safetensors.index.json`.

  The folder ends up holding exactly this checkpoint: an older index and shards are removed
  (files are written to a temporary folder first and swapped in), other files are kept.
  """
  ckpt_files.save_hub_tensors(to_hub_tensors(model), fields_to_hf(model.cfg), os.fspath(path),
                              quantize=quantize, max_shard_bytes=max_shard_bytes)
