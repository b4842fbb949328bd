"""QLoRA for V4: LoRA adapters trained over routed experts kept as their released FP4 codes
(`Options.keep_quantized="experts"`, deepseek_v4/lora.py, layers/moe_ffn.py).

Oracles: the same LoRA on the dequantized float base (gradients), the checkpoint file's bytes
(frozen experts, export), `quant_codecs.quantize_fp4` (requantized adapted experts) and jax's own
residual list of a vjp (what the backward keeps).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import lora, quant_codecs, train
from deepseek_v4.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from deepseek_v4.checkpoint.safetensors_io import list_checkpoint, read_array
from deepseek_v4.layers import moe_ffn
from deepseek_v4.layers.moe import KeptWeight
from tests.tolerances import F32_FUNCTION, F32_QLORA_GRAD_REL, F32_SHARDED_REL, rel_err

TARGETS = ("wq_a", "wkv", "shared_experts.w1", "experts")


@pytest.fixture(scope="module")
def cfg():
  # Two blocks (one hash-routed, one score-routed), no MTP: the smallest model with both routers.
  return deepseek_v4.tiny(compress_ratios=(0, 4), num_hash_layers=1, num_mtp_layers=0)


@pytest.fixture(scope="module")
def folder(cfg, tmp_path_factory):
  """The model saved in the official format: FP4 experts, FP8 linears."""
  from tests.hf_oracle import randomize_params

  model = randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(5)), 5)
  path = tmp_path_factory.mktemp("qlora_fp4")
  save_hf_checkpoint(model, path, quantize="fp4-experts")
  return path


def _adapted(folder, keep_quantized, targets=TARGETS, seed=7):
  """The loaded model with LoRA on `targets`, every adapter (A and B) set to fixed random values,
  identical for the kept and the dequantized load (same paths, same order)."""
  model = load_hf_checkpoint(folder, keep_quantized=keep_quantized)
  lora.apply_lora(model, targets, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(seed)
  for _, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)), key=lambda kv: kv[0]):
    var.set_value(jnp.asarray(0.1 * rng.standard_normal(var.shape), jnp.float32))
  return model


def _kept_bytes(model) -> dict:
  return {p: np.asarray(v[...]).view(np.uint8)
          for p, v in nnx.to_flat_state(nnx.state(model, KeptWeight))}


def _ids(cfg, B=2, T=24, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, (B, T)), jnp.int32)


def _fp4_experts(rng, E=4, F=32, D=64):
  """(kept Fp4Weights, their decoded float32 stacks) of random w1, w2, w3."""
  kept, full = [], []
  for shape in ((E, F, D), (E, D, F), (E, F, D)):
    w = 0.1 * rng.standard_normal(shape).astype(np.float32)
    pairs = [quant_codecs.quantize_fp4(w[e]) for e in range(E)]
    codes = jnp.asarray(np.stack([c for c, _ in pairs]).view(np.uint8))
    scale = jnp.asarray(np.stack([s for _, s in pairs]))
    kept.append(moe_ffn.Fp4Weight(codes, scale))
    full.append(jax.vmap(lambda c, s: quant_codecs.dequantize_fp4(c, s))(codes, scale))
  return kept, full


def _expert_lora(rng, E=4, F=32, D=64, L=3):
  shapes = ((E, D, L), (E, L, F), (E, F, L), (E, L, D), (E, D, L), (E, L, F))
  return moe_ffn.ExpertLoRA(*(jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32)
                              for s in shapes))


@pytest.mark.parametrize("gmm", ["tiled", "reference"])
def test_kept_expert_ffn_gradients_equal_the_float_path(gmm):
  """d/dx and d/d(adapters) through the kept FFN (adapters inside the tile loop, custom VJP)
  equal autodiff of the float FFN on the decoded weights with the adapters merged."""
  rng = np.random.default_rng(0)
  kept, full = _fp4_experts(rng)
  ad = _expert_lora(rng)
  sizes = jnp.asarray([3, 0, 7, 5], jnp.int32)
  xs = jnp.asarray(rng.standard_normal((17, 64)), jnp.float32)  # 2 rows past every group

  def f(x, a, ws):
    return jnp.sum(jnp.sin(moe_ffn.expert_ffn(x, sizes, *ws, 10.0, gmm, a, 0.5)))

  got = jax.grad(f, (0, 1))(xs, ad, kept)
  want = jax.grad(f, (0, 1))(xs, ad, full)
  fields = ("x",) + moe_ffn.ExpertLoRA._fields
  for name, g, w in zip(fields, jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) <= F32_FUNCTION, name
  assert float(jnp.max(jnp.abs(got[1].b1[1]))) == 0.0  # expert 1 has no rows: no gradient


def test_backward_saves_no_decoded_expert():
  """The vjp's residuals over kept experts are the inputs (codes, scales, rows, adapters): no
  float array of an expert weight's shape. The float path does save its weights (the check can
  fail)."""
  rng = np.random.default_rng(1)
  kept, full = _fp4_experts(rng)
  ad = _expert_lora(rng)
  sizes = jnp.asarray([3, 0, 7, 5], jnp.int32)
  xs = jnp.asarray(rng.standard_normal((15, 64)), jnp.float32)

  def residuals(ws):
    _, vjp = jax.vjp(lambda x, a: moe_ffn.expert_ffn(x, sizes, *ws, 10.0, "tiled", a, 0.5), xs, ad)
    return [r for r in jax.tree.leaves(vjp) if jnp.issubdtype(r.dtype, jnp.floating)
            and r.dtype.itemsize > 1 and r.shape[-2:] in ((32, 64), (64, 32))]

  assert residuals(kept) == []
  assert len(residuals(full)) >= 3


@pytest.mark.slow  # two whole-model backward compiles (72 s under load); the default suite has
# the kept FFN's gradients (test_kept_expert_ffn_gradients_equal_the_float_path) and the whole
# adapted model's logits against the dequantized base (test_strip_keeps_...)
def test_adapter_gradients_equal_the_dequantized_base(folder, cfg):
  """The whole model's LoRA gradients (attention, shared expert, routed experts) with the experts
  kept FP4 equal those of the same LoRA on the dequantized float load."""
  kept, base = _adapted(folder, "experts"), _adapted(folder, None)
  ids = _ids(cfg)

  def loss(m):
    logits = m(ids)[:, :-1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

  grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))
  got, want = (dict(nnx.to_flat_state(grad(m))) for m in (kept, base))
  assert got.keys() == want.keys()
  assert any("experts" in str(p) and "lora" in str(p) for p in got)
  worst = max(rel_err(got[p][...], want[p][...]) for p in got)
  print(f"\nQLoRA vs LoRA on the dequantized base: worst rel err of the gradients {worst:.1e}")
  assert worst <= F32_QLORA_GRAD_REL
  for p in got:
    assert float(jnp.max(jnp.abs(want[p][...]))) > 0, p  # every adapter gets a gradient


def test_merge_refuses_and_strip_requantizes_only_adapted_experts(folder):
  """Merging into kept FP4 experts is refused by name; `strip_lora(requantize_experts=True)`
  requantizes exactly the experts with a nonzero update (decoded weight + update, FP4-rounded by
  `quant_codecs.quantize_fp4`) and leaves every other expert's bytes as they were."""
  model = _adapted(folder, "experts", targets=("wq_a", "experts"))
  stacks = [e for _, e in lora._routed_experts(model)]
  for e in stacks:  # only expert 2 of each stack keeps a nonzero update
    for name in ("w1", "w2", "w3"):
      b = getattr(e.lora, f"{name}_lora_b")
      keep = jnp.zeros(b.shape[-3:-2] + (1, 1)).at[2].set(1)
      b.set_value(b[...] * keep)
    assert {ix[-1] for ix in lora.adapted_experts(e)} == {2}
  with pytest.raises(ValueError, match=r"routed experts carry a nonzero LoRA update.*"
                                       r"requantize_experts=True"):
    lora.merge_lora(model)
  before = [{n: (np.array(getattr(e, n)[...]), np.array(getattr(e, f"{n}_scale")[...]),
                 np.asarray(e.lora.deltas()[n])) for n in ("w1", "w2", "w3")} for e in stacks]
  lora.strip_lora(model, requantize_experts=True)
  assert not nnx.state(model, nnx.LoRAParam)
  for e, old in zip(stacks, before):
    for name, (codes, scale, delta) in old.items():
      new_codes, new_scale = np.asarray(getattr(e, name)[...]), np.asarray(
        getattr(e, f"{name}_scale")[...])
      E, R = codes.shape[-3:-1]
      flat = [a.reshape(-1, E, R, a.shape[-1]) for a in (codes, scale, delta, new_codes,
                                                          new_scale)]
      for c, s, d, nc, ns in zip(*flat):
        for x in range(E):
          if x != 2:
            np.testing.assert_array_equal(nc[x], c[x])
            np.testing.assert_array_equal(ns[x].view(np.uint8), s[x].view(np.uint8))
            continue
          base = np.asarray(quant_codecs.dequantize_fp4(c[x], s[x]), np.float32)
          want_c, want_s = quant_codecs.quantize_fp4(base + d[x])
          np.testing.assert_array_equal(nc[x], want_c.view(np.uint8))
          np.testing.assert_array_equal(ns[x].view(np.uint8), want_s.view(np.uint8))
          assert not np.array_equal(nc[x], c[x])


def test_strip_merges_expert_adapters_into_a_float_base(folder, cfg):
  """Over float experts the adapters merge into the weights: the same logits after `strip_lora`
  (the base model's parameter tree, adapters gone)."""
  from tests.tolerances import F32_MODEL_REL

  model = _adapted(folder, None)
  ids = _ids(cfg)
  before = model(ids)
  lora.strip_lora(model)
  assert not nnx.state(model, nnx.LoRAParam)
  assert rel_err(model(ids), before) <= F32_MODEL_REL


def test_training_the_kept_weights_is_refused(folder, cfg):
  """A full fine-tune over kept experts would silently leave them untouched: refused by name;
  freezing them (or LoRA) is accepted."""
  options = deepseek_v4.Options(keep_quantized="experts")
  with pytest.raises(ValueError, match=r"frozen FP4 codes, which cannot be trained.*"
                                       r"layers\.0\.ffn\.experts\.w1.*--lora-rank"):
    train.build(cfg, train.TrainConfig(), options=options)
  train.build(cfg, train.TrainConfig(freeze=(r"ffn\.experts\.",)), options=options)
  train.build(cfg, train.TrainConfig(lora_rank=2, lora_targets=("experts",)), options=options)


def test_train_cli_qlora_lowers_the_loss_keeps_the_bytes_and_exports(folder, cfg, tmp_path):
  """`train --init DIR --keep-quantized experts --lora-rank 4` lowers the loss, the trained
  model's expert codes and scales are the file's bytes, and `convert --to hub --quantize
  fp4-experts` writes them back bit for bit (no expert adapted)."""
  from deepseek_v4 import cli
  from deepseek_v4.checkpoint.io import restore_model

  data = tmp_path / "text.txt"
  data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
  out = tmp_path / "run"
  rc = cli.main(["train", "--init", str(folder), "--keep-quantized", "experts", "--lora-rank",
                 "4", "--lora-targets", "wq_a,wkv,shared_experts.w1", "--data", str(data),
                 "--steps", "8", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2",
                 "--warmup", "0", "--out", str(out), "--no-progress", "--sample", "0"])
  assert rc == 0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  print(f"\nQLoRA train: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
  model, _ = restore_model(str(out / "checkpoints"), merge_lora=False)
  assert model.options.keep_quantized == "experts" and nnx.state(model, nnx.LoRAParam)
  want = _kept_bytes(load_hf_checkpoint(folder, keep_quantized="experts"))
  got = _kept_bytes(model)
  assert got.keys() == want.keys()
  for p in want:
    np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
  hub = tmp_path / "hub"
  assert cli.main(["convert", str(out), str(hub), "--to", "hub", "--quantize",
                   "fp4-experts"]) == 0
  a, b = list_checkpoint(str(folder)), list_checkpoint(str(hub))
  experts = [k for k in a if ".ffn.experts." in k]
  assert experts and set(experts) <= set(b)
  for k in experts:
    np.testing.assert_array_equal(np.asarray(read_array(a[k])).view(np.uint8),
                                  np.asarray(read_array(b[k])).view(np.uint8), err_msg=k)


# ----- plan --train --lora-rank R --keep-quantized experts ---------------------------------------
def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("keep_quantized", ["experts", None])
def test_plan_lora_state_equals_the_abstract_train_state(cfg, keep_quantized):
  """plan's parameters, gradients and optimizer state of a (Q)LoRA run equal the bytes of the
  run's own abstract model and optimizer (`abstract.train_state`, as `train.build` makes them)."""
  from deepseek_v4 import abstract, plan

  options = deepseek_v4.Options(keep_quantized=keep_quantized)
  s = plan.Settings(train=True, batch=2, seq=64, lora_rank=4, lora_targets=TARGETS)
  p = plan.make_plan(cfg, {}, settings=s, options=options)
  lines = {label.split(" (")[0]: b for label, b, _ in p.lines}
  tcfg = train.TrainConfig(lora_rank=4, lora_targets=TARGETS)
  model, opt = abstract.train_state(cfg, tcfg, options)
  assert lines["parameters"] + lines["router bias + hash tables"] == _bytes(nnx.state(model))
  assert lines["gradients"] == _bytes(nnx.state(model, nnx.LoRAParam))
  moments = [x for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim > 0]
  assert lines["optimizer state"] == _bytes(moments)
  if keep_quantized:
    assert any(label.startswith("decoded FP4 experts") for label, _, _ in p.lines)


def test_plan_refuses_what_cannot_run(cfg):
  from deepseek_v4 import plan

  kept = deepseek_v4.Options(keep_quantized="experts")
  with pytest.raises(ValueError, match=r"frozen FP4 codes, which cannot be trained.*--lora-rank"):
    plan.make_plan(cfg, {}, settings=plan.Settings(train=True, batch=2, seq=64), options=kept)
  with pytest.raises(ValueError, match=r"'experts' runs without expert parallelism.*expert=2"):
    plan.make_plan(cfg, {"expert": 2}, "fsdp_ep", plan.Settings(
      train=True, batch=2, seq=64, lora_rank=4, lora_targets=("experts",)), options=kept)


def test_plan_flash_qlora_fits_four_h200():
  """The issue's goal: LoRA on V4-Flash at 8K tokens per row, experts kept FP4, on 4 x H200
  (141 GB); the routed experts take 4.25 bits per weight, spread over expert=4."""
  from deepseek_v4 import plan

  cfg = deepseek_v4.flash()
  s = plan.Settings(train=True, batch=4, seq=8192, lora_rank=16)
  p = plan.make_plan(cfg, plan.default_mesh(cfg, 4, train=True), settings=s, name="flash",
                     device_memory=plan.parse_bytes("141GB"),
                     options=deepseek_v4.Options(keep_quantized="experts"))
  print("\n" + plan.format_plan(p))
  assert p.mesh["expert"] == 4 and p.fits
  L = cfg.num_layers + cfg.num_mtp_layers
  experts = 3 * cfg.num_experts * cfg.moe_inter_dim * cfg.d_model * L * (0.5 + 1 / 32) / 4
  params = dict((label.split(" (")[0], b) for label, b, _ in p.lines)["parameters"]
  assert experts < params < experts + 20e9  # + the replicated bf16 attention, shared, embeddings


@pytest.mark.slow  # two whole-model gradient compiles, one of them over 8 devices
def test_qlora_gradients_on_an_expert_parallel_mesh(folder, cfg):
  """Kept experts split over expert=4 (fsdp_ep), run through the expert-parallel MoE: the LoRA
  gradients equal the one-device kept model's."""
  from deepseek_v4 import parallel, sharding

  targets = ("wq_a", "wkv", "shared_experts.w1")
  one = _adapted(folder, "experts", targets)
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  model = load_hf_checkpoint(folder, keep_quantized="experts", mesh=mesh, rules="fsdp_ep")
  lora.apply_lora(model, targets, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  nnx.update(model, nnx.state(one, nnx.LoRAParam))
  ids = _ids(cfg, 8, 12)
  ep = parallel.options(mesh, "fsdp_ep", keep_quantized="experts")

  def loss(m, options):
    logits = m(ids, options=options)[:, :-1]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

  want = dict(nnx.to_flat_state(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(
    one, None)))
  with sharding.use(mesh, "fsdp_ep"):
    got = dict(nnx.to_flat_state(nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(
      0, nnx.LoRAParam)), static_argnums=1)(model, ep)))
  assert got.keys() == want.keys()
  worst = max(rel_err(got[p][...], want[p][...]) for p in got)
  print(f"\nQLoRA on expert=4 x fsdp=2 vs one device: worst rel err of the gradients {worst:.1e}")
  assert worst <= F32_SHARDED_REL


def test_strip_keeps_kept_expert_adapters_unmerged(folder, cfg):
  """`strip_lora(keep_expert_adapters=True)` (what `restore_model` does): the float adapters are
  merged and unwrapped, the kept experts keep their bytes and their adapters, and the logits are
  the adapted model's. Those equal the same LoRA's on the dequantized float base (the adapters
  wired through the whole kept model, cheaply; the gradients are the slow test's)."""
  from tests.tolerances import F32_MODEL_REL

  model = _adapted(folder, "experts")
  ids = _ids(cfg)
  before, codes = model(ids), _kept_bytes(model)
  assert rel_err(before, _adapted(folder, None)(ids)) <= F32_MODEL_REL
  lora.strip_lora(model, keep_expert_adapters=True)
  assert not lora.lora_modules(model)
  assert lora.kept_expert_adapters(model) == [n for n, _ in lora._routed_experts(model)]
  assert {str(p) for p in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))} and all(
    "experts.lora" in ".".join(map(str, p)) for p, _ in nnx.to_flat_state(
      nnx.state(model, nnx.LoRAParam)))
  for p, b in _kept_bytes(model).items():
    np.testing.assert_array_equal(b, codes[p], err_msg=str(p))
  assert rel_err(model(ids), before) <= F32_MODEL_REL


@pytest.mark.slow  # a training run and a decode compile (~80 s of CPU)
def test_generate_from_a_qlora_run_with_expert_adapters(folder, tmp_path, monkeypatch):
  """`generate --checkpoint RUN` on a QLoRA run whose adapters include the routed experts: the
  kept experts' adapters stay unmerged (no lossy requantization), the float ones are merged, and
  the greedy tokens equal those of the trained model (the checkpoint's tree, nothing merged)."""
  import io

  from deepseek_v4 import cli, decoding, generate_cli
  from deepseek_v4.checkpoint.io import restore_model
  from tests.tolerances import F32_MODEL_REL

  data = tmp_path / "text.txt"
  data.write_text("the quick brown fox jumps over the lazy dog. " * 60)
  out = tmp_path / "run"
  assert cli.main(["train", "--init", str(folder), "--keep-quantized", "experts", "--lora-rank",
                   "4", "--lora-targets", ",".join(TARGETS), "--data", str(data), "--steps", "4",
                   "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--warmup", "0",
                   "--out", str(out), "--no-progress", "--sample", "0"]) == 0
  trained, _ = restore_model(str(out / "checkpoints"), merge_lora=False)
  assert any(lora.adapted_experts(e) for _, e in lora._routed_experts(trained))

  merged, _ = restore_model(str(out / "checkpoints"))  # the default: merge what merges exactly
  assert not lora.lora_modules(merged)
  assert len(lora.kept_expert_adapters(merged)) == len(list(lora._routed_experts(merged)))
  want_bytes, got_bytes = _kept_bytes(trained), _kept_bytes(merged)
  assert want_bytes and got_bytes.keys() == want_bytes.keys()
  for p in want_bytes:  # the codes are the trained model's (not requantized)
    np.testing.assert_array_equal(got_bytes[p], want_bytes[p], err_msg=str(p))
  ids = _ids(merged.cfg, 1, 16)
  assert rel_err(merged(ids), trained(ids)) <= F32_MODEL_REL

  calls = []
  inner = decoding.generate

  def recording_generate(model, *args, **kwargs):
    res = inner(model, *args, **kwargs)
    calls.append((model, args, kwargs, res))
    return res

  monkeypatch.setattr(decoding, "generate", recording_generate)
  args = cli.build_parser("generate").parse_args(
    ["generate", "--checkpoint", str(out), "--prompt", "the quick", "--max-new-tokens", "8"])
  assert generate_cli.run(args, out=io.StringIO()) == 0
  (used, gen_args, kwargs, got), = calls
  assert lora.kept_expert_adapters(used) and not lora.lora_modules(used)
  want = inner(trained, *gen_args, stop_tokens=kwargs["stop_tokens"])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  # In bfloat16 (a cast through hub tensors) the expert adapters come along; a mesh is refused.
  calls.clear()
  monkeypatch.setattr(decoding, "generate", lambda model, *a, **k: calls.append(model) or inner(
    model, *a, **k))
  args = cli.build_parser("generate").parse_args(
    ["generate", "--checkpoint", str(out), "--prompt", "the quick", "--max-new-tokens", "2",
     "--dtype", "bfloat16"])
  assert generate_cli.run(args, out=io.StringIO()) == 0
  (bf16,) = calls
  assert bf16.cfg.param_dtype == "bfloat16" and lora.kept_expert_adapters(bf16)
  assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "x", "--mesh", "fsdp=8",
                   "--rules", "fsdp"]) == cli.USAGE_ERROR
