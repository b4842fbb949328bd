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
from kernels_pallas.sparse_attention.sources import KeySources


def _check(q, q_pos, sink, keys, *, scale, block) -> None:
  """Raises ValueError where the queries and the key sources disagree (each record has checked its
  own shapes when built, sources.py)."""
  if not isinstance(keys, KeySources):
    raise ValueError(f"sparse_attention: keys must be a KeySources, got {type(keys).__name__}")
  if q.ndim != 4:
    raise ValueError(f"sparse_attention: q must be [B, T, N, H], got shape {q.shape}")
  B, T, N, H = q.shape
  if q_pos.shape != (B, T):
    raise ValueError(f"sparse_attention: q_pos must be [B, T]={B, T}, got {q_pos.shape}")
  if keys.band.kv.shape != (B, T, H):
    raise ValueError(f"sparse_attention: keys.band.kv must be [B, T, H]={B, T, H}, got "
                     f"{keys.band.kv.shape}")
  if sink.shape != (N,):
    raise ValueError(f"sparse_attention: sink must be [N]=({N},), got {sink.shape}")
  if block < 1:
    raise ValueError(f"sparse_attention: block must be >= 1, got {block}")
  if not float(scale) > 0:
    raise ValueError(f"sparse_attention: scale must be > 0, got {scale}")


def why_not_pallas(target: str, q, keys: KeySources) -> str | None:
  """Why the Pallas body of `target` ("gpu", "tpu") would not compile or run this call, or None."""
  if target == "gpu":
    return blocks.why_unsupported_gpu(q.shape[-1], q.dtype)
  if target == "tpu":
    from kernels_pallas.sparse_attention import kernel_tpu

    return kernel_tpu.why_unsupported_keys(q.shape, q.dtype, keys)
  return f"no Pallas body for platform {target!r}"


def auto_impl(q, keys: KeySources) -> str:
  """What impl="auto" runs for this call on the platform traced for: "pallas" or "reference"."""
  target = platform()
  if target in ("gpu", "tpu"):
    why = why_not_pallas(target, q, keys)
    if why is not None:
      log_choice("sparse_attention", "reference", target, why)
      return "reference"
  return resolve_impl("sparse_attention", "auto")


def sparse_attention(
  q: Float[Array, "B T N H"],
  q_pos: Int[Array, "B T"],
  sink: Float[Array, "N"],
  keys: KeySources,
  *,
  scale: float,
  block: int,
  return_lse: bool = False,
  impl: Literal["auto", "reference", "pallas"] = "reference",
  interpret: bool = False,
) -> Array | tuple[Array, Array]:
  """Attention of T new queries over their key sources (`keys`: window band, optional cache ring,
  optional compressed entries, sources.py) and the per-head sink.

  Arguments and results are those of `reference.sparse_attention` (see there): with
  `return_lse`, also the float32 log-sum-exp [B, T, N] of the whole denominator, sink included,
  so `exp(scale * q.k - lse)` is the probability of key k.

  Args:
    impl: "reference", "pallas" or "auto" (Pallas on GPU/TPU where that body compiles the call,
      the reference elsewhere; logged once, see `auto_impl`).
    interpret: run the Pallas body in the interpreter (always so on CPU).
  """
  _check(q, q_pos, sink, keys, scale=scale, block=block)
  kw = dict(scale=scale, block=block, return_lse=return_lse)
  if impl == "auto":
    impl = auto_impl(q, keys)
  if resolve_impl("sparse_attention", impl) == "reference":
    return reference.sparse_attention(q, q_pos, sink, keys, **kw)
  from kernels_pallas.sparse_attention import kernel  # Pallas imports stay off the default path

  backend, interpret = pallas_backend(interpret)
  return kernel.sparse_attention(q, q_pos, sink, keys, **kw, backend=backend, interpret=interpret)
