"""Hub checkpoints as files: official FP8/FP4 checkpoints written by an independent quantizer and
writer (torch's safetensors), in hub and transformers naming, sharded with an index; quantized
saves and their byte-identical round trip; one consistent checkpoint per folder;
clear errors naming file and tensor for corrupt files, configs and dtypes; partial loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4.checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from deepseek_v4.checkpoint import files as ckpt_files
from deepseek_v4.checkpoint.convert import from_hub_tensors, to_hub_tensors
from deepseek_v4.config_hf import fields_to_hf
from tests.test_quant import np_decode_fp4, np_decode_fp8, ref_quantize_fp4, ref_quantize_fp8

torch = pytest.importorskip("torch")

# Which hub tensors the official checkpoints quantize (docs/architecture.md#hub-names), written out
# independently.
_FP8 = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123]|"
                  r"mtp\.\d+\.[eh]_proj)\.weight$")
_FP4 = re.compile(r"\.experts\.\d+\.w[123]\.weight$")
_QCFG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
         "weight_block_size": [128, 128]}

# hub -> transformers' in-memory names (docs/architecture.md#hf-names), applied in order.
_HUB_TO_HF = [(re.compile(a), b) for a, b in [
  (r"^embed\.weight$", "model.embed_tokens.weight"), (r"^head\.weight$", "lm_head.weight"),
  (r"^norm\.weight$", "model.norm.weight"), (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
  (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
  (r"\.hc_attn_(fn|base|scale)$", r".attn_hc.\1"), (r"\.hc_ffn_(fn|base|scale)$", r".ffn_hc.\1"),
  (r"\.attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
  (r"\.attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
  (r"\.attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
  (r"\.attn\.attn_sink$", ".self_attn.sinks"), (r"\.attn\.", ".self_attn."),
  (r"\.wq_a\.", ".q_a_proj."), (r"\.q_norm\.", ".q_a_norm."), (r"\.wq_b\.", ".q_b_proj."),
  (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."),
  (r"\.wo_b\.", ".o_b_proj."), (r"\.ape$", ".position_bias"),
  (r"\.compressor\.norm\.", ".compressor.kv_norm."), (r"\.indexer\.norm\.", ".indexer.kv_norm."),
  (r"\.ffn\.gate\.bias$", ".mlp.gate.e_score_correction_bias"), (r"\.ffn\.", ".mlp."),
  (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
  (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
  (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
  (r"^layers\.", "model.layers."),
]]


def _hf_name(hub: str) -> str:
  for pattern, repl in _HUB_TO_HF:
    hub = pattern.sub(repl, hub)
  return hub


def write_official(folder, cfg, tensors: dict[str, np.ndarray], *, naming="hub", shards=3,
                   experts="fp4") -> dict[str, np.ndarray]:
  """Quantizes `tensors` as DeepSeek publishes them and writes them with torch's safetensors over
  `shards` files + index; returns the float32 values an exact decoder must give back."""
  os.makedirs(folder, exist_ok=True)
  stored, decoded = {}, {}
  for name, value in tensors.items():
    value = np.asarray(value)
    if _FP4.search(name) and experts == "fp4":
      q, s = ref_quantize_fp4(value.astype(np.float32))
      decoded[name] = np_decode_fp4(q, s).astype(np.float32)
      stored[name], stored[name[:-6] + "scale"] = torch.from_numpy(q), torch.from_numpy(s)
    elif _FP8.search(name) or _FP4.search(name):
      q, s = ref_quantize_fp8(value.astype(np.float32))
      decoded[name] = np_decode_fp8(q, s).astype(np.float32)
      stored[name] = torch.from_numpy(q).view(torch.float8_e4m3fn)
      stored[name[:-6] + "scale"] = torch.from_numpy(s)
    else:
      decoded[name] = value
      stored[name] = torch.from_numpy(np.array(value))
  for k, v in list(stored.items()):
    if k.endswith(".scale"):
      stored[k] = v.view(torch.float8_e8m0fnu)
  if naming == "hf":
    stored = _to_hf(stored)
    decoded = {k: v for k, v in decoded.items() if not k.startswith("mtp.")}
  keys = sorted(stored)
  weight_map = {}
  for i in range(shards):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: stored[k].contiguous() for k in keys[i::shards]}
    from safetensors.torch import save_file

    save_file(part, os.path.join(folder, file), metadata={"format": "pt"})
    weight_map.update({k: file for k in part})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**fields_to_hf(cfg), "quantization_config": _QCFG}, f)
  return decoded


def _to_hf(stored):
  """transformers' names: `.weight_scale_inv` scales, stacked `gate_up_proj` / `down_proj` experts
  (with their `_scale_inv`), no MTP."""
  out, experts = {}, {}
  for k, v in stored.items():
    if k.startswith("mtp."):
      continue
    m = re.match(r"^(.+\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$", k)
    if m:
      experts.setdefault((m[1], m[4]), {})[(int(m[2]), m[3])] = v
      continue
    if k.endswith(".scale"):
      out[_hf_name(k[:-6] + ".weight") + "_scale_inv"] = v
    else:
      out[_hf_name(k)] = v
  for (pre, kind), d in experts.items():
    n = 1 + max(e for e, _ in d)
    suffix = "_scale_inv" if kind == "scale" else ""
    base = _hf_name(pre)
    out[f"{base}.gate_up_proj{suffix}"] = torch.stack(
      [torch.cat([d[(e, "w1")], d[(e, "w3")]]) for e in range(n)])
    out[f"{base}.down_proj{suffix}"] = torch.stack([d[(e, "w2")] for e in range(n)])
  return out


@pytest.fixture(scope="module")
def model(tiny_cfg):
  from tests.hf_oracle import randomize_params

  return randomize_params(deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(5)), 5)


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, ids: m(ids))


def _ids(cfg, T=19):
  return jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, T)), jnp.int32)


def _files(folder) -> dict[str, bytes]:
  out = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      out[name] = f.read()
  return out


# ----- official quantized checkpoints in --------------------------------------------------------
@pytest.mark.parametrize("naming", ["hub", "hf"])
def test_official_quantized_checkpoint_loads_bit_for_bit(model, forward, tmp_path, naming):
  decoded = write_official(tmp_path, model.cfg, to_hub_tensors(model), naming=naming)
  lazy = ckpt_files.hub_tensors(str(tmp_path))
  assert set(lazy) == set(decoded)
  for name, want in decoded.items():  # every tensor, bit for bit
    got = np.asarray(lazy[name])
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  loaded = load_hf_checkpoint(tmp_path)
  ref = from_hub_tensors(loaded.cfg, decoded)  # the model of the dequantized float weights
  ids = _ids(model.cfg)
  np.testing.assert_array_equal(np.asarray(forward(loaded, ids)), np.asarray(forward(ref, ids)))
  assert loaded.cfg.num_mtp_layers == (1 if naming == "hub" else 0)


def test_quantized_load_in_bfloat16_is_exact(model, tmp_path):
  decoded = write_official(tmp_path, model.cfg, to_hub_tensors(model), experts="fp8", shards=2)
  lazy = ckpt_files.hub_tensors(str(tmp_path), dtype=jnp.bfloat16)
  for name in ["layers.0.attn.wq_a.weight", "layers.3.ffn.experts.5.w2.weight", "mtp.0.e_proj.weight"]:
    got = jnp.asarray(lazy[name])  # dequantized by JAX straight into bfloat16
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), decoded[name])


# ----- quantized checkpoints out ------------------------------------------------------------------
@pytest.mark.parametrize("quantize", ["fp4-experts", "fp8", None])
def test_save_load_save_is_byte_identical(model, tmp_path, quantize):
  a, b = tmp_path / "a", tmp_path / "b"
  save_hf_checkpoint(model, a, quantize=quantize, max_shard_bytes=200_000)
  first = _files(a)
  assert "model.safetensors.index.json" in first and len(first) > 3  # sharded
  loaded = load_hf_checkpoint(a)
  save_hf_checkpoint(loaded, b, quantize=quantize, max_shard_bytes=200_000)
  assert _files(b) == first
  config = json.loads(first["config.json"])
  listing = ckpt_files.list_checkpoint(str(a))
  if quantize is None:
    assert "quantization_config" not in config
    assert listing["layers.0.attn.wq_a.weight"].dtype == "F32"
    return
  assert config["quantization_config"]["expert_dtype"] == ("fp4" if quantize == "fp4-experts" else "fp8")
  assert listing["layers.0.attn.wq_a.weight"].dtype == "F8_E4M3"
  assert listing["layers.0.attn.wq_a.scale"].dtype == "F8_E8M0"
  assert listing["layers.2.attn.compressor.wkv.weight"].dtype == "F32"  # not quantized
  expert = listing["layers.3.ffn.experts.1.w1.weight"]
  assert expert.dtype == ("I8" if quantize == "fp4-experts" else "F8_E4M3")
  # The saved values decode (independently) to what the model now holds.
  hub = to_hub_tensors(loaded)
  from deepseek_v4.checkpoint.safetensors_io import read_array

  w = read_array(listing["layers.3.ffn.experts.1.w1.weight"])
  s = read_array(listing["layers.3.ffn.experts.1.w1.scale"]).view(np.uint8)
  dec = np_decode_fp4(w, s) if quantize == "fp4-experts" else np_decode_fp8(w.view(np.uint8), s)
  np.testing.assert_array_equal(dec.astype(np.float32), hub["layers.3.ffn.experts.1.w1.weight"])


def test_bfloat16_model_is_stored_and_read_as_bf16(model, tmp_path):
  bf16 = load_hf_checkpoint(_saved(model, tmp_path / "a"), dtype=jnp.bfloat16)
  save_hf_checkpoint(bf16, tmp_path / "b")
  listing = ckpt_files.list_checkpoint(str(tmp_path / "b"))
  assert listing["embed.weight"].dtype == "BF16" and listing["layers.0.hc_attn_fn"].dtype == "F32"
  again = to_hub_tensors(load_hf_checkpoint(tmp_path / "b", dtype=jnp.bfloat16))
  for k, v in to_hub_tensors(bf16).items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


def _saved(model, folder):
  save_hf_checkpoint(model, folder)
  return folder


# ----- one consistent checkpoint per folder -------------------------------------
def test_save_over_a_sharded_checkpoint_replaces_it(model, tmp_path):
  from tests.hf_oracle import randomize_params

  other = randomize_params(deepseek_v4.Transformer(model.cfg, rngs=nnx.Rngs(6)), 6)
  save_hf_checkpoint(other, tmp_path, max_shard_bytes=100_000)  # an older, sharded checkpoint
  (tmp_path / "tokenizer.json").write_text("{}")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
  save_hf_checkpoint(model, tmp_path)  # one file now
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
  loaded = load_hf_checkpoint(tmp_path)
  hub, want = to_hub_tensors(loaded), to_hub_tensors(model)
  for k in want:
    np.testing.assert_array_equal(hub[k], want[k], err_msg=k)
  save_hf_checkpoint(other, tmp_path, max_shard_bytes=100_000)  # and back to shards
  assert "model.safetensors" not in os.listdir(tmp_path)
  hub = to_hub_tensors(load_hf_checkpoint(tmp_path))
  np.testing.assert_array_equal(hub["head.weight"], to_hub_tensors(other)["head.weight"])


def test_index_and_files_must_agree(model, tmp_path):
  save_hf_checkpoint(model, tmp_path, max_shard_bytes=100_000)
  index = tmp_path / "model.safetensors.index.json"
  data = json.loads(index.read_text())
  # A stray single-file checkpoint next to the index (what an old save left behind).
  first = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[0]
  (tmp_path / "model.safetensors").write_bytes((tmp_path / first).read_bytes())
  with pytest.raises(CheckpointError, match=r"model\.safetensors.*not named by"):
    load_hf_checkpoint(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  # The index places a tensor in a shard that does not hold it.
  moved = next(k for k, v in data["weight_map"].items() if v != first)
  bad = dict(data, weight_map={**data["weight_map"], moved: first})
  index.write_text(json.dumps(bad))
  with pytest.raises(CheckpointError, match=re.escape(first)) as e:
    load_hf_checkpoint(tmp_path)
  assert moved in str(e.value)
  # The index forgets a tensor that a shard holds.
  index.write_text(json.dumps(dict(data, weight_map={k: v for k, v in data["weight_map"].items()
                                                      if k != moved})))
  with pytest.raises(CheckpointError, match="does not place") as e:
    load_hf_checkpoint(tmp_path)
  assert moved in str(e.value)


# ----- errors that name the file and tensor --------------------------------------------------------
def test_a_file_corrupt_files_and_bad_config_are_named(model, tmp_path):
  save_hf_checkpoint(model, tmp_path)
  file = tmp_path / "model.safetensors"
  with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*is a file"):
    load_hf_checkpoint(file)
  raw = file.read_bytes()
  file.write_bytes(raw[: len(raw) // 2])  # truncated
  with pytest.raises(CheckpointError, match=re.escape(str(file)) + r".*tensor '.*'.*truncated"):
    load_hf_checkpoint(tmp_path)
  file.write_bytes(np.random.default_rng(0).bytes(5000))  # random bytes
  with pytest.raises(CheckpointError, match=re.escape(str(file)) + ".*not a safetensors file"):
    load_hf_checkpoint(tmp_path)
  file.write_bytes(raw[:5])
  with pytest.raises(CheckpointError, match=re.escape(str(file))):
    load_hf_checkpoint(tmp_path)
  file.write_bytes(raw)
  (tmp_path / "config.json").write_text('{"vocab_size": 512,')
  with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json")) + ".*JSON"):
    load_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
  with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json"))):
    load_hf_checkpoint(tmp_path)


def _write_hub(folder, cfg, tensors):
  from deepseek_v4.checkpoint.safetensors_io import write_file

  os.makedirs(folder, exist_ok=True)
  write_file(os.path.join(folder, "model.safetensors"), tensors)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(fields_to_hf(cfg), f)


def test_integer_weights_and_float_expert_ids_are_refused(model, tmp_path):
  tensors = to_hub_tensors(model)
  bad = dict(tensors, **{"layers.1.attn.wq_a.weight": tensors["layers.1.attn.wq_a.weight"].astype(np.int32)})
  _write_hub(tmp_path / "a", model.cfg, bad)
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'layers\.1\.attn\.wq_a\.weight'.*I32"):
    load_hf_checkpoint(tmp_path / "a")
  bad = dict(tensors, **{"layers.0.ffn.gate.tid2eid": tensors["layers.0.ffn.gate.tid2eid"].astype(np.float32)})
  _write_hub(tmp_path / "b", model.cfg, bad)
  with pytest.raises(CheckpointError, match=r"tid2eid.*F32.*refusing"):
    load_hf_checkpoint(tmp_path / "b")
  ok = dict(tensors, **{"layers.0.ffn.gate.tid2eid": tensors["layers.0.ffn.gate.tid2eid"].astype(np.int32)})
  _write_hub(tmp_path / "c", model.cfg, ok)  # any integer width of expert ids is fine
  load_hf_checkpoint(tmp_path / "c")


def test_nan_fp8_value_and_misfit_scale_grid_are_named(model, tmp_path):
  save_hf_checkpoint(model, tmp_path, quantize="fp4-experts")
  from deepseek_v4.checkpoint.safetensors_io import read_header

  file = str(tmp_path / "model.safetensors")
  info = read_header(file)[0]["layers.2.attn.wkv.weight"]
  raw = bytearray(open(file, "rb").read())
  raw[info.start + 7] = 0x7F  # an E4M3 NaN
  open(file, "wb").write(bytes(raw))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'layers\.2\.attn\.wkv\.weight'.*NaN"):
    load_hf_checkpoint(tmp_path)
  from deepseek_v4.checkpoint.safetensors_io import list_checkpoint, read_array

  stored = {k: np.array(read_array(v)) for k, v in list_checkpoint(str(tmp_path)).items()}
  stored["layers.2.attn.wkv.weight"] = np.zeros_like(stored["layers.2.attn.wkv.weight"])
  stored["layers.2.attn.wkv.scale"] = np.concatenate([stored["layers.2.attn.wkv.scale"]] * 2, 1)
  _write_hub(tmp_path / "g", model.cfg, stored)
  with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.wkv\.scale.*scale grid \[1, 2\] does not fit"):
    load_hf_checkpoint(tmp_path / "g")


def test_config_with_quantization_config_of_another_format_is_refused(model, tmp_path):
  save_hf_checkpoint(model, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [64, 64]}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"config\.json.*weight_block_size"):
    load_hf_checkpoint(tmp_path)


# ----- partial loads ----------------------------------------------------------------------------
def test_first_k_layers(model, tmp_path, caplog):
  write_official(tmp_path, model.cfg, to_hub_tensors(model))
  part = load_hf_checkpoint(tmp_path, num_layers=3, mtp=False)
  assert part.cfg.compress_ratios == model.cfg.compress_ratios[:3]
  assert part.cfg.num_mtp_layers == 0 and part.cfg.num_hash_layers == 3
  assert "partial load: 3 of 6 layers" in caplog.text
  full = ckpt_files.hub_tensors(str(tmp_path))
  got = to_hub_tensors(part)
  assert not any(k.startswith(("layers.3.", "mtp.")) for k in got)
  for k, v in got.items():
    np.testing.assert_array_equal(v, np.asarray(full[k]), err_msg=k)
  with pytest.raises(ValueError, match="num_layers=7"):
    load_hf_checkpoint(tmp_path, num_layers=7)


# ----- bounded memory -----------------------------------------------------------------------------
_RSS_SCRIPT = r"""
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
import deepseek_v4
from deepseek_v4.checkpoint import load_hf_checkpoint
from deepseek_v4.checkpoint.files import hub_tensors
path = sys.argv[1]
cfg = deepseek_v4.ModelConfig.from_hf(path)
jnp.ones(4).block_until_ready()
lazy = hub_tensors(path)
def status(key):
  for line in open("/proc/self/status"):
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
  f.write("5")  # restart the peak (VmHWM) from the current RSS
m = load_hf_checkpoint(path)
peak, after = status("VmHWM"), status("VmRSS")
from flax import nnx
leaves = [v for v in jax.tree.leaves(nnx.state(m))]
print(json.dumps({"base": base, "peak": peak, "after": after, "model": sum(x.nbytes for x in leaves),
                  "largest_leaf": max(x.nbytes for x in leaves),
                  "largest_tensor": max(int(np.prod(t.shape)) * 4 for t in lazy.values())}))
"""


def test_streamed_load_peak_memory(tmp_path):
  """A 16-file FP8/FP4 checkpoint of an 85 MiB (float32) model loads tensor by tensor: the peak
  RSS exceeds the RSS the loaded model finally holds by less than 2x its largest leaf (the
  stacked experts of one layer, or of two with scanned layers), i.e. the checkpoint is never staged whole in host memory. The
  rest of the growth is the model itself plus a fixed cost (first-use tracing and compilation)."""
  cfg = deepseek_v4.tiny(d_model=256, num_heads=4, head_dim=128, q_lora_rank=128, o_lora_rank=128,
                         index_head_dim=64, moe_inter_dim=256, vocab_size=4096, num_experts=8,
                         compress_ratios=(0, 0, 4, 16, 4, 16, 0, 4))
  from tests.hf_oracle import randomize_params

  model = randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), 0)
  save_hf_checkpoint(model, tmp_path, quantize="fp4-experts", max_shard_bytes=2 << 20)
  del model
  assert len(os.listdir(tmp_path)) > 12
  out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  mib = {k: v / 2**20 for k, v in r.items()}
  print(f"model {mib['model']:.1f} MiB, largest leaf {mib['largest_leaf']:.1f} MiB, largest "
        f"tensor {mib['largest_tensor']:.1f} MiB; peak - final RSS {mib['peak'] - mib['after']:.1f} "
        f"MiB; final - base {mib['after'] - mib['base']:.1f} MiB")
  assert r["model"] > 8 * r["largest_leaf"]
  assert r["peak"] - r["after"] < 2 * r["largest_leaf"]
  assert r["after"] - r["base"] < r["model"] + (256 << 20)
