"""Mixture of experts (docs/architecture.md#moe): sqrt-softplus router with the aux-loss-free
selection bias, hash routing for the first layers, clamped SwiGLU experts and one shared expert.

Routed experts run as grouped matmuls over the token-expert pairs sorted by expert: dispatch is a
stable sort and a gather, combine a scatter back and a weighted sum over each token's k pairs, so
compute and memory are O(tokens * k), never O(tokens * E) (no one-hot matrices). How they run is
explicit: `MoE.__call__(x, ids, impl)` takes a `MoEImpl` naming the grouped-matmul implementation
and, for expert parallelism, the device layout (layers/moe_ep.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from deepseek_v4.config import ModelConfig
from deepseek_v4.layers import moe_ep, moe_ffn
from deepseek_v4.layers.moe_ffn import swiglu
from deepseek_v4.layers.params import HashTable, Linear, RouterBias, normal, param

__all__ = ["ExpertAdapters", "Experts", "KeptWeight", "MoE", "MoEImpl", "routed_experts", "swiglu"]


@dataclasses.dataclass(frozen=True)
class MoEImpl:
  """How the routed experts run (hashable: usable as a static jit argument).

  Attributes:
    gmm: grouped-matmul implementation (kernels_pallas/moe_gmm/ops.py): "auto" (tiled on CPU,
      ragged_dot on GPU/TPU, logged once), "tiled", "ragged_dot" or "reference".
    expert_parallel: the expert-parallel layout (`moe_ep.expert_parallel_layout(mesh, rules)`),
      or None to run every expert on this device's tokens.
  """

  gmm: str = "auto"
  expert_parallel: moe_ep.ExpertParallel | None = None


SCORE_FUNCS = {
  "sqrtsoftplus": lambda z: jnp.sqrt(jax.nn.softplus(z)),  # V4 (docs/architecture.md#router-scores)
  "sigmoid": jax.nn.sigmoid,  # V3
  "softmax": lambda z: jax.nn.softmax(z, axis=-1),  # classic top-k MoE (over the experts)
}


def router_scores(x: Float[Array, "T D"], gate: Float[Array, "E D"],
                  func: str = "sqrtsoftplus") -> Array:
  """Affinities `f(x gate^T)` in float32, [T, E]; f = `ModelConfig.score_func` (V4:
  sqrt(softplus), docs/architecture.md#router-scores)."""
  logits = jnp.einsum("TD,ED->TE", x.astype(jnp.float32), gate.astype(jnp.float32))
  return SCORE_FUNCS[func](logits)


def route_topk(scores: Float[Array, "T E"], bias: Float[Array, "E"] | None, k: int) -> Array:
  """Learned selection: top-k of `scores + bias`; the bias only chooses
  (docs/architecture.md#routing). No bias (router_bias=False): top-k of the scores."""
  return jax.lax.top_k(scores if bias is None else scores + bias.astype(jnp.float32), k)[1]


def route_hash(ids: Int[Array, "T"], table: Int[Array, "V X"]) -> Array:
  """Hash selection: the frozen `tid2eid` row of each token."""
  return table[ids]


def combine_weights(scores: Array, idx: Array, scale: float, normalize: bool) -> Array:
  """`w_k = s_{idx_k} / sum_k' s_{idx_k'} * scale` from the unbiased scores
  (docs/architecture.md#combine-weights)."""
  w = jnp.take_along_axis(scores, idx, axis=-1)
  if normalize:
    w = w / jnp.sum(w, axis=-1, keepdims=True)
  return w * scale


def routed_experts(x: Float[Array, "T D"], idx: Int[Array, "T X"], w: Float[Array, "T X"],
                   w1: Array, w2: Array, w3: Array, limit: float, gmm: str = "auto",
                   lora: moe_ffn.ExpertLoRA | None = None, lora_scale: float = 1.0) -> Array:
  """sum_k w_k * Expert_{idx_k}(x), [T, D] float32, as grouped matmuls over expert-sorted pairs.

  w1, w3: [E, F, D]; w2: [E, D, F] (checkpoint layouts). `gmm` picks the grouped matmul; `lora`
  adds per-expert adapters (`moe_ffn.expert_ffn`).
  """
  X = idx.shape[1]
  E = w1.shape[0]
  order, sizes, _ = moe_ffn.sort_by(idx.reshape(-1), E)  # dispatch: pairs grouped by expert
  ys = moe_ffn.expert_ffn(x[order // X], sizes, w1, w2, w3, limit, gmm, lora, lora_scale)
  y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)  # pairs token-major again
  return moe_ffn.combine(y, w)  # weighted sum of each token's k outputs, float32


class KeptWeight(nnx.Variable):
  """A weight held in its released low-precision form (packed FP4 codes or E8M0 scales,
  `Options.keep_quantized`): frozen data, never an `nnx.Param` (so never an optimizer target);
  gradients flow through its decoded values to the activations and adapters only."""


def _fp4_weight(rngs: nnx.Rngs, shape: tuple[int, int, int], std: float,
                axes: tuple[str, str, str]) -> tuple[KeptWeight, KeptWeight]:
  """(codes [E, R, C/2] uint8, scales [E, R, ceil(C/32)] E8M0) of a fresh FP4 weight: random
  codes (E2M1 values up to 6) under one power-of-two scale near std / 2. A loaded checkpoint
  replaces both; a fresh kept model exists for shapes (plan, eval_shape) and tests."""
  E, R, C = shape
  if C % 2:
    raise ValueError(f"keep_quantized='experts' packs two FP4 values per byte along the last "
                     f"axis; expert weight {shape} has an odd width {C}")
  codes = jax.random.bits(rngs.params(), (E, R, C // 2), jnp.uint8)
  scale = jnp.full((E, R, -(-C // 32)), 2.0 ** round(math.log2(std / 2)), jnp.float8_e8m0fnu)
  return (KeptWeight(codes, out_sharding=axes, eager_sharding=False),
          KeptWeight(scale, out_sharding=axes, eager_sharding=False))


class Experts(nnx.Module):
  """Stacked routed experts: w1, w3 [E, F, D] and w2 [E, D, F].

  With `keep_quantized == "experts"` (`Options.keep_quantized`) each of them is held as stored in the official
  checkpoints (docs/architecture.md#fp8-fp4): `w1` the packed FP4 codes [E, F, D/2] uint8 and
  `w1_scale` the E8M0 scales [E, F, D/32] (likewise w3; w2 [E, D, F/2] and [E, D, F/32]); the MoE
  decodes them one expert at a time (layers/moe_ffn.py).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, keep_quantized: str | None = None):
    E, F, D = cfg.num_experts, cfg.moe_inter_dim, cfg.d_model
    self.kept = keep_quantized == "experts"
    shapes = {"w1": ((E, F, D), ("expert", "mlp", "embed")),
              "w3": ((E, F, D), ("expert", "mlp", "embed")),
              "w2": ((E, D, F), ("expert", "embed", "mlp"))}
    for name, (shape, axes) in shapes.items():
      if self.kept:
        codes, scale = _fp4_weight(rngs, shape, cfg.init_std, axes)
        setattr(self, name, codes)
        setattr(self, f"{name}_scale", scale)
      else:
        setattr(self, name, param(normal(rngs, shape, cfg.init_std, jnp.dtype(cfg.param_dtype)),
                                  axes))

    self.lora = nnx.data(None)  # `ExpertAdapters` once deepseek_v4/lora.py targets "experts"

  def logical_shapes(self) -> dict[str, tuple[int, ...]]:
    """The weights' logical shapes ([..., E, out, in]; a scanned stack leads with its layers),
    whether held as floats or as packed FP4 codes (two values per byte)."""
    shapes = {}
    for name in ("w1", "w2", "w3"):
      *lead, last = getattr(self, name).shape
      shapes[name] = (*lead, 2 * last if self.kept else last)
    return shapes

  def adapters(self) -> tuple[moe_ffn.ExpertLoRA | None, float]:
    """(the experts' LoRA arrays or None, their scale alpha / r)."""
    if self.lora is None or self.lora.merged:
      return None, 1.0
    return self.lora.arrays(), self.lora.scale

  def weights(self) -> tuple:
    """(w1, w2, w3): arrays, or `moe_ffn.Fp4Weight`s when kept quantized."""
    if not self.kept:
      return self.w1[...], self.w2[...], self.w3[...]
    return tuple(moe_ffn.Fp4Weight(getattr(self, n)[...], getattr(self, f"{n}_scale")[...])
                 for n in ("w1", "w2", "w3"))


class ExpertAdapters(nnx.Module):
  """LoRA on the routed experts (deepseek_v4/lora.py): per expert e and weight w in (w1, w2, w3)
  `w_e += scale (A_e B_e)^T`, with A [..., E, in, L] random and B [..., E, L, out] zero at the
  start, both `nnx.LoRAParam`s. Applied inside the expert loop (layers/moe_ffn.py), so over kept
  FP4 experts no merged weight is ever formed."""

  def __init__(self, shapes: dict[str, tuple[int, ...]], rank: int, alpha: float, *,
               rngs: nnx.Rngs):
    self.scale = alpha / rank
    self.merged = False  # whether the updates are in the experts' weights (lora.merge_lora)
    for name, (*lead, out_features, in_features) in shapes.items():
      std = 1.0 / rank ** 0.5 / in_features ** 0.5
      a = std * jax.random.normal(rngs.params(), (*lead, in_features, rank), jnp.float32)
      setattr(self, f"{name}_lora_a", nnx.LoRAParam(a))
      setattr(self, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros((*lead, rank, out_features),
                                                              jnp.float32)))

  def arrays(self) -> moe_ffn.ExpertLoRA:
    return moe_ffn.ExpertLoRA(*(getattr(self, f"{n}_lora_{ab}")[...]
                                for n in ("w1", "w2", "w3") for ab in "ab"))

  def deltas(self) -> dict[str, jax.Array]:
    """Each weight's update `scale (A B)^T` [..., E, out, in], float32."""
    return {n: self.scale * jnp.einsum("...IL,...LO->...OI", getattr(self, f"{n}_lora_a")[...],
                                       getattr(self, f"{n}_lora_b")[...])
            for n in ("w1", "w2", "w3")}


class SharedExpert(nnx.Module):
  """The always-on expert: w1, w3 [F, D], w2 [D, F], clamped like the routed ones."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    lin = dict(std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    self.w1 = Linear(cfg.d_model, cfg.moe_inter_dim, axes=("mlp", "embed"), **lin)
    self.w2 = Linear(cfg.moe_inter_dim, cfg.d_model, axes=("embed", "mlp"), **lin)
    self.w3 = Linear(cfg.d_model, cfg.moe_inter_dim, axes=("mlp", "embed"), **lin)

  def __call__(self, x: Array, limit: float) -> Array:
    h = swiglu(self.w1(x, jnp.float32), self.w3(x, jnp.float32), limit)
    return self.w2(h.astype(x.dtype))


def default_hash_table(key: jax.Array, vocab: int, experts: int, k: int) -> jax.Array:
  """k distinct pseudo-random experts per token id, [V, k] int32.

  DeepSeek's hash function is unpublished (docs/architecture.md#routing); checkpoints ship the real
  table, which replaces this one on load. Written in jax so `nnx.eval_shape` never computes it.
  """
  u = jax.random.uniform(key, (vocab, experts))
  return jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)


class Gate(nnx.Module):
  """Router: weight [E, D]; `bias` [E] on learned layers (when cfg.router_bias), `tid2eid`
  [V, K] on hash layers."""

  def __init__(self, cfg: ModelConfig, hashed: bool, *, rngs: nnx.Rngs):
    self.hashed = hashed
    self.weight = param(normal(rngs, (cfg.num_experts, cfg.d_model), cfg.init_std,
                               jnp.dtype(cfg.param_dtype)), ("expert", "embed"))
    if hashed:
      table = default_hash_table(rngs.params(), cfg.vocab_size, cfg.num_experts,
                                 cfg.experts_per_token)
      self.tid2eid = HashTable(table, out_sharding=("vocab", None),
                               eager_sharding=False)
    elif cfg.router_bias:
      self.bias = RouterBias(jnp.zeros((cfg.num_experts,), jnp.float32),
                             out_sharding=("expert",), eager_sharding=False)


class MoE(nnx.Module):
  """y = sum_k w_k Expert_{idx_k}(x) + Shared(x) (docs/architecture.md#moe-output)."""

  def __init__(self, cfg: ModelConfig, hashed: bool, *, rngs: nnx.Rngs,
               keep_quantized: str | None = None):
    self.cfg = cfg
    self.gate = Gate(cfg, hashed, rngs=rngs)
    self.experts = Experts(cfg, rngs=rngs, keep_quantized=keep_quantized)
    self.shared_experts = nnx.data(
      SharedExpert(cfg, rngs=rngs) if cfg.num_shared_experts else None)

  def route(self, x: Float[Array, "T D"], ids: Int[Array, "T"]) -> tuple[Array, Array, Array]:
    """(scores [T,E], selected experts [T,K], combine weights [T,K])."""
    cfg = self.cfg
    scores = router_scores(x, self.gate.weight[...], cfg.score_func)
    if self.gate.hashed:
      idx = route_hash(ids, self.gate.tid2eid[...])
    else:
      bias = self.gate.bias[...] if cfg.router_bias else None
      idx = route_topk(scores, bias, cfg.experts_per_token)
    return scores, idx, combine_weights(scores, idx, cfg.route_scale, cfg.norm_topk_prob)

  def __call__(self, x: Float[Array, "B T D"], ids: Int[Array, "B T"],
               impl: MoEImpl = MoEImpl()) -> tuple[Array, dict]:
    """Returns the output [B,T,D] and routing stats (scores, selected experts) for the losses."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)
    scores, idx, w = self.route(flat, ids.reshape(-1))
    experts = (*self.experts.weights(), self.cfg.swiglu_limit)
    lora, lora_scale = self.experts.adapters()
    if impl.expert_parallel is None:
      y = routed_experts(flat, idx, w, *experts, gmm=impl.gmm, lora=lora, lora_scale=lora_scale)
    elif lora is not None:
      raise ValueError("LoRA on the routed experts (target 'experts') runs without expert "
                       "parallelism only; drop 'experts' from the LoRA targets or run without "
                       "an expert mesh axis")
    else:
      y = moe_ep.routed_experts_ep(flat, idx, w, *experts, impl.expert_parallel.for_rows(B),
                                   gmm=impl.gmm)
    if self.shared_experts is not None:
      y = y + self.shared_experts(flat, self.cfg.swiglu_limit).astype(jnp.float32)
    stats = {"scores": scores.reshape(B, T, -1), "experts": idx.reshape(B, T, -1)}
    return y.astype(x.dtype).reshape(B, T, D), stats
