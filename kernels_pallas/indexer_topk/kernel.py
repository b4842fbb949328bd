"""Pallas body of the lightning-indexer scores (docs/architecture.md#indexer), Triton-style GPU API.

`I[t, s] = sum_i w[t, i] * ReLU(q[t, i] . k[s])`. A program owns one query token: its I indexer
heads are the rows of a [I, J] x [J, block_c] matmul, the ReLU and the head weighting reduce the
rows, and the entry loop stops at the last visible chunk (causal block skipping); the rest of the
row is written as -inf. Selection is the reference's `top_indices` (on GPU `jax.lax.top_k`, its
picks sorted by index), so the indices equal the reference's whenever the scores do.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.common import PAD_POSITION, from_blocks, pad_to_blocks, to_blocks
from kernels_pallas.indexer_topk import reference
from kernels_pallas.sparse_attention import blocks

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """`block_c` entries per step (a power of two), Triton warps and pipeline stages."""

  block_c: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_c", "num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"BlockSizes: {name}={value} must be a power of two >= 1")
    if self.num_stages < 1:
      raise ValueError(f"BlockSizes: num_stages={self.num_stages} must be >= 1")

  @classmethod
  def default(cls, target: str | None = None) -> "BlockSizes":
    """The tiles of `target` ("h100", "h200", "interpret"); None: the platform traced for."""
    target = target or blocks.default_target()
    if target not in DEFAULTS:
      raise ValueError(f"BlockSizes.default: target must be one of {sorted(DEFAULTS)}, "
                       f"got {target!r}")
    return DEFAULTS[target]


# scripts/tune_kernel_blocks.py: the largest entry block that compiles for H100 and H200 at V4's
# indexer widths (64 x 128) within shared memory and without spills (146 KB, 168 registers).
_SM90 = BlockSizes(block_c=256, num_warps=4, num_stages=3)
DEFAULTS = {"interpret": BlockSizes(), "h100": _SM90, "h200": _SM90}


def _pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def indexer_scores_kernel(q_ref, w_ref, pos_ref, seg_ref, k_ref, kseg_ref, o_ref, *, ratio: int,
                          block_c: int):
  """Scores [C] of one (batch, token); invisible or other-document entries are -inf."""
  q = q_ref[...]  # [I, J]
  w = w_ref[...].astype(jnp.float32)  # [I]
  pos, seg = jnp.sum(pos_ref[...]), jnp.sum(seg_ref[...])
  C = o_ref.shape[0]
  J = q.shape[1]
  cols = jnp.arange(J)[None, :]
  lane = jnp.arange(block_c)
  # Truncating division: a padding position gives a negative count, which hides everything.
  nvis = jnp.clip(jax.lax.div(pos + 1, jnp.asarray(ratio, pos.dtype)), 0, C)
  prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

  def visible(c, carry):
    rows = c * block_c + lane
    ok = (rows < nvis) & (kseg_ref[pl.ds(c * block_c, block_c)] == seg)
    k = pltriton.load(k_ref.at[rows[:, None], cols], mask=ok[:, None], other=0.0)
    s = pl.dot(q, k, trans_b=True, precision=prec).astype(jnp.float32)  # [I, bc]
    score = jnp.sum(jnp.maximum(s, 0.0) * w[:, None], axis=0)
    o_ref[pl.ds(c * block_c, block_c)] = jnp.where(ok, score, NEG_INF)
    return carry

  def hidden(c, carry):
    o_ref[pl.ds(c * block_c, block_c)] = jnp.full((block_c,), NEG_INF, jnp.float32)
    return carry

  n_vis = jax.lax.div(nvis + block_c - 1, block_c)
  jax.lax.fori_loop(0, n_vis, visible, n_vis)  # (a traced carry: Triton needs a Value to yield)
  jax.lax.fori_loop(n_vis, C // block_c, hidden, n_vis)


def indexer_scores(q, w, k, positions, *, ratio: int, q_seg=None, k_seg=None,
                   interpret: bool = False, block_sizes: BlockSizes | None = None):
  """Masked scores [B, T, C] float32 (-inf = invisible) of every query against every entry."""
  bs = block_sizes or BlockSizes.default()
  B, T, I, J = q.shape
  C = k.shape[1]
  bc = bs.block_c
  least = 1 if interpret else 16  # compiled Triton dots take operands of >= 16 rows and columns
  Cp, Ip, Jp = pl.cdiv(C, bc) * bc, max(_pow2(I), least), max(_pow2(J), least)
  i32 = jnp.int32
  qx = jnp.pad(q, ((0, 0), (0, 0), (0, Ip - I), (0, Jp - J)))
  wx = jnp.pad(w, ((0, 0), (0, 0), (0, Ip - I)))  # padded heads weigh 0
  kx = jnp.pad(k, ((0, 0), (0, Cp - C), (0, Jp - J)))
  seg = jnp.zeros((B, T), i32) if q_seg is None else q_seg.astype(i32)
  kseg = jnp.zeros((B, C), i32) if k_seg is None else k_seg.astype(i32)
  kseg = jnp.pad(kseg, ((0, 0), (0, Cp - C)), constant_values=-(2**31) + 1)
  tok = pl.BlockSpec((None, 1), lambda b, t: (b, t))
  out = pl.pallas_call(
    functools.partial(indexer_scores_kernel, ratio=ratio, block_c=bc),
    grid=(B, T),
    in_specs=[pl.BlockSpec((None, None, Ip, Jp), lambda b, t: (b, t, 0, 0)),
              pl.BlockSpec((None, None, Ip), lambda b, t: (b, t, 0)), tok, tok,
              pl.BlockSpec((None, Cp, Jp), lambda b, t: (b, 0, 0)),
              pl.BlockSpec((None, Cp), lambda b, t: (b, 0))],
    out_specs=pl.BlockSpec((None, None, Cp), lambda b, t: (b, t, 0)),
    out_shape=jax.ShapeDtypeStruct((B, T, Cp), jnp.float32),
    compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
    interpret=interpret, name="v4_indexer_scores",
  )(qx, wx, positions.astype(i32), seg, kx, kseg)
  return out[:, :, :C]


def indexer_topk(q, w, k, positions, *, ratio: int, topk: int, block: int, q_seg=None, k_seg=None,
                 backend: str = "gpu", interpret: bool = False,
                 block_sizes: BlockSizes | None = None):
  """The Pallas path of `ops.indexer_topk`: kernel scores `block` queries at a time, then top-k.

  backend: the scoring kernel is the Triton-style body on every backend that runs it (on TPU it
  would need its own body; there `ops` is expected to pass impl="reference" until one exists).
  """
  if backend == "tpu":
    raise NotImplementedError("indexer_topk: no TPU body yet; use impl='reference' on TPU")
  # The result is integer indices: no gradient flows back. Cutting the tangents here keeps the
  # scoring pallas_call out of autodiff, which cannot linearize it (the model differentiates a loss
  # whose indexer queries and keys carry tangents for the indexer's own KL loss).
  q, w, k = (jax.lax.stop_gradient(a) for a in (q, w, k))
  B, T = q.shape[:2]
  C = k.shape[1]
  P = min(topk, C)
  if P == 0:
    return jnp.zeros((B, T, 0), jnp.int32)
  block = min(block, T)
  segs = jnp.zeros((B, T), jnp.int32) if q_seg is None else q_seg
  kseg = jnp.zeros((B, C), jnp.int32) if k_seg is None else k_seg
  xs = tuple(to_blocks(pad_to_blocks(x, block, 1, v)[0], block)
             for x, v in ((q, 0), (w, 0), (positions, PAD_POSITION), (segs, -1)))

  def one_block(args):
    qb, wb, pb, sb = args
    scores = indexer_scores(qb, wb, k, pb, ratio=ratio, q_seg=sb, k_seg=kseg, interpret=interpret,
                            block_sizes=block_sizes)
    return reference.top_indices(scores, P)  # invisible entries are -inf: never picked

  return from_blocks(jax.lax.map(one_block, xs))[:, :T]
