"""`ModelConfig.from_hf` on config.json files written by transformers' own
`DeepseekV4Config.save_pretrained`: null, missing and list-valued special ids,
every optional key; plus invalid files (not JSON, not text) and values of the wrong type.

The committed fixtures (tests/data/hf_configs/) are read without torch; the parity tests write
the same and more configs with transformers at run time and check both."""

from __future__ import annotations

import json
import os

import pytest

from deepseek_v4.config import ModelConfig
from tests.hf_config_cases import CASES, FIXTURE_CASES, fixture_path, transformers_config_json


def _fixture(name: str) -> dict:
  with open(fixture_path(name)) as f:
    return json.load(f)


def _write(tmp_path, hf: dict | str) -> str:
  path = os.path.join(tmp_path, "config.json")
  with open(path, "w") as f:
    f.write(hf if isinstance(hf, str) else json.dumps(hf))
  return path


# ----- the committed files (no torch needed) ------------------------------------------------------
def test_fixture_default_ids_flash_sizes():
  cfg = ModelConfig.from_hf(fixture_path("defaults"))
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.head_dim, cfg.rope_dim) == (
    129280, 4096, 43, 512, 64)
  assert cfg.compress_ratios[:4] == (128, 128, 128, 4) and cfg.compress_ratios[-1] == 128
  assert (cfg.bos_token_id, cfg.eos_token_id) == (0, 1)
  assert cfg.rope_factor == 1.0 and not cfg.yarn  # transformers' default: no YaRN
  assert (cfg.num_hash_layers, cfg.route_scale, cfg.num_mtp_layers) == (3, 1.5, 1)


def test_fixture_null_ids_read_as_v4_defaults():
  """save_pretrained without ids writes "bos_token_id": null, "eos_token_id": null; today's code
  raised TypeError (int(None))."""
  hf = _fixture("tiny_null_ids")
  assert hf["bos_token_id"] is None and hf["eos_token_id"] is None
  cfg = ModelConfig.from_hf(fixture_path("tiny_null_ids"))
  assert (cfg.bos_token_id, cfg.eos_token_id) == (0, 1)
  import deepseek_v4

  assert cfg == deepseek_v4.tiny(max_position_embeddings=64)


def test_fixture_list_eos_gives_its_first_id(tmp_path):
  assert _fixture("tiny_list_eos")["eos_token_id"] == [1, 5]
  cfg = ModelConfig.from_hf(fixture_path("tiny_list_eos"))
  assert cfg.eos_token_id == 1 and cfg.bos_token_id == 0
  hf = _fixture("tiny_list_eos")
  hf["eos_token_id"] = [7, 1]
  assert ModelConfig.from_hf(hf).eos_token_id == 7
  hf["eos_token_id"] = []
  assert ModelConfig.from_hf(hf).eos_token_id == 1


@pytest.mark.parametrize("eos,needles", [
  ([1, 512], ("eos_token_id", "512", "vocab")),
  ([1, "2"], ("eos_token_id[1]", "'2'")),
  ([1.5], ("eos_token_id[0]", "1.5")),
  (True, ("eos_token_id", "True")),
], ids=["out_of_vocab", "string", "float", "bool"])
def test_bad_eos_lists_are_refused(tmp_path, eos, needles):
  hf = _fixture("tiny_list_eos")
  hf["eos_token_id"] = eos
  path = _write(tmp_path, hf)
  with pytest.raises(ValueError) as info:
    ModelConfig.from_hf(path)
  for needle in needles + (path,):
    assert needle in str(info.value)


def test_missing_ids_and_optional_keys_take_transformers_defaults():
  """A key that is missing or null reads as DeepseekV4Config's default (today: num_hash_layers 0,
  routed_scaling_factor 1.0, no MTP, where transformers has 3, 1.5 and 1)."""
  full = ModelConfig.from_hf(fixture_path("tiny_null_ids"))
  hf = _fixture("tiny_null_ids")
  for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mlp_layer_types",
              "routed_scaling_factor", "num_nextn_predict_layers", "n_shared_experts",
              "norm_topk_prob", "scoring_func", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters",
              "hc_eps", "rms_norm_eps", "max_position_embeddings", "initializer_range",
              "num_key_value_heads", "hidden_act", "tie_word_embeddings", "attention_bias",
              "qk_rope_head_dim", "rope_theta", "compress_rope_theta"):
    hf.pop(key)
  cfg = ModelConfig.from_hf(hf)
  assert cfg.replace(max_position_embeddings=64) == full
  assert cfg.max_position_embeddings == 1048576  # transformers' default
  hf = {k: (None if k in ("routed_scaling_factor", "mlp_layer_types", "hc_eps") else v)
        for k, v in _fixture("tiny_null_ids").items()}
  assert ModelConfig.from_hf(hf) == full


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "layer_types", "n_routed_experts"])
def test_missing_required_key_is_named(tmp_path, key):
  hf = _fixture("tiny_null_ids")
  del hf[key]
  path = _write(tmp_path, hf)
  with pytest.raises(ValueError) as info:
    ModelConfig.from_hf(path)
  assert path in str(info.value)
  assert key in str(info.value) or "per-layer schedule" in str(info.value)


# ----- values of the wrong type (item 7, config.json side) ----------------------------------------
@pytest.mark.parametrize("key,value,needles", [
  ("hidden_size", 64.7, ("hidden_size", "64.7", "integer")),
  ("hidden_size", "64", ("hidden_size", "'64'")),
  ("num_hidden_layers", True, ("num_hidden_layers", "True")),
  ("norm_topk_prob", "no", ("norm_topk_prob", "'no'")),
  ("tie_word_embeddings", "false", ("tie_word_embeddings", "'false'")),
  ("routed_scaling_factor", "1.5", ("routed_scaling_factor", "'1.5'")),
  ("rms_norm_eps", float("nan"), ("rms_norm_eps", "nan")),
  ("hc_eps", float("inf"), ("hc_eps", "inf")),
  ("partial_rotary_factor", 0.3, ("partial_rotary_factor", "0.3")),
  ("qk_rope_head_dim", 16, ("qk_rope_head_dim=16", "partial_rotary_factor")),
  ("attention_bias", True, ("attention_bias",)),
  ("compress_rates", {"compressed_sparse_attention": 4}, ("heavily_compressed_attention",)),
  ("mlp_layer_types", "moe", ("mlp_layer_types", "'moe'")),
], ids=lambda v: str(v)[:20])
def test_bad_values_are_named(tmp_path, key, value, needles):
  hf = _fixture("tiny_null_ids")
  hf[key] = value
  path = _write(tmp_path, hf)  # json writes NaN / Infinity, which json.load reads back
  with pytest.raises(ValueError) as info:
    ModelConfig.from_hf(path)
  for needle in needles + (path,):
    assert needle in str(info.value)


@pytest.mark.parametrize("change,needles", [
  ({"factor": float("nan")}, ("rope_parameters['compress']['factor']", "nan")),
  ({"original_max_position_embeddings": 0}, ("rope_original_max_position=0",)),
  ({"original_max_position_embeddings": None}, ("original_max_position_embeddings", "missing")),
  ({"beta_fast": float("nan")}, ("beta_fast", "nan")),
  ({"beta_fast": 0.5}, ("rope_beta_fast=0.5", "rope_beta_slow=1.0")),
  ({"rope_theta": float("inf")}, ("rope_parameters['compress']['rope_theta']", "inf")),
  ({"rope_type": "linear"}, ("rope_type", "'linear'")),
  ({"attention_factor": 1.3}, ("attention_factor", "1.3")),
], ids=["nan_factor", "orig_0", "orig_null", "nan_beta", "beta_order", "inf_theta", "linear",
        "mscale"])
def test_bad_yarn_values_are_named(tmp_path, change, needles):
  hf = _fixture("tiny_null_ids")
  hf["rope_parameters"]["compress"].update(change)
  path = _write(tmp_path, hf)
  with pytest.raises(ValueError) as info:
    ModelConfig.from_hf(path)
  for needle in needles + (path,):
    assert needle in str(info.value)


# ----- files that are not a config.json -----------------------------------------------------------
@pytest.mark.parametrize("content,needle", [
  ('{"hidden_size": 64,', "not valid JSON"),
  ("", "not valid JSON"),
  ("[1, 2]", "JSON object"),
  (b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01", "not a text file"),
], ids=["truncated", "empty", "list", "binary"])
def test_invalid_file_names_the_path(tmp_path, content, needle):
  path = os.path.join(tmp_path, "config.json")
  with open(path, "wb") as f:
    f.write(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ValueError) as info:
    ModelConfig.from_hf(tmp_path)  # the folder: its config.json
  assert needle in str(info.value) and path in str(info.value)


def test_folder_without_config_json(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    ModelConfig.from_hf(tmp_path)


# ----- files transformers writes now (parity: needs transformers) --------------------------------
def _transformers_view(name: str):
  """What transformers itself reads back from the file it wrote: our fields from its attrs."""
  from transformers import DeepseekV4Config

  hf = DeepseekV4Config.from_dict(transformers_config_json(name))
  comp = hf.rope_parameters["compress"]
  yarn = comp["rope_type"] == "yarn"
  eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, list) else hf.eos_token_id
  rates = hf.compress_rates
  expect = dict(
    vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_heads=hf.num_attention_heads,
    head_dim=hf.head_dim, rope_dim=hf.qk_rope_head_dim, q_lora_rank=hf.q_lora_rank,
    o_groups=hf.o_groups, o_lora_rank=hf.o_lora_rank, window=hf.sliding_window,
    compress_ratios=tuple(0 if t == "sliding_attention" else rates[t] for t in hf.layer_types),
    index_heads=hf.index_n_heads, index_head_dim=hf.index_head_dim, index_topk=hf.index_topk,
    num_experts=hf.n_routed_experts, experts_per_token=hf.num_experts_per_tok,
    moe_inter_dim=hf.moe_intermediate_size, num_shared_experts=hf.n_shared_experts,
    num_hash_layers=hf.mlp_layer_types.count("hash_moe"), route_scale=hf.routed_scaling_factor,
    norm_topk_prob=hf.norm_topk_prob, score_func=hf.scoring_func, swiglu_limit=hf.swiglu_limit,
    hc_mult=hf.hc_mult, hc_sinkhorn_iters=hf.hc_sinkhorn_iters, hc_eps=hf.hc_eps,
    rms_eps=hf.rms_norm_eps, rope_theta=hf.rope_parameters["main"]["rope_theta"],
    compress_rope_theta=comp["rope_theta"], rope_factor=comp["factor"] if yarn else 1.0,
    max_position_embeddings=hf.max_position_embeddings,
    num_mtp_layers=hf.num_nextn_predict_layers, init_std=hf.initializer_range,
    bos_token_id=0 if hf.bos_token_id is None else hf.bos_token_id,
    eos_token_id=1 if eos is None else eos,
  )
  if yarn:
    expect.update(rope_original_max_position=comp["original_max_position_embeddings"],
                  rope_beta_fast=comp["beta_fast"], rope_beta_slow=comp["beta_slow"])
  return expect


@pytest.mark.parity
@pytest.mark.parametrize("name", list(CASES))
def test_from_hf_reads_what_transformers_writes(tmp_path, name):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  hf = transformers_config_json(name)
  path = _write(tmp_path, hf)
  cfg = ModelConfig.from_hf(tmp_path)
  expect = _transformers_view(name)
  got = {k: getattr(cfg, k) for k in expect}
  assert got == expect, path
  if isinstance(CASES[name].get("eos_token_id", 1), list):
    assert cfg.eos_token_id == CASES[name]["eos_token_id"][0]


@pytest.mark.parity
@pytest.mark.parametrize("name", FIXTURE_CASES)
def test_fixtures_match_what_transformers_writes(name):
  """The committed files are still what the installed transformers writes (regenerate with
  `python -m tests.hf_config_cases` when transformers changes its output)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  drop = ("transformers_version",)
  now = {k: v for k, v in transformers_config_json(name).items() if k not in drop}
  committed = {k: v for k, v in _fixture(name).items() if k not in drop}
  assert now == committed


@pytest.mark.parametrize("preset", ["tiny", "flash", "pro"])
def test_to_hf_reads_back_equal_and_matches_the_writer(preset):
  """`ModelConfig.to_hf` / `from_hf` (thin entry points into config_hf) round-trip every preset,
  through JSON, and the dict is the transformers form (`layer_types`, not `compress_ratios`)."""
  import deepseek_v4
  from deepseek_v4 import config_hf

  cfg = deepseek_v4.PRESETS[preset]()
  hf = json.loads(json.dumps(cfg.to_hf()))
  assert hf == json.loads(json.dumps(config_hf.fields_to_hf(cfg)))
  assert hf["model_type"] == "deepseek_v4" and "compress_ratios" not in hf
  assert len(hf["layer_types"]) == cfg.num_layers
  # dtypes are how to run, not what the model is: config.json does not carry them
  assert ModelConfig.from_hf(hf, dtype=cfg.dtype, param_dtype=cfg.param_dtype) == cfg


@pytest.mark.parametrize("model_type", ["deepseek_v3", "llama", ""])
def test_config_of_another_model_type_is_refused(tmp_path, model_type):
  hf = _fixture("defaults")
  assert ModelConfig.from_hf(hf).num_layers > 0  # model_type "deepseek_v4": read
  path = _write(tmp_path, {**hf, "model_type": model_type})
  with pytest.raises(ValueError, match=rf"config\.json: model_type='{model_type}' is not "
                                       r"DeepSeek-V4's \(expected one of \['deepseek_v4'\]\)"):
    ModelConfig.from_hf(path)
  without = {k: v for k, v in hf.items() if k != "model_type"}  # a hub config may omit it
  assert ModelConfig.from_hf(without) == ModelConfig.from_hf(hf)


# ----- run choices that moved from ModelConfig to Options (deepseek_v4/options.py) ----------------
def test_old_config_json_with_run_choices_loads_and_drops_them(tmp_path, caplog):
  """A config.json this project wrote before the run choices moved to `Options` still carries
  them under "deepseek_v4_jax": it reads as the same architecture, one INFO line names them."""
  import logging

  import deepseek_v4

  cfg = deepseek_v4.tiny()
  hf = cfg.to_hf()
  hf["deepseek_v4_jax"].update(kernel_impl="pallas", scan_layers=False, attn_block=16,
                               keep_quantized="experts")
  with caplog.at_level(logging.INFO, logger="deepseek_v4.options"):
    got = ModelConfig.from_hf(_write(tmp_path, hf))
  assert got == cfg
  lines = [r.getMessage() for r in caplog.records if r.name == "deepseek_v4.options"]
  assert len(lines) == 1 and all(r.levelno == logging.INFO for r in caplog.records
                                 if r.name == "deepseek_v4.options")
  for name in ("kernel_impl", "scan_layers", "attn_block", "keep_quantized", "Options"):
    assert name in lines[0], (name, lines[0])


def test_to_hf_writes_no_run_choices():
  import deepseek_v4

  hf = deepseek_v4.tiny().to_hf()
  text = json.dumps(hf)
  for name in ("kernel_impl", "scan_layers", "attn_block", "keep_quantized"):
    assert name not in text, name
  assert set(hf["deepseek_v4_jax"]) == {"init_std", "residual", "attention", "hca_ratio",
                                        "router_bias"}
