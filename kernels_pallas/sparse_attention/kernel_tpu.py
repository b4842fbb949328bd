"""TPU body of the sparse attention forward (spec §3.10): scalar-prefetched top-k indices.

One program per (batch, token). The token's CSA indices and the band's key positions arrive as
scalar prefetch (SMEM), K=V rows stay in HBM (`pl.ANY`) and are copied into VMEM scratch with
`make_async_copy`: the window band as one contiguous copy of W rows (the band is left-padded by
W rows so the copy never starts before row 0), each picked entry as a one-row copy. Then a single
softmax over the W + P keys, seeded with the sink, gives the output and the lse. Runs under
`interpret=True` on CPU.

Scope: window + CSA (the layers with a gather). HCA, the decode ring and packed segments take the
reference here (logged); the backward is `jax.vjp` of the reference (STYLE.md §6) until a TPU
backward kernel exists.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.common import PAD_POSITION
from kernels_pallas.sparse_attention import reference

NEG_INF = float("-inf")


def sparse_fwd_tpu_kernel(idx_sref, kpos_sref, q_ref, sink_ref, kv_hbm, comp_hbm, o_ref, lse_ref,
                          kbuf, cbuf, sem, *, scale: float, window: int, T: int, P: int):
  """out [N, H], lse [N] of token t of row b; kbuf [W, H] and cbuf [P, H] are VMEM scratch."""
  b, t = pl.program_id(0), pl.program_id(1)
  # Band: padded rows t + 1 .. t + W hold keys t - W + 1 .. t.
  band = pltpu.make_async_copy(kv_hbm.at[b, pl.ds(t + 1, window)], kbuf, sem.at[0])
  band.start()
  copies = []
  for j in range(P):  # static unroll: P one-row gathers in flight together
    row = jnp.maximum(idx_sref[b, t, j], 0)
    cp = pltpu.make_async_copy(comp_hbm.at[b, pl.ds(row, 1)], cbuf.at[pl.ds(j, 1)], sem.at[1])
    cp.start()
    copies.append(cp)
  band.wait()
  for cp in copies:
    cp.wait()
  qp = kpos_sref[b, t + window]
  kp = jnp.stack([kpos_sref[b, t + 1 + i] for i in range(window)])  # [W]
  d = qp - kp
  wvalid = (d >= 0) & (d < window) & (kp >= 0)
  cvalid = jnp.stack([idx_sref[b, t, j] >= 0 for j in range(P)])  # [P]
  q = q_ref[...].astype(jnp.float32) * scale  # [N, H]
  kw, kc = kbuf[...].astype(jnp.float32), cbuf[...].astype(jnp.float32)
  sw = jnp.where(wvalid[None, :], jnp.dot(q, kw.T, preferred_element_type=jnp.float32), NEG_INF)
  sc = jnp.where(cvalid[None, :], jnp.dot(q, kc.T, preferred_element_type=jnp.float32), NEG_INF)
  sink = sink_ref[...].astype(jnp.float32)  # [N]
  m = jnp.maximum(jnp.maximum(jnp.max(sw, axis=1), jnp.max(sc, axis=1)), sink)
  pw, pc = jnp.exp(sw - m[:, None]), jnp.exp(sc - m[:, None])
  l = jnp.sum(pw, axis=1) + jnp.sum(pc, axis=1) + jnp.exp(sink - m)
  out = (jnp.dot(pw, kw, preferred_element_type=jnp.float32)
         + jnp.dot(pc, kc, preferred_element_type=jnp.float32)) / l[:, None]
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _forward(q, q_pos, kv, sink, comp, comp_idx, *, scale, window, interpret):
  B, T, N, H = q.shape
  P = comp_idx.shape[-1]
  kv_pad = jnp.pad(kv, ((0, 0), (window, 0), (0, 0)))
  kpos_pad = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (window, 0)),
                     constant_values=PAD_POSITION)
  kern = functools.partial(sparse_fwd_tpu_kernel, scale=float(scale), window=window, T=T, P=P)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2, grid=(B, T),
    in_specs=[pl.BlockSpec((None, None, N, H), lambda b, t, *_: (b, t, 0, 0)),
              pl.BlockSpec((N,), lambda b, t, *_: (0,)),
              pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
    out_specs=[pl.BlockSpec((None, None, N, H), lambda b, t, *_: (b, t, 0, 0)),
               pl.BlockSpec((None, None, N), lambda b, t, *_: (b, t, 0))],
    scratch_shapes=[pltpu.VMEM((window, H), kv.dtype), pltpu.VMEM((P, H), comp.dtype),
                    pltpu.SemaphoreType.DMA((2,))])
  return pl.pallas_call(
    kern, grid_spec=grid_spec,
    out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((B, T, N), jnp.float32)],
    interpret=interpret, name="v4_sparse_attention_fwd_tpu",
  )(comp_idx.astype(jnp.int32), kpos_pad, q, sink.astype(jnp.float32), kv_pad, comp)


def sparse_attention(q, q_pos, kv, sink, *, scale, window, prefix_kv=None, prefix_pos=None,
                     comp=None, comp_idx=None, comp_ratio=0, segments=None, comp_seg=None,
                     return_lse=False, interpret=False):
  """The TPU path of `ops.sparse_attention` (window + CSA; other layouts run the reference)."""
  supported = (comp is not None and comp_idx is not None and comp_idx.shape[-1] > 0
               and comp.shape[1] > 0 and prefix_kv is None and segments is None)
  kw = dict(scale=scale, window=window, block=min(256, q.shape[1]), prefix_kv=prefix_kv,
            prefix_pos=prefix_pos, comp=comp, comp_idx=comp_idx, comp_ratio=comp_ratio,
            segments=segments, comp_seg=comp_seg, return_lse=True)
  if not supported:
    logging.getLogger("kernels_pallas").warning(
      "sparse_attention TPU body covers window + CSA only; this call runs the reference")
    out = reference.sparse_attention(q, q_pos, kv, sink, **kw)
    return out if return_lse else out[0]

  @jax.custom_vjp
  def attn(q, kv, sink, comp):
    return _forward(q, q_pos, kv, sink, comp, comp_idx, scale=scale, window=window,
                    interpret=interpret)

  def fwd(q, kv, sink, comp):
    return attn(q, kv, sink, comp), (q, kv, sink, comp)

  def bwd(res, cts):  # reference backward until a TPU backward kernel exists (STYLE.md §6)
    _, vjp = jax.vjp(lambda *a: reference.sparse_attention(a[0], q_pos, a[1], a[2], **{
      **kw, "comp": a[3]}), *res)
    return vjp(cts)

  attn.defvjp(fwd, bwd)
  out, lse = attn(q, kv, sink, comp)
  return (out, lse) if return_lse else out
