"""`python -m deepseek_v4 convert`: hub <-> Orbax round trips give the same
tensors and logits, published-style FP8 folders convert (and back, byte for byte), partial / bf16 /
sharded conversions, and one `error:` line with exit 2 for each bad input; a failed write leaves
nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import deepseek_v4
from deepseek_v4 import cli
from deepseek_v4.checkpoint import load_hf_checkpoint, save_hf_checkpoint, to_hub_tensors
from deepseek_v4.checkpoint.io import load_model
from tests.hf_oracle import randomize_params

# Sliding, CSA and HCA layers, a hash layer and MTP: every kind of tensor, with a short compile.
CFG = deepseek_v4.tiny(compress_ratios=(0, 4, 16), num_hash_layers=1)


@pytest.fixture(scope="module")
def model():
  return randomize_params(deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(5)), 5)


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
  """A hub folder (with a tokenizer.json) and its Orbax conversion."""
  root = tmp_path_factory.mktemp("convert")
  hub, orbax = str(root / "hub"), str(root / "orbax")
  save_hf_checkpoint(model, hub)
  with open(os.path.join(hub, "tokenizer.json"), "w") as f:
    f.write('{"stand-in": true}')
  assert cli.main(["convert", hub, orbax, "--to", "orbax"]) == 0
  return hub, orbax


def _convert(*argv) -> int:
  return cli.main(["convert", *map(str, argv)])


def _same_state(a, b):
  sa, sb = dict(nnx.to_flat_state(nnx.state(a))), dict(nnx.to_flat_state(nnx.state(b)))
  assert sa.keys() == sb.keys()
  for k in sa:
    x, y = np.asarray(sa[k][...]), np.asarray(sb[k][...])
    assert x.dtype == y.dtype, k
    np.testing.assert_array_equal(x, y, err_msg=str(k))


def _bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _one_error_line(err: str, *needles: str) -> None:
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in err, err
  for needle in needles:
    assert needle in errors[0], (needle, err)


# ----- round trips --------------------------------------------------------------------------------
def test_hub_orbax_hub_round_trip(model, folders, tmp_path, capsys):
  hub, orbax = folders
  loaded = load_model(orbax)
  assert loaded.cfg == model.cfg
  _same_state(model, loaded)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 19)), jnp.int32)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(np.asarray(forward(model, ids)), np.asarray(forward(loaded, ids)))
  assert os.path.isfile(os.path.join(orbax, "tokenizer.json"))

  back = tmp_path / "hub2"
  assert _convert(orbax, back, "--to", "hub") == 0
  printed = capsys.readouterr().out
  assert "safetensors tensors" in printed and " MB" in printed and "done in" in printed
  want = to_hub_tensors(model)
  got = load_file(back / "model.safetensors")
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The same writer on the same tensors: the files are the original ones, byte for byte.
  for name in ("model.safetensors", "config.json", "tokenizer.json"):
    assert _bytes(back / name) == _bytes(os.path.join(hub, name)), name
  assert sorted(os.listdir(tmp_path)) == ["hub2"]  # no temporary folder left behind


def test_quantized_fp8_folder_converts_and_back_byte_for_byte(model, tmp_path, capsys):
  fp8, orbax, back = tmp_path / "fp8", tmp_path / "orbax", tmp_path / "back"
  save_hf_checkpoint(model, fp8, quantize="fp8")
  assert _convert(fp8, orbax, "--to", "orbax") == 0
  assert "FP8/FP4-quantized weights" in capsys.readouterr().out
  _same_state(load_hf_checkpoint(fp8), load_model(orbax))  # the dequantized values, exactly
  assert _convert(orbax, back, "--to", "hub", "--quantize", "fp8") == 0
  assert _bytes(back / "model.safetensors") == _bytes(fp8 / "model.safetensors")
  assert json.loads(_bytes(back / "config.json")) == json.loads(_bytes(fp8 / "config.json"))


def test_bfloat16_first_layers_without_mtp(folders, tmp_path):
  hub, _ = folders
  out = tmp_path / "part"
  assert _convert(hub, out, "--to", "orbax", "--dtype", "bfloat16", "--layers", 2,
                  "--no-mtp") == 0
  part = load_model(out)
  assert part.cfg.compress_ratios == (0, 4) and part.cfg.num_mtp_layers == 0
  assert part.cfg.dtype == part.cfg.param_dtype == "bfloat16"
  full = load_hf_checkpoint(hub, dtype=jnp.bfloat16)
  want = to_hub_tensors(full)
  for k, v in to_hub_tensors(part).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_sharded_conversion(folders, tmp_path, capsys):
  hub, _ = folders
  out = tmp_path / "sharded"
  assert _convert(hub, out, "--to", "orbax", "--mesh", "fsdp=8") == 0
  assert "sharded over fsdp=8 by fsdp" in capsys.readouterr().out
  from deepseek_v4 import sharding

  want = to_hub_tensors(load_hf_checkpoint(hub))
  sharded = load_model(out, mesh=sharding.make_mesh(data=2, fsdp=4), rules="fsdp")
  single = load_model(out)  # this process's first device, whatever mesh wrote it
  assert len(sharded.layer(0).attn.wq_a.weight[...].sharding.device_set) == 8
  assert len(single.layer(0).attn.wq_a.weight[...].sharding.device_set) == 1
  for loaded in (sharded, single):
    for k, v in to_hub_tensors(loaded).items():
      np.testing.assert_array_equal(v, want[k], err_msg=k)
  # Back to hub in a process with one device (Orbax alone would refuse: topology mismatch).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  back = tmp_path / "back"
  done = subprocess.run([sys.executable, "-m", "deepseek_v4", "convert", str(out), str(back),
                         "--to", "hub"], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert _bytes(back / "model.safetensors") == _bytes(os.path.join(hub, "model.safetensors"))


# ----- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
  "quantize-to-orbax", "step-to-orbax", "layers-to-hub", "mesh-to-hub", "rules-without-mesh",
  "layers-too-many", "bad-mesh", "orbax-to-orbax", "hub-to-hub", "neither", "missing",
  "output-is-input", "output-not-empty"])
def test_refusals_name_the_bad_value(folders, tmp_path, capsys, case):
  hub, orbax = folders
  out = tmp_path / "out"
  empty = tmp_path / "empty"
  empty.mkdir()
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("mine")
  argv, needles = {
    "quantize-to-orbax": ([hub, out, "--to", "orbax", "--quantize", "fp8"],
                          ["--quantize fp8", "--to hub only"]),
    "step-to-orbax": ([hub, out, "--to", "orbax", "--step", 0], ["--step 0"]),
    "layers-to-hub": ([orbax, out, "--to", "hub", "--layers", 2], ["--layers 2"]),
    "mesh-to-hub": ([orbax, out, "--to", "hub", "--mesh", "fsdp=8"], ["--mesh fsdp=8"]),
    "rules-without-mesh": ([hub, out, "--to", "orbax", "--rules", "fsdp_ep"],
                           ["--rules fsdp_ep", "--mesh"]),
    "layers-too-many": ([hub, out, "--to", "orbax", "--layers", 9],
                        ["--layers 9", "3 layers"]),
    "bad-mesh": ([hub, out, "--to", "orbax", "--mesh", "fsdp=x"], ["'fsdp=x'"]),
    "orbax-to-orbax": ([orbax, out, "--to", "orbax"], [repr(orbax), "--to hub converts"]),
    "hub-to-hub": ([hub, out, "--to", "hub"], [repr(hub), "--to orbax converts"]),
    "neither": ([empty, out, "--to", "hub"], [repr(str(empty)), "config.json", "step folders"]),
    "missing": ([tmp_path / "nope", out, "--to", "orbax"], [repr(str(tmp_path / "nope"))]),
    "output-is-input": ([hub, os.path.join(hub, "sub"), "--to", "orbax"], ["overlap"]),
    "output-not-empty": ([hub, full, "--to", "orbax"], [repr(str(full)), "--overwrite"]),
  }[case]
  assert _convert(*argv) == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, *needles)
  assert not out.exists() and (full / "keep.txt").read_text() == "mine"
  assert sorted(os.listdir(tmp_path)) == ["empty", "full"]  # nothing written anywhere


def test_bad_to_is_an_argparse_error(folders, tmp_path, capsys):
  hub, _ = folders
  with pytest.raises(SystemExit) as e:
    _convert(hub, tmp_path / "out", "--to", "safetensors")
  assert e.value.code == cli.USAGE_ERROR
  assert "'safetensors'" in capsys.readouterr().err


def test_overwrite_replaces_only_when_complete(folders, tmp_path, monkeypatch, capsys):
  _, orbax = folders
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")

  def failing_save(model, path, **kw):  # dies halfway through writing the new checkpoint
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
      f.write(b"partial")
    raise OSError("No space left on device")

  monkeypatch.setattr("deepseek_v4.checkpoint.save_hf_checkpoint", failing_save)
  assert _convert(orbax, out, "--to", "hub", "--overwrite") == cli.USAGE_ERROR
  _one_error_line(capsys.readouterr().err, "No space left")
  assert sorted(os.listdir(out)) == ["old.txt"] and sorted(os.listdir(tmp_path)) == ["out"]

  monkeypatch.undo()
  assert _convert(orbax, out, "--to", "hub", "--overwrite") == 0
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
  assert sorted(os.listdir(tmp_path)) == ["out"]
