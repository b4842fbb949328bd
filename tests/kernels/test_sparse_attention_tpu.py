"""The TPU body of the sparse attention (kernel_tpu) under interpret=True on CPU vs the reference:
out and lse for every layer kind (sliding window, CSA gather, HCA), ragged T, offset positions,
windows wider than the sequence, bf16 inputs; gradients (the reference's VJP under the Pallas
forward); and the `why_unsupported` predicate that dispatchers read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.sparse_attention import kernel_tpu, reference
from tests.attention_keys import keys
from tests.tolerances import BF16, F32_FUNCTION, F32_KERNEL_GRAD_REL, rel_err


def _case(kind, *, B=2, T=37, N=4, H=8, P=3, ratio=None, seed=0, dtype=jnp.float32):
  """Inputs of one call; row 1 starts at position 5 (positions are start + arange(T))."""
  rng = np.random.default_rng(seed)
  x = {"q": jnp.asarray(rng.normal(size=(B, T, N, H)), dtype),
       "kv": jnp.asarray(rng.normal(size=(B, T, H)), dtype),
       "sink": jnp.asarray(rng.normal(size=(N,)), jnp.float32),
       "pos": jnp.arange(T, dtype=jnp.int32)[None, :] + jnp.asarray([[0], [5]] * (B // 2),
                                                                     jnp.int32)}
  kw = {}
  if kind == "csa":
    ratio = ratio or 4
    C = T // ratio
    idx = np.asarray(rng.integers(-1, C, size=(B, T, P)), np.int32)
    idx[0, 3] = -1  # a token with no entry at all
    idx[1, 4, :2] = C - 1  # a duplicated pick counts twice, as in the reference
    kw = dict(comp=jnp.asarray(rng.normal(size=(B, C, H)), dtype), comp_idx=jnp.asarray(idx),
              comp_ratio=ratio)
  elif kind == "hca":
    ratio = ratio or 8
    kw = dict(comp=jnp.asarray(rng.normal(size=(B, T // ratio, H)), dtype), comp_ratio=ratio)
  return x, kw


def _both(x, kw, window, scale=0.3):
  args = (x["q"], x["pos"], x["sink"], keys(x["kv"], window, **kw))
  ref = reference.sparse_attention(*args, scale=scale, block=8, return_lse=True)
  ours = kernel_tpu.sparse_attention(*args, scale=scale, return_lse=True, interpret=True)
  return ours, ref


@pytest.mark.parametrize("kind,window", [("sliding", 5), ("sliding", 20), ("csa", 5),
                                         ("csa", 40), ("hca", 5), ("hca", 20)])
def test_forward_matches_reference(kind, window):
  """T=37 (three blocks, the last ragged); window 40 > T covers every earlier key."""
  x, kw = _case(kind)
  (o, lse), (o_ref, lse_ref) = _both(x, kw, window)
  assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
  assert rel_err(o, o_ref) < F32_FUNCTION
  assert rel_err(lse, lse_ref) < F32_FUNCTION
  if kind != "sliding":  # the entries change the result: the test sees a dropped source
    o_win = reference.sparse_attention(x["q"], x["pos"], x["sink"], keys(x["kv"], window),
                                       scale=0.3, block=8)
    assert rel_err(o_win, o_ref) > 1e-2


def test_bf16_inputs():
  """bf16 q, K=V, entries: the MXU products are exact, the probabilities are rounded to bf16."""
  x, kw = _case("csa", T=40, N=16, H=128, P=8, dtype=jnp.bfloat16, seed=1)
  (o, lse), (o_ref, lse_ref) = _both(x, kw, window=16, scale=128**-0.5)
  assert o.dtype == jnp.bfloat16
  assert rel_err(o, o_ref) < BF16
  assert rel_err(lse, lse_ref) < F32_FUNCTION * 10  # logits exact; lse from float32 sums


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
def test_gradients_are_the_reference_vjp(kind):
  """Cotangents of out and lse both flow; q, K=V, sink and entries vs jax.grad of the reference."""
  x, kw = _case(kind, T=21)
  comp = kw.pop("comp", None)

  def loss(fn, q, kv, sink, comp, **more):
    o, lse = fn(q, x["pos"], sink, keys(kv, 6, comp=comp, **kw), scale=0.3, return_lse=True,
                **more)
    return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(lse))

  argnums = (0, 1, 2) if comp is None else (0, 1, 2, 3)
  g_ref = jax.grad(lambda *a: loss(reference.sparse_attention, *a, block=8), argnums)(
    x["q"], x["kv"], x["sink"], comp)
  g = jax.grad(lambda *a: loss(kernel_tpu.sparse_attention, *a, interpret=True), argnums)(
    x["q"], x["kv"], x["sink"], comp)
  for a, b in zip(g, g_ref):
    assert a.shape == b.shape
    assert rel_err(a, b) < F32_KERNEL_GRAD_REL


def test_uncovered_calls_run_the_reference():
  """Segments (and a decode ring) are refused by the predicate and run the reference whole."""
  x, kw = _case("sliding", T=16)
  seg = jnp.asarray([[0] * 8 + [1] * 8] * 2, jnp.int32)
  args = (x["q"], x["pos"], x["sink"], keys(x["kv"], 6, segments=seg))
  ours = kernel_tpu.sparse_attention(*args, scale=0.3, interpret=True)
  ref = reference.sparse_attention(*args, scale=0.3, block=8)
  assert rel_err(ours, ref) < F32_FUNCTION


def test_why_unsupported():
  flash = (1, 8192, 64, 512)
  bf = jnp.bfloat16
  for kind, picks, entries in [("sliding", 0, 0), ("csa", 512, 2048), ("hca", 0, 64)]:
    assert kernel_tpu.why_unsupported(flash, bf, window=128, kind=kind, num_picks=picks,
                                      num_entries=entries) is None
    assert kernel_tpu.supported(flash, bf, window=128, kind=kind, num_picks=picks,
                                num_entries=entries)
  assert "keys.ring" in kernel_tpu.why_unsupported(flash, bf, window=128, kind="sliding",
                                                   prefix=True)
  assert "segments" in kernel_tpu.why_unsupported(flash, bf, window=128, kind="csa",
                                                  num_picks=512, num_entries=2048, segments=True)
  # attention="dense" at Pro's T=8192: the band is the whole sequence, past the VMEM budget
  # (tests/aot compiles the widest windows this accepts).
  why = kernel_tpu.why_unsupported((1, 8192, 128, 512), bf, window=8192, kind="sliding")
  assert why is not None and "VMEM" in why and "window=8192" in why
  small = (1, 2048, 8, 128)  # few, narrow heads: the indices' SMEM binds before VMEM
  assert kernel_tpu.supported(small, bf, window=128, kind="csa", num_picks=6144,
                              num_entries=512)
  why = kernel_tpu.why_unsupported(small, bf, window=128, kind="csa", num_picks=8192,
                                   num_entries=512)
  assert why is not None and "SMEM" in why and "P=8192" in why
  assert "float16" in kernel_tpu.why_unsupported(flash, jnp.float16, window=128, kind="sliding")
  with pytest.raises(ValueError, match="kind must be one of"):
    kernel_tpu.why_unsupported(flash, bf, window=128, kind="dense")
  with pytest.raises(ValueError, match=r"q_shape must be \(B, T, N, H\)"):
    kernel_tpu.why_unsupported((8192, 64, 512), bf, window=128, kind="sliding")


def test_no_usable_entries_is_the_window():
  """T below the ratio (no entry yet, C = 0) and zero picks (P = 0) run as the sliding window."""
  x, _ = _case("sliding", T=7)
  args = (x["q"], x["pos"], x["sink"])
  ref = reference.sparse_attention(*args, keys(x["kv"], 4), scale=0.3, block=8)
  B, _, _, H = x["q"].shape
  for kw in (dict(comp=jnp.zeros((B, 0, H)), comp_ratio=8),
             dict(comp=jnp.ones((B, 1, H)), comp_idx=jnp.zeros((B, 7, 0), jnp.int32),
                  comp_ratio=4)):
    k = keys(x["kv"], 4, **kw)
    assert k.kind != "sliding" and k.without_unusable_entries().kind == "sliding"
    ours = kernel_tpu.sparse_attention(*args, k, scale=0.3, interpret=True)
    assert rel_err(ours, ref) < F32_FUNCTION
