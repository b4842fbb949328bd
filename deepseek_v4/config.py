"""Model configuration: one frozen dataclass, presets, and the Hugging Face / hub config reader.

Values follow the DeepSeek-V4 hub `config.json` files (spec §1.1, §1.2). Every per-layer choice is a
tuple field; derived sizes are properties, so there is one source of truth.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Literal

# compress_ratios values with a meaning of their own (spec §1.2): 0 = sliding window only; 4 = CSA
# (overlapping windows + lightning indexer). Every other positive ratio is an HCA-style layer.
SWA_RATIO = 0
CSA_RATIO = 4

LayerKind = Literal["sliding", "csa", "hca"]


def layer_kind(ratio: int) -> LayerKind:
  """The attention kind of a layer with compression ratio `ratio` (the official semantics)."""
  if ratio == SWA_RATIO:
    return "sliding"
  return "csa" if ratio == CSA_RATIO else "hca"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """DeepSeek-V4 architecture. Field names follow the spec's symbols (see ARCHITECTURE.md §0.1).

  Attributes:
    vocab_size: V, rows of the embedding and the LM head.
    d_model: D, hidden size.
    num_heads: attention query heads (one shared K=V head serves them all).
    head_dim: c, width of a query head and of the shared K=V head.
    rope_dim: r, rotary channels (the LAST r channels of a head, interleaved pairs).
    q_lora_rank: d_c, rank of the low-rank query path.
    o_groups: g, groups of the grouped output projection.
    o_lora_rank: d_g, per-group output rank.
    window: W, sliding-window size (keys p_t - W < p_j <= p_t).
    compress_ratios: one entry per trunk layer: 0 sliding-only, 4 CSA, other > 0 HCA.
    index_heads / index_head_dim / index_topk: lightning indexer H_I, c_I, k_I.
    num_experts / experts_per_token / moe_inter_dim: routed experts E, K and their hidden size.
    num_shared_experts: shared experts (0 or 1), each of size moe_inter_dim.
    num_hash_layers: the first layers route by the frozen `tid2eid` table.
    route_scale: routed_scaling_factor applied after renormalizing the top-k weights.
    norm_topk_prob: renormalize the selected scores to sum 1 before scaling.
    score_func: router affinity; V4 uses sqrt(softplus(logits)).
    swiglu_limit: clamp of the SwiGLU branches (gate <= limit, |up| <= limit).
    hc_mult / hc_sinkhorn_iters / hc_eps: mHC stream count, Sinkhorn iterations, epsilon.
    rms_eps: epsilon of every RMS norm (also the mHC RMS scalar).
    rope_theta: base of the sliding-only layers (no YaRN).
    compress_rope_theta: base of CSA/HCA layers (queries, window keys, entries, indexer).
    rope_factor / rope_original_max_position / rope_beta_fast / rope_beta_slow: YaRN on the
      compressed layers; `rope_factor == 1` turns YaRN off.
    max_position_embeddings: longest sequence the model accepts.
    num_mtp_layers: multi-token-prediction depth (0 or 1); the MTP block is sliding-only.
    bos_token_id / eos_token_id: special ids.
    dtype: compute dtype of activations and matmuls.
    param_dtype: storage dtype of matrices (norms, mHC, sinks, ape and router bias stay float32).
    attn_block: queries per block in the gather-based attention and the indexer (memory knob).
    init_std: std of the normal initializer of matrices.
  """

  vocab_size: int
  d_model: int
  num_heads: int
  head_dim: int
  rope_dim: int
  q_lora_rank: int
  o_groups: int
  o_lora_rank: int
  window: int
  compress_ratios: tuple[int, ...]
  index_heads: int
  index_head_dim: int
  index_topk: int
  num_experts: int
  experts_per_token: int
  moe_inter_dim: int
  num_shared_experts: int = 1
  num_hash_layers: int = 3
  route_scale: float = 1.5
  norm_topk_prob: bool = True
  score_func: Literal["sqrtsoftplus"] = "sqrtsoftplus"
  swiglu_limit: float = 10.0
  hc_mult: int = 4
  hc_sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  rms_eps: float = 1e-6
  rope_theta: float = 10000.0
  compress_rope_theta: float = 160000.0
  rope_factor: float = 16.0
  rope_original_max_position: int = 65536
  rope_beta_fast: float = 32.0
  rope_beta_slow: float = 1.0
  max_position_embeddings: int = 1048576
  num_mtp_layers: int = 1
  bos_token_id: int = 0
  eos_token_id: int = 1
  dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
  attn_block: int = 128
  init_std: float = 0.02

  def __post_init__(self):
    if isinstance(self.compress_ratios, list):
      object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
    _validate(self)

  # ----- derived sizes --------------------------------------------------------------------------
  @property
  def num_layers(self) -> int:
    return len(self.compress_ratios)

  @property
  def nope_dim(self) -> int:
    return self.head_dim - self.rope_dim

  @property
  def heads_per_group(self) -> int:
    return self.num_heads // self.o_groups

  @property
  def hc_mix_dim(self) -> int:
    """Size of the mHC mixing vector: pre (M) + post (M) + residual (M*M)."""
    return (2 + self.hc_mult) * self.hc_mult

  @property
  def yarn(self) -> bool:
    return self.rope_factor != 1.0

  def layer_kinds(self) -> tuple[LayerKind, ...]:
    return tuple(layer_kind(r) for r in self.compress_ratios)

  def is_hash_layer(self, layer: int) -> bool:
    return layer < self.num_hash_layers

  def replace(self, **overrides) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["compress_ratios"] = list(self.compress_ratios)
    return d

  # ----- readers --------------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, source: str | os.PathLike | dict, **overrides) -> "ModelConfig":
    """Builds a config from a hub or transformers `config.json` (path, folder, or dict).

    Accepts the official hub keys (`compress_ratios` with L+1 entries, `num_hash_layers`,
    `qk_rope_head_dim`, `rope_scaling`) and transformers' form (`layer_types`, `compress_rates`,
    `mlp_layer_types`, `partial_rotary_factor`, nested `rope_parameters`).
    """
    return cls(**{**hf_to_fields(_read_json(source)), **overrides})


def _read_json(source) -> dict:
  if isinstance(source, dict):
    return source
  path = os.fspath(source)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path!r} (expected a config.json or its folder)")
  with open(path) as f:
    return json.load(f)


_HF_KIND = {
  "sliding_attention": "sliding",
  "compressed_sparse_attention": "csa",
  "heavily_compressed_attention": "hca",
}


def _require(hf: dict, key: str):
  if key not in hf:
    raise ValueError(f"config.json lacks the required key {key!r}")
  return hf[key]


def _hf_compress_ratios(hf: dict, num_layers: int) -> tuple[int, ...]:
  if hf.get("layer_types") is not None:
    kinds = hf["layer_types"]
    rates = hf.get("compress_rates") or {
      "compressed_sparse_attention": 4,
      "heavily_compressed_attention": 128,
    }
    bad = [k for k in kinds if k not in _HF_KIND]
    if bad:
      raise ValueError(f"layer_types has unknown entries {bad}; expected one of {list(_HF_KIND)}")
    ratios = tuple(0 if k == "sliding_attention" else int(rates[k]) for k in kinds)
    if rates.get("compressed_sparse_attention", 4) != CSA_RATIO:
      raise ValueError(
        f"compress_rates['compressed_sparse_attention']={rates['compressed_sparse_attention']}; "
        f"CSA layers are defined by ratio {CSA_RATIO} (spec §1.2)"
      )
  else:
    ratios = tuple(int(r) for r in _require(hf, "compress_ratios"))
  if len(ratios) == num_layers + 1:
    if ratios[-1] != SWA_RATIO:
      raise ValueError(f"the MTP entry of compress_ratios is {ratios[-1]}; only 0 (SWA) is supported")
    ratios = ratios[:-1]
  if len(ratios) != num_layers:
    raise ValueError(
      f"per-layer schedule has {len(ratios)} entries; expected num_hidden_layers={num_layers} "
      f"(or {num_layers + 1} with the MTP entry)"
    )
  return ratios


def _hf_rope(hf: dict, head_dim: int) -> dict[str, Any]:
  out: dict[str, Any] = {}
  if "qk_rope_head_dim" in hf:
    out["rope_dim"] = int(hf["qk_rope_head_dim"])
  elif "partial_rotary_factor" in hf:
    out["rope_dim"] = int(round(head_dim * float(hf["partial_rotary_factor"])))
  else:
    _require(hf, "qk_rope_head_dim")
  params = hf.get("rope_parameters") or {}
  main = params.get("main") if isinstance(params.get("main"), dict) else None
  comp = params.get("compress") if isinstance(params.get("compress"), dict) else None
  out["rope_theta"] = float((main or {}).get("rope_theta", hf.get("rope_theta", 10000.0)))
  out["compress_rope_theta"] = float(
    (comp or {}).get("rope_theta", hf.get("compress_rope_theta", 160000.0))
  )
  # YaRN parameters: nested HF form, flat HF form, or the hub's `rope_scaling`.
  yarn = None
  if comp is not None:
    yarn = comp if comp.get("rope_type", "default") == "yarn" else None
  elif params.get("rope_type") == "yarn":
    yarn = params
  elif isinstance(hf.get("rope_scaling"), dict):
    rs = hf["rope_scaling"]
    yarn = rs if rs.get("type", rs.get("rope_type")) == "yarn" else None
  if yarn is None:
    out["rope_factor"] = 1.0
  else:
    out["rope_factor"] = float(yarn["factor"])
    out["rope_original_max_position"] = int(yarn["original_max_position_embeddings"])
    out["rope_beta_fast"] = float(yarn.get("beta_fast", 32.0))
    out["rope_beta_slow"] = float(yarn.get("beta_slow", 1.0))
  return out


def hf_to_fields(hf: dict) -> dict[str, Any]:
  """Maps hub / transformers config keys to ModelConfig fields."""
  num_layers = int(_require(hf, "num_hidden_layers"))
  head_dim = int(_require(hf, "head_dim"))
  kv_heads = hf.get("num_key_value_heads", 1)
  if kv_heads != 1:
    raise ValueError(f"num_key_value_heads={kv_heads}; DeepSeek-V4 has one shared K=V head")
  if hf.get("mlp_layer_types") is not None:
    types = list(hf["mlp_layer_types"])
    num_hash = sum(1 for t in types if t == "hash_moe")
    if types != ["hash_moe"] * num_hash + ["moe"] * (len(types) - num_hash):
      raise ValueError(f"mlp_layer_types={types}: hash layers must form a prefix of 'moe' layers")
  else:
    num_hash = int(hf.get("num_hash_layers", 0))
  fields = dict(
    vocab_size=int(_require(hf, "vocab_size")),
    d_model=int(_require(hf, "hidden_size")),
    num_heads=int(_require(hf, "num_attention_heads")),
    head_dim=head_dim,
    q_lora_rank=int(_require(hf, "q_lora_rank")),
    o_groups=int(_require(hf, "o_groups")),
    o_lora_rank=int(_require(hf, "o_lora_rank")),
    window=int(_require(hf, "sliding_window")),
    compress_ratios=_hf_compress_ratios(hf, num_layers),
    index_heads=int(_require(hf, "index_n_heads")),
    index_head_dim=int(_require(hf, "index_head_dim")),
    index_topk=int(_require(hf, "index_topk")),
    num_experts=int(hf.get("n_routed_experts", hf.get("num_local_experts", 0)) or 0),
    experts_per_token=int(_require(hf, "num_experts_per_tok")),
    moe_inter_dim=int(hf.get("moe_intermediate_size", hf.get("intermediate_size", 0)) or 0),
    num_shared_experts=int(hf.get("n_shared_experts", 1)),
    num_hash_layers=num_hash,
    route_scale=float(hf.get("routed_scaling_factor", 1.0)),
    norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
    score_func=hf.get("scoring_func", "sqrtsoftplus"),
    swiglu_limit=float(hf.get("swiglu_limit", 10.0)),
    hc_mult=int(hf.get("hc_mult", 4)),
    hc_sinkhorn_iters=int(hf.get("hc_sinkhorn_iters", 20)),
    hc_eps=float(hf.get("hc_eps", 1e-6)),
    rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
    max_position_embeddings=int(hf.get("max_position_embeddings", 1048576)),
    num_mtp_layers=int(hf.get("num_nextn_predict_layers", 0)),
    bos_token_id=int(hf.get("bos_token_id", 0) or 0),
    eos_token_id=int(hf.get("eos_token_id", 1) if not isinstance(hf.get("eos_token_id"), list)
                     else hf["eos_token_id"][0]),
  )
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r}; DeepSeek-V4 uses 'silu'")
  if hf.get("tie_word_embeddings", False):
    raise ValueError("tie_word_embeddings=true; DeepSeek-V4 has an untied LM head")
  fields.update(_hf_rope(hf, head_dim))
  # Our own knobs that transformers has no key for, written by fields_to_hf.
  fields.update({k: v for k, v in (hf.get(_OWN_KEY) or {}).items() if k in _OWN_FIELDS})
  return fields


_OWN_KEY = "deepseek_v4_jax"
_OWN_FIELDS = ("attn_block", "init_std")


def fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers-style config.json of `cfg` (accepted by `DeepseekV4Config`)."""
  kinds = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
           "hca": "heavily_compressed_attention"}
  hca = sorted({r for r in cfg.compress_ratios if layer_kind(r) == "hca"}) or [128]
  if len(hca) > 1:
    raise ValueError(f"transformers supports one HCA ratio per model; got {hca}")
  rope = {"rope_type": "default"}
  if cfg.yarn:
    rope = {"rope_type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
            "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
  return {
    "model_type": "deepseek_v4",
    "architectures": ["DeepseekV4ForCausalLM"],
    "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
    "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": 1, "head_dim": cfg.head_dim,
    "partial_rotary_factor": cfg.rope_dim / cfg.head_dim, "qk_rope_head_dim": cfg.rope_dim,
    "q_lora_rank": cfg.q_lora_rank, "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
    "moe_intermediate_size": cfg.moe_inter_dim, "n_routed_experts": cfg.num_experts,
    "n_shared_experts": cfg.num_shared_experts, "num_experts_per_tok": cfg.experts_per_token,
    "scoring_func": cfg.score_func, "norm_topk_prob": cfg.norm_topk_prob,
    "routed_scaling_factor": cfg.route_scale, "swiglu_limit": cfg.swiglu_limit,
    "layer_types": [kinds[k] for k in cfg.layer_kinds()],
    "compress_rates": {"compressed_sparse_attention": CSA_RATIO,
                       "heavily_compressed_attention": hca[0]},
    "mlp_layer_types": ["hash_moe" if cfg.is_hash_layer(i) else "moe"
                        for i in range(cfg.num_layers)],
    "sliding_window": cfg.window, "index_n_heads": cfg.index_heads,
    "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
    "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
    "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
    "compress_rope_theta": cfg.compress_rope_theta, "rope_parameters": rope,
    "max_position_embeddings": cfg.max_position_embeddings,
    "num_nextn_predict_layers": cfg.num_mtp_layers, "bos_token_id": cfg.bos_token_id,
    "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": False, "hidden_act": "silu",
    _OWN_KEY: {k: getattr(cfg, k) for k in _OWN_FIELDS},
  }


def _validate(c: ModelConfig) -> None:
  """Raises ValueError naming the offending field and value."""
  positive = ["vocab_size", "d_model", "num_heads", "head_dim", "q_lora_rank", "o_groups",
              "o_lora_rank", "window", "experts_per_token", "moe_inter_dim", "hc_mult",
              "hc_sinkhorn_iters", "max_position_embeddings", "attn_block", "num_experts"]
  for name in positive:
    v = getattr(c, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name}={v!r} must be a positive integer")
  if not c.compress_ratios:
    raise ValueError("compress_ratios=() must have one entry per layer (at least one layer)")
  for i, r in enumerate(c.compress_ratios):
    if not isinstance(r, int) or r < 0:
      raise ValueError(f"compress_ratios[{i}]={r!r} must be an integer >= 0")
  if not (0 < c.rope_dim <= c.head_dim) or c.rope_dim % 2:
    raise ValueError(f"rope_dim={c.rope_dim} must be even and in (0, head_dim={c.head_dim}]")
  if c.num_heads % c.o_groups:
    raise ValueError(f"num_heads={c.num_heads} not divisible by o_groups={c.o_groups}")
  if any(layer_kind(r) == "csa" for r in c.compress_ratios):
    for name in ("index_heads", "index_head_dim", "index_topk"):
      if getattr(c, name) <= 0:
        raise ValueError(f"{name}={getattr(c, name)} must be positive when a CSA layer exists")
    if not (0 < c.rope_dim <= c.index_head_dim):
      raise ValueError(f"rope_dim={c.rope_dim} must fit in index_head_dim={c.index_head_dim}")
  if not (0 < c.experts_per_token <= c.num_experts):
    raise ValueError(
      f"experts_per_token={c.experts_per_token} must be in [1, num_experts={c.num_experts}]"
    )
  if not (0 <= c.num_hash_layers <= c.num_layers):
    raise ValueError(f"num_hash_layers={c.num_hash_layers} must be in [0, {c.num_layers}]")
  if c.num_shared_experts not in (0, 1):
    raise ValueError(f"num_shared_experts={c.num_shared_experts}; supported: 0 or 1")
  if c.num_mtp_layers not in (0, 1):
    raise ValueError(f"num_mtp_layers={c.num_mtp_layers}; supported: 0 or 1")
  if c.score_func != "sqrtsoftplus":
    raise ValueError(f"score_func={c.score_func!r}; DeepSeek-V4 uses 'sqrtsoftplus'")
  for name in ("dtype", "param_dtype"):
    if getattr(c, name) not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"{name}={getattr(c, name)!r}; expected 'float32', 'bfloat16' or 'float16'")
  for name in ("hc_eps", "rms_eps", "swiglu_limit", "route_scale", "rope_theta",
               "compress_rope_theta", "init_std"):
    v = getattr(c, name)
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
      raise ValueError(f"{name}={v!r} must be a positive finite number")
  if c.rope_factor < 1.0:
    raise ValueError(f"rope_factor={c.rope_factor} must be >= 1 (1 disables YaRN)")
  if not (0 <= c.bos_token_id < c.vocab_size and 0 <= c.eos_token_id < c.vocab_size):
    raise ValueError(
      f"bos_token_id={c.bos_token_id} / eos_token_id={c.eos_token_id} outside vocab {c.vocab_size}"
    )


# ----- presets ------------------------------------------------------------------------------------
def _flash_ratios() -> tuple[int, ...]:
  return (0, 0) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 43))


def _pro_ratios() -> tuple[int, ...]:
  return (128, 128) + tuple(4 if i % 2 == 0 else 128 for i in range(2, 61))


def flash(**overrides) -> ModelConfig:
  """DeepSeek-V4-Flash (284B total / 13B active), hub config.json values."""
  base = ModelConfig(
    vocab_size=129280, d_model=4096, num_heads=64, head_dim=512, rope_dim=64, q_lora_rank=1024,
    o_groups=8, o_lora_rank=1024, window=128, compress_ratios=_flash_ratios(), index_heads=64,
    index_head_dim=128, index_topk=512, num_experts=256, experts_per_token=6, moe_inter_dim=2048,
    route_scale=1.5, dtype="bfloat16", param_dtype="bfloat16",
  )
  return dataclasses.replace(base, **overrides)


def pro(**overrides) -> ModelConfig:
  """DeepSeek-V4-Pro (1.6T total / 49B active), hub config.json values."""
  base = ModelConfig(
    vocab_size=129280, d_model=7168, num_heads=128, head_dim=512, rope_dim=64, q_lora_rank=1536,
    o_groups=16, o_lora_rank=1024, window=128, compress_ratios=_pro_ratios(), index_heads=64,
    index_head_dim=128, index_topk=1024, num_experts=384, experts_per_token=6, moe_inter_dim=3072,
    route_scale=2.5, dtype="bfloat16", param_dtype="bfloat16",
  )
  return dataclasses.replace(base, **overrides)


def tiny(**overrides) -> ModelConfig:
  """Every layer kind in seconds on a CPU: the spec's §1.5 test model (6 layers).

  SWA+hash, SWA+hash, CSA+hash, HCA(16)+learned, CSA+learned, HCA(16)+learned; YaRN on; MTP on.
  """
  base = ModelConfig(
    vocab_size=512, d_model=64, num_heads=4, head_dim=96, rope_dim=32, q_lora_rank=32, o_groups=2,
    o_lora_rank=16, window=8, compress_ratios=(0, 0, 4, 16, 4, 16), index_heads=16,
    index_head_dim=64, index_topk=4, num_experts=8, experts_per_token=2, moe_inter_dim=32,
    route_scale=1.5, num_hash_layers=3, rope_factor=4.0, rope_original_max_position=16,
    max_position_embeddings=512, attn_block=16,
  )
  return dataclasses.replace(base, **overrides)


PRESETS: dict[str, Callable[..., ModelConfig]] = {"tiny": tiny, "flash": flash, "pro": pro}


def parse_overrides(cfg: ModelConfig, assignments: list[str]) -> ModelConfig:
  """Applies `field=value` strings (as given to `--set`) with the field's own type."""
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  updates: dict[str, Any] = {}
  for item in assignments:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected field=value")
    name, raw = item.split("=", 1)
    if name not in fields:
      raise ValueError(f"--set {name}=...: unknown ModelConfig field; known: {sorted(fields)}")
    current = getattr(cfg, name)
    try:
      if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
          raise ValueError
        value: Any = raw.lower() in ("true", "1")
      elif isinstance(current, int):
        value = int(raw)
      elif isinstance(current, float):
        value = float(raw)
      elif isinstance(current, tuple):
        value = tuple(int(v) for v in raw.strip("()[] ").split(",") if v.strip())
      else:
        value = raw
    except ValueError:
      raise ValueError(
        f"--set {name}={raw!r}: expected a value of type {type(current).__name__}"
      ) from None
    updates[name] = value
  return dataclasses.replace(cfg, **updates)
