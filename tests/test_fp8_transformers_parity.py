"""Parity with transformers' own FP8-dequantizing load.

A tiny random model is saved FP8-quantized in the official hub format (`.weight` E4M3 + `.scale`
E8M0 128x128 blocks, docs/architecture.md#fp8-fp4; our writer has no transformers-naming option,
and transformers renames hub `.scale` to `.weight_scale_inv` itself). The same folder is then loaded twice:

* by transformers: `DeepseekV4ForCausalLM.from_pretrained(..., quantization_config=
  FineGrainedFP8Config(dequantize=True))` on CPU, i.e. its `Fp8Dequantize` load op;
* by us: `load_hf_checkpoint` (dequantizes on read).

Both must hold bit-identical weights (every tensor, not only the FP8 ones) and give the same
logits within F32_MODEL_REL. A second test applies transformers' `Fp8Dequantize` op standalone
to every FP8 (weight, scale) pair of the file and compares it bit for bit with our dequantization.

Shapes: transformers derives its block size as rows // scale_rows (and cols // scale_cols), which
mis-scales partial edge blocks (docs/architecture.md#fp8-fp4 has the ceil grid right). So every
quantized matrix here has each dimension a multiple of 128 or below 128 (num_heads=8, head_dim=64:
wq_b [512, 32], wo_a [32, 256], indexer wq_b [1024, 32], the rest below 128); several matrices span
more than one block in rows or columns, and each block is given its own power-of-two magnitude so
its scale differs.

Environment note: transformers 5.23.0's `FineGrainedFP8HfQuantizer.validate_environment`
(quantizers/quantizer_finegrained_fp8.py:32-33) raises `ImportError: Loading an FP8 quantized
model requires accelerate` before looking at `dequantize`, although nothing on the dequantizing
load path uses accelerate. When accelerate is absent (this venv) that availability check alone is
patched for the duration of `from_pretrained`; everything else is transformers' real code path.
"""

from __future__ import annotations

import contextlib
import os
import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import deepseek_v4  # noqa: E402
from deepseek_v4.checkpoint import load_hf_checkpoint, save_hf_checkpoint, to_hub_tensors  # noqa: E402
from deepseek_v4.checkpoint import files as ckpt_files  # noqa: E402
from deepseek_v4.checkpoint.convert import from_hub_tensors  # noqa: E402
from deepseek_v4.checkpoint.names import hub_name as _canonical  # noqa: E402
from deepseek_v4.checkpoint.names import unstack_hf_experts as _unstack_hf_experts  # noqa: E402
from tests.hf_oracle import hf_logits, randomize_params  # noqa: E402
from tests.tolerances import F32_MODEL_REL, rel_err  # noqa: E402

# ~50 s on a 2-core CPU (model build + FP8 save ~25 s, transformers load + forward ~25 s).
pytestmark = [pytest.mark.parity, pytest.mark.slow]

# The hub tensors the official checkpoints quantize with quantize="fp8"
# (docs/architecture.md#hub-names), written out independently of the writer's own table.
_FP8 = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123]|"
                  r"experts\.\d+\.w[123])\.weight$")


def _cfg():
  # No MTP: transformers has no MTP module, so its load would leave mtp.* unused.
  return deepseek_v4.tiny(num_heads=8, head_dim=64, num_mtp_layers=0)


def _block_magnitudes(model, seed: int = 0):
  """Each 128x128 block of every FP8 matrix times its own 2^k, k in [-2, 1], so block scales
  differ inside one matrix and a misplaced scale would show."""
  rng = np.random.default_rng(seed)
  tensors = to_hub_tensors(model)
  for name, w in tensors.items():
    if _FP8.search(name):
      gm, gn = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
      k = rng.integers(-2, 2, (gm, gn)).astype(np.float32)
      mult = np.repeat(np.repeat(np.exp2(k), 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
      tensors[name] = (w * mult).astype(w.dtype)
  return from_hub_tensors(model.cfg, tensors)


def _check_shapes(tensors):
  quantized = {k: v.shape for k, v in tensors.items() if _FP8.search(k)}
  assert quantized
  bad = {k: s for k, s in quantized.items() if any(d > 128 and d % 128 for d in s)}
  assert not bad, f"shapes transformers would mis-scale (partial edge blocks): {bad}"
  # Multi-block matrices in both directions are exercised.
  assert any(s[0] > 128 for s in quantized.values()) and any(s[1] > 128 for s in quantized.values())


@contextlib.contextmanager
def _accelerate_check_if_absent():
  """transformers 5.23.0 demands accelerate for any FP8 load, even the pure-torch dequantizing
  one that never uses it; patch only that availability check, only when accelerate is absent."""
  try:
    import accelerate  # noqa: F401
  except ImportError:
    import transformers.quantizers.quantizer_finegrained_fp8 as q

    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(q, "is_accelerate_available", lambda: True)
      yield
  else:
    yield


def _hf_fp8_load(folder):
  from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

  with _accelerate_check_if_absent():
    ref, info = DeepseekV4ForCausalLM.from_pretrained(
      folder, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True),
      attn_implementation="eager", output_loading_info=True)
  problems = {k: v for k, v in info.items() if v}
  assert not problems, f"transformers did not load every tensor: {problems}"
  ref.eval()
  return ref


def _hf_hub_tensors(ref) -> dict[str, np.ndarray]:
  """transformers' parameters under hub names (stacked experts split per expert)."""
  out = {}
  for name, value in ref.state_dict().items():
    value = value.detach().numpy()
    canon = _canonical(name)
    split = _unstack_hf_experts(canon, value)
    if split is None:
      out[canon] = value
    else:
      out.update(split)
  return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  model = _block_magnitudes(randomize_params(deepseek_v4.Transformer(_cfg(), rngs=nnx.Rngs(3)), 3))
  _check_shapes(to_hub_tensors(model))
  path = str(tmp_path_factory.mktemp("fp8_hub"))
  save_hf_checkpoint(model, path, quantize="fp8")
  return path


def _stored(folder) -> dict[str, torch.Tensor]:
  from safetensors import safe_open

  out = {}
  for f in sorted(os.listdir(folder)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(folder, f), "pt") as st:
        out.update({k: st.get_tensor(k) for k in st.keys()})
  return out


def test_fp8_load_matches_transformers(folder):
  stored = _stored(folder)
  fp8 = sorted(k for k in stored if _FP8.search(k))
  assert fp8 and all(stored[k].dtype == torch.float8_e4m3fn for k in fp8)
  assert all(stored[k[: -len("weight")] + "scale"].dtype == torch.float8_e8m0fnu for k in fp8)

  ref = _hf_fp8_load(folder)
  from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear

  assert not any(isinstance(m, (FP8Linear, FP8Experts)) for m in ref.modules()), \
    "dequantize=True should leave plain float modules"
  ours = load_hf_checkpoint(folder)

  # Every tensor, quantized or not, bit for bit.
  theirs_w = _hf_hub_tensors(ref)
  ours_w = to_hub_tensors(ours)
  assert set(theirs_w) == set(ours_w)
  differ = [k for k in ours_w if not np.array_equal(ours_w[k], theirs_w[k].astype(ours_w[k].dtype))]
  assert not differ, f"dequantized weights differ: {differ[:8]} ({len(differ)} tensors)"

  # And the logits (T=37: CSA with more entries than index_topk, HCA past its first window).
  ids = np.random.default_rng(12).integers(0, ours.cfg.vocab_size, (2, 37)).astype(np.int32)
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids)))
  ref_logits = hf_logits(ref, ids)
  assert logits.shape == ref_logits.shape == (2, 37, ours.cfg.vocab_size)
  assert rel_err(logits, ref_logits) < F32_MODEL_REL


def test_fp8_dequantize_op_matches_ours(folder):
  """transformers' `Fp8Dequantize` op on its own, every FP8 pair of the file vs our reader."""
  from transformers.integrations.finegrained_fp8 import Fp8Dequantize

  op = Fp8Dequantize(hf_quantizer=None)
  stored = _stored(folder)
  ours = ckpt_files.hub_tensors(folder, dtype=jnp.float32)
  pairs = sorted(k for k in stored if k.endswith(".weight") and k[:-len("weight")] + "scale" in stored)
  assert pairs == sorted(k for k in stored if _FP8.search(k))
  for name in pairs:
    # output_dtype as on the load path (the target parameter's dtype); without a model the op
    # would fall back to bfloat16 for E8M0 scales.
    theirs = op._dequantize_one(stored[name], stored[name[:-len("weight")] + "scale"],
                                output_dtype=torch.float32).numpy()
    mine = np.asarray(ours[name])
    assert mine.dtype == np.float32 and mine.shape == theirs.shape, name
    assert np.array_equal(mine, theirs), name
