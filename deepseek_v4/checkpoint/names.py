"""The tensor names of a checkpoint: transformers' names -> the official hub names.

Our parameter paths are the hub names (`layout.official_names`); a checkpoint written by
transformers' `save_pretrained` uses its own names under an optional `model.` prefix.
`hub_name` maps either naming to the hub's, and `unstack_hf_experts` splits transformers' stacked
experts into the hub's per-expert tensors. Both loaders (`reader.py`'s lazy one, `convert.py`'s
tree builder) and the tests use this one table. Imports no other project module.
"""

from __future__ import annotations

import re

import numpy as np

# transformers' names -> hub names (docs/architecture.md#hf-names, reversed). Applied in order
# after stripping a leading "model.". Besides transformers' in-memory names this covers what its
# save_pretrained actually writes (5.23.0): it reverts most renames but leaves
# `model.embed_tokens.weight` and `model.hc_head.hc_*` (its anchored patterns miss the prefix) and
# turns the attention's `kv_norm` into `attn.norm` (its bidirectional `.norm.` <-> `.kv_norm.`
# rule).
_HF_TO_HUB = [(re.compile(a), b) for a, b in [
  (r"^embed_tokens\.weight$", "embed.weight"),
  (r"^lm_head\.weight$", "head.weight"),
  (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
  (r"\.attn\.norm\.weight$", ".attn.kv_norm.weight"),
  (r"\.input_layernorm\.", ".attn_norm."),
  (r"\.post_attention_layernorm\.", ".ffn_norm."),
  (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
  (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
  (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
  (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
  (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
  (r"\.self_attn\.", ".attn."),
  (r"\.mlp\.", ".ffn."),
  (r"\.sinks$", ".attn_sink"),
  (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
  (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
  (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
  (r"\.q_a_proj\.", ".wq_a."),
  (r"\.q_a_norm\.", ".q_norm."),
  (r"\.q_b_proj\.", ".wq_b."),
  (r"\.kv_proj\.", ".wkv."),
  (r"\.gate_proj\.", ".wgate."),
  (r"\.o_a_proj\.", ".wo_a."),
  (r"\.o_b_proj\.", ".wo_b."),
  (r"\.position_bias$", ".ape"),
  (r"\.compressor\.kv_norm\.", ".compressor.norm."),
  (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
]]
# transformers' stacked experts [E, rows, cols] (and their `_scale_inv` scales, group `s`).
HF_STACKED = re.compile(
  r"^(?P<pre>.+\.ffn\.experts)\.(?P<w>gate_up_proj|down_proj)(?P<s>_scale_inv)?$")


def hub_name(name: str) -> str:
  """The hub name of a tensor saved under hub or transformers naming."""
  if name.startswith("model."):
    name = name[len("model."):]
  for pattern, repl in _HF_TO_HUB:
    name = pattern.sub(repl, name)
  return name


def unstack_hf_experts(name: str, value) -> dict[str, np.ndarray] | None:
  """transformers' stacked experts -> per-expert hub tensors (gate_up = [w1 rows; w3 rows])."""
  m = HF_STACKED.match(name)
  if m is None or m["s"]:
    return None
  out = {}
  for e in range(value.shape[0]):
    if m["w"] == "down_proj":
      out[f"{m['pre']}.{e}.w2.weight"] = value[e]
    else:
      inter = value.shape[1] // 2
      out[f"{m['pre']}.{e}.w1.weight"] = value[e, :inter]
      out[f"{m['pre']}.{e}.w3.weight"] = value[e, inter:]
  return out
