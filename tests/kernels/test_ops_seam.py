"""The `ops.py` seams of the attention kernels: the reference path, the lse output, input checks and
the impl switch (STYLE.md §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.common import resolve_impl, target_platform
from kernels_pallas.indexer_topk import ops as idx_ops
from kernels_pallas.indexer_topk import reference as idx_ref
from kernels_pallas.sparse_attention import ops
from kernels_pallas.sparse_attention import reference
from tests.attention_keys import keys
from tests.tolerances import F32_FUNCTION, rel_err

SCALE = 0.37


def _inputs(seed, B=2, T=11, N=3, H=8, C=5, P=3):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
  sink = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  comp = jnp.asarray(rng.normal(size=(B, C, H)), jnp.float32)
  idx = jnp.asarray(rng.integers(-1, C, size=(B, T, P)), jnp.int32)
  return q, pos, kv, sink, comp, idx


def _dense_lse(q, pos, kv, sink, comp, idx, window):
  """log(sum_k exp(scale q.k) + exp(sink)) by brute force over window keys and picked entries."""
  q, kv, comp = (np.asarray(a, np.float64) for a in (q, kv, comp))
  B, T, N, _ = q.shape
  out = np.zeros((B, T, N))
  for b in range(B):
    for t in range(T):
      keys = [kv[b, j] for j in range(T) if 0 <= t - j < window]
      keys += [comp[b, s] for s in np.asarray(idx)[b, t] if s >= 0]
      z = np.stack(keys) @ q[b, t].T * SCALE  # [keys, N]
      out[b, t] = np.log(np.exp(z).sum(0) + np.exp(np.asarray(sink, np.float64)))
  return out


def test_reference_lse_is_the_full_denominator():
  q, pos, kv, sink, comp, idx = _inputs(0)
  k = keys(kv, 4, comp=comp, comp_idx=idx)
  out, lse = ops.sparse_attention(q, pos, sink, k, scale=SCALE, block=4, return_lse=True,
                                  impl="reference")
  assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  assert rel_err(lse, _dense_lse(q, pos, kv, sink, comp, idx, 4)) < F32_FUNCTION
  plain = ops.sparse_attention(q, pos, sink, k, scale=SCALE, block=4, impl="reference")
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(out))


def test_reference_impl_is_the_reference():
  q, pos, kv, sink, comp, _ = _inputs(1)
  k = keys(kv, 3, comp=comp, comp_ratio=2)
  np.testing.assert_array_equal(
    np.asarray(ops.sparse_attention(q, pos, sink, k, scale=SCALE, block=4, impl="reference")),
    np.asarray(reference.sparse_attention(q, pos, sink, k, scale=SCALE, block=4)))


@pytest.mark.parametrize("change, message", [
  (dict(q=jnp.zeros((2, 11, 8))), "q must be"),
  (dict(kv=jnp.zeros((2, 10, 8))), "kv must be"),
  (dict(sink=jnp.zeros((4,))), "sink must be"),
  (dict(block=0), "block must be"),
  (dict(scale=0.0), "scale must be"),
  (dict(impl="triton"), "impl must be"),
], ids=["q-rank", "kv-len", "sink", "block", "scale", "impl"])
def test_sparse_attention_rejects_bad_inputs(change, message):
  """The op's own checks: the queries against the key sources (each record checks itself when
  built: tests/kernels/test_sources.py)."""
  q, pos, kv, sink, comp, _ = _inputs(2)
  kv = change.pop("kv", kv)
  args = dict(q=q, q_pos=pos, sink=sink, keys=keys(kv, 3, comp=comp, comp_ratio=2), scale=SCALE,
              block=4, impl="reference")
  args.update(change)
  with pytest.raises(ValueError, match=message):
    ops.sparse_attention(**args)


def test_pallas_on_cpu_interprets():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU-only rule")
  q, pos, kv, sink, _, _ = _inputs(3)
  kw = dict(scale=SCALE, block=4)
  a = ops.sparse_attention(q, pos, sink, keys(kv, 3), **kw, impl="pallas")
  b = ops.sparse_attention(q, pos, sink, keys(kv, 3), **kw, impl="reference")
  assert rel_err(a, b) < F32_FUNCTION


def test_auto_runs_the_reference_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU-only rule")
  assert resolve_impl("sparse_attention", "auto") == "reference"


def test_indexer_reference_impl_and_checks():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(2, 9, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(2, 9, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
  kw = dict(ratio=2, topk=3, block=4)
  np.testing.assert_array_equal(
    np.asarray(idx_ops.indexer_topk(q, w, k, pos, **kw, impl="reference")),
    np.asarray(idx_ref.indexer_topk(q, w, k, pos, **kw)))
  with pytest.raises(ValueError, match="w must be"):
    idx_ops.indexer_topk(q, w[:, :, :2], k, pos, **kw, impl="reference")
  with pytest.raises(ValueError, match="go together"):
    idx_ops.indexer_topk(q, w, k, pos, **kw, q_seg=pos, impl="reference")


# ----- impl="auto" never picks a body that would not compile the call -----------------
def _q(H=512, N=64, dtype=jnp.bfloat16):
  return jnp.zeros((1, 2, N, H), dtype)


def _band(q, window=128):
  """The window-only key sources of queries q."""
  return keys(jnp.zeros((*q.shape[:2], q.shape[-1]), q.dtype), window)


def auto(q):
  return ops.auto_impl(q, _band(q))


def why_not(q):
  return ops.why_not_pallas("gpu", q, _band(q))


def test_auto_on_gpu_picks_pallas_only_within_the_compiled_widths():
  """bf16 up to Flash/Pro's head dim 512 -> the kernels (tests/aot compiles them); wider heads,
  float32 (its dots spill) or an integer dtype -> the reference, with the reason."""
  with target_platform("gpu"):
    assert auto(_q()) == "pallas"
    assert auto(_q(96, 4)) == "pallas"  # tiny: padded to 16 x 128
    assert auto(_q(96, 4, jnp.float32)) == "reference"
    assert "float32" in why_not(_q(dtype=jnp.float32))
    assert auto(_q(1024)) == "reference"
    assert "head dim 1024" in why_not(_q(1024))
    assert auto(_q(dtype=jnp.int8)) == "reference"
    assert "int8" in why_not(_q(dtype=jnp.int8))


def test_auto_on_gpu_refusal_runs_the_reference():
  """On a GPU target a call the kernels were not compiled for runs the reference (bit-equal): had
  "auto" picked the GPU body, this CPU host could not have run it uninterpreted."""
  q, pos, kv, sink, comp, idx = _inputs(9, T=5, N=2, H=1024, C=3, P=2)
  k = keys(kv, 3, comp=comp, comp_idx=idx)
  with target_platform("gpu"):
    auto = ops.sparse_attention(q, pos, sink, k, scale=SCALE, block=4, impl="auto")
  np.testing.assert_array_equal(np.asarray(auto), np.asarray(reference.sparse_attention(
    q, pos, sink, k, scale=SCALE, block=4)))


def test_auto_on_tpu_follows_the_tpu_body():
  """The TPU body's own predicate decides: the decode ring it does not cover -> the reference."""
  from kernels_pallas.sparse_attention import kernel_tpu

  q = _q()
  ring = jnp.zeros((1, 128, 512), jnp.bfloat16)
  with_ring = keys(_band(q).band.kv, 128, prefix_kv=ring, prefix_pos=jnp.zeros((1, 128), jnp.int32))
  with target_platform("tpu"):
    assert ops.auto_impl(q, with_ring) == "reference"
    expect = kernel_tpu.why_unsupported(q.shape, q.dtype, window=128, kind="sliding")
    assert auto(q) == ("pallas" if expect is None else "reference")
  with target_platform("cpu"):
    assert auto(q) == "reference"


def test_indexer_auto_picks():
  """GPU: the scoring kernel at V4's indexer widths (64 x 128), the reference past them; TPU (no
  body) and CPU: the reference."""
  q = jnp.zeros((1, 2, 64, 128), jnp.bfloat16)
  wide = jnp.zeros((1, 2, 128, 128), jnp.bfloat16)
  with target_platform("gpu"):
    assert idx_ops.auto_impl(q) == "pallas"
    assert idx_ops.auto_impl(wide) == "reference"
    assert idx_ops.auto_impl(q.astype(jnp.float32)) == "reference"
    assert "128 x 128" in idx_ops.why_not_pallas("gpu", wide)
  with target_platform("tpu"):
    assert idx_ops.auto_impl(q) == "reference"
  with target_platform("cpu"):
    assert idx_ops.auto_impl(q) == "reference"


def test_every_auto_choice_is_logged_once_at_info(caplog):
  """The three ops' impl="auto" lines all go through `common.log_choice`: INFO, once each, with
  the reason when a call's shapes send it to the reference."""
  import logging

  from kernels_pallas import common
  from kernels_pallas.moe_gmm import ops as gmm_ops

  common.forget_logged()
  with caplog.at_level(logging.DEBUG, logger="kernels_pallas"):
    for _ in range(2):
      with target_platform("gpu"):
        assert auto(_q(96, 4, jnp.float32)) == "reference"
        assert idx_ops.auto_impl(jnp.zeros((1, 2, 4, 16), jnp.float32)) == "reference"
      with target_platform("tpu"):
        assert gmm_ops.resolve_impl("auto") == "ragged_dot"
  got = [(r.levelno, r.getMessage().split(":")[0], r.getMessage().split(" on ")[1][:3])
         for r in caplog.records]
  assert got == [(logging.INFO, "sparse_attention", "gpu"), (logging.INFO, "indexer_topk", "gpu"),
                 (logging.INFO, "moe_gmm", "tpu")]
  assert "float32" in caplog.records[0].getMessage()
