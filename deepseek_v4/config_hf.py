"""The `config.json` boundary: hub / transformers config keys <-> `ModelConfig` fields.

`read_hf_config(source)` (also `ModelConfig.from_hf`) reads the official hub form and the one
transformers' `DeepseekV4Config.save_pretrained` writes; `fields_to_hf(cfg)` (also
`ModelConfig.to_hf`) writes the transformers form, which reads back equal. Errors name the file,
the key and the value.

Layering: this module imports `config` and nothing imports it at module level; `config.py`'s two
methods reach it through a function-level import, so loading the dataclass never loads the reader.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from deepseek_v4 import kinds as kinds_lib
from deepseek_v4.config import ModelConfig
from deepseek_v4.options import drop_former_config_fields

MODEL_TYPES = ("deepseek_v4",)  # the `model_type` of the hub and transformers configs


def read_hf_config(source: str | os.PathLike | dict, **overrides) -> ModelConfig:
  """Builds a config from a hub or transformers `config.json` (path, folder, or dict).

  Accepts the official hub keys (`compress_ratios` with L+1 entries, `num_hash_layers`,
  `qk_rope_head_dim`, `rope_scaling`) and transformers' form (`layer_types`, `compress_rates`,
  `mlp_layer_types`, `partial_rotary_factor`, nested `rope_parameters`), including the files
  that `DeepseekV4Config.save_pretrained` writes. `hf_to_fields` says how missing and null keys
  and a list-valued `eos_token_id` are read.

  Raises:
    FileNotFoundError: there is no config.json at `source`.
    ValueError: the file is not a JSON object, its `model_type` is another model's, or a key is
      missing, null where it is required, or holds a bad value; the message names the file, the
      key and the value.
  """
  hf, where = _read_json(source)
  try:
    return ModelConfig(**{**hf_to_fields(hf), **overrides})
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _read_json(source) -> tuple[dict, str]:
  """(the config dict, where it came from: the file's path or "config")."""
  if isinstance(source, dict):
    return source, "config"
  path = os.fspath(source)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"config file not found: {path!r} (expected a config.json or its folder)")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except UnicodeDecodeError:
    raise ValueError(f"{path}: not a text file (not UTF-8); expected a config.json") from None
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected a "
      "config.json"
    ) from None
  if not isinstance(hf, dict):
    raise ValueError(f"{path}: expected a JSON object of config keys, got a {type(hf).__name__}")
  return hf, path


_HF_KIND = {
  "sliding_attention": "sliding",
  "compressed_sparse_attention": "csa",
  "heavily_compressed_attention": "hca",
}
_HF_TYPE = {kind: hf_type for hf_type, kind in _HF_KIND.items()}
_SLIDING = 0  # the hub's `compress_ratios` entry of a sliding-only layer


def _csa_ratio() -> int:
  return kinds_lib.lookup("csa")().ratio


# transformers' DeepseekV4Config default of `compress_rates`.
_HF_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_REQUIRED = object()


def _default(name: str) -> Any:
  """ModelConfig's default of field `name`."""
  return ModelConfig.__dataclass_fields__[name].default


def _get(hf: dict, key: str, default: Any = _REQUIRED) -> Any:
  """hf[key]; a key that is missing or null gives `default` (an error when there is none)."""
  value = hf.get(key)
  if value is None:
    if default is _REQUIRED:
      raise ValueError(f"the required key {key!r} is {'null' if key in hf else 'missing'}")
    return default
  return value


def _as_int(key: str, value: Any) -> int:
  """An integer JSON value (64, or 64.0); 64.7, true or "64" is an error naming `key`."""
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{key}={value!r} must be an integer")
  return value


def _as_float(key: str, value: Any) -> float:
  """A finite JSON number; NaN, Infinity, true or "1e-6" is an error naming `key`."""
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or (isinstance(value, float) and not math.isfinite(value))):
    raise ValueError(f"{key}={value!r} must be a finite number")
  return float(value)


def _as_bool(key: str, value: Any) -> bool:
  """A JSON boolean; "no", "false" or 0 is an error naming `key`."""
  if not isinstance(value, bool):
    raise ValueError(f"{key}={value!r} must be true or false")
  return value


def _as_type(key: str, value: Any, kind: type, what: str):
  """`value` when it is a `kind` (str, list or dict), else an error naming `key` and `what`."""
  if not isinstance(value, kind):
    raise ValueError(f"{key}={value!r} must be {what}")
  return value


def _as_str(key: str, value: Any) -> str:
  return _as_type(key, value, str, "a string")


def _as_list(key: str, value: Any) -> list:
  return _as_type(key, value, list, "a list")


def _as_dict(key: str, value: Any) -> dict:
  return _as_type(key, value, dict, "a JSON object")


def _first_of(hf: dict, *keys: str) -> tuple[str, Any]:
  """(key, value) of the first of `keys` (a key and its alias) that is present and not null."""
  for key in keys:
    if hf.get(key) is not None:
      return key, hf[key]
  raise ValueError(f"the required key {keys[0]!r} (or {' / '.join(map(repr, keys[1:]))}) is "
                   "missing or null")


def _schedule(hf: dict, num_layers: int) -> tuple:
  """The layer schedule: our own key's list of kinds when the file has one (a schedule with a
  kind that has no official encoding, written by `fields_to_hf`), else the official keys."""
  own = _as_dict(_OWN_KEY, _get(hf, _OWN_KEY, {}))
  if own.get("layers") is None:
    return _hf_compress_ratios(hf, num_layers)
  raw = _as_list(f"{_OWN_KEY}.layers", own["layers"])
  if len(raw) != num_layers:
    raise ValueError(f"{_OWN_KEY}.layers has {len(raw)} entries; expected num_hidden_layers="
                     f"{num_layers}")
  out = []
  for i, e in enumerate(raw):
    if isinstance(e, dict):
      try:
        out.append(kinds_lib.from_json(e))
      except ValueError as err:
        raise ValueError(f"{_OWN_KEY}.layers[{i}]: {err}") from None
    else:
      out.append(_as_int(f"{_OWN_KEY}.layers[{i}]", e))
  return tuple(out)


def _hf_compress_ratios(hf: dict, num_layers: int) -> tuple[int, ...]:
  if hf.get("layer_types") is not None:
    kinds = _as_list("layer_types", hf["layer_types"])
    rates = dict(_as_dict("compress_rates", _get(hf, "compress_rates", _HF_COMPRESS_RATES)))
    # transformers folds the legacy scalar keys into compress_rates.
    for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                         ("compress_rate_hca", "heavily_compressed_attention")):
      if hf.get(legacy) is not None:
        rates[kind] = hf[legacy]
    bad = [k for k in kinds if k not in _HF_KIND]
    if bad:
      raise ValueError(f"layer_types has unknown entries {bad}; expected one of {list(_HF_KIND)}")
    ratios = []
    for i, kind in enumerate(kinds):
      if kind == "sliding_attention":
        ratios.append(_SLIDING)
      elif kind not in rates:
        raise ValueError(f"layer_types[{i}]={kind!r} but compress_rates={rates} has no such key")
      else:
        ratios.append(_as_int(f"compress_rates[{kind!r}]", rates[kind]))
    csa = rates.get("compressed_sparse_attention", _csa_ratio())
    if csa != _csa_ratio():
      raise ValueError(f"compress_rates['compressed_sparse_attention']={csa!r}; CSA layers are "
                       f"defined by ratio {_csa_ratio()} (docs/architecture.md#layer-schedule)")
  elif hf.get("compress_ratios") is not None:
    raw = _as_list("compress_ratios", hf["compress_ratios"])
    ratios = [_as_int(f"compress_ratios[{i}]", r) for i, r in enumerate(raw)]
  else:
    raise ValueError("the per-layer schedule is missing: expected 'layer_types' (transformers) "
                     "or 'compress_ratios' (hub)")
  if len(ratios) == num_layers + 1:
    if ratios[-1] != _SLIDING:
      raise ValueError(
        f"the MTP entry of compress_ratios is {ratios[-1]}; only 0 (SWA) is supported")
    ratios = ratios[:-1]
  if len(ratios) != num_layers:
    raise ValueError(
      f"per-layer schedule has {len(ratios)} entries; expected num_hidden_layers={num_layers} "
      f"(or {num_layers + 1} with the MTP entry)"
    )
  return tuple(ratios)


def _hf_rope_dim(hf: dict, head_dim: int) -> int:
  """qk_rope_head_dim (hub) or partial_rotary_factor * head_dim (transformers); both must agree."""
  dim = None
  if hf.get("qk_rope_head_dim") is not None:
    dim = _as_int("qk_rope_head_dim", hf["qk_rope_head_dim"])
  if hf.get("partial_rotary_factor") is not None:
    factor = _as_float("partial_rotary_factor", hf["partial_rotary_factor"])
    channels = head_dim * factor
    if abs(channels - round(channels)) > 1e-6:
      raise ValueError(f"partial_rotary_factor={factor} times head_dim={head_dim} is {channels}, "
                       "not a whole number of rotary channels")
    if dim is not None and dim != round(channels):
      raise ValueError(f"qk_rope_head_dim={dim} disagrees with partial_rotary_factor={factor} "
                       f"times head_dim={head_dim} (= {channels})")
    dim = int(round(channels))
  if dim is None:
    raise ValueError("the rotary width is missing: expected 'qk_rope_head_dim' or "
                     "'partial_rotary_factor'")
  return dim


def _hf_yarn(src: dict, label: str) -> dict[str, Any]:
  """YaRN fields of one rope dict (`label` names it in errors); rope_factor 1 when not YaRN."""
  rope_type = src.get("rope_type", src.get("type")) or "default"
  if rope_type == "default":
    return {"rope_factor": 1.0}
  if rope_type != "yarn":
    raise ValueError(f"{label}['rope_type']={rope_type!r}; DeepSeek-V4 uses 'yarn' on the "
                     "compressed layers (or 'default' for none)")
  # The V4 reference scales no magnitude (transformers forces attention_factor 1.0) and rounds
  # the correction range (truncate true).
  if src.get("attention_factor") not in (None, 1, 1.0):
    raise ValueError(f"{label}['attention_factor']={src['attention_factor']!r}; DeepSeek-V4's YaRN "
                     "has no magnitude factor (1.0)")
  if src.get("truncate") not in (None, True):
    raise ValueError(f"{label}['truncate']={src['truncate']!r}; only true is supported")
  for key in ("factor", "original_max_position_embeddings"):
    if src.get(key) is None:
      raise ValueError(f"{label}[{key!r}] is missing or null; YaRN needs it")
  return {
    "rope_factor": _as_float(f"{label}['factor']", src["factor"]),
    "rope_original_max_position": _as_int(f"{label}['original_max_position_embeddings']",
                                          src["original_max_position_embeddings"]),
    "rope_beta_fast": _as_float(f"{label}['beta_fast']",
                                _get(src, "beta_fast", _default("rope_beta_fast"))),
    "rope_beta_slow": _as_float(f"{label}['beta_slow']",
                                _get(src, "beta_slow", _default("rope_beta_slow"))),
  }


def _hf_rope(hf: dict, head_dim: int) -> dict[str, Any]:
  out: dict[str, Any] = {"rope_dim": _hf_rope_dim(hf, head_dim)}
  params = _as_dict("rope_parameters", _get(hf, "rope_parameters", {}))
  main, comp = params.get("main"), params.get("compress")
  nested = isinstance(main, dict) and isinstance(comp, dict)
  if nested and main.get("rope_theta") is not None:
    out["rope_theta"] = _as_float("rope_parameters['main']['rope_theta']", main["rope_theta"])
  else:
    out["rope_theta"] = _as_float("rope_theta", _get(hf, "rope_theta", _default("rope_theta")))
  if nested and comp.get("rope_theta") is not None:
    out["compress_rope_theta"] = _as_float("rope_parameters['compress']['rope_theta']",
                                           comp["rope_theta"])
  else:
    out["compress_rope_theta"] = _as_float(
      "compress_rope_theta", _get(hf, "compress_rope_theta", _default("compress_rope_theta")))
  # YaRN parameters: nested transformers form, flat transformers form, or the hub's rope_scaling.
  if nested:
    out.update(_hf_yarn(comp, "rope_parameters['compress']"))
  elif params:
    out.update(_hf_yarn(params, "rope_parameters"))
  elif hf.get("rope_scaling") is not None:
    out.update(_hf_yarn(_as_dict("rope_scaling", hf["rope_scaling"]), "rope_scaling"))
  else:
    out["rope_factor"] = 1.0
  return out


def _hf_special_ids(hf: dict, vocab_size: int) -> dict[str, int]:
  """bos/eos ids; null or missing = V4's 0 / 1; a list-valued eos gives its first id."""
  bos = hf.get("bos_token_id")
  bos = _default("bos_token_id") if bos is None else _as_int("bos_token_id", bos)
  eos = hf.get("eos_token_id")
  if isinstance(eos, list):
    ids = [_as_int(f"eos_token_id[{i}]", e) for i, e in enumerate(eos)]
  else:
    ids = [] if eos is None else [_as_int("eos_token_id", eos)]
  for i in ids:
    if not 0 <= i < vocab_size:
      raise ValueError(f"eos_token_id={eos!r}: id {i} is outside the vocabulary "
                       f"[0, vocab_size={vocab_size})")
  return {"bos_token_id": bos, "eos_token_id": ids[0] if ids else _default("eos_token_id")}


def _hf_num_hash_layers(hf: dict, num_layers: int) -> int:
  if hf.get("mlp_layer_types") is not None:
    types = _as_list("mlp_layer_types", hf["mlp_layer_types"])
    num_hash = sum(1 for t in types if t == "hash_moe")
    if types != ["hash_moe"] * num_hash + ["moe"] * (len(types) - num_hash):
      raise ValueError(f"mlp_layer_types={types}: hash layers must form a prefix of 'moe' layers")
    return num_hash
  if hf.get("num_hash_layers") is not None:
    return _as_int("num_hash_layers", hf["num_hash_layers"])
  return min(_default("num_hash_layers"), num_layers)  # transformers: the first 3 layers


def hf_to_fields(hf: dict) -> dict[str, Any]:
  """Maps hub / transformers config keys to ModelConfig fields.

  Required: the shape keys (vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
  head_dim, q_lora_rank, o_groups, o_lora_rank, sliding_window, index_*, n_routed_experts,
  num_experts_per_tok, moe_intermediate_size), the per-layer schedule (layer_types or
  compress_ratios) and the rotary width (qk_rope_head_dim or partial_rotary_factor). Every other
  key may be missing or null and then takes transformers' DeepseekV4Config default, which is
  ModelConfig's default too (routed_scaling_factor 1.5, the first 3 layers hash-routed, 1 MTP
  layer, ...); without YaRN parameters `rope_factor` is 1 (no YaRN).

  Special ids: a null or missing `bos_token_id` / `eos_token_id` (what save_pretrained writes when
  no ids are given) is V4's 0 / 1, the released tokenizer's BOS / EOS and DeepseekV4Config's
  defaults. A list-valued `eos_token_id` (several end ids) gives its FIRST id as `eos_token_id`,
  the id that pads stopped rows in `generate`; every id in the list must be in the vocabulary.
  ModelConfig holds one EOS id: the stop tokens of generation come from the tokenizer.

  Values are type-checked and named in errors: 64.7 for an integer, "no" for a boolean, NaN for
  a number are refused. Keys with no architectural meaning (use_cache, pad_token_id, dtype,
  quantization_config, router_aux_loss_coef, ...) are not read.
  """
  model_type = hf.get("model_type")
  if model_type is not None and model_type not in MODEL_TYPES:
    raise ValueError(f"model_type={model_type!r} is not DeepSeek-V4's (expected one of "
                     f"{list(MODEL_TYPES)}); this config describes another model")
  num_layers = _as_int("num_hidden_layers", _get(hf, "num_hidden_layers"))
  head_dim = _as_int("head_dim", _get(hf, "head_dim"))
  vocab_size = _as_int("vocab_size", _get(hf, "vocab_size"))
  kv_heads = _as_int("num_key_value_heads", _get(hf, "num_key_value_heads", 1))
  if kv_heads != 1:
    raise ValueError(f"num_key_value_heads={kv_heads}; DeepSeek-V4 has one shared K=V head")
  if _as_str("hidden_act", _get(hf, "hidden_act", "silu")) != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r}; DeepSeek-V4 uses 'silu'")
  for key, what in (("tie_word_embeddings", "an untied LM head"),
                    ("attention_bias", "no attention bias"), ("mlp_bias", "no MLP bias")):
    if _as_bool(key, _get(hf, key, False)):
      raise ValueError(f"{key}=true; DeepSeek-V4 has {what}")

  def req_int(key: str) -> int:
    return _as_int(key, _get(hf, key))

  def opt(conv, key: str, field: str):
    return conv(key, _get(hf, key, _default(field)))

  fields = dict(
    vocab_size=vocab_size,
    d_model=req_int("hidden_size"),
    num_heads=req_int("num_attention_heads"),
    head_dim=head_dim,
    q_lora_rank=req_int("q_lora_rank"),
    o_groups=req_int("o_groups"),
    o_lora_rank=req_int("o_lora_rank"),
    window=req_int("sliding_window"),
    compress_ratios=_schedule(hf, num_layers),
    index_heads=req_int("index_n_heads"),
    index_head_dim=req_int("index_head_dim"),
    index_topk=req_int("index_topk"),
    num_experts=_as_int(*_first_of(hf, "n_routed_experts", "num_local_experts")),
    experts_per_token=req_int("num_experts_per_tok"),
    moe_inter_dim=_as_int(*_first_of(hf, "moe_intermediate_size", "intermediate_size")),
    num_shared_experts=opt(_as_int, "n_shared_experts", "num_shared_experts"),
    num_hash_layers=_hf_num_hash_layers(hf, num_layers),
    route_scale=opt(_as_float, "routed_scaling_factor", "route_scale"),
    norm_topk_prob=opt(_as_bool, "norm_topk_prob", "norm_topk_prob"),
    score_func=opt(_as_str, "scoring_func", "score_func"),
    swiglu_limit=opt(_as_float, "swiglu_limit", "swiglu_limit"),
    hc_mult=opt(_as_int, "hc_mult", "hc_mult"),
    hc_sinkhorn_iters=opt(_as_int, "hc_sinkhorn_iters", "hc_sinkhorn_iters"),
    hc_eps=opt(_as_float, "hc_eps", "hc_eps"),
    rms_eps=opt(_as_float, "rms_norm_eps", "rms_eps"),
    max_position_embeddings=opt(_as_int, "max_position_embeddings", "max_position_embeddings"),
    num_mtp_layers=opt(_as_int, "num_nextn_predict_layers", "num_mtp_layers"),
    init_std=opt(_as_float, "initializer_range", "init_std"),
    **_hf_special_ids(hf, vocab_size),
  )
  fields.update(_hf_rope(hf, head_dim))
  # Our own knobs that transformers has no key for, written by fields_to_hf.
  own = _as_dict(_OWN_KEY, _get(hf, _OWN_KEY, {}))
  # Files written before the run choices moved to `Options` carry them here: dropped, one INFO.
  own = drop_former_config_fields(own, f"config.json {_OWN_KEY!r}")
  fields.update({k: v for k, v in own.items() if k in _OWN_FIELDS})
  return fields


_OWN_KEY = "deepseek_v4_jax"
_OWN_FIELDS = ("init_std", "residual", "attention", "hca_ratio", "router_bias")


def _own_entry(entry):
  """A schedule entry under our key: an official ratio as is, another kind as its `to_json`."""
  return entry.to_json() if isinstance(entry, kinds_lib.AttentionKind) else entry


def fields_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers-style config.json of `cfg` (accepted by `DeepseekV4Config`).

  The ablation switches without a transformers key (residual, attention, hca_ratio, router_bias)
  go under our own key, as do the other knobs of `_OWN_FIELDS`; the transformers keys describe
  the fields as stored (`compress_ratios`, not `layer_ratios`), so a config reads back equal. A
  switched config (residual != "mhc", attention != "v4", router_bias off) is a model only this
  package runs, as is one whose schedule holds a kind without an official encoding (Dense, a
  registered user kind): its schedule goes under our key as `layers` (`AttentionKind.to_json`)
  instead of `layer_types`.
  """
  kinds = [kinds_lib.as_kind(e) for e in cfg.compress_ratios]
  official = all(kinds_lib.official_ratio(k) is not None for k in kinds)
  hca = sorted({k.ratio for k in kinds if _HF_TYPE.get(k.name) == "heavily_compressed_attention"})
  hca = hca or [128]
  if len(hca) > 1:
    raise ValueError(f"transformers supports one HCA ratio per model; got {hca}")
  rope = {"rope_type": "default"}
  if cfg.yarn:
    rope = {"rope_type": "yarn", "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
            "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
  return {
    "model_type": MODEL_TYPES[0],
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
    **({"layer_types": [_HF_TYPE[k.name] for k in kinds],
        "compress_rates": {"compressed_sparse_attention": _csa_ratio(),
                           "heavily_compressed_attention": hca[0]}} if official else {}),
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
    "initializer_range": cfg.init_std,
    # A kind without an official encoding (Dense, a user kind): the whole schedule, our way.
    _OWN_KEY: {**{k: getattr(cfg, k) for k in _OWN_FIELDS},
               **({} if official else {"layers": [_own_entry(e) for e in cfg.compress_ratios]})},
  }
