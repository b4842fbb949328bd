"""LoRA on chosen projections: identity at init, merge / unmerge, only adapters train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import lora, optim, train
from tests.tolerances import F32_FUNCTION, F32_MODEL_REL, rel_err

CFG = deepseek_v4.tiny(compress_ratios=(0, 4), num_hash_layers=1, num_mtp_layers=0)
IDS = jnp.asarray(np.random.default_rng(0).integers(2, 512, (2, 16)), jnp.int32)
forward = nnx.jit(lambda m, ids: m(ids))


def _model():
  return deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(0))


def _randomize_adapters(model):
  rng = np.random.default_rng(1)
  for m in lora.lora_modules(model):
    m.lora_b.set_value(jnp.asarray(rng.standard_normal(m.lora_b.shape) * 0.1, jnp.float32))


def test_identity_at_init_then_merge_and_unmerge():
  model = _model()
  base_logits = forward(model, IDS)
  w0 = np.asarray(model.layer(1).attn.wq_b.weight[...])
  names = lora.apply_lora(model, ["wq_a", "wq_b", "wo_b", "shared_experts.w1"], rank=4,
                          alpha=8, rngs=nnx.Rngs(1))
  assert "layers.1.attn.wq_b" in names and "layers.0.ffn.shared_experts.w1" in names
  assert rel_err(forward(model, IDS), base_logits) < F32_FUNCTION  # B = 0: no change
  _randomize_adapters(model)
  adapted = forward(model, IDS)
  assert rel_err(adapted, base_logits) > 1e-3
  lora.merge_lora(model)
  assert not np.allclose(model.layer(1).attn.wq_b.weight[...], w0)
  assert rel_err(forward(model, IDS), adapted) < F32_MODEL_REL
  lora.unmerge_lora(model)
  assert rel_err(model.layer(1).attn.wq_b.weight[...], w0) < F32_FUNCTION
  assert rel_err(forward(model, IDS), adapted) < F32_MODEL_REL


def test_strip_restores_the_base_parameter_tree():
  base = _model()
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(base))}
  model = _model()
  lora.apply_lora(model, ["wq_a", "wkv"], rank=2, alpha=2, rngs=nnx.Rngs(1))
  _randomize_adapters(model)
  adapted = forward(model, IDS)
  lora.strip_lora(model)
  assert {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))} == names
  assert not lora.lora_modules(model)
  assert rel_err(forward(model, IDS), adapted) < F32_MODEL_REL


def test_bad_targets():
  model = _model()
  with pytest.raises(ValueError, match="matches no Linear"):
    lora.apply_lora(model, ["nope"], rank=2, alpha=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="read these weights directly"):
    lora.apply_lora(model, ["wo_a"], rank=2, alpha=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'head'.*read these weights directly"):
    lora.apply_lora(model, ["head"], rank=2, alpha=2, rngs=nnx.Rngs(0))  # no gradient in training


def test_only_adapters_train():
  tcfg = train.TrainConfig(seq_len=16, batch_size=2, lora_rank=4, lora_targets=("wq_a", "wo_b"),
                           learning_rate=1e-2, warmup_steps=1)
  model, opt = train.build(CFG, tcfg)
  trained = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, opt.wrt))]
  assert trained and all(n.endswith(("lora_a", "lora_b")) for n in trained)
  assert {r["optimizer"] for r in optim.describe(nnx.state(model, opt.wrt), CFG)} == {"adamw"}
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
  toks = np.random.default_rng(2).integers(2, 512, (2, 17))
  batch = train.as_batch(toks[:, :-1], toks[:, 1:])
  losses = [float(train.train_step(model, opt, batch, 0.3, tcfg=tcfg)["lm_loss"]) for _ in range(4)]
  assert losses[-1] < losses[0]
  after = nnx.state(model, nnx.Not(nnx.LoRAParam))
  changed = [
    ".".join(map(str, p)) for (p, a), (_, b) in zip(nnx.to_flat_state(before),
                                                  nnx.to_flat_state(after))
    if not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))]
  # Only the router biases (non-gradient state) move besides the adapters.
  assert all(n.endswith("gate.bias") for n in changed), changed


def test_strip_on_scanned_layers():
  # Layers 0-1 (SWA, hash-routed) form a scanned group: their weights are stacked [2, out, in].
  cfg = deepseek_v4.tiny(compress_ratios=(0, 0, 4), num_hash_layers=2, num_mtp_layers=0)
  base = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(base))}
  model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))
  wrapped = lora.apply_lora(model, ["wq_a"], rank=2, alpha=2, rngs=nnx.Rngs(1))
  assert {"layers.0.attn.wq_a", "layers.1.attn.wq_a"} <= set(wrapped)
  assert any(m.weight.ndim == 3 for m in lora.lora_modules(model))
  _randomize_adapters(model)
  adapted = forward(model, IDS)
  lora.strip_lora(model)
  assert {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))} == names
  assert rel_err(forward(model, IDS), adapted) < F32_MODEL_REL


def _same_values(a, b):
  assert nnx.graphdef(a) == nnx.graphdef(b)
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_build_model_is_the_one_model_and_lora_construction():
  """`lora.build_model` = the constructor then `apply_lora` (adapters from their own rngs), value
  for value; training builds its model through it (adapters drawn from seed + 1)."""
  targets, rank, alpha = ("wq_a", "wo_b"), 4, 8.0
  want = _model()
  lora.apply_lora(want, targets, rank=rank, alpha=alpha, rngs=nnx.Rngs(1))
  got = lora.build_model(CFG, (targets, rank, alpha), rngs=nnx.Rngs(0), adapter_rngs=nnx.Rngs(1))
  _same_values(got, want)
  assert len(lora.lora_modules(got)) == 2 * CFG.num_layers
  plain = lora.build_model(CFG, None, rngs=nnx.Rngs(0))
  _same_values(plain, _model())
  assert not lora.lora_modules(plain)
  tcfg = train.TrainConfig(seq_len=16, batch_size=2, seed=0, lora_rank=rank, lora_alpha=alpha,
                           lora_targets=targets)
  assert train.lora_spec(tcfg) == (targets, rank, alpha)
  assert train.lora_spec(tcfg.replace(lora_rank=0)) is None
  trained, _ = train.build(CFG, tcfg)
  _same_values(trained, want)
