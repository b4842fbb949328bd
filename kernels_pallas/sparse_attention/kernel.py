"""Pallas bodies of V4's core attention (docs/architecture.md#core-attention): forward and backward,
Triton-style GPU API.

Layout (MQA, one shared K=V head): a program owns one query token and `block_q` of its heads, so
the heads are the rows of every matmul ([block_q, H] x [H, block_k], as in FlashMLA's sparse
prefill) and the token's own key set is walked in `block_k` chunks with an online softmax that is
seeded with the sink (m = sink, l = 1): the sink joins max and denominator, never the numerator.
Key sources, in order, each a loop of masked loads:
  band    the token's window among the T new tokens: row indices (t - W, t], masked by position;
  prefix  the decode ring (`keys.ring`, position < 0 = empty);
  HCA     the compressed entries below floor((p_t + 1) / m), contiguous; the loop stops at the last
          visible chunk (causal block skipping);
  CSA     the token's own top-k entries, gathered by index (-1 = none).
The band assumes what the model guarantees: positions strictly increase along a row (row r's
tokens sit at start + arange(T)); keys further back than W rows are then outside the window.

Backward (recompute from the saved lse; `delta = sum(dO * O)`):
  dQ      the same per-token programs, plus, for CSA, each (token, slot)'s gradient written to its
          own row of a [B, T, P, H] buffer and reduced by XLA's scatter-add (duplicated picks and
          picks shared by many tokens add up exactly; no atomics), in chunks of tokens;
  dKV     transposed programs over `block_k` keys (band, prefix) or entries (HCA), looping over
          exactly the tokens that can see them, so every output row has one writer;
  dsink   `-sum p_sink * (delta - dlse)`, from lse alone (plain jnp).

Every kernel launches with its own `blocks.Tile` (heads per program, keys per step, warps,
stages), tuned per target by compiling (blocks.py); key-side lengths are padded to a multiple of
every kernel's key block, so the tiles change the launch, never the result beyond rounding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.common import PAD_POSITION
from kernels_pallas.sparse_attention.blocks import BlockSizes, Tile
from kernels_pallas.sparse_attention.sources import KeySources, PickedEntries, VisibleEntries

NEG_INF = float("-inf")
# Bound on the backward's per-slot CSA gradient buffer: tokens per chunk shrink to stay within it.
CSA_BUFFER_BYTES = 1 << 30


def _pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _params(tile: Tile):
  return pltriton.CompilerParams(num_warps=tile.num_warps, num_stages=tile.num_stages)


# ----- the math, shared by every body -------------------------------------------------------------
def _dot_nt(a, b):
  """a [M, H] . b [K, H]^T in float32 (HIGHEST for f32 inputs, so interpret matches XLA)."""
  prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return pl.dot(a, b, trans_b=True, precision=prec).astype(jnp.float32)


def _dot_nn(a, b):
  prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return pl.dot(a, b, precision=prec).astype(jnp.float32)


def _dot_tn(a, b):
  """a [M, K]^T . b [M, H] -> [K, H]."""
  prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return pl.dot(a, b, trans_a=True, precision=prec).astype(jnp.float32)


def _online_step(carry, q, k, valid, scale):
  """One chunk of keys into (acc, m, l): flash-attention update with masked logits."""
  acc, m, l = carry
  s = jnp.where(valid[None, :], _dot_nt(q, k) * scale, NEG_INF)  # [h, k]
  m_new = jnp.maximum(m, jnp.max(s, axis=1))  # finite: m starts at the sink
  corr = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[:, None])
  l = l * corr + jnp.sum(p, axis=1)
  acc = acc * corr[:, None] + _dot_nn(p.astype(k.dtype), k)
  return acc, m_new, l


def _probs(q, k, valid, lse, scale):
  """Recomputed probabilities [h, k] of a chunk from the saved lse."""
  s = _dot_nt(q, k) * scale
  return jnp.where(valid[None, :], jnp.exp(s - lse[:, None]), 0.0)


def _visible(qp, ratio):
  """floor((p + 1) / m) entries visible (docs/architecture.md#causality); truncating division
  (Triton lowers it; a negative count, from a padding position, hides everything either way)."""
  return jax.lax.div(qp + 1, jnp.asarray(ratio, qp.dtype))


def _in_window(qp, kp, window):
  d = qp - kp
  return (d >= 0) & (d < window) & (kp >= 0)


# ----- walking one token's keys -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Meta:
  """Static facts of one call (hashable: a jit / pallas static)."""

  scale: float
  window: int
  T: int
  S: int  # prefix slots (padded), 0 = none
  C: int  # compressed entries (padded), 0 = none
  P: int  # CSA slots (padded), 0 = HCA or none
  ratio: int
  hca: bool
  bk: int


def _walk(meta: _Meta, refs: dict, t, qp, qs, step, carry):
  """Runs `step(carry, k [bk, H], valid [bk], csa_chunk or None)` over every key chunk of token t.

  refs: kv [T, H], kpos [T], kseg [T]; optional pkv [S, H], ppos [S]; comp [C, H], cseg [C];
  idx [P]. qp, qs: the token's position and segment.
  """
  bk, W = meta.bk, meta.window
  H = refs["kv"].shape[-1]
  cols = jnp.arange(H)[None, :]
  lane = jnp.arange(bk)

  def band(c, carry):
    off = c * bk + lane
    j = t - W + 1 + off
    inside = (off < W) & (j >= 0)
    jc = jnp.clip(j, 0, meta.T - 1)
    kp = pltriton.load(refs["kpos"].at[jc], mask=inside, other=PAD_POSITION)
    ks = pltriton.load(refs["kseg"].at[jc], mask=inside, other=-1)
    valid = inside & _in_window(qp, kp, W) & (ks == qs)
    k = pltriton.load(refs["kv"].at[jc[:, None], cols], mask=valid[:, None], other=0.0)
    return step(carry, k, valid, None)

  carry = jax.lax.fori_loop(0, pl.cdiv(W, bk), band, carry)
  if meta.S:
    def prefix(c, carry):
      rows = c * bk + lane
      kp = refs["ppos"][pl.ds(c * bk, bk)]
      valid = _in_window(qp, kp, W)
      k = pltriton.load(refs["pkv"].at[rows[:, None], cols], mask=valid[:, None], other=0.0)
      return step(carry, k, valid, None)

    carry = jax.lax.fori_loop(0, meta.S // bk, prefix, carry)
  if meta.C and meta.hca:
    nvis = jnp.minimum(_visible(qp, meta.ratio), meta.C)

    def hca(c, carry):
      rows = c * bk + lane
      valid = (rows < nvis) & (refs["cseg"][pl.ds(c * bk, bk)] == qs)
      k = pltriton.load(refs["comp"].at[rows[:, None], cols], mask=valid[:, None], other=0.0)
      return step(carry, k, valid, None)

    carry = jax.lax.fori_loop(0, jax.lax.div(jnp.maximum(nvis, 0) + bk - 1, bk), hca, carry)
  if meta.C and meta.P:
    def csa(c, carry):
      ids = refs["idx"][pl.ds(c * bk, bk)]
      rows = jnp.maximum(ids, 0)
      own = pltriton.load(refs["cseg"].at[rows], mask=ids >= 0, other=-1)
      valid = (ids >= 0) & (own == qs)
      k = pltriton.load(refs["comp"].at[rows[:, None], cols], mask=valid[:, None], other=0.0)
      return step(carry, k, valid, c)

    carry = jax.lax.fori_loop(0, meta.P // bk, csa, carry)
  return carry



def _ref_dict(meta: _Meta, refs) -> dict:
  names = ["kv", "kpos", "kseg"]
  if meta.S:
    names += ["pkv", "ppos"]
  if meta.C:
    names += ["comp", "cseg"]
    if meta.P:
      names += ["idx"]
  return dict(zip(names, refs))


# ----- forward body -------------------------------------------------------------------------------
def sparse_fwd_kernel(q_ref, qpos_ref, qseg_ref, sink_ref, *refs, meta: _Meta):
  """One (batch, token, head block): out [bh, H] and lse [bh] over the token's keys + sink."""
  n_in = len(refs) - 2
  o_ref, lse_ref = refs[n_in:]
  r = _ref_dict(meta, refs[:n_in])
  t = pl.program_id(1)
  q = q_ref[...]  # [bh, H]
  qp = jnp.sum(qpos_ref[...])  # the [1] block as a scalar
  qs = jnp.sum(qseg_ref[...])
  sink = sink_ref[...].astype(jnp.float32)  # [bh]
  acc = jnp.zeros(q.shape, jnp.float32)
  step = lambda carry, k, valid, c: _online_step(carry, q, k, valid, meta.scale)
  acc, m, l = _walk(meta, r, t, qp, qs, step, (acc, sink, jnp.ones_like(sink)))
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


# ----- dQ (and CSA per-slot dKV) body -------------------------------------------------------------
def sparse_dq_kernel(t0_ref, q_ref, do_ref, lse_ref, dd_ref, qpos_ref, qseg_ref, *refs,
                     meta: _Meta):
  """dq [bh, H] of one (batch, token, head block); with CSA also g [P, H]: each slot's dKV.

  The grid covers a chunk of tokens starting at row t0 (so the CSA buffer stays chunk-sized).
  """
  n_out = 2 if meta.P else 1
  n_in = len(refs) - n_out
  r = _ref_dict(meta, refs[:n_in])
  dq_ref = refs[n_in]
  t = jnp.sum(t0_ref[...]) + pl.program_id(1)
  q, do = q_ref[...], do_ref[...]
  lse, dd = lse_ref[...], dd_ref[...]  # dd = delta - dlse
  qp, qs = jnp.sum(qpos_ref[...]), jnp.sum(qseg_ref[...])
  scale = meta.scale

  def step(dq, k, valid, c):
    p = _probs(q, k, valid, lse, scale)  # [bh, bk]
    ds = p * (_dot_nt(do, k) - dd[:, None])
    if c is not None:  # CSA: this token's contribution to each picked entry, one row per slot
      g = scale * _dot_tn(ds.astype(q.dtype), q) + _dot_tn(p.astype(do.dtype), do)  # [bk, H]
      refs[n_in + 1][pl.ds(c * meta.bk, meta.bk), :] = g
    return dq + scale * _dot_nn(ds.astype(k.dtype), k)

  dq = _walk(meta, r, t, qp, qs, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


# ----- dKV, transposed: one program per block of keys ---------------------------------------------
def sparse_dkv_kernel(k_ref, kpos_ref, kseg_ref, tlo_ref, thi_ref, q_ref, do_ref, lse_ref, dd_ref,
                      qpos_ref, qseg_ref, dk_ref, *, scale: float, window: int, ratio: int,
                      kind: str, bh: int):
  """dK=V [bkv, H] of one (batch, key block), looping over tokens [tlo, thi) and head blocks.

  kind: "band" (keys are the new tokens: window by position and row index), "prefix" (ring slots:
  window by position) or "hca" (entries: visible when index < floor((p_t + 1) / m)).
  """
  kb = pl.program_id(1)
  k = k_ref[...]  # [bkv, H]
  bkv = k.shape[0]
  kpos, kseg = kpos_ref[...], kseg_ref[...]
  rows = kb * bkv + jnp.arange(bkv)
  nhb = q_ref.shape[1] // bh
  t_lo, t_hi = jnp.sum(tlo_ref[...]), jnp.sum(thi_ref[...])

  def one(i, dk):
    t, hb = t_lo + jax.lax.div(i, nhb), jax.lax.rem(i, nhb)
    hs = pl.ds(hb * bh, bh)
    q = q_ref[t, hs, :]  # [bh, H]
    do = do_ref[t, hs, :]
    lse, dd = lse_ref[t, hs], dd_ref[t, hs]
    qp, qs = qpos_ref[t], qseg_ref[t]
    if kind == "hca":
      valid = (rows < _visible(qp, ratio)) & (kseg == qs)
    else:
      valid = _in_window(qp, kpos, window) & (kseg == qs)
      if kind == "band":  # the forward's candidate rows (t - W, t]
        valid &= (t - rows < window) & (t >= rows)
    p = _probs(q, k, valid, lse, scale)  # [bh, bkv]
    ds = p * (_dot_nt(do, k) - dd[:, None])
    return dk + scale * _dot_tn(ds.astype(q.dtype), q) + _dot_tn(p.astype(do.dtype), do)

  n = jnp.maximum(t_hi - t_lo, 0) * nhb
  dk = jax.lax.fori_loop(0, n, one, jnp.zeros(k.shape, jnp.float32))
  dk_ref[...] = dk.astype(dk_ref.dtype)


# ----- pallas_call wrappers -----------------------------------------------------------------------
def _key_inputs(meta: _Meta, kv, kpos, kseg, pkv, ppos, comp, cseg, idx):
  """The key-side operands and their BlockSpecs (grid (b, t, h)), in `_ref_dict` order."""
  whole = lambda x: pl.BlockSpec((None, *x.shape[1:]),
                                 lambda b, i, j, n=x.ndim - 1: (b,) + (0,) * n)
  args = [kv, kpos, kseg]
  if meta.S:
    args += [pkv, ppos]
  if meta.C:
    args += [comp, cseg]
  specs = [whole(a) for a in args]
  if meta.C and meta.P:
    args.append(idx)
    specs.append(pl.BlockSpec((None, None, meta.P), lambda b, t, h: (b, t, 0)))
  return args, specs


def _fwd_call(meta, tile, interpret, q, sink, kv, kpos, kseg, pkv, ppos, comp, cseg, idx):
  B, T, Np, Hp = q.shape
  bh = min(tile.block_q, Np)
  meta = dataclasses.replace(meta, bk=tile.block_k)
  args, specs = _key_inputs(meta, kv, kpos, kseg, pkv, ppos, comp, cseg, idx)
  tok = pl.BlockSpec((None, 1), lambda b, t, h: (b, t))
  heads = pl.BlockSpec((None, None, bh, Hp), lambda b, t, h: (b, t, h, 0))
  return pl.pallas_call(
    functools.partial(sparse_fwd_kernel, meta=meta),
    grid=(B, T, Np // bh),
    in_specs=[heads, tok, tok, pl.BlockSpec((bh,), lambda b, t, h: (h,)), *specs],
    out_specs=[heads, pl.BlockSpec((None, None, bh), lambda b, t, h: (b, t, h))],
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((B, T, Np), jnp.float32)],
    compiler_params=_params(tile), interpret=interpret, name="v4_sparse_attention_fwd",
  )(q, kpos, kseg, sink, *args)


def _dq_call(meta, tile, interpret, t0, q, do, lse, dd, qpos, qseg, kv, kpos, kseg, pkv, ppos, comp,
             cseg, idx):
  """dq [B, Tc, Np, Hp] f32 of the chunk of Tc tokens from row t0 ([1] int32) and, with CSA, the
  per-slot dKV g [B, Tc, nhb, P, Hp] f32."""
  B, T, Np, Hp = q.shape
  bh = min(tile.block_q, Np)
  nhb = Np // bh
  meta = dataclasses.replace(meta, bk=tile.block_k)
  args, specs = _key_inputs(meta, kv, kpos, kseg, pkv, ppos, comp, cseg, idx)
  tok = pl.BlockSpec((None, 1), lambda b, t, h: (b, t))
  heads = pl.BlockSpec((None, None, bh, Hp), lambda b, t, h: (b, t, h, 0))
  hrow = pl.BlockSpec((None, None, bh), lambda b, t, h: (b, t, h))
  out_specs = [heads]
  out_shape = [jax.ShapeDtypeStruct(q.shape, jnp.float32)]
  if meta.C and meta.P:
    out_specs.append(pl.BlockSpec((None, None, None, meta.P, Hp), lambda b, t, h: (b, t, h, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((B, T, nhb, meta.P, Hp), jnp.float32))
  return pl.pallas_call(
    functools.partial(sparse_dq_kernel, meta=meta),
    grid=(B, T, nhb),
    in_specs=[pl.BlockSpec((1,), lambda b, t, h: (0,)), heads, heads, hrow, hrow, tok, tok, *specs],
    out_specs=out_specs, out_shape=out_shape,
    compiler_params=_params(tile), interpret=interpret, name="v4_sparse_attention_dq",
  )(t0, q, do, lse, dd, qpos, qseg, *args)


def _dkv_call(meta, tile, interpret, kind, keys, kpos, kseg, t_lo, t_hi, q, do, lse, dd, qpos,
              qseg):
  """dK=V [B, nk, Hp] f32 of `keys` [B, nk, Hp] (nk a multiple of tile.block_k)."""
  B, nk, Hp = keys.shape
  _, T, Np, _ = q.shape
  bkv = tile.block_k
  bh = min(tile.block_q, Np)
  kblk = lambda *s: pl.BlockSpec((None, bkv, *s), lambda b, i: (b, i) + (0,) * len(s))
  one = pl.BlockSpec((None, 1), lambda b, i: (b, i))
  whole = lambda x: pl.BlockSpec((None, *x.shape[1:]), lambda b, i, n=x.ndim - 1: (b,) + (0,) * n)
  kern = functools.partial(sparse_dkv_kernel, scale=meta.scale, window=meta.window,
                           ratio=meta.ratio, kind=kind, bh=bh)
  return pl.pallas_call(
    kern, grid=(B, nk // bkv),
    in_specs=[kblk(Hp), kblk(), kblk(), one, one, whole(q), whole(do), whole(lse), whole(dd),
              whole(qpos), whole(qseg)],
    out_specs=kblk(Hp), out_shape=jax.ShapeDtypeStruct((B, nk, Hp), jnp.float32),
    compiler_params=_params(tile), interpret=interpret, name=f"v4_sparse_attention_dkv_{kind}",
  )(keys, kpos, kseg, t_lo, t_hi, q, do, lse, dd, qpos, qseg)


# ----- custom_vjp: forward kernel, backward kernels -----------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _core(meta, bs, interpret, q, sink, kv, pkv, comp, ints):
  tile = bs.decode if meta.S else bs.fwd  # a decode ring: the decode step's tile
  return _fwd_call(meta, tile, interpret, q, sink, kv, ints["kpos"], ints["kseg"], pkv,
                   ints["ppos"], comp, ints["cseg"], ints["idx"])


def _core_fwd(meta, bs, interpret, q, sink, kv, pkv, comp, ints):
  out, lse = _core(meta, bs, interpret, q, sink, kv, pkv, comp, ints)
  return (out, lse), (q, sink, kv, pkv, comp, ints, out, lse)


def _core_bwd(meta, bs, interpret, res, cts):
  q, sink, kv, pkv, comp, ints, out, lse = res
  dout, dlse = cts
  B, T, Np, Hp = q.shape
  f32 = jnp.float32
  # delta - dlse: the row term of ds = p * (dO.v - delta + dlse), shared by every kernel below.
  dd = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1) - dlse.astype(f32)  # [B, T, Np]
  dsink = -jnp.sum(jnp.exp(sink[None, None, :] - lse) * dd, axis=(0, 1))
  dout = dout.astype(q.dtype)
  kpos, kseg = ints["kpos"], ints["kseg"]
  dq, dcomp_csa = _dq_chunks(meta, bs, interpret, q, dout, lse, dd, kv, pkv, comp, ints)
  bkv = bs.dkv.block_k
  # Band keys: key block [k0, k0 + bkv) is seen by tokens [k0, k0 + bkv + W - 1).
  Tk = pl.cdiv(T, bkv) * bkv
  k0 = jnp.arange(Tk // bkv, dtype=jnp.int32) * bkv
  t_lo = jnp.broadcast_to(k0[None, :], (B, Tk // bkv))
  t_hi = jnp.minimum(t_lo + bkv + meta.window - 1, T)
  pad = lambda x, n, v: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                                constant_values=v)
  qargs = (q, dout, lse, dd, kpos, kseg)
  dkv = _dkv_call(meta, bs.dkv, interpret, "band", pad(kv, Tk, 0), pad(kpos, Tk, PAD_POSITION),
                  pad(kseg, Tk, -1), t_lo, t_hi, *qargs)[:, :T]
  dpkv = None
  if meta.S:
    nb = meta.S // bkv
    lo, hi = jnp.zeros((B, nb), jnp.int32), jnp.full((B, nb), T, jnp.int32)
    dpkv = _dkv_call(meta, bs.dkv, interpret, "prefix", pkv, ints["ppos"],
                     jnp.zeros_like(ints["ppos"]),
                     lo, hi, q, dout, lse, dd, kpos, jnp.zeros_like(kseg)).astype(pkv.dtype)
  dcomp = None
  if meta.C and meta.hca:
    nb = meta.C // bkv
    # Entry block [c0, c0 + bkv) is first seen by the first token with floor((p+1)/m) > c0.
    nvis = (kpos + 1) // meta.ratio  # [B, T], nondecreasing along a row
    c0 = jnp.arange(nb, dtype=jnp.int32) * bkv
    lo = jax.vmap(lambda v: jnp.searchsorted(v, c0, side="right"))(nvis).astype(jnp.int32)
    hi = jnp.full((B, nb), T, jnp.int32)
    dcomp = _dkv_call(meta, bs.dkv, interpret, "hca", comp, jnp.zeros((B, meta.C), jnp.int32),
                      ints["cseg"], lo, hi, *qargs).astype(comp.dtype)
  elif meta.C:
    dcomp = dcomp_csa.astype(comp.dtype)
  return (dq.astype(q.dtype), dsink.astype(sink.dtype), dkv.astype(kv.dtype), dpkv, dcomp, None)


def _dq_chunks(meta, bs, interpret, q, dout, lse, dd, kv, pkv, comp, ints):
  """dq, and for CSA the entries' gradient, over chunks of `bwd_chunk` tokens.

  CSA: every (token, slot) writes its own gradient row; XLA's scatter-add then sums rows that
  pick the same entry (within a token too), in f32, so no update is lost. Chunking bounds the
  [B, chunk, P, H] buffer (one per head block: [B, chunk, Np / block_q, P, H] f32), within
  `CSA_BUFFER_BYTES` (at Pro's 128 heads, top-k 1024 and 32-head blocks, 8 MiB a token).
  """
  B, T, Np, Hp = q.shape
  chunk = min(bs.bwd_chunk, T)
  if meta.C and meta.P:
    per_token = B * (Np // min(bs.dq.block_q, Np)) * meta.P * Hp * 4
    chunk = max(1, min(chunk, CSA_BUFFER_BYTES // per_token))
  n = pl.cdiv(T, chunk)
  pad = lambda x, v: jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2),
                             constant_values=v)
  xs = dict(q=pad(q, 0), do=pad(dout, 0), lse=pad(lse, 0), dd=pad(dd, 0),
            qpos=pad(ints["kpos"], PAD_POSITION), qseg=pad(ints["kseg"], -1))
  csa = bool(meta.C and meta.P)
  if csa:
    xs["idx"] = pad(ints["idx"], -1)
  keys = (kv, ints["kpos"], ints["kseg"], pkv, ints["ppos"], comp, ints["cseg"])

  def one(dcomp, c):
    t0 = c * chunk
    x = {k: jax.lax.dynamic_slice_in_dim(v, t0, chunk, axis=1) for k, v in xs.items()}
    outs = _dq_call(meta, bs.dq, interpret, jnp.reshape(t0, (1,)).astype(jnp.int32), x["q"],
                    x["do"], x["lse"], x["dd"], x["qpos"], x["qseg"], *keys, x.get("idx"))
    if csa:
      g = jnp.sum(outs[1], axis=2)  # [B, chunk, P, Hp]: the head blocks' shares
      rows = jnp.maximum(x["idx"], 0).reshape(B, -1)  # invalid slots carry g = 0
      dcomp = jax.vmap(lambda d, r, gg: d.at[r].add(gg))(dcomp, rows, g.reshape(B, -1, Hp))
    return dcomp, outs[0]

  dcomp0 = jnp.zeros((B, meta.C, Hp), jnp.float32) if csa else None
  dcomp, dq = jax.lax.scan(one, dcomp0, jnp.arange(n, dtype=jnp.int32))
  dq = jnp.moveaxis(dq, 0, 1).reshape(B, n * chunk, Np, Hp)[:, :T]
  return dq, dcomp


_core.defvjp(_core_fwd, _core_bwd)


# ----- public wrapper (called by ops.py) ----------------------------------------------------------
def _pad_axis(x, axis, size, value):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def sparse_attention(q, q_pos, sink, keys: KeySources, *, scale, block, return_lse=False,
                     backend="gpu", interpret=False, block_sizes: BlockSizes | None = None):
  """The Pallas path of `ops.sparse_attention` (same arguments; `block` is the reference's scan
  step and unused here: the kernel tiles by `block_sizes`). Differentiable (custom_vjp)."""
  del block
  if backend == "tpu":
    from kernels_pallas.sparse_attention import kernel_tpu

    return kernel_tpu.sparse_attention(q, q_pos, sink, keys, scale=scale, return_lse=return_lse,
                                       interpret=interpret)
  bs = block_sizes or BlockSizes.default()
  B, T, N, H = q.shape
  band, ring, entries = keys.band, keys.ring, keys.without_unusable_entries().entries
  i32 = jnp.int32
  kpad = bs.key_multiple  # every kernel's key block divides the padded key-side lengths
  # Compiled Triton dots take operands of at least 16 rows and columns: pad heads and width so.
  least = 1 if interpret else 16
  # Compiled, a key loop of one trip is unrolled into the band loop before it, and the merged body
  # spilled (Flash widths, top-k <= 64 on h100: 255 registers, 1.5 KB); two trips keep the loop.
  least_chunks = 1 if interpret else 2
  bh = bs.head_multiple(max(_pow2(N), least))
  Np, Hp = pl.cdiv(N, bh) * bh, max(_pow2(H), least)
  ints = dict(kpos=q_pos.astype(i32),
              kseg=jnp.zeros((B, T), i32) if band.segments is None else band.segments.astype(i32),
              ppos=None, cseg=None, idx=None)
  qx = _pad_axis(_pad_axis(q, 2, Np, 0), 3, Hp, 0)
  kvx = _pad_axis(band.kv, 2, Hp, 0)
  sinkx = _pad_axis(sink.astype(jnp.float32), 0, Np, 0)
  S = 0
  pkv = None
  if ring is not None:
    S = max(pl.cdiv(ring.kv.shape[1], kpad), least_chunks) * kpad
    pkv = _pad_axis(_pad_axis(ring.kv, 2, Hp, 0), 1, S, 0)
    ints["ppos"] = _pad_axis(ring.pos.astype(i32), 1, S, PAD_POSITION)
  C = P = 0
  compx = None
  if entries is not None:
    C = pl.cdiv(entries.kv.shape[1], kpad) * kpad
    compx = _pad_axis(_pad_axis(entries.kv, 2, Hp, 0), 1, C, 0)
    cseg = (jnp.zeros(entries.kv.shape[:2], i32) if entries.segments is None
            else entries.segments.astype(i32))
    ints["cseg"] = _pad_axis(cseg, 1, C, -(2**31) + 1)  # padding matches no document
    if isinstance(entries, PickedEntries):
      P = max(pl.cdiv(entries.picks.shape[-1], kpad), least_chunks) * kpad
      ints["idx"] = _pad_axis(entries.picks.astype(i32), 2, P, -1)
  ratio = entries.ratio if isinstance(entries, VisibleEntries) else 0
  meta = _Meta(scale=float(scale), window=band.window, T=T, S=S, C=C, P=P, ratio=ratio,
               hca=isinstance(entries, VisibleEntries), bk=kpad)  # each kernel sets its own bk
  out, lse = _core(meta, bs, interpret, qx, sinkx, kvx, pkv, compx, ints)
  out, lse = out[:, :, :N, :H], lse[:, :, :N]
  return (out, lse) if return_lse else out
