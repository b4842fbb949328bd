"""Every GPU (Triton) Pallas kernel compiles for H100 and H200 at V4-Flash and V4-Pro shapes, each
layer kind (CSA, HCA, sliding window), forward, backward and decode, within the target's
shared-memory limit and with zero register spills.

The real compiler runs on this CPU host (deepseek_v4.aot.targets: compile-only devices; Triton,
then ptxas for sm_90a); `aot.compile.gpu_kernel_resources` reads each kernel's shared memory from
XLA's launch and its registers and spills from `ptxas -v`. The kernels run with their default
tiles (kernels_pallas/sparse_attention/blocks.py), through the public ops with impl="pallas", and
one case through impl="auto". A tile that overflows shared memory makes XLA refuse the program;
one that spills fails the spill assertion.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from deepseek_v4.aot import targets
from tests.aot import backend

pytestmark = pytest.mark.aot

backend.require("h100", "h200", module=True)

from deepseek_v4.aot import compile as aot_compile  # noqa: E402
from kernels_pallas.indexer_topk import ops as idx_ops  # noqa: E402
from kernels_pallas.sparse_attention import ops, sources  # noqa: E402

PRESETS = aot_compile.KERNEL_PRESETS  # V4-Flash / V4-Pro heads and top-k; shapes: aot/compile.py
H = aot_compile.HEAD_DIM
bf16, i32 = jnp.bfloat16, jnp.int32
FWD, DQ = "v4_sparse_attention_fwd", "v4_sparse_attention_dq"
BAND, HCA = "v4_sparse_attention_dkv_band", "v4_sparse_attention_dkv_hca"


def _attention(target, kind, N, P, *, decode, impl="pallas", Hd=H, W=aot_compile.WINDOW):
  """(fn, abstract args): the forward with lse (decode: one token against the ring), or for
  training the gradient of a loss of both outputs (forward, dQ and dKV kernels)."""
  attention = functools.partial(ops.sparse_attention, impl=impl)
  return aot_compile.attention_program(attention, target, kind, N=N, P=P, decode=decode,
                                       grad=not decode, head_dim=Hd, window=W)


def _resources(target, fn, args):
  with targets.compiling_for(target):
    lowered = jax.jit(fn).lower(*args)
    return {k.name: k for k in aot_compile.gpu_kernel_resources(lowered)}


def _assert_fits(target, kernels, expected):
  assert set(kernels) == set(expected), f"kernels compiled: {sorted(kernels)}"
  for k in kernels.values():
    assert k.arch == "sm_90a", k
    assert 0 < k.shared_memory_bytes <= aot_compile.shared_memory_limit(target), k
    assert k.spill_bytes == 0, k


@pytest.mark.parametrize("target", ["h100", "h200"])
@pytest.mark.parametrize("preset", ["flash", "pro"])
@pytest.mark.parametrize("kind", ["csa", "hca", "window"])
def test_attention_forward_and_backward_fit(target, preset, kind):
  fn, args = _attention(target, kind, **PRESETS[preset], decode=False)
  kernels = _resources(target, fn, args)
  _assert_fits(target, kernels, {FWD, DQ, BAND} | ({HCA} if kind == "hca" else set()))


@pytest.mark.parametrize("target", ["h100", "h200"])
@pytest.mark.parametrize("preset", ["flash", "pro"])
@pytest.mark.parametrize("kind", ["csa", "hca", "window"])
def test_attention_decode_fits(target, preset, kind):
  fn, args = _attention(target, kind, **PRESETS[preset], decode=True)
  _assert_fits(target, _resources(target, fn, args), {FWD})


@pytest.mark.parametrize("target", ["h100", "h200"])
@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_indexer_fits(target, preset):
  topk = functools.partial(idx_ops.indexer_topk, impl="pallas")
  fn, args = aot_compile.indexer_program(topk, target, P=PRESETS[preset]["P"])
  _assert_fits(target, _resources(target, fn, args), {"v4_indexer_scores"})


def test_auto_compiles_what_it_picks():
  """impl="auto" at Flash's CSA shapes on an H100 picks the kernels, and they compile and fit."""
  fn, args = _attention("h100", "csa", **PRESETS["flash"], decode=False, impl="auto")
  with targets.compiling_for("h100"):
    q = jnp.zeros((1, 1, 64, H), bf16)
    kv = jnp.zeros((1, 1, H), bf16)
    picks = sources.PickedEntries(kv, jnp.zeros((1, 1, 8), i32))
    keys = sources.KeySources(sources.Band(kv, aot_compile.WINDOW), entries=picks)
    assert ops.auto_impl(q, keys) == "pallas"
  _assert_fits("h100", _resources("h100", fn, args), {FWD, DQ, BAND})


def test_tiny_widths_fit():
  """What impl="auto" also sends to the GPU body (blocks.why_unsupported_gpu): the tiny preset's
  widths (4 heads x 96, bf16), heads and width padded to Triton's 16-row dots; HCA's gradient
  (every backward kernel) and CSA decode compile within the limits."""
  fn, args = _attention("h100", "hca", N=4, P=8, decode=False, Hd=96)
  _assert_fits("h100", _resources("h100", fn, args), {FWD, DQ, BAND, HCA})
  fn, args = _attention("h100", "csa", N=4, P=8, decode=True, Hd=96)
  _assert_fits("h100", _resources("h100", fn, args), {FWD})


@pytest.mark.parametrize("decode", [False, True], ids=["fwd+bwd", "decode"])
def test_small_topk_and_window_fit(decode):
  """Flash widths with the tiny preset's top-k (4) and window (8): the CSA loop and the decode
  ring get at least two key chunks (a one-trip loop was merged into the band loop and spilled
  1.5 KB in the forward of a Flash-width model's training step)."""
  fn, args = _attention("h100", "csa", N=64, P=4, decode=decode, W=8)
  _assert_fits("h100", _resources("h100", fn, args), {FWD} if decode else {FWD, DQ, BAND})
