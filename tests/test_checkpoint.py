"""Safetensors checkpoints: hub naming and transformers naming in, hub naming out, and one error
that lists every missing, unexpected and mis-shaped tensor."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import deepseek_v4
from deepseek_v4.checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from deepseek_v4.checkpoint.convert import to_hub_tensors
from deepseek_v4.config_hf import fields_to_hf
from tests.tolerances import F32_MODEL_REL, rel_err


@pytest.fixture(scope="module")
def model(tiny_cfg):
  from tests.hf_oracle import randomize_params

  return randomize_params(deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(3)), 3)


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, ids: m(ids))


def _ids(cfg, T=21):
  return jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T)), jnp.int32)


def _same_params(a, b):
  sa = dict(nnx.to_flat_state(nnx.state(a)))
  sb = dict(nnx.to_flat_state(nnx.state(b)))
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_array_equal(np.asarray(sa[k][...]), np.asarray(sb[k][...]), err_msg=str(k))


def test_hub_names_are_the_official_ones(model):
  names = set(to_hub_tensors(model))
  for name in ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base",
               "hc_head_scale", "layers.0.attn.wq_a.weight", "layers.0.attn.kv_norm.weight",
               "layers.0.hc_attn_fn", "layers.0.ffn.gate.tid2eid", "layers.3.ffn.gate.bias",
               "layers.2.attn.compressor.ape", "layers.2.attn.indexer.compressor.norm.weight",
               "layers.2.attn.indexer.weights_proj.weight", "layers.5.ffn.experts.7.w2.weight",
               "layers.1.ffn.shared_experts.w3.weight", "mtp.0.e_proj.weight",
               "mtp.0.hc_head_scale", "mtp.0.ffn.gate.bias"]:
    assert name in names, name
  assert "layers.0.ffn.gate.bias" not in names and "layers.3.ffn.gate.tid2eid" not in names
  assert "layers.0.attn.compressor.ape" not in names  # sliding-only layer


def test_round_trip_is_exact(model, forward, tmp_path):
  save_hf_checkpoint(model, tmp_path)
  loaded = load_hf_checkpoint(tmp_path)
  _same_params(model, loaded)
  ids = _ids(model.cfg)
  np.testing.assert_array_equal(np.asarray(forward(model, ids)), np.asarray(forward(loaded, ids)))
  assert load_file(os.path.join(tmp_path, "model.safetensors"))[
    "layers.0.ffn.gate.tid2eid"].dtype == np.int64


def test_bfloat16_load(model, tmp_path):
  save_hf_checkpoint(model, tmp_path)
  loaded = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
  assert loaded.layer(0).attn.wq_a.weight.dtype == jnp.bfloat16
  # mHC stays float32 (docs/architecture.md#dtypes)
  assert loaded.layer(0).hc_attn_fn.dtype == jnp.float32
  assert loaded.cfg.dtype == "bfloat16"


def test_error_lists_every_problem(model, tmp_path):
  tensors = to_hub_tensors(model)
  del tensors["layers.1.attn.wq_b.weight"]
  del tensors["layers.4.ffn.experts.3.w1.weight"]
  tensors["layers.9.attn.wq_a.weight"] = np.zeros((2, 2), np.float32)
  tensors["head.weight"] = tensors["head.weight"][:-1]
  save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(fields_to_hf(model.cfg), f)
  with pytest.raises(CheckpointError) as err:
    load_hf_checkpoint(tmp_path)
  msg = str(err.value)
  assert "2 missing, 1 unexpected, 1 mis-shaped" in msg
  for part in ["layers.1.attn.wq_b.weight", "layers.4.ffn.experts.3.w1.weight",
               "layers.9.attn.wq_a.weight", "head.weight: checkpoint (511, 64), expected (512, 64)"]:
    assert part in msg


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config"):
    load_hf_checkpoint(tmp_path / "nope")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(fields_to_hf(deepseek_v4.tiny()), f)
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_hf_checkpoint(tmp_path)


def test_quantized_checkpoint_is_refused_clearly(model, tmp_path):
  tensors = to_hub_tensors(model)
  tensors["layers.0.attn.wq_a.scale"] = np.ones((1, 1), np.float32)
  save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(fields_to_hf(model.cfg), f)
  with pytest.raises(CheckpointError, match="layers.0.attn.wq_a.scale"):
    load_hf_checkpoint(tmp_path)


def test_hub_style_config_json(model, forward, tmp_path):
  """A hub config.json (legacy keys of docs/architecture.md#tiny) gives the same model."""
  save_hf_checkpoint(model, tmp_path)
  hub = {k: v for k, v in fields_to_hf(model.cfg).items()
         if k not in ("mlp_layer_types", "partial_rotary_factor", "rope_parameters")}
  hub.update(num_hash_layers=3, qk_rope_head_dim=32, rope_scaling={
    "type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "beta_fast": 32,
    "beta_slow": 1})
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(hub, f)
  loaded = load_hf_checkpoint(tmp_path)
  assert loaded.cfg == model.cfg


@pytest.mark.parity
def test_transformers_save_pretrained_loads(model, forward, tmp_path):
  """What transformers' save_pretrained writes (hub names under `model.`, with its own leftovers:
  `model.embed_tokens.weight`, `model.hc_head.*`, `attn.norm` for kv_norm) loads and matches the
  transformers model's logits. transformers has no MTP, so the load drops the MTP module."""
  pytest.importorskip("transformers")
  from tests.hf_oracle import hf_logits, hf_model

  ref = hf_model(model)
  ref.save_pretrained(tmp_path)
  loaded = load_hf_checkpoint(tmp_path)
  assert loaded.cfg.num_mtp_layers == 0
  ids = _ids(model.cfg, 40)
  assert rel_err(forward(loaded, ids), hf_logits(ref, np.asarray(ids))) < F32_MODEL_REL


@pytest.mark.parity
def test_transformers_internal_names_load(model, forward, tmp_path):
  """transformers' in-memory names (q_a_proj, attn_hc.fn, stacked gate_up_proj, ...) load too."""
  pytest.importorskip("transformers")
  from tests.hf_oracle import hf_model

  ref = hf_model(model)
  sd = {f"model.{k}" if not k.startswith(("model.", "lm_head")) else k: v.numpy()
        for k, v in ref.state_dict().items()}
  save_file(sd, os.path.join(tmp_path, "model.safetensors"))
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(fields_to_hf(model.cfg), f)
  loaded = load_hf_checkpoint(tmp_path)
  ids = _ids(model.cfg)
  # The trunk logits do not depend on the (dropped) MTP module.
  np.testing.assert_array_equal(np.asarray(forward(loaded, ids)), np.asarray(forward(model, ids)))
