"""The ablation switches: each is validated, round-trips through config.json and
checkpoints, is named by the summary, and changes what it claims and nothing else."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepseek_v4 import cache as cache_lib
from deepseek_v4 import decoding, layout, summary, train
from deepseek_v4.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from deepseek_v4.config import ModelConfig, tiny
from deepseek_v4.config_hf import fields_to_hf
from deepseek_v4.layers import mhc, moe
from deepseek_v4.model import Transformer
from tests.tolerances import F32_DECODE_REL, F32_FUNCTION, rel_err

# Two layers (sliding + CSA), no MTP: the smallest model with every attention kind's code.
SMALL = dict(compress_ratios=(0, 4), num_hash_layers=1, num_mtp_layers=0, vocab_size=128)
T = 16


def _ids(B=1, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 128, (B, T)), jnp.int32)


def _flat(model) -> dict[str, jax.Array]:
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


# ----- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
  ("residual", "highway", "residual='highway'"),
  ("attention", "linear", "attention='linear'"),
  ("score_func", "tanh", "score_func='tanh'"),
  ("router_bias", "yes", "router_bias='yes'"),
  ("hca_ratio", 4, "hca_ratio=4"),
  ("hca_ratio", 0, "hca_ratio=0"),
  ("num_mtp_layers", 2, "num_mtp_layers=2"),
])
def test_bad_switch_values_refused_naming_field_and_value(field, value, needle):
  with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
    tiny(**{field: value})


def test_a_switch_that_cannot_run_is_refused_at_config_time():
  # Every layer CSA needs the indexer sizes; the V4 schedule without CSA does not.
  tiny(compress_ratios=(0, 16), index_topk=0, num_hash_layers=1)
  with pytest.raises(ValueError, match="index_topk=0.*attention='csa'"):
    tiny(compress_ratios=(0, 16), index_topk=0, num_hash_layers=1, attention="csa")
  with pytest.raises(ValueError, match="optimizer='sgd'"):
    train.TrainConfig(optimizer="sgd")
  with pytest.raises(ValueError, match="adamw_learning_rate=-1"):
    train.TrainConfig(optimizer="adamw", adamw_learning_rate=-1.0)


SWITCHED = dict(residual="plain", attention="hca", hca_ratio=8, score_func="softmax",
                router_bias=False, num_hash_layers=0, num_mtp_layers=0)


def test_switches_round_trip_config_json_and_checkpoint_meta():
  cfg = tiny(**SWITCHED)
  assert ModelConfig.from_hf(json.loads(json.dumps(fields_to_hf(cfg)))) == cfg
  # Orbax checkpoints store cfg.to_dict() as JSON and rebuild with ModelConfig(**meta).
  assert ModelConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
  # A config.json without our key (an official one) reads as V4.
  hf = fields_to_hf(tiny())
  del hf["deepseek_v4_jax"]
  got = ModelConfig.from_hf(hf)
  assert (got.residual, got.attention, got.router_bias) == ("mhc", "v4", True)


def test_layer_ratios_drive_layout_cache_and_summary():
  base = tiny(**SMALL)
  expect = {"v4": (0, 4), "window": (0, 0), "dense": (0, 0), "csa": (4, 4), "hca": (8, 8)}
  for attention, ratios in expect.items():
    cfg = base.replace(attention=attention, hca_ratio=8)
    assert cfg.layer_ratios == ratios and cfg.compress_ratios == (0, 4)
    assert tuple(r for g in layout.layer_groups(cfg) for _ in range(g.count)
                 for r in g.ratios) == ratios
    kv = summary.kv_cache(cfg, 64)
    names = " ".join(r.name for r in kv.rows)
    assert ("CSA" in names) == (4 in ratios) and ("HCA" in names) == (8 in ratios)
  c = cache_lib.init_cache(base.replace(attention="csa"), 1, 16)
  assert all(c.layer(i).index_keys is not None for i in range(2))


def test_summary_header_names_the_switches():
  cfg = tiny(**SWITCHED)
  s = summary.summarize(cfg, context=64)
  head = summary.format_summary(s).splitlines()[0]
  for part in ("residual=plain", "attention=hca (hca_ratio=8)", "score_func=softmax",
               "router_bias=False", "hash_layers=0"):
    assert part in head
  assert s.params.total["mhc"] == 0  # no hc_* tensors with one plain stream
  assert s.params.buffers["router_bias"][0] == 0  # no balancing bias
  assert "residual=mhc (hc_mult=4), attention=v4" in summary.format_summary(
    summary.summarize(tiny(), context=64)).splitlines()[0]


# ----- residual -----------------------------------------------------------------------------------
def test_plain_residual_is_a_textbook_prenorm_transformer(tmp_path):
  cfg = tiny(**SMALL, residual="plain")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  names = _flat(model)
  assert not [n for n in names if "hc_" in n]  # unused parameters are never created
  ids = _ids()
  pos = jnp.arange(T, dtype=jnp.int32)[None]

  x = model.embed.weight[...][ids]  # the textbook loop, from the model's own submodules
  for i in range(cfg.num_layers):
    blk = model.layer(i)
    x = x + blk.attn(blk.attn_norm(x), pos)[0]
    x = x + blk.ffn(blk.ffn_norm(x), ids)[0]
  want = model.head(model.norm(x), jnp.float32)
  assert rel_err(model(ids), want) < F32_FUNCTION

  # The hub-format checkpoint holds exactly these tensors and loads back.
  save_hf_checkpoint(model, tmp_path)
  back = load_hf_checkpoint(tmp_path)
  assert back.cfg == cfg
  got = _flat(back)
  assert got.keys() == names.keys()
  assert all(np.array_equal(got[k], names[k]) for k in names)


def _hc_formula(x, fn, base, scale, **_):
  """Hyper-connections (Zhu et al. 2024) as the mHC paper writes them: H = a tanh(mu) + b."""
  B, T_, M, D = x.shape
  flat = x.reshape(B, T_, M * D).astype(jnp.float32)
  mu = flat @ fn.T * jax.lax.rsqrt(jnp.mean(flat * flat, -1, keepdims=True) + 1e-6)
  a = jnp.repeat(scale, jnp.asarray([M, M, M * M]), total_repeat_length=(2 + M) * M)
  h = a * jnp.tanh(mu) + base
  return h[..., :M], h[..., M:2 * M], h[..., 2 * M:].reshape(B, T_, M, M)


def test_hc_residual_is_mhc_with_unconstrained_hyper_connection_maps(monkeypatch):
  small = dict(SMALL, compress_ratios=(0,), num_hash_layers=0)
  m_hc = Transformer(tiny(**small, residual="hc"), rngs=nnx.Rngs(0))
  m_mhc = Transformer(tiny(**small), rngs=nnx.Rngs(0))
  hc, mhc_ = _flat(m_hc), _flat(m_mhc)
  assert {k: v.shape for k, v in hc.items()} == {k: v.shape for k, v in mhc_.items()}
  # HC's static init: pre 1/M, post 1, res = I, dynamic scales 0.01.
  M = 4
  base = np.asarray(hc["groups.0.blocks.0.hc_attn_base"])
  np.testing.assert_array_equal(base, np.r_[np.full(M, 1 / M), np.ones(M), np.eye(M).ravel()])
  np.testing.assert_allclose(hc["groups.0.blocks.0.hc_ffn_scale"], 0.01)
  # Same parameters: the hc model equals the mhc trunk with only the site maps replaced.
  nnx.update(m_hc, nnx.state(m_mhc))
  ids = _ids()
  got = m_hc(ids)
  monkeypatch.setattr(mhc, "hc_weights", _hc_formula)
  want = nnx.jit(lambda m, x: m(x))(m_mhc, ids)  # a fresh trace: model(ids) caches its compile
  assert rel_err(got, want) < F32_FUNCTION
  monkeypatch.undo()
  assert rel_err(m_mhc(ids), want) > 1e-3  # and the maps do matter


# ----- attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attention,schedule", [("window", (0, 0)), ("csa", (4, 4)),
                                                ("hca", (8, 8))])
def test_attention_switch_equals_the_v4_model_with_that_schedule(attention, schedule):
  a = Transformer(tiny(**SMALL, attention=attention, hca_ratio=8), rngs=nnx.Rngs(0))
  b = Transformer(tiny(**dict(SMALL, compress_ratios=schedule)), rngs=nnx.Rngs(0))
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
  if attention == "csa":  # the same tree and values; one forward to be sure
    ids = _ids()
    np.testing.assert_array_equal(a(ids), b(ids))


def test_dense_attention_sees_every_key_and_decodes():
  sliding = dict(SMALL, compress_ratios=(0, 0))
  dense = Transformer(tiny(**SMALL, attention="dense", window=4), rngs=nnx.Rngs(0))
  full_window = Transformer(tiny(**sliding, window=T), rngs=nnx.Rngs(0))
  ids = _ids()
  want = full_window(ids)
  got = dense(ids)
  np.testing.assert_array_equal(got, want)  # window = T: every earlier key, same numbers
  assert rel_err(Transformer(tiny(**sliding, window=4), rngs=nnx.Rngs(0))(ids), want) > 1e-3

  # Decoding keeps every key: the ring has one slot per position.
  max_len = 32
  cache = cache_lib.init_cache(dense.cfg, 1, max_len)
  assert cache.layer(0).window.kv.shape[1] == max_len
  assert cache_lib.cache_bytes(cache) == (max_len * cache_lib.bytes_per_token(dense.cfg)
                                          + cache_lib.fixed_bytes(dense.cfg))
  _, cache = decoding.prefill(dense, cache, ids[:, :-1])
  last, _ = decoding.decode_step(dense, cache, ids[:, -1])
  assert rel_err(last, got[:, -1]) < F32_DECODE_REL


# ----- routing ------------------------------------------------------------------------------------
def _np_scores(x, gate, func):
  z = np.asarray(x, np.float64) @ np.asarray(gate, np.float64).T
  if func == "sqrtsoftplus":
    return np.sqrt(np.log1p(np.exp(z)))
  if func == "sigmoid":
    return 1 / (1 + np.exp(-z))
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("bias_on", [True, False])
def test_router_score_function_and_bias(func, bias_on):
  cfg = tiny(**SMALL, score_func=func, router_bias=bias_on)
  layer = moe.MoE(cfg, hashed=False, rngs=nnx.Rngs(0))
  assert hasattr(layer.gate, "bias") == bias_on  # no dead tensor
  rng = np.random.default_rng(1)
  bias = rng.normal(size=8).astype(np.float32)
  if bias_on:
    layer.gate.bias.set_value(jnp.asarray(bias))
  x = rng.normal(size=(12, 64)).astype(np.float32)
  gate = layer.gate.weight[...]
  scores, idx, w = layer.route(jnp.asarray(x), jnp.zeros(12, jnp.int32))
  s = _np_scores(x, gate, func)
  np.testing.assert_allclose(scores, s, rtol=F32_FUNCTION, atol=F32_FUNCTION)
  pick = np.argsort(-(s + (bias if bias_on else 0)), axis=-1)[:, :2]
  np.testing.assert_array_equal(np.sort(idx, -1), np.sort(pick, -1))
  ws = np.take_along_axis(s, np.asarray(idx), -1)
  np.testing.assert_allclose(w, ws / ws.sum(-1, keepdims=True) * cfg.route_scale,
                             rtol=F32_FUNCTION)


# ----- optimizer ----------------------------------------------------------------------------------
def test_adamw_optimizer_is_adamw_on_every_parameter_with_its_own_rate():
  cfg = tiny(**SMALL)
  tcfg = train.TrainConfig(optimizer="adamw", learning_rate=1.0, adamw_learning_rate=1e-3,
                           warmup_steps=1, clip_norm=None, adam_eps=1e-12)
  assert train.TrainConfig().peak_learning_rate == train.TrainConfig().learning_rate
  assert tcfg.peak_learning_rate == 1e-3
  rng = np.random.default_rng(0)
  params = {"layers": {"0": {"attn": {"wq_a": {"weight": jnp.asarray(
    rng.normal(size=(32, 64)), jnp.float32)}}}}, "embed": {"weight": jnp.ones((4, 8))}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  tx = train.gradient_transform(cfg, tcfg)
  upd, _ = tx.update(grads, tx.init(params), params)
  # AdamW's first step: -lr (g / |g| + wd p), a sign step on the matrix too (Muon's would be
  # an orthogonalized matrix).
  lr, wd = 1e-3, tcfg.adam_weight_decay
  want = jax.tree.map(lambda g, p: -lr * (jnp.sign(g) + wd * p), grads, params)
  for u, v in zip(jax.tree.leaves(upd), jax.tree.leaves(want)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-9)
  muon = train.gradient_transform(cfg, tcfg.replace(optimizer="muon_v4"))
  upd_m, _ = muon.update(grads, muon.init(params), params)
  assert not np.allclose(upd_m["layers"]["0"]["attn"]["wq_a"]["weight"],
                         upd["layers"]["0"]["attn"]["wq_a"]["weight"])


def test_train_step_with_switches_off():
  """plain residual, no router bias, AdamW: one training step runs, no bias appears."""
  cfg = tiny(**dict(SMALL, compress_ratios=(0,), num_hash_layers=0), residual="plain",
             router_bias=False, score_func="sigmoid")
  tcfg = train.TrainConfig(seq_len=T, batch_size=2, steps=2, optimizer="adamw")
  model, opt = train.build(cfg, tcfg)
  toks = np.random.default_rng(0).integers(0, 128, (2, T + 1))
  before = _flat(model)
  m = train.train_step(model, opt, train.as_batch(toks[:, :-1], toks[:, 1:]), 0.3, tcfg=tcfg)
  assert np.isfinite(float(m["loss"]))
  after = _flat(model)
  assert after.keys() == before.keys() and not [k for k in after if k.endswith("gate.bias")]
  assert not np.array_equal(after["head.weight"], before["head.weight"])
