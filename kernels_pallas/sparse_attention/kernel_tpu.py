"""TPU body of the sparse attention forward (docs/architecture.md#core-attention), Pallas TPU
(Mosaic) API.

One program per (batch row, block of `BLOCK_Q` query tokens); inside it, a `fori_loop` over the
block's tokens (a static unroll took 10x longer to compile), each token's `N` heads being the rows
of its matmuls ([N, H] x [H, keys]). Key
sources, each with its own logits and mask, joined in one softmax seeded with the sink:
  band  the block's window keys, one aligned DMA of `Lp + BLOCK_Q` rows from a copy of `kv`
        left-padded by `Lp` (a multiple of 16, >= W - 1) rows, so block i reads rows
        [i * BLOCK_Q, i * BLOCK_Q + Lp + BLOCK_Q): the copy starts on a tile boundary;
  CSA   the token's own top-k entries, gathered row by row by DMA from a float32 copy of the
        entries in HBM (Mosaic cannot DMA one row of a bf16 tile), the addresses read from the
        block's `[BLOCK_Q, P]` slice of the picks (`PickedEntries.picks`), which the pipeline
        copies into SMEM per grid step (never the whole index array: Flash at T=1024 would
        already fill the 1 MiB SMEM);
        the next token's rows are fetched while the current token computes (two buffers);
  HCA   every entry of the row (C = T / 128, small) in VMEM, masked by visibility.
The window mask uses what the model guarantees (kernel.py's GPU body does the same): along a row
the positions are `q_pos[:, :1] + arange(T)`, so distances are index differences; only the row's
start position is read (scalar prefetch, [B]) for HCA visibility.

Outputs: o [B, T, N, H] and lse [B, T, N] (float32). Each token's lse is a column [N, 1] after the
lane reductions; it becomes the row of the `[BLOCK_Q, N]` lse block through a masked diagonal
sum instead of a transpose (cheap at N <= 128, and every TPU generation lowers it).

Backward: the reference's VJP (`jax.vjp` of `reference.sparse_attention`) under this forward
(STYLE.md §6), through `jax.custom_vjp`: the residuals are the inputs, so nothing of the forward is
saved. The decode ring (`keys.ring`) and packed documents (`keys.band.segments`) are not covered
here; `why_unsupported` says so, and such calls run the reference (logged).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.sparse_attention import reference
from kernels_pallas.sparse_attention.sources import KeySources, PickedEntries

NEG_INF = float("-inf")
# Query tokens per program: a multiple of 16, so that the band copy starts on a bf16 tile row.
BLOCK_Q = 16
KINDS = ("sliding", "csa", "hca")
# VMEM the body may ask Mosaic for (vmem_limit_bytes), under the smallest capacity of the targets
# (v5p: 64 MiB in libtpu's compile-only description; v5e and v6e: 128 MiB); XLA's default scoped
# limit is lower. `vmem_bytes` keeps a program's estimate within it.
VMEM_LIMIT = 48 * 2**20
# SMEM for the block's CSA indices (two pipeline buffers of [BLOCK_Q, P] int32) out of the 1 MiB
# every generation has: P=6144 (768 KiB) compiles on v5e, P=8192 (1 MiB) overflows.
SMEM_LIMIT = 768 * 2**10


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _band_pad(window: int) -> int:
  """Lp: rows of left padding before the band, >= W - 1 and a multiple of 16 (tile aligned)."""
  return _round_up(max(window - 1, 0), 16)


def vmem_bytes(q_shape: tuple[int, ...], dtype, *, window: int, kind: str, num_picks: int = 0,
               num_entries: int = 0) -> int:
  """Upper estimate of the VMEM one program holds (double-buffered blocks, scratch, logits)."""
  _, _, N, H = q_shape
  isz = jnp.dtype(dtype).itemsize
  kb = _band_pad(window) + BLOCK_Q
  keys = kb + (num_picks if kind == "csa" else 0) + (num_entries if kind == "hca" else 0)
  total = 4 * BLOCK_Q * N * H * isz  # q and o blocks, two buffers each
  total += 2 * kb * H * isz + 2 * BLOCK_Q * N * 4  # band scratch and its loaded copy, lse blocks
  if kind == "csa":
    total += 2 * num_picks * H * 4 + num_picks * H * isz + 2 * BLOCK_Q * num_picks * 4
  if kind == "hca":
    total += 2 * num_entries * H * isz
  # A token's logits, masks, exponentials and their casts, p.v partials: 10 [N, keys] float32
  # arrays, calibrated against Mosaic's scoped allocations (Flash sliding at W=12288: 55.4 MiB,
  # at W=24576: 76.8 MiB; Pro at W=6144: compiles), conservative by design.
  total += 10 * N * keys * 4 + 4 * N * H * 4
  return total


def why_unsupported(q_shape: tuple[int, ...], dtype, *, window: int, kind: str,
                    num_picks: int = 0, num_entries: int = 0, prefix: bool = False,
                    segments: bool = False) -> str | None:
  """Why the TPU body cannot run (compile) this call, or None when it can.

  Signature for dispatchers (ops.py's impl="auto"):
    why_unsupported(q_shape, dtype, *, window, kind, num_picks=0, num_entries=0, prefix=False,
                    segments=False) -> str | None

  Args:
    q_shape: (B, T, N, H) of the queries.
    dtype: the queries' (and K=V's) dtype.
    window: W.
    kind: "sliding" (no entries), "csa" (`PickedEntries`) or "hca" (`VisibleEntries`): the
      `KeySources.kind` of the call (`why_unsupported_keys` reads it and the numbers below).
    num_picks: P, the picks' last axis (CSA).
    num_entries: C, the entries' count (CSA, HCA).
    prefix: a decode ring (`keys.ring`) is given.
    segments: packed documents (`keys.band.segments`) are given.
  """
  if kind not in KINDS:
    raise ValueError(f"kernel_tpu: kind must be one of {KINDS}, got {kind!r}")
  if len(q_shape) != 4:
    raise ValueError(f"kernel_tpu: q_shape must be (B, T, N, H), got {q_shape}")
  if prefix:
    return "the decode ring (keys.ring) is not covered by the TPU body"
  if segments:
    return "packed documents (keys.band.segments) are not covered by the TPU body"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return f"dtype {jnp.dtype(dtype)} (the TPU body takes float32 or bfloat16)"
  if kind == "csa" and 2 * BLOCK_Q * num_picks * 4 > SMEM_LIMIT:
    return (f"P={num_picks} picks per token: the block's indices need "
            f"{2 * BLOCK_Q * num_picks * 4 // 2**10} KiB of SMEM, over {SMEM_LIMIT // 2**10} KiB")
  need = vmem_bytes(q_shape, dtype, window=window, kind=kind, num_picks=num_picks,
                    num_entries=num_entries)
  if need > VMEM_LIMIT:
    return (f"needs about {need / 2**20:.1f} MiB of VMEM per program (window={window}, "
            f"P={num_picks}, C={num_entries}, q {q_shape}); the body asks for at most "
            f"{VMEM_LIMIT // 2**20} MiB")
  return None


def supported(q_shape: tuple[int, ...], dtype, *, window: int, kind: str, num_picks: int = 0,
              num_entries: int = 0, prefix: bool = False, segments: bool = False) -> bool:
  """`why_unsupported(...) is None` (same arguments)."""
  return why_unsupported(q_shape, dtype, window=window, kind=kind, num_picks=num_picks,
                         num_entries=num_entries, prefix=prefix, segments=segments) is None


def _precision(a, b):
  """float32 operands: full float32 products (as the reference); bf16: the MXU's native pass. Set
  explicitly: a global `jax_default_matmul_precision="highest"` on bf16 operands makes Mosaic
  reject the matmul ("Bad lhs type")."""
  wide = a.dtype == jnp.float32 or b.dtype == jnp.float32
  return jax.lax.Precision.HIGHEST if wide else jax.lax.Precision.DEFAULT


def _nt(a, b):
  """a [M, H] . b [K, H]^T -> [M, K] in float32 on the MXU."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a, b),
                             preferred_element_type=jnp.float32)


def _nn(a, b):
  """a [M, K] . b [K, H] -> [M, H] in float32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a, b),
                             preferred_element_type=jnp.float32)


def _as_row(col):
  """[N, 1] -> [1, N]: the diagonal of the broadcast column, summed over rows (no transpose)."""
  n = col.shape[0]
  r = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  c = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(r == c, jnp.broadcast_to(col, (n, n)), 0.0), axis=0, keepdims=True)


def _gather(idx_sref, comp_hbm, cbuf, sem, b, j, slot, picks: int):
  """Starts the DMAs of token j's picked entry rows into cbuf[slot] (invalid -1 reads row 0)."""
  def start(p, carry):
    row = jnp.maximum(idx_sref[j, p], 0)
    pltpu.make_async_copy(comp_hbm.at[b, pl.ds(row, 1)], cbuf.at[slot, pl.ds(p, 1)],
                          sem.at[slot]).start()
    return carry

  jax.lax.fori_loop(0, picks, start, 0)


def _wait_gather(comp_hbm, cbuf, sem, b, slot, picks: int):
  """Waits for the `picks` one-row copies into cbuf[slot] (one same-sized wait per copy)."""
  def wait(p, carry):
    pltpu.make_async_copy(comp_hbm.at[b, pl.ds(0, 1)], cbuf.at[slot, pl.ds(0, 1)],
                          sem.at[slot]).wait()
    return carry

  jax.lax.fori_loop(0, picks, wait, 0)


def sparse_fwd_tpu_kernel(start_sref, *refs, scale: float, window: int, kind: str,
                          picks: int, ratio: int):
  """o [BLOCK_Q, N, H] and lse [BLOCK_Q, N] of query block i of row b (see the module doc)."""
  if kind == "csa":
    (idx_sref, q_ref, sink_ref, idx_ref, kv_hbm, comp_hbm, o_ref, lse_ref, kbuf, cbuf, sem,
     bsem) = refs
  elif kind == "hca":
    q_ref, sink_ref, comp_ref, kv_hbm, o_ref, lse_ref, kbuf, bsem = refs
  else:
    q_ref, sink_ref, kv_hbm, o_ref, lse_ref, kbuf, bsem = refs
  b, i = pl.program_id(0), pl.program_id(1)
  lp = _band_pad(window)
  kb = kbuf.shape[0]
  band = pltpu.make_async_copy(kv_hbm.at[b, pl.ds(pl.multiple_of(i * BLOCK_Q, BLOCK_Q), kb)],
                               kbuf, bsem.at[0])
  band.start()
  if kind == "csa":
    _gather(idx_sref, comp_hbm, cbuf, sem, b, 0, 0, picks)
  band.wait()
  kw = kbuf[...]  # [Kb, H]: key of slot s is token i * BLOCK_Q - Lp + s
  slot = jax.lax.broadcasted_iota(jnp.int32, (1, kb), 1)
  first_real = lp - i * BLOCK_Q  # slots below it are left padding
  sink = sink_ref[...]  # [N, 1] float32

  def token(j, carry):  # query j of the block: every key source, one softmax
    q = q_ref[j]  # [N, H]
    d = lp + j - slot  # distance from the query, in tokens
    parts = [(_nt(q, kw) * scale, (d >= 0) & (d < window) & (slot >= first_real), kw)]
    if kind == "csa":
      cur = j % 2

      @pl.when(j + 1 < BLOCK_Q)
      def _():  # the next token's rows arrive while this one computes
        _gather(idx_sref, comp_hbm, cbuf, sem, b, j + 1, 1 - cur, picks)

      _wait_gather(comp_hbm, cbuf, sem, b, cur, picks)
      kc = cbuf[cur].astype(kw.dtype)  # [P, H]; float32 in HBM only for the row DMAs
      parts.append((_nt(q, kc) * scale, idx_ref[pl.ds(j, 1), :] >= 0, kc))
    elif kind == "hca":
      kc = comp_ref[...]  # [C, H]
      t = start_sref[b] + i * BLOCK_Q + j  # this query's position
      entry = jax.lax.broadcasted_iota(jnp.int32, (1, kc.shape[0]), 1)
      parts.append((_nt(q, kc) * scale, entry < (t + 1) // ratio, kc))
    out, lse = _softmax_pv(parts, sink)
    o_ref[j] = out.astype(o_ref.dtype)
    lse_ref[pl.ds(j, 1), :] = _as_row(lse)
    return carry

  jax.lax.fori_loop(0, BLOCK_Q, token, 0)


def _softmax_pv(parts, sink):
  """One softmax over the key sources [(logits [N, K], mask, values [K, H])], seeded with the sink
  [N, 1] (max and denominator, never the numerator): (out [N, H] float32, lse [N, 1])."""
  logits = [jnp.where(mask, s, NEG_INF) for s, mask, _ in parts]
  m = sink
  for s in logits:
    m = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [N, 1]
  denom = jnp.exp(sink - m)
  out = None
  for s, (_, _, v) in zip(logits, parts):
    e = jnp.exp(s - m)
    denom = denom + jnp.sum(e, axis=1, keepdims=True)
    pv = _nn(e.astype(v.dtype), v)
    out = pv if out is None else out + pv
  return out / denom, m + jnp.log(denom)


def _forward(q, q_pos, kv, sink, comp, comp_idx, *, kind, scale, window, ratio, interpret):
  """The pallas_call: o [B, T, N, H] (q's dtype), lse [B, T, N] float32."""
  B, T, N, H = q.shape
  tp = _round_up(T, BLOCK_Q)
  nb = tp // BLOCK_Q
  lp = _band_pad(window)
  kb = lp + BLOCK_Q
  qx = jnp.pad(q, ((0, 0), (0, tp - T), (0, 0), (0, 0)))
  kv_pad = jnp.pad(kv, ((0, 0), (lp, tp - T), (0, 0)))  # [B, Lp + Tp, H]
  start = q_pos[:, 0].astype(jnp.int32)  # [B]: positions are start + arange(T) along a row
  blk = lambda shape: pl.BlockSpec(shape, lambda b, i, *_: (b, i) + (0,) * (len(shape) - 2))
  in_specs = [blk((None, BLOCK_Q, N, H)), pl.BlockSpec((N, 1), lambda b, i, *_: (0, 0))]
  args = [qx, sink.astype(jnp.float32).reshape(N, 1)]
  scratch = [pltpu.VMEM((kb, H), kv.dtype)]
  picks = 0
  if kind == "csa":
    picks = comp_idx.shape[-1]
    idx = jnp.pad(comp_idx.astype(jnp.int32), ((0, 0), (0, tp - T), (0, 0)), constant_values=-1)
    # The block's indices twice: in SMEM (pipelined per grid step) for the DMA addresses, in VMEM
    # for the validity mask.
    idx_smem = pl.BlockSpec((None, BLOCK_Q, picks), lambda b, i, *_: (b, i, 0),
                            memory_space=pltpu.SMEM)
    in_specs = [idx_smem, *in_specs, blk((None, BLOCK_Q, picks)),
                pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)]
    args = [idx, *args, idx, kv_pad, comp.astype(jnp.float32)]
    scratch += [pltpu.VMEM((2, picks, H), jnp.float32), pltpu.SemaphoreType.DMA((2,))]
  elif kind == "hca":
    C = comp.shape[1]
    in_specs += [pl.BlockSpec((None, C, H), lambda b, i, *_: (b, 0, 0)),
                 pl.BlockSpec(memory_space=pl.ANY)]
    args += [comp, kv_pad]
  else:
    in_specs += [pl.BlockSpec(memory_space=pl.ANY)]
    args += [kv_pad]
  scratch += [pltpu.SemaphoreType.DMA((1,))]
  kern = functools.partial(sparse_fwd_tpu_kernel, scale=float(scale), window=int(window),
                           kind=kind, picks=picks, ratio=int(ratio))
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1, grid=(B, nb), in_specs=in_specs,
    out_specs=[blk((None, BLOCK_Q, N, H)), blk((None, BLOCK_Q, N))], scratch_shapes=scratch)
  # No state crosses grid steps (each fetches its own band and rows), so both axes are parallel:
  # v5p's two cores can split the blocks of one row.
  o, lse = pl.pallas_call(
    kern, grid_spec=grid_spec,
    out_shape=[jax.ShapeDtypeStruct((B, tp, N, H), q.dtype),
               jax.ShapeDtypeStruct((B, tp, N), jnp.float32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                         vmem_limit_bytes=VMEM_LIMIT),
    interpret=interpret, name="v4_sparse_attention_fwd_tpu",
  )(start, *args)
  return o[:, :T], lse[:, :T]


def why_unsupported_keys(q_shape: tuple[int, ...], dtype, keys: KeySources) -> str | None:
  """`why_unsupported` of a call's queries (shape, dtype) and key sources (ops.py's dispatcher)."""
  used = keys.without_unusable_entries()
  e = used.entries
  return why_unsupported(
    q_shape, dtype, window=keys.band.window, kind=used.kind,
    num_picks=e.picks.shape[-1] if isinstance(e, PickedEntries) else 0,
    num_entries=0 if e is None else e.kv.shape[1], prefix=keys.ring is not None,
    segments=keys.band.segments is not None)


def sparse_attention(q, q_pos, sink, keys: KeySources, *, scale, return_lse=False,
                     interpret=False, block=None):
  """The TPU path of `ops.sparse_attention` (same arguments; `block` is the reference's scan step,
  used only where the reference runs: the backward, and calls `why_unsupported` refuses, which run
  the reference whole and log it). Differentiable: the reference's VJP under the Pallas forward.

  The positions of each row must be `q_pos[:, :1] + arange(T)` (what the model passes).
  """
  B, T, N, H = q.shape
  ref_kw = dict(scale=scale, block=block or min(256, T), return_lse=True)
  why = why_unsupported_keys(q.shape, q.dtype, keys)
  if why is not None:
    logging.getLogger("kernels_pallas").warning(
      "sparse_attention: the TPU body does not cover this call (%s); it runs the reference", why)
    out = reference.sparse_attention(q, q_pos, sink, keys, **ref_kw)
    return out if return_lse else out[0]
  keys = keys.without_unusable_entries()  # entries no query can use (T < ratio, no picks) drop out
  kind, band, entries = keys.kind, keys.band, keys.entries
  comp = None if entries is None else entries.kv
  comp_idx = entries.picks if kind == "csa" else None
  ratio = entries.ratio if kind == "hca" else 0
  comp_dummy = comp if comp is not None else jnp.zeros((B, 0, H), band.kv.dtype)

  @jax.custom_vjp
  def attn(q, q_pos, kv, sink, comp, comp_idx):
    return _forward(q, q_pos, kv, sink, None if kind == "sliding" else comp, comp_idx,
                    kind=kind, scale=scale, window=band.window, ratio=ratio, interpret=interpret)

  def fwd(q, q_pos, kv, sink, comp, comp_idx):
    return attn(q, q_pos, kv, sink, comp, comp_idx), (q, q_pos, kv, sink, comp, comp_idx)

  def bwd(res, cts):  # the reference's VJP (STYLE.md §6); the residuals are the inputs
    q, q_pos, kv, sink, comp, comp_idx = res

    def ref(q, kv, sink, comp):
      e = None if kind == "sliding" else dataclasses.replace(entries, kv=comp)
      return reference.sparse_attention(
        q, q_pos, sink, dataclasses.replace(keys, band=dataclasses.replace(band, kv=kv), entries=e),
        **ref_kw)

    _, vjp = jax.vjp(ref, q, kv, sink, comp)
    dq, dkv, dsink, dcomp = vjp(cts)
    return dq, None, dkv, dsink, dcomp, None

  attn.defvjp(fwd, bwd)
  out, lse = attn(q, q_pos, band.kv, sink, comp_dummy, comp_idx)
  return (out, lse) if return_lse else out
