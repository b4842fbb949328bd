"""Pallas indexer scores (kernels_pallas/indexer_topk/kernel.py) vs the reference: masked scores
and the selected indices (interpret on CPU; the native class is marked `gpu`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.indexer_topk import kernel, ops, reference
from tests.tolerances import BF16, F32_FUNCTION, rel_err


class _Cases:
  INTERPRET = True
  I, J = 3, 8
  BS = kernel.BlockSizes(block_c=4)

  def _inputs(self, seed, B=2, T=13, C=5, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, self.I, self.J)), dtype)
    w = jnp.asarray(rng.normal(size=(B, T, self.I)), dtype)
    k = jnp.asarray(rng.normal(size=(B, C, self.J)), dtype)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return q, w, k, pos

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
  def test_scores(self, dtype):
    q, w, k, pos = self._inputs(0, T=14, C=7, dtype=dtype)
    ours = kernel.indexer_scores(q, w, k, pos, ratio=2, interpret=self.INTERPRET,
                                 block_sizes=self.BS)
    ref = reference.indexer_scores(q, w, k)
    visible = np.arange(7)[None, None, :] < ((np.asarray(pos) + 1) // 2)[..., None]
    assert np.all(np.isneginf(np.asarray(ours)[~visible]))
    tol = F32_FUNCTION if dtype == jnp.float32 else BF16
    assert rel_err(np.asarray(ours)[visible], np.asarray(ref)[visible]) < tol

  @pytest.mark.parametrize("topk", [3, 9], ids=["k3", "k-over-C"])
  def test_topk_matches(self, topk):
    q, w, k, pos = self._inputs(1, T=13, C=6)
    seg = jnp.asarray(np.repeat([[0] * 8 + [1] * 5], 2, axis=0), jnp.int32)
    kseg = seg[:, ::2][:, :6]
    kw = dict(ratio=2, topk=topk, block=4, q_seg=seg, k_seg=kseg)
    ours = kernel.indexer_topk(q, w, k, pos, **kw, interpret=self.INTERPRET, block_sizes=self.BS)
    np.testing.assert_array_equal(np.asarray(ours),
                                  np.asarray(reference.indexer_topk(q, w, k, pos, **kw)))


class TestIndexerInterpret(_Cases):
  INTERPRET = True


@pytest.mark.gpu
class TestIndexerNative(_Cases):
  INTERPRET = False
  I, J = 16, 32
  BS = kernel.BlockSizes(block_c=16)

  @pytest.fixture(autouse=True)
  def _needs_gpu(self):
    if jax.default_backend() != "gpu":
      pytest.skip("needs a GPU")


def test_ops_pallas_path():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 9, 2, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 9, 2)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 4, 4)), jnp.float32)
  pos = jnp.arange(9, dtype=jnp.int32)[None]
  kw = dict(ratio=2, topk=2, block=4)
  np.testing.assert_array_equal(
    np.asarray(ops.indexer_topk(q, w, k, pos, **kw, impl="pallas", interpret=True)),
    np.asarray(ops.indexer_topk(q, w, k, pos, **kw, impl="reference")))
