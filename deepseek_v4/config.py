"""Model configuration: one frozen dataclass, its validation, and the presets.

The hub / transformers `config.json` reader and writer live in `config_hf.py`, which imports this
module (never the reverse at import time); `ModelConfig.from_hf` / `to_hf` are thin entry points
into it.

Values follow the DeepSeek-V4 hub `config.json` files (docs/architecture.md#hyperparameters,
#layer-schedule). Every per-layer choice is a tuple field; derived sizes are properties, so there
is one source of truth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import typing
from typing import Any, Callable, Literal

from deepseek_v4 import kinds as kinds_lib
from deepseek_v4.kinds import AttentionKind

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """DeepSeek-V4 architecture. Field names follow the spec's symbols (see
  docs/architecture.md#notation).

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
    compress_ratios: the layer schedule, one entry per trunk layer: an attention kind
      (`deepseek_v4.kinds`: Sliding(), Dense(), CSA(), HCA(ratio=m) or a registered user kind)
      or its official shorthand, 0 sliding-only, 4 CSA, other > 0 HCA with that ratio
      (docs/architecture.md#layer-schedule); the `attention` switch may replace it, see
      `layer_kinds`.
    index_heads / index_head_dim / index_topk: lightning indexer H_I, c_I, k_I.
    num_experts / experts_per_token / moe_inter_dim: routed experts E, K and their hidden size.
    num_shared_experts: shared experts (0 or 1), each of size moe_inter_dim.
    num_hash_layers: the first layers route by the frozen `tid2eid` table.
    route_scale: routed_scaling_factor applied after renormalizing the top-k weights.
    norm_topk_prob: renormalize the selected scores to sum 1 before scaling.
    score_func: router affinity s = f(x gate^T): "sqrtsoftplus" sqrt(softplus) (V4), "sigmoid"
      (V3) or "softmax" over the experts (classic top-k MoE); the combine weights are the selected
      unbiased scores (renormalized when norm_topk_prob) times route_scale, whichever f.
    router_bias: the aux-loss-free balancing bias of learned routers (added to the scores for the
      selection only, moved toward balance after each step). False = plain top-k of the scores,
      and no `gate.bias` tensor exists.
    swiglu_limit: clamp of the SwiGLU branches (gate <= limit, |up| <= limit).
    hc_mult / hc_sinkhorn_iters / hc_eps: mHC stream count, Sinkhorn iterations, epsilon.
    residual: the residual connection around every attention and MoE (ablation switch):
      "mhc" (V4): hc_mult streams, sigmoid pre/post, Sinkhorn-projected (doubly stochastic) W^res;
      "hc": hyper-connections (Zhu et al. 2024) as the mHC paper writes them, without the manifold
        constraint: pre/post/res = scale * tanh(mixing logits) + base, W^res unconstrained, base
        initialized to HC's static values (layers.mhc.hc_weights);
      "plain": the pre-norm residual x + f(norm(x)) with one stream; hc_mult (and the Sinkhorn
        settings) are ignored and no hc_* tensor exists (`num_streams` = 1).
    rms_eps: epsilon of every RMS norm (also the mHC RMS scalar).
    rope_theta: base of the sliding-only layers (no YaRN).
    compress_rope_theta: base of CSA/HCA layers (queries, window keys, entries, indexer).
    rope_factor / rope_original_max_position / rope_beta_fast / rope_beta_slow: YaRN on the
      compressed layers; `rope_factor == 1` turns YaRN off.
    max_position_embeddings: longest sequence the model accepts.
    attention: which attention every trunk layer runs (ablation switch; `layer_ratios` is the
      effective schedule that the model, the cache, the layout and the summary follow):
      "v4": `compress_ratios` as given; "window": sliding window only, every layer; "csa": CSA
      (ratio 4 + lightning indexer, index_topk) every layer; "hca": HCA with ratio `hca_ratio`
      every layer; "dense": full causal MQA with the same projections and sink, every key
      visible (no window limit, no compression; the MTP block too, and a decode cache keeps
      every key).
    hca_ratio: the compression ratio of attention="hca" (unused otherwise).
    num_mtp_layers: multi-token-prediction depth (0 or 1); the MTP block is sliding-only.
    bos_token_id / eos_token_id: special ids.
    dtype: compute dtype of activations and matmuls.
    param_dtype: storage dtype of matrices (norms, mHC, sinks, ape and router bias stay float32).
    init_std: std of the normal initializer of matrices.
    Run and load choices (kernels, query block, layer stacking, weight storage) are not part of
    the architecture: they travel as `deepseek_v4.options.Options`.
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
  compress_ratios: tuple[int | AttentionKind, ...]
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
  score_func: Literal["sqrtsoftplus", "sigmoid", "softmax"] = "sqrtsoftplus"
  router_bias: bool = True
  swiglu_limit: float = 10.0
  hc_mult: int = 4
  hc_sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  residual: Literal["mhc", "hc", "plain"] = "mhc"
  attention: Literal["v4", "dense", "window", "csa", "hca"] = "v4"
  hca_ratio: int = 128
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
  init_std: float = 0.02

  def __post_init__(self):
    if isinstance(self.compress_ratios, list):
      object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
    if isinstance(self.compress_ratios, tuple):
      object.__setattr__(self, "compress_ratios", tuple(map(_schedule_entry,
                                                            self.compress_ratios)))
    _validate(self)

  # ----- derived sizes --------------------------------------------------------------------------
  @property
  def num_layers(self) -> int:
    return len(self.compress_ratios)

  @property
  def nope_dim(self) -> int:
    return self.head_dim - self.rope_dim

  @property
  def num_streams(self) -> int:
    """Residual streams M of the trunk: hc_mult, or 1 with residual="plain"."""
    return 1 if self.residual == "plain" else self.hc_mult

  @property
  def hc_mix_dim(self) -> int:
    """Size of the mHC mixing vector: pre (M) + post (M) + residual (M*M)."""
    return (2 + self.hc_mult) * self.hc_mult

  @property
  def layer_kinds(self) -> tuple[AttentionKind, ...]:
    """The attention kind each trunk layer runs (`deepseek_v4.kinds`): the `attention` switch
    applied to `compress_ratios`. Everything per-layer reads this."""
    if self.attention == "v4":
      return tuple(kinds_lib.as_kind(e) for e in self.compress_ratios)
    kind = {"dense": lambda: kinds_lib.lookup("dense")(),
            "window": lambda: kinds_lib.lookup("sliding")(),
            "csa": lambda: kinds_lib.lookup("csa")(),
            "hca": lambda: kinds_lib.lookup("hca")(ratio=self.hca_ratio)}[self.attention]()
    return (kind,) * self.num_layers

  @property
  def mtp_kind(self) -> AttentionKind:
    """The MTP block's attention (docs/architecture.md#mtp): sliding window only, dense under
    the attention="dense" switch like every layer."""
    return kinds_lib.lookup("dense" if self.attention == "dense" else "sliding")()

  @property
  def layer_ratios(self) -> tuple[int, ...]:
    """Tokens per compressed entry of each trunk layer (0 = no entries): `layer_kinds` ratios."""
    return tuple(k.ratio for k in self.layer_kinds)

  @property
  def yarn(self) -> bool:
    return self.rope_factor != 1.0

  def is_hash_layer(self, layer: int) -> bool:
    return layer < self.num_hash_layers

  def replace(self, **overrides) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["compress_ratios"] = [e.to_json() if isinstance(e, AttentionKind) else e
                            for e in self.compress_ratios]
    return d

  # ----- the file boundary (config_hf.py) ------------------------------------------------------
  @classmethod
  def from_hf(cls, source: str | os.PathLike | dict, **overrides) -> "ModelConfig":
    """A config from a hub or transformers `config.json` (path, folder, or dict), then
    `overrides`: `config_hf.read_hf_config`, which documents the keys read and the errors."""
    from deepseek_v4 import config_hf  # the reader imports this module; see config_hf's doc

    return config_hf.read_hf_config(source, **overrides)

  def to_hf(self) -> dict[str, Any]:
    """The transformers-style config.json dict of this config: `config_hf.fields_to_hf`."""
    from deepseek_v4 import config_hf

    return config_hf.fields_to_hf(self)


def _schedule_entry(entry: Any) -> Any:
  """One `compress_ratios` entry in its canonical form, so equal schedules compare equal: a V4
  kind with an official encoding as its ratio (`CSA()` -> 4, what checkpoints and config.json
  have always stored), another kind as itself (a `to_json` dict, as checkpoint metadata stores
  it, read back), anything else as given for `_validate` to judge."""
  if isinstance(entry, dict):
    entry = kinds_lib.from_json(entry)
  if isinstance(entry, AttentionKind):
    r = kinds_lib.official_ratio(entry)
    return entry if r is None else r
  return entry


@functools.cache
def _field_types() -> dict[str, Any]:
  return typing.get_type_hints(ModelConfig)


def _check_types(c: ModelConfig) -> None:
  """Every field holds its annotated type: an int field a Python int (not a bool, not 64.7), a
  float field a finite real number, a bool field a bool (not "no"), a Literal field one of its
  choices. NumPy scalars become the Python scalar of the field's type."""
  for name, tp in _field_types().items():
    v = getattr(c, name)
    if tp is bool:
      if not isinstance(v, bool):
        raise ValueError(f"{name}={v!r} must be True or False")
    elif tp is int:
      if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name}={v!r} must be an integer")
      if type(v) is not int:
        object.__setattr__(c, name, int(v))
    elif tp is float:
      if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name}={v!r} must be a finite number")
      if not isinstance(v, (int, float)):
        object.__setattr__(c, name, float(v))
    elif typing.get_origin(tp) is Literal:
      if v not in typing.get_args(tp) or isinstance(v, bool):
        choices = ", ".join(map(repr, typing.get_args(tp)))
        raise ValueError(f"{name}={v!r}; expected one of {choices}")
    elif typing.get_origin(tp) is tuple and typing.get_args(tp) == (int, Ellipsis):
      if not isinstance(v, tuple):
        raise ValueError(f"{name}={v!r} must be a tuple of integers")
      for i, r in enumerate(v):
        if isinstance(r, bool) or not isinstance(r, int):
          raise ValueError(f"{name}[{i}]={r!r} must be an integer")


def _validate(c: ModelConfig) -> None:
  """Raises ValueError naming the offending field and value."""
  _check_types(c)
  positive = ["vocab_size", "d_model", "num_heads", "head_dim", "q_lora_rank", "o_groups",
              "o_lora_rank", "window", "experts_per_token", "moe_inter_dim", "hc_mult",
              "hc_sinkhorn_iters", "max_position_embeddings", "num_experts"]
  for name in positive:
    v = getattr(c, name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name}={v!r} must be a positive integer")
  if not c.compress_ratios:
    raise ValueError("compress_ratios=() must have one entry per layer (at least one layer)")
  if not isinstance(c.compress_ratios, tuple):
    raise ValueError(f"compress_ratios={c.compress_ratios!r} must be a tuple, one entry per layer")
  for i, r in enumerate(c.compress_ratios):
    if isinstance(r, AttentionKind):
      continue
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
      raise ValueError(f"compress_ratios[{i}]={r!r} must be an attention kind or an integer >= 0 "
                       "(0 sliding, 4 CSA, other HCA)")
  if not (0 < c.rope_dim <= c.head_dim) or c.rope_dim % 2:
    raise ValueError(f"rope_dim={c.rope_dim} must be even and in (0, head_dim={c.head_dim}]")
  if c.num_heads % c.o_groups:
    raise ValueError(f"num_heads={c.num_heads} not divisible by o_groups={c.o_groups}")
  csa_ratio = kinds_lib.lookup("csa")().ratio
  if c.hca_ratio <= 0 or c.hca_ratio == csa_ratio:
    raise ValueError(f"hca_ratio={c.hca_ratio} must be a positive integer other than "
                     f"{csa_ratio} (ratio {csa_ratio} is CSA)")
  for kind in dict.fromkeys(c.layer_kinds):  # each distinct kind once, in schedule order
    kind.validate(c)
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
  for name in ("dtype", "param_dtype"):
    if getattr(c, name) not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"{name}={getattr(c, name)!r}; expected 'float32', 'bfloat16' or 'float16'")
  for name in ("hc_eps", "rms_eps", "swiglu_limit", "route_scale", "rope_theta",
               "compress_rope_theta", "init_std", "rope_beta_fast", "rope_beta_slow"):
    v = getattr(c, name)
    if not v > 0:
      raise ValueError(f"{name}={v!r} must be a positive finite number")
  for name in ("rope_theta", "compress_rope_theta"):
    if not getattr(c, name) > 1:
      raise ValueError(f"{name}={getattr(c, name)!r}: a RoPE base must be > 1")
  if c.rope_factor < 1.0:
    raise ValueError(f"rope_factor={c.rope_factor} must be >= 1 (1 disables YaRN)")
  if c.rope_original_max_position <= 0:
    raise ValueError(f"rope_original_max_position={c.rope_original_max_position} must be a "
                     "positive integer")
  if c.yarn and c.rope_beta_fast < c.rope_beta_slow:
    raise ValueError(f"rope_beta_fast={c.rope_beta_fast} must be >= rope_beta_slow="
                     f"{c.rope_beta_slow} (YaRN's ramp runs from beta_fast to beta_slow)")
  for name in ("index_heads", "index_head_dim", "index_topk"):
    if getattr(c, name) < 0:
      raise ValueError(f"{name}={getattr(c, name)} must be >= 0")
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
  """Every layer kind in seconds on a CPU: docs/architecture.md#tiny test model (6 layers).

  SWA+hash, SWA+hash, CSA+hash, HCA(16)+learned, CSA+learned, HCA(16)+learned; YaRN on; MTP on.
  """
  base = ModelConfig(
    vocab_size=512, d_model=64, num_heads=4, head_dim=96, rope_dim=32, q_lora_rank=32, o_groups=2,
    o_lora_rank=16, window=8, compress_ratios=(0, 0, 4, 16, 4, 16), index_heads=16,
    index_head_dim=64, index_topk=4, num_experts=8, experts_per_token=2, moe_inter_dim=32,
    route_scale=1.5, num_hash_layers=3, rope_factor=4.0, rope_original_max_position=16,
    max_position_embeddings=512,
  )
  return dataclasses.replace(base, **overrides)


PRESETS: dict[str, Callable[..., ModelConfig]] = {"tiny": tiny, "flash": flash, "pro": pro}


# Former fields, now `deepseek_v4.options.Options` (kept in step with FORMER_CONFIG_FIELDS there;
# config.py imports nothing from the package).
_NOW_OPTIONS = ("kernel_impl", "scan_layers", "attn_block", "keep_quantized")


def parse_overrides(cfg: ModelConfig, assignments: list[str]) -> ModelConfig:
  """Applies `field=value` strings (as given to `--set`) with the field's own type."""
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  updates: dict[str, Any] = {}
  for item in assignments:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected field=value")
    name, raw = item.split("=", 1)
    if name in _NOW_OPTIONS:
      raise ValueError(f"--set {name}=...: {name} is no longer a ModelConfig field but a run "
                       f"option (deepseek_v4.Options): use --{name.replace('_', '-')} instead")
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
