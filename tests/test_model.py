"""Whole-model tests on the tiny preset: shapes, causality, MTP, input errors, config validation,
the hub / transformers config readers, the Flash / Pro schedules
(docs/architecture.md#layer-schedule) and preset builds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import layout
from deepseek_v4.config import ModelConfig
from deepseek_v4.config_hf import fields_to_hf
from tests.tolerances import F32_MODEL_REL, rel_err

T = 40
# Token t + 1 is changed for each t: around the window (W = 8), CSA (m = 4) and HCA (m = 16)
# boundaries, the start and the end of the sequence.
CAUSAL_TS = (0, 2, 3, 4, 6, 7, 8, 14, 15, 16, 30, 31, 38)


@pytest.fixture(scope="module")
def model():
  return deepseek_v4.Transformer(deepseek_v4.tiny(), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, ids):
  """(logits [B, T, V] of `model(ids)`, MTP logits [B, T-1, V])."""
  return model(ids), model.mtp_logits(model.trunk(ids)[0], ids)


@pytest.fixture(scope="module")
def perturbed_run(model):
  """Row 0: random ids; row k: row 0 with token CAUSAL_TS[k-1] + 1 replaced."""
  rng = np.random.default_rng(0)
  base = rng.integers(2, 512, size=(T,))
  rows = [base]
  for t in CAUSAL_TS:
    row = base.copy()
    row[t + 1] = (row[t + 1] + 1 + rng.integers(0, 500)) % 512
    rows.append(row)
  ids = jnp.asarray(np.stack(rows), jnp.int32)
  logits, mtp = _forward(model, ids)
  return np.asarray(ids), np.asarray(logits), np.asarray(mtp)


def test_forward_shape_dtype_finite(model, perturbed_run):
  ids, logits, mtp = perturbed_run
  assert logits.shape == (len(CAUSAL_TS) + 1, T, model.cfg.vocab_size)
  assert logits.dtype == np.float32 and np.isfinite(logits).all()
  assert mtp.shape == (len(CAUSAL_TS) + 1, T - 1, model.cfg.vocab_size)
  assert mtp.dtype == np.float32 and np.isfinite(mtp).all()


@pytest.mark.parametrize("k,t", list(enumerate(CAUSAL_TS, start=1)), ids=lambda v: str(v))
def test_causality(perturbed_run, k, t):
  # Rows of one batch agree only up to rounding (~1e-7 for some rows), hence the module-stack
  # tolerance. Information does flow forward far above that tolerance (the changed position and
  # the later ones move), so a backward leak of similar size would be caught.
  _, logits, _ = perturbed_run
  assert rel_err(logits[k, : t + 1], logits[0, : t + 1]) < F32_MODEL_REL
  assert rel_err(logits[k, t + 1], logits[0, t + 1]) > F32_MODEL_REL
  if t + 2 < T:
    assert rel_err(logits[k, t + 2:], logits[0, t + 2:]) > F32_MODEL_REL


@pytest.mark.parametrize("k,t", list(enumerate(CAUSAL_TS, start=1)), ids=lambda v: str(v))
def test_mtp_sees_next_token_only(perturbed_run, k, t):
  # MTP position i combines X^L_i with token i+1: changing token t+1 changes position t and
  # leaves every earlier position untouched.
  _, _, mtp = perturbed_run
  if t:
    assert rel_err(mtp[k, :t], mtp[0, :t]) < F32_MODEL_REL
  assert rel_err(mtp[k, t], mtp[0, t]) > F32_MODEL_REL


# ----- input validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("ids,exc,needle", [
  (jnp.zeros((1, 4), jnp.float32), TypeError, "float32"),
  (jnp.zeros((4,), jnp.int32), ValueError, "(4,)"),
  (jnp.zeros((1, 2, 3), jnp.int32), ValueError, "(1, 2, 3)"),
  (jnp.array([[3, 512, 4]], jnp.int32), ValueError, "512"),
  (jnp.array([[3, -1, 4]], jnp.int32), ValueError, "-1"),
  (jnp.zeros((1, 513), jnp.int32), ValueError, "T=513"),
], ids=["float", "rank1", "rank3", "id_eq_vocab", "id_negative", "too_long"])
def test_bad_input_ids(model, ids, exc, needle):
  with pytest.raises(exc) as info:
    model(ids)
  assert needle in str(info.value)


# ----- config validation --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,needles", [
  (dict(num_heads=3), ("num_heads", "3")),
  (dict(compress_ratios=(0, -1)), ("compress_ratios", "-1")),
  (dict(experts_per_token=99), ("experts_per_token", "99")),
  (dict(rope_dim=7), ("rope_dim", "7")),
  (dict(dtype="float64"), ("dtype", "float64")),
  (dict(d_model=0), ("d_model", "0")),
  (dict(num_hash_layers=7), ("num_hash_layers", "7")),
], ids=["o_groups", "neg_ratio", "topk_experts", "odd_rope", "dtype", "d_model", "hash_layers"])
def test_config_validation(overrides, needles):
  with pytest.raises(ValueError) as info:
    deepseek_v4.tiny(**overrides)
  for needle in needles:
    assert needle in str(info.value)


def test_config_is_frozen_and_hashable():
  cfg = deepseek_v4.tiny()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_model = 3
  assert hash(cfg) == hash(deepseek_v4.tiny()) and cfg == deepseek_v4.tiny()
  assert deepseek_v4.tiny(compress_ratios=[0, 4, 16]).compress_ratios == (0, 4, 16)


# ----- config readers (docs/architecture.md#hyperparameters, #tiny) -------------------------------
def _transformers_style(cfg: ModelConfig) -> dict:
  """transformers' form: layer_types + compress_rates + mlp_layer_types, partial_rotary_factor
  (no qk_rope_head_dim) and nested rope_parameters {"main", "compress"}."""
  hf = fields_to_hf(cfg)
  del hf["qk_rope_head_dim"], hf["rope_theta"], hf["compress_rope_theta"]
  prf = cfg.rope_dim / cfg.head_dim
  hf["rope_parameters"] = {
    "main": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": prf},
    "compress": {"rope_type": "yarn", "rope_theta": cfg.compress_rope_theta,
                 "factor": cfg.rope_factor,
                 "original_max_position_embeddings": cfg.rope_original_max_position,
                 "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow,
                 "partial_rotary_factor": prf, "attention_factor": 1.0},
  }
  return hf


def _hub_style(cfg: ModelConfig) -> dict:
  """The official hub keys: compress_ratios with L+1 entries (last = MTP, 0), num_hash_layers,
  qk_rope_head_dim, rope_scaling; no layer_types / mlp_layer_types / rope_parameters."""
  hf = fields_to_hf(cfg)
  for key in ("layer_types", "compress_rates", "mlp_layer_types", "partial_rotary_factor",
              "rope_parameters"):
    del hf[key]
  hf.update(compress_ratios=list(cfg.compress_ratios) + [0], num_hash_layers=cfg.num_hash_layers,
            qk_rope_head_dim=cfg.rope_dim,
            rope_scaling={"type": "yarn", "factor": cfg.rope_factor,
                          "original_max_position_embeddings": cfg.rope_original_max_position,
                          "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow})
  return hf


def _not_in_hf(cfg: ModelConfig) -> dict:
  """Run settings that no config.json carries."""
  return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype,
              init_std=cfg.init_std)


@pytest.mark.parametrize("preset", ["tiny", "flash", "pro"])
def test_from_hf_both_styles_give_the_same_config(preset):
  cfg = deepseek_v4.PRESETS[preset]()
  keep = _not_in_hf(cfg)
  flat = ModelConfig.from_hf(fields_to_hf(cfg), **keep)
  nested = ModelConfig.from_hf(_transformers_style(cfg), **keep)
  hub = ModelConfig.from_hf(_hub_style(cfg), **keep)
  assert flat == cfg and nested == cfg and hub == cfg


def test_from_hf_tiny_spec_kwargs():
  # The exact transformers kwargs of docs/architecture.md#tiny (max_position_embeddings 64 there).
  kw = dict(
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
    max_position_embeddings=64, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
    tie_word_embeddings=False)
  cfg = ModelConfig.from_hf(kw)
  assert cfg == deepseek_v4.tiny(max_position_embeddings=64)


def test_from_hf_reads_a_file(tmp_path):
  import json

  (tmp_path / "config.json").write_text(json.dumps(_hub_style(deepseek_v4.tiny())))
  assert ModelConfig.from_hf(tmp_path) == deepseek_v4.tiny()


# ----- presets ------------------------------------------------------------------------------------
FLASH_RATIOS = [0, 0, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4,
                128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128,
                4, 0]
PRO_RATIOS = [128, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4,
              128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128,
              4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 128, 4, 0]


@pytest.mark.parametrize("preset,ratios", [("flash", FLASH_RATIOS), ("pro", PRO_RATIOS)])
def test_preset_schedules(preset, ratios):
  cfg = deepseek_v4.PRESETS[preset]()
  assert len(ratios) == {"flash": 44, "pro": 62}[preset]
  assert len(ratios) == cfg.num_layers + 1  # the hub list's last entry is the MTP block (SWA)
  assert cfg.compress_ratios == tuple(ratios[:-1]) and ratios[-1] == 0
  assert cfg.num_mtp_layers == 1 and cfg.num_hash_layers == 3
  assert [cfg.is_hash_layer(i) for i in range(cfg.num_layers)] == [True] * 3 + [False] * (
    cfg.num_layers - 3)
  kinds = cfg.layer_kinds
  sliding, csa, hca = deepseek_v4.Sliding(), deepseek_v4.CSA(), deepseek_v4.HCA(ratio=128)
  if preset == "flash":
    assert cfg.num_layers == 43
    assert [i for i, k in enumerate(kinds) if k == sliding] == [0, 1]
    assert [i for i, k in enumerate(kinds) if k == csa] == list(range(2, 43, 2))
    assert [i for i, k in enumerate(kinds) if k == hca] == list(range(3, 42, 2))
  else:
    assert cfg.num_layers == 61
    assert sliding not in kinds
    assert [i for i, k in enumerate(kinds) if k == csa] == list(range(2, 61, 2))
    assert [i for i, k in enumerate(kinds) if k == hca] == [0, 1] + list(range(3, 60, 2))


def test_preset_hyperparameters():
  f, p = deepseek_v4.flash(), deepseek_v4.pro()
  assert (f.d_model, f.num_heads, f.q_lora_rank, f.o_groups, f.index_topk, f.num_experts,
          f.moe_inter_dim, f.route_scale) == (4096, 64, 1024, 8, 512, 256, 2048, 1.5)
  assert (p.d_model, p.num_heads, p.q_lora_rank, p.o_groups, p.index_topk, p.num_experts,
          p.moe_inter_dim, p.route_scale) == (7168, 128, 1536, 16, 1024, 384, 3072, 2.5)
  for c in (f, p):
    assert (c.head_dim, c.rope_dim, c.o_lora_rank, c.window, c.index_heads, c.index_head_dim,
            c.experts_per_token, c.vocab_size) == (512, 64, 1024, 128, 64, 128, 6, 129280)
    assert (c.rope_theta, c.compress_rope_theta, c.rope_factor, c.rope_original_max_position,
            c.rope_beta_fast, c.rope_beta_slow) == (10000.0, 160000.0, 16.0, 65536, 32.0, 1.0)


def _shapes(abstract) -> dict[str, tuple[int, ...]]:
  """Shape of every parameter under its official per-layer name (scanned stacks split)."""
  out = {}
  for path, v in nnx.to_flat_state(nnx.state(abstract)):
    for name, r in layout.official_names(abstract.cfg, ".".join(str(p) for p in path)):
      out[name] = tuple(v.shape)[r is not None:]
  return out


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_preset_layer_kinds_build_at_full_width(preset):
  # The first four layers cover every layer kind of the preset, at the real widths (fast).
  cfg = deepseek_v4.PRESETS[preset]()
  cfg = cfg.replace(compress_ratios=cfg.compress_ratios[:4])
  shapes = _shapes(nnx.eval_shape(lambda: deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))))
  D = cfg.d_model
  # docs/architecture.md#hub-names shapes (experts stacked over E).
  assert shapes["embed.weight"] == (129280, D) and shapes["head.weight"] == (129280, D)
  assert shapes["hc_head_fn"] == (4, 4 * D)
  assert shapes["layers.3.hc_attn_fn"] == (24, 4 * D)
  assert shapes["layers.2.attn.wq_b.weight"] == (cfg.num_heads * 512, cfg.q_lora_rank)
  assert shapes["layers.2.attn.wo_a.weight"] == (cfg.o_groups * 1024, 4096)
  assert shapes["layers.2.attn.compressor.wkv.weight"] == (1024, D)
  assert shapes["layers.2.attn.compressor.ape"] == (4, 1024)
  assert shapes["layers.2.attn.indexer.compressor.ape"] == (4, 256)
  assert shapes["layers.3.attn.compressor.ape"] == (128, 512)
  assert shapes["layers.2.ffn.gate.tid2eid"] == (129280, 6)
  assert shapes["layers.3.ffn.gate.bias"] == (cfg.num_experts,)
  assert shapes["layers.3.ffn.experts.w1"] == (cfg.num_experts, cfg.moe_inter_dim, D)
  assert shapes["mtp.0.e_proj.weight"] == (D, D)


def test_tiny_builds_under_eval_shape():
  abstract = nnx.eval_shape(lambda: deepseek_v4.Transformer(deepseek_v4.tiny(),
                                                            rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


@pytest.mark.slow
@pytest.mark.parametrize("preset,billions", [("flash", 284), ("pro", 1600)])
def test_full_preset_builds_under_eval_shape(preset, billions):
  # ~20 s (Flash) / ~45 s (Pro) of CPU: tracing cost grows quadratically with the layer count.
  cfg = deepseek_v4.PRESETS[preset]()
  abstract = nnx.eval_shape(lambda: deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)))
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
  mtp = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract.mtp)))
  # The report's totals (Flash 284B, Pro 1.6T) count the trunk without the MTP block.
  if preset == "flash":
    assert round((total - mtp) / 1e9) == billions
  else:
    assert round((total - mtp) / 1e11) * 100 == billions
