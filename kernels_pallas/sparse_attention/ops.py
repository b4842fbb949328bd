"""Public entry of V4's core attention (docs/architecture.md#core-attention): one call, `impl=`
picks the path.

`impl="reference"` runs `reference.py` (the definition); `"pallas"` runs `kernel.py` (Triton-style
GPU body, or the TPU body on TPU; on CPU always interpreted); `"auto"` picks Pallas on
GPU/TPU and the reference elsewhere and logs once which ran (STYLE.md §6). "auto" never picks a
body that would not compile the call on the platform traced for: `auto_impl` asks the body's own
predicate (GPU: the widths and dtypes its tuned tiles were compiled at, blocks.py; TPU:
`kernel_tpu.why_unsupported`) and takes the reference, logged with the reason, where it refuses.
"""

from __future__ import annotations

from typing import Literal

from jaxtyping import Array, Float, Int

from kernels_pallas.common import log_choice, pallas_backend, platform, resolve_impl
from kernels_pallas.sparse_attention import blocks, reference



def _check(q, q_pos, kv, sink, *, scale, window, block, prefix_kv, prefix_pos, comp, comp_idx,
           comp_ratio, segments, comp_seg) -> None:
  """Raises ValueError on shapes or option combinations the op does not define."""
  if q.ndim != 4:
    raise ValueError(f"sparse_attention: q must be [B, T, N, H], got shape {q.shape}")
  B, T, N, H = q.shape
  if q_pos.shape != (B, T):
    raise ValueError(f"sparse_attention: q_pos must be [B, T]={B, T}, got {q_pos.shape}")
  if kv.shape != (B, T, H):
    raise ValueError(f"sparse_attention: kv must be [B, T, H]={B, T, H}, got {kv.shape}")
  if sink.shape != (N,):
    raise ValueError(f"sparse_attention: sink must be [N]=({N},), got {sink.shape}")
  if window < 1 or block < 1:
    raise ValueError(f"sparse_attention: window and block must be >= 1, got {window}, {block}")
  if not float(scale) > 0:
    raise ValueError(f"sparse_attention: scale must be > 0, got {scale}")
  if (prefix_kv is None) != (prefix_pos is None):
    raise ValueError("sparse_attention: prefix_kv and prefix_pos go together")
  if prefix_kv is not None:
    S = prefix_kv.shape[1]
    if prefix_kv.shape != (B, S, H) or prefix_pos.shape != (B, S):
      raise ValueError(f"sparse_attention: prefix_kv must be [B, S, H] and prefix_pos [B, S], got "
                       f"{prefix_kv.shape}, {prefix_pos.shape}")
    if segments is not None:
      raise ValueError("sparse_attention: segments are for full sequences, not with prefix_kv")
  if comp is None:
    if comp_idx is not None or comp_seg is not None:
      raise ValueError("sparse_attention: comp_idx / comp_seg need comp")
  else:
    C = comp.shape[1]
    if comp.shape != (B, C, H):
      raise ValueError(f"sparse_attention: comp must be [B, C, H]={B, 'C', H}, got {comp.shape}")
    if comp_idx is None and comp_ratio < 1:
      raise ValueError("sparse_attention: HCA (comp without comp_idx) needs comp_ratio >= 1")
    if comp_idx is not None and (comp_idx.ndim != 3 or comp_idx.shape[:2] != (B, T)):
      raise ValueError(f"sparse_attention: comp_idx must be [B, T, P], got {comp_idx.shape}")
    if segments is not None and (comp_seg is None or comp_seg.shape != (B, C)):
      raise ValueError("sparse_attention: with segments and comp, comp_seg must be [B, C]")
  if segments is not None and segments.shape != (B, T):
    raise ValueError(f"sparse_attention: segments must be [B, T], got {segments.shape}")


def why_not_pallas(target: str, q, *, window: int, prefix_kv=None, comp=None, comp_idx=None,
                   segments=None) -> str | None:
  """Why the Pallas body of `target` ("gpu", "tpu") would not compile or run this call, or None."""
  if target == "gpu":
    return blocks.why_unsupported_gpu(q.shape[-1], q.dtype)
  if target == "tpu":
    from kernels_pallas.sparse_attention import kernel_tpu

    return kernel_tpu.why_unsupported(
      q.shape, q.dtype, window=window, kind=kernel_tpu.layer_kind(comp, comp_idx),
      num_picks=0 if comp_idx is None else comp_idx.shape[-1],
      num_entries=0 if comp is None else comp.shape[1], prefix=prefix_kv is not None,
      segments=segments is not None)
  return f"no Pallas body for platform {target!r}"


def auto_impl(q, *, window: int, prefix_kv=None, comp=None, comp_idx=None,
              segments=None) -> str:
  """What impl="auto" runs for this call on the platform traced for: "pallas" or "reference"."""
  target = platform()
  if target in ("gpu", "tpu"):
    why = why_not_pallas(target, q, window=window, prefix_kv=prefix_kv, comp=comp,
                         comp_idx=comp_idx, segments=segments)
    if why is not None:
      log_choice("sparse_attention", "reference", target, why)
      return "reference"
  return resolve_impl("sparse_attention", "auto")


def sparse_attention(
  q: Float[Array, "B T N H"],
  q_pos: Int[Array, "B T"],
  kv: Float[Array, "B T H"],
  sink: Float[Array, "N"],
  *,
  scale: float,
  window: int,
  block: int,
  prefix_kv: Float[Array, "B S H"] | None = None,
  prefix_pos: Int[Array, "B S"] | None = None,
  comp: Float[Array, "B C H"] | None = None,
  comp_idx: Int[Array, "B T P"] | None = None,
  comp_ratio: int = 0,
  segments: Int[Array, "B T"] | None = None,
  comp_seg: Int[Array, "B C"] | None = None,
  return_lse: bool = False,
  impl: Literal["auto", "reference", "pallas"] = "reference",
  interpret: bool = False,
) -> Array | tuple[Array, Array]:
  """Attention of T new queries over window keys, compressed entries and the per-head sink.

  Arguments and results are those of `reference.sparse_attention` (see there): with
  `return_lse`, also the float32 log-sum-exp [B, T, N] of the whole denominator, sink included,
  so `exp(scale * q.k - lse)` is the probability of key k.

  Args:
    impl: "reference", "pallas" or "auto" (Pallas on GPU/TPU where that body compiles the call,
      the reference elsewhere; logged once, see `auto_impl`).
    interpret: run the Pallas body in the interpreter (always so on CPU).
  """
  _check(q, q_pos, kv, sink, scale=scale, window=window, block=block, prefix_kv=prefix_kv,
         prefix_pos=prefix_pos, comp=comp, comp_idx=comp_idx, comp_ratio=comp_ratio,
         segments=segments, comp_seg=comp_seg)
  kw = dict(scale=scale, window=window, block=block, prefix_kv=prefix_kv, prefix_pos=prefix_pos,
            comp=comp, comp_idx=comp_idx, comp_ratio=comp_ratio, segments=segments,
            comp_seg=comp_seg, return_lse=return_lse)
  if impl == "auto":
    impl = auto_impl(q, window=window, prefix_kv=prefix_kv, comp=comp, comp_idx=comp_idx,
                     segments=segments)
  if resolve_impl("sparse_attention", impl) == "reference":
    return reference.sparse_attention(q, q_pos, kv, sink, **kw)
  from kernels_pallas.sparse_attention import kernel  # Pallas imports stay off the default path

  backend, interpret = pallas_backend(interpret)
  return kernel.sparse_attention(q, q_pos, kv, sink, **kw, backend=backend, interpret=interpret)

