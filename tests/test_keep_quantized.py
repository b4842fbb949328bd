"""Routed experts kept in their released FP4 form (`keep_quantized="experts"`):
loaded byte for byte, decoded inside the MoE, equal to the dequantized load, inference-only, and
accounted exactly by `plan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import decoding, plan
from deepseek_v4.checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from deepseek_v4.checkpoint.convert import to_hub_tensors
from deepseek_v4.checkpoint.safetensors_io import list_checkpoint, read_array
from deepseek_v4.layers import moe_ffn
from deepseek_v4.layers.moe import KeptWeight
from tests.tolerances import F32_DECODE_REL, F32_FUNCTION, F32_SHARDED_REL, rel_err


@pytest.fixture(scope="module")
def folder(tiny_cfg, tmp_path_factory):
  """A tiny model saved in the official format: FP4 experts, FP8 linears."""
  from tests.hf_oracle import randomize_params

  model = randomize_params(deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(3)), 3)
  path = tmp_path_factory.mktemp("fp4")
  save_hf_checkpoint(model, path, quantize="fp4-experts")
  return path


@pytest.fixture(scope="module")
def dequantized(folder):
  return load_hf_checkpoint(folder)


@pytest.fixture(scope="module")
def kept(folder):
  return load_hf_checkpoint(folder, keep_quantized="experts")


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, ids: m(ids))


def _ids(cfg, B=2, T=21, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(2, cfg.vocab_size, (B, T)), jnp.int32)


def test_kept_experts_are_fp4_leaves(kept):
  cfg = kept.cfg
  E, F, D = cfg.num_experts, cfg.moe_inter_dim, cfg.d_model
  e = kept.layer(3).ffn.experts
  assert kept.options.keep_quantized == "experts"
  assert isinstance(e.w1, KeptWeight) and not isinstance(e.w1, nnx.Param)
  assert (e.w1[...].dtype, e.w1[...].shape) == (jnp.uint8, (E, F, D // 2))
  assert (e.w2[...].dtype, e.w2[...].shape) == (jnp.uint8, (E, D, F // 2))
  assert (e.w1_scale[...].dtype, e.w1_scale[...].shape) == (jnp.float8_e8m0fnu, (E, F, D // 32))
  assert e.w2_scale[...].shape == (E, D, -(-F // 32))


def test_stored_bytes_equal_the_files_bytes(folder, kept):
  """Every kept code and scale is the file's byte; the rest equals the dequantized load."""
  stored = list_checkpoint(str(folder))
  ours = to_hub_tensors(kept)
  expert_keys = [k for k in ours if ".ffn.experts." in k]
  assert len(expert_keys) == 2 * 3 * kept.cfg.num_experts * (kept.cfg.num_layers + 1)  # + MTP
  for k in expert_keys:
    want = np.asarray(read_array(stored[k]))
    assert ours[k].dtype.itemsize == want.dtype.itemsize == 1, k
    np.testing.assert_array_equal(ours[k].view(np.uint8), want.view(np.uint8), err_msg=k)


def test_forward_equals_the_dequantized_load(kept, dequantized, forward):
  ids = _ids(kept.cfg)
  err = rel_err(forward(kept, ids), forward(dequantized, ids))
  print(f"\nkept FP4 experts vs dequantized load: rel err of the logits {err:.1e}")
  assert err <= F32_FUNCTION


@pytest.mark.parametrize("gmm", ["tiled", "ragged_dot", "reference"])
def test_expert_ffn_decoded_paths_equal_the_float_path(kept, gmm):
  """Each grouped-matmul path over FP4 weights equals the float path on the decoded weights."""
  w = kept.layer(4).ffn.experts.weights()  # scanned layers: take one layer's slice
  w = [moe_ffn.Fp4Weight(x.codes, x.scale) for x in w]
  full = [jax.vmap(lambda c, s: moe_ffn.decode_fp4(moe_ffn.Fp4Weight(c, s), jnp.float32))(*x)
          for x in w]
  rng = np.random.default_rng(1)
  E, D = full[0].shape[0], full[0].shape[2]
  sizes = jnp.asarray([3, 0, 7, 1, 0, 9, 2, 4][:E], jnp.int32)
  xs = jnp.asarray(rng.normal(size=(int(sizes.sum()) + 3, D)), jnp.float32)
  got = moe_ffn.expert_ffn(xs, sizes, *w, 10.0, gmm)
  want = moe_ffn.expert_ffn(xs, sizes, *full, 10.0, "reference")
  assert rel_err(got, want) <= F32_FUNCTION


@pytest.mark.slow
def test_generate_equals_the_dequantized_load(kept, dequantized):
  """Prefill + decode through the scanned trunk and the decoding loop."""
  prompts = [np.asarray(_ids(kept.cfg, 1, n, seed=n)[0]) for n in (5, 11)]
  ids_k, logits_k = decoding.generate(kept, prompts, 6, return_logits=True)
  ids_d, logits_d = decoding.generate(dequantized, prompts, 6, return_logits=True)
  np.testing.assert_array_equal(np.asarray(ids_k), np.asarray(ids_d))
  err = rel_err(logits_k, logits_d)
  print(f"\ngenerate, kept vs dequantized: rel err of the logits {err:.1e}")
  assert err <= F32_DECODE_REL


def test_gradients_flow_through_the_kept_experts(kept):
  """Kept experts are frozen data, yet differentiable in the rows (QLoRA, tests/test_qlora.py):
  the gradient equals the float path's on the decoded weights."""
  w = kept.layer(4).ffn.experts.weights()
  full = [jax.vmap(lambda c, s: moe_ffn.decode_fp4(moe_ffn.Fp4Weight(c, s), jnp.float32))(*x)
          for x in w]
  sizes = jnp.asarray([2, 1, 0, 0, 0, 0, 0, 1], jnp.int32)
  xs = jnp.asarray(np.random.default_rng(2).normal(size=(4, kept.cfg.d_model)), jnp.float32)
  f = lambda x, ws: jnp.sum(jnp.sin(moe_ffn.expert_ffn(x, sizes, *ws, 10.0, "tiled")))  # noqa: E731
  assert rel_err(jax.grad(f)(xs, w), jax.grad(f)(xs, full)) <= F32_FUNCTION


def test_bad_option_values_are_refused(folder, tiny_cfg, tmp_path):
  with pytest.raises(ValueError, match=r"keep_quantized='fp4'; expected one of None, 'experts'"):
    load_hf_checkpoint(folder, keep_quantized="fp4")
  with pytest.raises(ValueError, match=r"keep_quantized='all'"):
    deepseek_v4.Options(keep_quantized="all")
  with pytest.raises(ValueError, match="frozen FP4 codes, which cannot be trained.*--lora-rank"):
    plan.make_plan(tiny_cfg, {}, settings=plan.Settings(train=True),
                   options=deepseek_v4.Options(keep_quantized="experts"))
  model = deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(0))
  save_hf_checkpoint(model, tmp_path / "fp8", quantize="fp8")
  with pytest.raises(CheckpointError, match=r"experts\.0\.w[123]\.weight.* stored as fp8"):
    load_hf_checkpoint(tmp_path / "fp8", keep_quantized="experts")
  save_hf_checkpoint(model, tmp_path / "plain")
  with pytest.raises(CheckpointError, match=r"stored as F32 without a scale"):
    load_hf_checkpoint(tmp_path / "plain", keep_quantized="experts")


def test_save_writes_the_kept_bytes_back(folder, kept, tmp_path):
  save_hf_checkpoint(kept, tmp_path, quantize="fp4-experts")
  a, b = list_checkpoint(str(folder)), list_checkpoint(str(tmp_path))
  assert a.keys() == b.keys()
  for k in a:
    if ".ffn.experts." in k:
      assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
      np.testing.assert_array_equal(np.asarray(read_array(a[k])).view(np.uint8),
                                    np.asarray(read_array(b[k])).view(np.uint8), err_msg=k)
  with pytest.raises(CheckpointError, match="keeps its experts in FP4"):
    save_hf_checkpoint(kept, tmp_path / "x", quantize="fp8")


def _state_bytes(model) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def test_plan_bytes_equal_the_loaded_leaves(kept, dequantized):
  """plan's parameter + buffer lines are the loaded model's bytes, kept or not; kept FP4 experts
  cost 0.5 + 1/32 byte per weight."""
  for model in (kept, dequantized):
    p = plan.make_plan(model.cfg, {}, settings=plan.Settings(seq=64), options=model.options)
    lines = dict((label.split(" (")[0], b) for label, b, _ in p.lines)
    assert lines["parameters"] + lines["router bias + hash tables"] == _state_bytes(model)
  cfg = kept.cfg
  weights = 3 * cfg.num_experts * cfg.moe_inter_dim * cfg.d_model * (cfg.num_layers + 1)
  saved = _state_bytes(dequantized) - _state_bytes(kept)
  assert saved == weights * (4 - 0.5 - 1 / 32)
  decoded = [b for label, b, _ in plan.make_plan(cfg, {}, settings=plan.Settings(
    seq=64, gmm="tiled"), options=kept.options).lines if label.startswith("decoded")]
  assert decoded == [3 * cfg.moe_inter_dim * cfg.d_model * 4]


def test_summary_counts_the_logical_weights_and_the_held_bytes(kept, dequantized):
  """`summary` of a kept config: the same parameter counts and FLOPs as the float model (the
  weights are the same, only stored differently), and the bytes actually held."""
  from deepseek_v4 import summary

  a, b = summary.count_params(kept.cfg, "experts"), summary.count_params(dequantized.cfg)
  assert (a.total, a.active, a.mtp_total) == (b.total, b.active, b.mtp_total)
  state = nnx.state(kept, nnx.Param, KeptWeight)
  assert a.param_bytes == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert "routed experts kept FP4" in summary.format_summary(
    summary.summarize(kept.cfg, keep_quantized=kept.options.keep_quantized))


@pytest.mark.slow
def test_sharded_load_and_generate(folder, kept):
  """Loaded straight into expert-parallel shards (codes and scales split along the experts) and
  run through the expert-parallel MoE: equal to the one-device kept model."""
  from deepseek_v4 import parallel, sharding

  mesh = sharding.make_mesh(fsdp=2, expert=4)
  model = load_hf_checkpoint(folder, keep_quantized="experts", mesh=mesh, rules="fsdp_ep")
  codes = model.layer(3).ffn.experts.w1[...]
  assert codes.addressable_shards[0].data.shape[0] == kept.cfg.num_experts // 4
  ids = np.asarray(_ids(kept.cfg, 8, 12))
  ref_ids, ref_logits = decoding.generate(kept, ids, 3, return_logits=True)
  with sharding.use(mesh, "fsdp_ep"):
    out_ids, logits = decoding.generate(model, ids, 3, return_logits=True,
                                        options=parallel.options(mesh, "fsdp_ep",
                                                                 keep_quantized="experts"))
  np.testing.assert_array_equal(np.asarray(out_ids), np.asarray(ref_ids))
  assert rel_err(logits, ref_logits) <= F32_SHARDED_REL
