"""Pallas sparse attention (kernels_pallas/sparse_attention/kernel.py) vs the reference: forward
(out and lse) and gradients, across the layout boundaries (window edges, segments, ring wrap).
Run twice through the INTERPRET switch: the interpret subclass on CPU (tiny tiles), the native one
on a GPU (marked `gpu`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.common import PAD_POSITION
from kernels_pallas.indexer_topk import kernel as idx_kernel
from kernels_pallas.sparse_attention import kernel, ops, reference
from kernels_pallas.sparse_attention.blocks import BlockSizes, Tile
from tests.attention_keys import keys
from tests.tolerances import BF16, F32_FUNCTION, F32_KERNEL_GRAD_REL, rel_err

SCALE = 0.37


def _csa_indices(rng, B, T, C, P, m, dup=True):
  """Visible picks per query padded with -1 (P may exceed the visible count); with `dup`, some
  rows repeat a pick (the kernel must count it twice, like the reference's gather)."""
  idx = np.full((B, T, P), -1, np.int32)
  for b in range(B):
    for t in range(T):
      nvis = min((t + 1) // m, C)
      pick = list(rng.permutation(nvis)[: rng.integers(0, P + 1)])
      if dup and pick and len(pick) < P and t % 3 == 0:
        pick.append(pick[0])
      idx[b, t, : len(pick)] = pick
  return idx


class _Cases:
  INTERPRET = True
  N, H = 3, 8  # heads not a power of two, padded by the wrapper
  BS = kernel.BlockSizes.uniform(block_q=4, block_k=4, block_kv=4, bwd_chunk=8)

  def _inputs(self, seed, B=2, T=13, C=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    N, H = self.N, self.H
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
    kv = jnp.asarray(rng.normal(size=(B, T, H)), dtype)
    sink = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    comp = jnp.asarray(rng.normal(size=(B, max(C, 1), H)), dtype)[:, :C]
    return rng, q, pos, kv, sink, comp

  def _both(self, q, pos, kv, sink, window=5, **kw):
    k = keys(kv, window, **kw)
    common = dict(scale=SCALE, block=4, return_lse=True)
    ref = reference.sparse_attention(q, pos, sink, k, **common)
    ours = kernel.sparse_attention(q, pos, sink, k, **common, interpret=self.INTERPRET,
                                   block_sizes=self.BS)
    return ours, ref

  def _check_fwd(self, ours, ref, dtype=jnp.float32):
    tol = F32_FUNCTION if dtype == jnp.float32 else BF16
    assert ours[0].dtype == ref[0].dtype and ours[0].shape == ref[0].shape
    assert rel_err(ours[0], ref[0]) < tol
    assert rel_err(ours[1], ref[1]) < tol

  @pytest.mark.parametrize("T", [12, 13, pytest.param(14, marks=pytest.mark.slow),
                                 pytest.param(15, marks=pytest.mark.slow)], ids=lambda t: f"T{t}")
  def test_window_every_residue(self, T):
    _, q, pos, kv, sink, _ = self._inputs(T, T=T)
    self._check_fwd(*self._both(q, pos, kv, sink, window=6))

  def test_csa_dup_and_empty_picks(self):
    rng, q, pos, kv, sink, comp = self._inputs(1, T=15, C=4)
    idx = _csa_indices(rng, 2, 15, 4, 6, 3)  # top-k 6 > the 4 entries: -1 slots
    idx[1, 5] = -1  # a row with no entry at all
    self._check_fwd(*self._both(q, pos, kv, sink, comp=comp, comp_idx=jnp.asarray(idx),
                                comp_ratio=3))

  def test_hca_visibility(self):
    _, q, pos, kv, sink, comp = self._inputs(2, T=14, C=3)
    self._check_fwd(*self._both(q, pos, kv, sink, comp=comp, comp_ratio=4))

  def test_segments(self):
    rng, q, pos, kv, sink, comp = self._inputs(3, T=16, C=4)
    seg = jnp.asarray(np.repeat([[0] * 8 + [1] * 8], 2, axis=0), jnp.int32)
    idx = jnp.asarray(_csa_indices(rng, 2, 16, 4, 3, 4))
    self._check_fwd(*self._both(q, pos, kv, sink, comp=comp, comp_idx=idx, comp_ratio=4,
                                segments=seg, comp_seg=seg[:, ::4]))

  def test_padded_batch_row(self):
    # Row 1 is padding: every position is PAD_POSITION, so only the sink remains (out 0).
    _, q, pos, kv, sink, comp = self._inputs(4, T=9, C=2)
    pos = pos.at[1].set(PAD_POSITION)
    ours, ref = self._both(q, pos, kv, sink, comp=comp, comp_ratio=4)
    self._check_fwd((ours, ref)[0], ref)
    np.testing.assert_allclose(np.asarray(ours[1][1]), np.broadcast_to(sink, (9, self.N)),
                               rtol=1e-6)

  def test_decode_half_full_ring(self):
    # One new token at position 9 against a ring of 8 slots, half empty, plus CSA entries.
    rng, q, _, kv, sink, comp = self._inputs(5, T=1, C=3)
    W = 8
    ring = jnp.asarray(rng.normal(size=(2, W, self.H)), q.dtype)
    ring_pos = jnp.asarray([[8, 5, 6, 7] + [PAD_POSITION] * 4, [2, 3, 4, PAD_POSITION, 0, 1,
                                                               PAD_POSITION, PAD_POSITION]])
    pos = jnp.asarray([[9], [5]], jnp.int32)
    idx = jnp.asarray([[[2, 0, -1]], [[1, 1, -1]]], jnp.int32)
    self._check_fwd(*self._both(q, pos, kv, sink, window=W, prefix_kv=ring, prefix_pos=ring_pos,
                                comp=comp, comp_idx=idx, comp_ratio=4))

  def test_bf16(self):
    rng, q, pos, kv, sink, comp = self._inputs(6, T=13, C=3, dtype=jnp.bfloat16)
    idx = jnp.asarray(_csa_indices(rng, 2, 13, 3, 4, 4))
    ours, ref = self._both(q, pos, kv, sink, comp=comp, comp_idx=idx, comp_ratio=4)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.float32
    self._check_fwd(ours, ref, jnp.bfloat16)

  @pytest.mark.parametrize("kind", ["csa", pytest.param("hca", marks=pytest.mark.slow),
                                    pytest.param("prefix", marks=pytest.mark.slow)])
  def test_grads(self, kind):
    rng, q, pos, kv, sink, comp = self._inputs(7, T=13, C=3)
    kw = dict(comp_ratio=4)
    if kind == "csa":
      kw["comp_idx"] = jnp.asarray(_csa_indices(rng, 2, 13, 3, 4, 4))
    extra = jnp.asarray(rng.normal(size=(2, 4, self.H)), q.dtype)
    ppos = jnp.asarray([[-5, -3, PAD_POSITION, -1], [PAD_POSITION, -2, -4, -1]], jnp.int32)

    def loss(fn, q, kv, sink, comp, extra, **more):
      kw2 = dict(kw, comp=comp)
      if kind == "prefix":
        kw2.update(prefix_kv=extra, prefix_pos=ppos)
      o, lse = fn(q, pos, sink, keys(kv, 5, **kw2), scale=SCALE, block=4, return_lse=True, **more)
      # Both outputs carry a cotangent: lse's gradient path is checked too.
      return jnp.sum(jnp.sin(o.astype(jnp.float32))) + 0.3 * jnp.sum(jnp.cos(lse))

    args = (q, kv, sink, comp, extra)
    ref = jax.grad(functools.partial(loss, reference.sparse_attention), argnums=range(5))(*args)
    ours = jax.grad(functools.partial(loss, kernel.sparse_attention, interpret=self.INTERPRET,
                                      block_sizes=self.BS), argnums=range(5))(*args)
    for name, a, b in zip(["q", "kv", "sink", "comp", "prefix"], ours, ref):
      if kind != "prefix" and name == "prefix":
        continue
      assert rel_err(a, b) < F32_KERNEL_GRAD_REL, name


class TestSparseAttentionInterpret(_Cases):
  INTERPRET = True


@pytest.mark.gpu
class TestSparseAttentionNative(_Cases):
  """The same cases compiled for the accelerator (Triton dots need tiles of at least 16)."""

  INTERPRET = False
  N, H = 24, 32
  BS = kernel.BlockSizes.uniform(block_q=16, block_k=16, block_kv=16, bwd_chunk=8)

  @pytest.fixture(autouse=True)
  def _needs_gpu(self):
    if jax.default_backend() != "gpu":
      pytest.skip("needs a GPU")


def test_ops_pallas_path_switches():
  """ops.sparse_attention(impl="pallas", interpret=True) runs the kernel and matches."""
  rng = np.random.default_rng(8)
  q = jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(1, 6, 8)), jnp.float32)
  sink = jnp.zeros((2,), jnp.float32)
  pos = jnp.arange(6, dtype=jnp.int32)[None]
  kw = dict(scale=SCALE, block=4)
  a = ops.sparse_attention(q, pos, sink, keys(kv, 3), **kw, impl="pallas", interpret=True)
  b = ops.sparse_attention(q, pos, sink, keys(kv, 3), **kw, impl="reference")
  assert rel_err(a, b) < F32_FUNCTION


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_native_flash_shapes(dtype):
  """Flash heads and width (64 x 512, window 128) on the accelerator: CSA forward and grads."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  B, T, N, H, C, P = 1, 512, 64, 512, 128, 64
  rng = np.random.default_rng(9)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
  kv = jnp.asarray(rng.normal(size=(B, T, H)), dtype)
  comp = jnp.asarray(rng.normal(size=(B, C, H)), dtype)
  sink = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  idx = jnp.asarray(_csa_indices(rng, B, T, C, P, 4))
  bs = (kernel.BlockSizes.uniform(block_q=32, block_k=32, num_warps=8) if dtype == jnp.float32
        else None)

  def loss(fn, q, kv, sink, comp, **more):
    o = fn(q, pos, sink, keys(kv, 128, comp=comp, comp_idx=idx), scale=H**-0.5, block=64,
           **more)
    return jnp.sum(jnp.sin(o.astype(jnp.float32))), o

  (_, o_ref), g_ref = jax.value_and_grad(functools.partial(loss, reference.sparse_attention),
                                         argnums=range(4), has_aux=True)(q, kv, sink, comp)
  (_, o), g = jax.value_and_grad(functools.partial(loss, kernel.sparse_attention,
                                                   block_sizes=bs),
                                 argnums=range(4), has_aux=True)(q, kv, sink, comp)
  tol = F32_FUNCTION if dtype == jnp.float32 else BF16
  assert rel_err(o, o_ref) < tol
  if dtype == jnp.float32:
    for name, a, b in zip(["q", "kv", "sink", "comp"], g, g_ref):
      assert rel_err(a, b) < F32_KERNEL_GRAD_REL, name


def test_mixed_tiles_match_the_reference():
  """Each kernel on its own tile (the GPU defaults differ per kernel): heads and key-side lengths
  padded to every tile's multiple, so forward, decode and gradients still equal the reference."""
  bs = BlockSizes(fwd=Tile(2, 8), dq=Tile(4, 2), dkv=Tile(1, 4), decode=Tile(4, 4), bwd_chunk=5)
  rng = np.random.default_rng(11)
  B, T, N, H, C = 2, 13, 3, 8, 3
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
  comp = jnp.asarray(rng.normal(size=(B, C, H)), jnp.float32)
  sink = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  idx = jnp.asarray(_csa_indices(rng, B, T, C, 5, 4))
  for extra in (dict(comp_idx=idx), {}):  # CSA, HCA
    def loss(fn, q, kv, sink, comp, **more):
      o, lse = fn(q, pos, sink, keys(kv, 5, comp=comp, comp_ratio=4, **extra), scale=SCALE,
                  block=4, return_lse=True, **more)
      return jnp.sum(jnp.sin(o)) + 0.3 * jnp.sum(jnp.cos(lse))

    ref = jax.grad(functools.partial(loss, reference.sparse_attention), argnums=range(4))(
      q, kv, sink, comp)
    ours = jax.grad(functools.partial(loss, kernel.sparse_attention, interpret=True,
                                      block_sizes=bs), argnums=range(4))(q, kv, sink, comp)
    for name, a, b in zip(["q", "kv", "sink", "comp"], ours, ref):
      assert rel_err(a, b) < F32_KERNEL_GRAD_REL, name
  # Decode: one token against a ring (the decode tile).
  ring = jnp.asarray(rng.normal(size=(B, 6, H)), jnp.float32)
  ring_pos = jnp.asarray([[3, 4, 5, 0, 1, 2], [2, PAD_POSITION, 0, 1, PAD_POSITION, 3]], jnp.int32)
  k = keys(kv[:, :1], 6, prefix_kv=ring, prefix_pos=ring_pos, comp=comp, comp_idx=idx[:, :1])
  kw = dict(scale=SCALE, block=1, return_lse=True)
  ref = reference.sparse_attention(q[:, :1], pos[:, :1] + 6, sink, k, **kw)
  ours = kernel.sparse_attention(q[:, :1], pos[:, :1] + 6, sink, k, **kw, interpret=True,
                                 block_sizes=bs)
  assert rel_err(ours[0], ref[0]) < F32_FUNCTION and rel_err(ours[1], ref[1]) < F32_FUNCTION


def test_block_sizes_refuse_bad_values():
  with pytest.raises(ValueError, match="block_q=24"):
    Tile(24, 16)
  with pytest.raises(ValueError, match="num_stages=0"):
    Tile(16, 16, num_stages=0)
  with pytest.raises(ValueError, match="a100"):
    BlockSizes.default("a100")
  with pytest.raises(ValueError, match="block_c=48"):
    idx_kernel.BlockSizes(block_c=48)
  for target in ("h100", "h200"):  # compiled Triton dots: every tile at least 16 wide
    bs = BlockSizes.default(target)
    assert min(min(t.block_q, t.block_k) for t in (bs.fwd, bs.dq, bs.dkv, bs.decode)) >= 16


def test_gpu_defaults_are_the_tuned_tiles():
  """blocks.DEFAULTS and the indexer's are what scripts/tune_kernel_blocks.py last chose (its
  JSON), so a re-tune that changes a pick cannot leave the defaults behind."""
  import json
  from pathlib import Path

  from kernels_pallas.sparse_attention import blocks

  path = Path(__file__).parents[2] / "benchmarks" / "results" / "tune_kernel_blocks.json"
  results = json.loads(path.read_text())["results"]
  for target in ("h100", "h200"):
    bs = blocks.BlockSizes.default(target)
    for name in ("fwd", "dq", "dkv", "decode"):
      assert Tile(**results[target][name]["pick"]) == getattr(bs, name), (target, name)
    assert idx_kernel.BlockSizes(**results[target]["indexer"]["pick"]) == \
      idx_kernel.BlockSizes.default(target)
