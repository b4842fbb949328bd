"""The file side of hub checkpoints: config.json, folder -> lazy hub tensors, hub tensors -> files.

This is the boundary with `convert.py`'s name mapping: loads produce `{hub name: LazyTensor}`
(dequantized on read), saves take `{hub name: float array}` (from `to_hub_tensors`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np

from deepseek_v4 import config_hf
from deepseek_v4 import quant_codecs as quant
from deepseek_v4.checkpoint import names, reader
from deepseek_v4.checkpoint.safetensors_io import (
  CheckpointError,
  Pending,
  list_checkpoint,
  replace_checkpoint,
  write_checkpoint_files,
)
from deepseek_v4.config import ModelConfig

log = logging.getLogger(__name__)

# The linears the official checkpoints store in FP8 (docs/architecture.md#hub-names, #fp8-fp4);
# routed experts are FP4 ("fp4-experts") or FP8 ("fp8"). Everything else is stored as the model
# holds it.
_FP8_LINEARS = re.compile(r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|"
                          r"ffn\.shared_experts\.w[123]|e_proj|h_proj)\.weight$")
_EXPERTS = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
QUANTIZE = (None, "fp8", "fp4-experts")
_LAYER = re.compile(r"^layers\.(\d+)\.")


def quantization_config(quantize: str) -> dict:
  """The `quantization_config` of config.json that DeepSeek and transformers read."""
  return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
          "expert_dtype": "fp4" if quantize == "fp4-experts" else "fp8"}


# ----- loading ------------------------------------------------------------------------------------
def read_config(path: str) -> ModelConfig:
  """`ModelConfig.from_hf` of a checkpoint folder, with errors that name the file."""
  if os.path.isfile(path):
    raise CheckpointError(f"{path}: is a file; a checkpoint is a folder holding config.json and "
                          f"*.safetensors (e.g. {os.path.dirname(path) or '.'!r})")
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"config file not found: {file!r} (expected a checkpoint folder "
                            "with config.json and *.safetensors)")
  try:
    with open(file, encoding="utf-8") as f:
      hf = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(hf, dict):
    raise CheckpointError(f"{file}: expected a JSON object, got {type(hf).__name__}")
  _check_quantization_config(file, hf.get("quantization_config"))
  hf = {k: v for k, v in hf.items() if k != "quantization_config"}  # read here, not by from_hf
  try:
    return ModelConfig(**config_hf.hf_to_fields(hf))
  except (ValueError, TypeError, KeyError) as e:
    raise CheckpointError(f"{file}: {e}") from e


def _check_quantization_config(file: str, qc) -> None:
  """The weights say how they are stored; the config must not claim a format we would misread."""
  if qc is None:
    return
  if not isinstance(qc, dict):
    raise CheckpointError(f"{file}: quantization_config is not an object: {qc!r}")
  method = qc.get("quant_method", "fp8")
  block = qc.get("weight_block_size", [128, 128])
  if method != "fp8" or list(block or [128, 128]) != [128, 128]:
    raise CheckpointError(f"{file}: quantization_config {qc} is not the DeepSeek format this "
                          "loader reads (quant_method 'fp8', weight_block_size [128, 128])")
  fmt = qc.get("fmt", "e4m3")
  if fmt != "e4m3":
    raise CheckpointError(f"{file}: quantization_config fmt {fmt!r}; only 'e4m3' is read")


def layer_subset(cfg: ModelConfig, num_layers: int | None, mtp: bool
                 ) -> tuple[ModelConfig, Callable[[str], bool]]:
  """The config of the first `num_layers` layers (and MTP only if `mtp`), and the filter of the
  hub names it keeps."""
  full, full_mtp = cfg.num_layers, cfg.num_mtp_layers
  if num_layers is not None:
    if not 1 <= num_layers <= full:
      raise ValueError(f"num_layers={num_layers} outside [1, {full}] (the checkpoint's layers)")
    cfg = dataclasses.replace(cfg, compress_ratios=cfg.compress_ratios[:num_layers],
                              num_hash_layers=min(cfg.num_hash_layers, num_layers))
  if not mtp:
    cfg = dataclasses.replace(cfg, num_mtp_layers=0)
  if cfg.num_layers < full or cfg.num_mtp_layers < full_mtp:
    log.warning("partial load: %d of %d layers%s; the config is adjusted to compress_ratios=%s, "
                "num_hash_layers=%d, num_mtp_layers=%d", cfg.num_layers, full,
                "" if mtp else ", no MTP", cfg.compress_ratios, cfg.num_hash_layers,
                cfg.num_mtp_layers)
  kept = cfg.num_layers
  if kept == full and mtp:
    return cfg, lambda name: True  # a full load: unexpected layers are reported, not dropped

  def keep(name: str) -> bool:
    m = _LAYER.match(name)
    if m:
      return int(m.group(1)) < kept
    return mtp or not name.startswith("mtp.")

  return cfg, keep


def kept_names(keep_quantized: str | None) -> Callable[[str], bool]:
  """The hub names `Options.keep_quantized` keeps as stored (routed experts for "experts")."""
  if keep_quantized is None:
    return lambda name: False
  return lambda name: _EXPERTS.search(name) is not None


def hub_tensors(path: str, *, dtype=jnp.float32, keep: Callable[[str], bool] = lambda n: True,
                keep_quantized: str | None = None) -> dict[str, reader.LazyTensor]:
  """`{hub name: LazyTensor}` of a checkpoint folder (validated; nothing read yet); with
  `keep_quantized` the weights it names come as stored (codes + `.scale`, see `reader`)."""
  return reader.hub_tensors(list_checkpoint(path), names.hub_name, dtype=dtype, keep=keep,
                            kept=kept_names(keep_quantized))


# ----- saving -------------------------------------------------------------------------------------
def stored_tensors(tensors: Mapping[str, np.ndarray], quantize: str | None
                   ) -> dict[str, Pending | np.ndarray]:
  """Hub tensors as they are stored: quantized weights become `.weight` + `.scale` pairs,
  quantized only when written (one tensor in memory at a time)."""
  if quantize not in QUANTIZE:
    raise ValueError(f"quantize={quantize!r}; expected one of {QUANTIZE}")
  out: dict[str, Pending | np.ndarray] = {}
  for name, value in tensors.items():
    fmt = None
    if _EXPERTS.search(name) and name[: -len(".weight")] + ".scale" in tensors:
      # Already stored (a model with keep_quantized experts): FP4 codes + scales as they are.
      if quantize == "fp8":
        raise CheckpointError(f"{name}: the model keeps its experts in FP4; quantize='fp8' would "
                              "need them in FP8 (save with quantize='fp4-experts' or None)")
      out[name] = np.asarray(value).view(np.int8)  # the official I8 packing
      continue
    if quantize is not None and _EXPERTS.search(name):
      fmt = "fp4" if quantize == "fp4-experts" else "fp8"
    elif quantize is not None and _FP8_LINEARS.search(name):
      fmt = "fp8"
    if fmt is None:
      out[name] = value
      continue
    out.update(_quantized_pair(name, value, fmt))
  return out


def _quantized_pair(name: str, value: np.ndarray, fmt: str) -> dict[str, Pending]:
  if value.ndim != 2 or (fmt == "fp4" and value.shape[1] % 2):
    raise CheckpointError(f"{name}: cannot store {list(value.shape)} as {fmt}")
  spec = quant.QuantSpec(fmt, tuple(value.shape))
  cache: dict = {}

  def take(i: int) -> np.ndarray:  # quantized once; dropped when both halves are written
    if "q" not in cache:
      v = np.asarray(value, np.float32)
      if not np.isfinite(v).all():
        raise CheckpointError(f"{name}: holds NaN/inf; refusing to quantize it")
      cache["q"], cache["taken"] = quant.quantize(fmt, v), set()
    out = cache["q"][i]
    cache["taken"].add(i)
    if len(cache["taken"]) == 2:
      cache.clear()
    return out

  w_dtype = np.dtype(quant.ml_dtypes.float8_e4m3fn) if fmt == "fp8" else np.dtype(np.int8)
  scale_name = name[: -len(".weight")] + ".scale"
  return {name: Pending(spec.stored_shape, w_dtype, lambda: take(0)),
          scale_name: Pending(spec.scale_shape, np.dtype(quant.ml_dtypes.float8_e8m0fnu),
                              lambda: take(1))}


def save_hub_tensors(tensors: Mapping[str, np.ndarray], hf_config: dict, path: str, *,
                     quantize: str | None, max_shard_bytes: int) -> None:
  """Writes a hub checkpoint folder (see `convert.save_hf_checkpoint`)."""
  stored = stored_tensors(tensors, quantize)
  config = dict(hf_config)
  if quantize is not None:
    config["quantization_config"] = quantization_config(quantize)

  def write(tmp: str) -> list[str]:
    written = write_checkpoint_files(tmp, stored, max_shard_bytes=max_shard_bytes,
                                   metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    return written + ["config.json"]

  replace_checkpoint(path, write)
