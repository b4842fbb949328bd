"""Checkpoint defects found by a new user's adversarial pass: corrupt scales and weights that
loaded silently, errors that named no file, a foreign config, a save that wrote an unloadable
folder, and a failed Orbax save that left its temporary folder behind. Each test fails on the
loader as it was before the fix."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import deepseek_v4
from deepseek_v4.checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from deepseek_v4.checkpoint.convert import to_hub_tensors
from deepseek_v4.checkpoint.safetensors_io import list_checkpoint, read_array, read_header, write_file
from deepseek_v4.config_hf import fields_to_hf

EXPERT = "layers.3.ffn.experts.0.w1"


@pytest.fixture(scope="module")
def model(tiny_cfg):
  from tests.hf_oracle import randomize_params

  return randomize_params(deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(5)), 5)


@pytest.fixture(scope="module")
def fp4_folder(model, tmp_path_factory):
  path = tmp_path_factory.mktemp("fp4")
  save_hf_checkpoint(model, path, quantize="fp4-experts")
  return path


def _patch_bytes(folder, key: str, edits: dict[int, int]) -> None:
  """Overwrites bytes of tensor `key` in the folder's single file (offset in the tensor: byte)."""
  file = os.path.join(folder, "model.safetensors")
  info = read_header(file)[0][key]
  raw = bytearray(open(file, "rb").read())
  for offset, value in edits.items():
    raw[info.start + offset] = value
  with open(file, "wb") as f:
    f.write(bytes(raw))


def _copy(src, tmp_path, name="c"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def _hub_folder(folder, cfg, tensors) -> None:
  os.makedirs(folder, exist_ok=True)
  write_file(os.path.join(folder, "model.safetensors"), tensors)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(fields_to_hf(cfg), f)


# ----- corrupt scales and weights ---------------------------------------------------------------
def test_nan_e8m0_scale_is_refused_by_both_loads(fp4_folder, tmp_path):
  folder = _copy(fp4_folder, tmp_path)
  _patch_bytes(folder, f"{EXPERT}.scale", {1: 255})  # row 0, block 1: E8M0 NaN
  where = rf"model\.safetensors: tensor '{EXPERT}\.(scale|weight)'"
  with pytest.raises(CheckpointError, match=where + r".*NaN \(byte 255\)"):
    load_hf_checkpoint(folder, keep_quantized="experts")
  with pytest.raises(CheckpointError, match=where + ".*NaN"):
    load_hf_checkpoint(folder)


def test_overflowing_e8m0_scale_is_refused_by_both_loads(fp4_folder, tmp_path):
  """Byte 254 (2^127) times an E2M1 6 overflows float32: both loads refuse. Over codes that are
  all zero the same scale decodes to zeros, and both loads accept it."""
  folder = _copy(fp4_folder, tmp_path, "over")
  _patch_bytes(folder, f"{EXPERT}.weight", {0: 0x77})  # elements 0 and 1: E2M1 6.0
  _patch_bytes(folder, f"{EXPERT}.scale", {0: 254})
  with pytest.raises(CheckpointError, match=rf"'{EXPERT}\.scale'.*2\^127.*overflow float32"):
    load_hf_checkpoint(folder, keep_quantized="experts")
  with pytest.raises(CheckpointError, match=rf"'{EXPERT}\.weight'.*NaN/inf"):
    load_hf_checkpoint(folder)
  zeros = _copy(fp4_folder, tmp_path, "zeros")
  _patch_bytes(zeros, f"{EXPERT}.weight", {i: 0 for i in range(16)})  # block 0 of row 0
  _patch_bytes(zeros, f"{EXPERT}.scale", {0: 254})
  kept = load_hf_checkpoint(zeros, keep_quantized="experts")
  assert int(np.asarray(kept.layer(3).ffn.experts.w1_scale[...]).view(np.uint8)[0, 0, 0]) == 254
  plain = load_hf_checkpoint(zeros)
  np.testing.assert_array_equal(np.asarray(plain.layer(3).ffn.experts.w1[...])[0, 0, :32], 0)


@pytest.mark.parametrize("bad", [0.0, -2.0, np.nan])
def test_float32_fp8_scale_must_be_positive(model, fp4_folder, tmp_path, bad):
  stored = {k: np.array(read_array(v)) for k, v in list_checkpoint(str(fp4_folder)).items()}
  key = "layers.2.attn.wkv.scale"
  scale = stored[key].astype(np.float32)
  scale[0, 0] = bad
  _hub_folder(tmp_path / "bad", model.cfg, dict(stored, **{key: scale}))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'layers\.2\.attn\.wkv"
                                            r"\.weight'.*float32 scale.*positive power of two"):
    load_hf_checkpoint(tmp_path / "bad")
  # The same scales, valid, in float32: the load equals the E8M0 one.
  ok = dict(stored, **{key: stored[key].astype(np.float32)})
  _hub_folder(tmp_path / "ok", model.cfg, ok)
  a = load_hf_checkpoint(tmp_path / "ok").layer(2).attn.wkv.weight[...]
  b = load_hf_checkpoint(fp4_folder).layer(2).attn.wkv.weight[...]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nan_in_a_float_weight_is_refused(model, tmp_path, dtype):
  tensors = {k: (v.astype(dtype) if v.dtype == np.float32 else v)
             for k, v in to_hub_tensors(model).items()}
  tensors["layers.1.attn_norm.weight"][3] = np.nan
  _hub_folder(tmp_path, model.cfg, tensors)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'layers\.1\.attn_norm"
                                            r"\.weight'.*1 NaN/inf values \(first at \(3,\)"):
    load_hf_checkpoint(tmp_path)


# ----- errors name the file and the official tensor name ----------------------------------------
def test_unexpected_tensor_error_names_the_file(model, tmp_path):
  tensors = to_hub_tensors(model)
  tensors["layers.0.attn.extra.weight"] = np.zeros((2, 2), np.float32)
  save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(fields_to_hf(model.cfg)))
  with pytest.raises(CheckpointError, match=r"unexpected: layers\.0\.attn\.extra\.weight \(2, 2\) "
                                            r"in .*model\.safetensors"):
    load_hf_checkpoint(tmp_path)


def test_bad_expert_ids_name_the_file_and_official_name(model, tmp_path):
  assert model.options.scan_layers  # the leaf is a scanned stack: the message must not use its path
  tensors = to_hub_tensors(model)
  ids = tensors["layers.1.ffn.gate.tid2eid"]
  ids[7, 0] = model.cfg.num_experts
  save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(fields_to_hf(model.cfg)))
  with pytest.raises(CheckpointError) as err:
    load_hf_checkpoint(tmp_path)
  msg = str(err.value)
  assert "model.safetensors: tensor 'layers.1.ffn.gate.tid2eid'" in msg, msg
  assert f"outside [0, {model.cfg.num_experts})" in msg and "groups." not in msg, msg


def test_config_of_another_model_is_refused(model, tmp_path):
  save_hf_checkpoint(model, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v3"}))
  with pytest.raises(CheckpointError, match=r"config\.json: model_type='deepseek_v3' is not "
                                            r"DeepSeek-V4's"):
    load_hf_checkpoint(tmp_path)
  with pytest.raises(ValueError, match="model_type='llama'"):
    deepseek_v4.ModelConfig.from_hf({**config, "model_type": "llama"})


# ----- saves ------------------------------------------------------------------------------------
def test_save_beside_an_adapter_file_is_refused(model, tmp_path):
  adapter = tmp_path / "adapter_model.safetensors"
  save_file({"base_model.lora_A.weight": np.ones((2, 4), np.float32)}, str(adapter))
  before = adapter.read_bytes()
  with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*another folder"):
    save_hf_checkpoint(model, tmp_path)
  assert adapter.read_bytes() == before and not (tmp_path / "model.safetensors").exists()
  save_hf_checkpoint(model, tmp_path / "clean")  # the same save elsewhere loads
  load_hf_checkpoint(tmp_path / "clean")


def test_full_disk_during_orbax_save_leaves_no_partial_folder(tiny_cfg, tmp_path, monkeypatch,
                                                             capfd):
  from etils import epath

  from deepseek_v4.checkpoint.io import Checkpointer

  model = deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(0))
  ck = Checkpointer(tmp_path)
  real = epath.Path.write_text

  def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(self))

  monkeypatch.setattr(epath.Path, "write_text", full)
  with pytest.raises(OSError) as err:
    ck.save(1, model)
  assert err.value.errno == errno.ENOSPC
  assert "checkpoint step 1 was not saved" in str(err.value) and "\n" not in str(err.value)
  assert not [n for n in os.listdir(tmp_path) if "orbax-checkpoint-tmp" in n], os.listdir(tmp_path)
  assert "Traceback" not in capfd.readouterr().err
  monkeypatch.setattr(epath.Path, "write_text", real)
  ck.save(1, model)  # the disk has room again: the same step saves and restores
  assert ck.all_steps() == [1]
  ck.restore(deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(1)))
  ck.close()
