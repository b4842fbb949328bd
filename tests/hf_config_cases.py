"""config.json cases for `ModelConfig.from_hf`, as transformers' own
`DeepseekV4Config(**kwargs).save_pretrained` writes them. Three are committed under
tests/data/hf_configs/ (read without torch); `write_fixtures()` rewrote them with transformers
5.23.0 and tests/test_config_hf_files.py checks they still match what transformers writes."""

from __future__ import annotations

import json
import os
import tempfile

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "hf_configs")

# The transformers kwargs of docs/architecture.md#tiny test model (YaRN on, HCA ratio 16).
TINY_KWARGS = dict(
  vocab_size=512, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
  num_key_value_heads=1, head_dim=96, partial_rotary_factor=32 / 96, q_lora_rank=32, o_groups=2,
  o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
  num_experts_per_tok=2, scoring_func="sqrtsoftplus", norm_topk_prob=True,
  routed_scaling_factor=1.5, swiglu_limit=10.0,
  layer_types=["sliding_attention", "sliding_attention", "compressed_sparse_attention",
               "heavily_compressed_attention", "compressed_sparse_attention",
               "heavily_compressed_attention"],
  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
  mlp_layer_types=["hash_moe", "hash_moe", "hash_moe", "moe", "moe", "moe"],
  sliding_window=8, index_n_heads=16, index_head_dim=64, index_topk=4, hc_mult=4,
  hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, rope_theta=10000.0,
  compress_rope_theta=160000.0,
  rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                   "beta_fast": 32.0, "beta_slow": 1.0},
  max_position_embeddings=64, num_nextn_predict_layers=1,
)

# name -> DeepseekV4Config kwargs. The first three are the committed fixtures.
CASES = {
  # No kwargs: transformers' defaults (Flash sizes, its own HCA/CSA schedule, no YaRN, ids 0 / 1).
  "defaults": {},
  # No special ids: save_pretrained writes "bos_token_id": null, "eos_token_id": null.
  "tiny_null_ids": {**TINY_KWARGS, "bos_token_id": None, "eos_token_id": None},
  # Several end ids.
  "tiny_list_eos": {**TINY_KWARGS, "bos_token_id": 0, "eos_token_id": [1, 5]},
  # The hub's legacy keys (compress_ratios with the MTP entry, num_hash_layers, qk_rope_head_dim,
  # rope_scaling), converted by transformers; no bos, list eos.
  "legacy_hub_keys": dict(
    vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, head_dim=64,
    q_lora_rank=16, o_groups=1, o_lora_rank=8, moe_intermediate_size=16, n_routed_experts=4,
    num_experts_per_tok=2, compress_ratios=[0, 4, 128, 0], num_hash_layers=1,
    qk_rope_head_dim=16, sliding_window=8, index_n_heads=2, index_head_dim=32, index_topk=4,
    max_position_embeddings=1024, bos_token_id=None, eos_token_id=[2, 7],
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                  "beta_fast": 32, "beta_slow": 1}),
  # No YaRN, one hash layer, routed scale 2.5, ids other than 0 / 1.
  "no_yarn_ids": {**TINY_KWARGS, "rope_parameters": None, "bos_token_id": 3, "eos_token_id": 4,
                  "mlp_layer_types": ["hash_moe"] + ["moe"] * 5, "routed_scaling_factor": 2.5},
}
FIXTURE_CASES = ("defaults", "tiny_null_ids", "tiny_list_eos")


def transformers_config_json(name: str) -> dict:
  """The config.json that transformers' save_pretrained writes for CASES[name]."""
  from transformers import DeepseekV4Config

  with tempfile.TemporaryDirectory() as d:
    DeepseekV4Config(**CASES[name]).save_pretrained(d)
    with open(os.path.join(d, "config.json")) as f:
      return json.load(f)


def fixture_path(name: str) -> str:
  return os.path.join(FIXTURES, f"{name}.json")


def write_fixtures() -> None:
  """Rewrites tests/data/hf_configs/*.json with the installed transformers."""
  os.makedirs(FIXTURES, exist_ok=True)
  for name in FIXTURE_CASES:
    with open(fixture_path(name), "w") as f:
      json.dump(transformers_config_json(name), f, indent=2, sort_keys=True)
      f.write("\n")


if __name__ == "__main__":
  write_fixtures()
