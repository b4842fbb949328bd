"""Public entry of the lightning indexer (docs/architecture.md#indexer): scores and top-k, `impl=`
picks the path.

`impl="reference"` runs `reference.py`; `"pallas"` scores with the blocked kernel in `kernel.py`
and keeps `jax.lax.top_k` for the selection; `"auto"` picks Pallas on GPU and the reference
elsewhere and logs once which ran (STYLE.md §6). "auto" never picks a body that would not compile
the call: there is no TPU body, and on GPU `kernel.why_unsupported_gpu` bounds the indexer widths
and dtypes the scoring kernel was compiled at (scripts/tune_kernel_blocks.py).
"""

from __future__ import annotations

from typing import Literal

from jaxtyping import Array, Float, Int

from kernels_pallas.common import log_choice, pallas_backend, platform, resolve_impl
from kernels_pallas.indexer_topk import reference

# What the scoring kernel's tiles were compiled at (V4's indexer: 64 heads x 128, bfloat16): a
# program holds the token's [I, J] queries whole, so only these widths are known to compile; in
# float32 the kernel spilled (13.8 KB at 16 x 64, 98 KB at 64 x 128 on h100).
MAX_INDEX_HEADS, MAX_INDEX_HEAD_DIM = 64, 128
GPU_DTYPES = ("bfloat16",)


def why_not_pallas(target: str, q) -> str | None:
  """Why the Pallas scoring body would not compile or run on `target` for queries q, or None."""
  if target == "tpu":
    return "no TPU body for the indexer's scoring kernel"
  if target != "gpu":
    return f"no Pallas body for platform {target!r}"
  import numpy as np

  _, _, I, J = q.shape
  pow2 = lambda n: 1 << max(0, (int(n) - 1).bit_length())
  if np.dtype(q.dtype).name not in GPU_DTYPES:
    name = np.dtype(q.dtype).name
    return f"dtype {name} (the GPU kernel was compiled for {', '.join(GPU_DTYPES)})"
  if pow2(I) > MAX_INDEX_HEADS or pow2(J) > MAX_INDEX_HEAD_DIM:
    return (f"indexer heads x dim {I} x {J} exceed the {MAX_INDEX_HEADS} x {MAX_INDEX_HEAD_DIM} "
            "the GPU kernel was compiled for")
  return None


def auto_impl(q) -> str:
  """What impl="auto" runs for queries q on the platform traced for: "pallas" or "reference"."""
  target = platform()
  if target in ("gpu", "tpu"):
    why = why_not_pallas(target, q)
    if why is not None:
      log_choice("indexer_topk", "reference", target, why)
      return "reference"
  return resolve_impl("indexer_topk", "auto")


def _check(q, w, k, positions, *, ratio, topk, block, q_seg, k_seg) -> None:
  """Raises ValueError on shapes or options the op does not define."""
  if q.ndim != 4:
    raise ValueError(f"indexer_topk: q must be [B, T, I, J], got shape {q.shape}")
  B, T, I, J = q.shape
  if w.shape != (B, T, I):
    raise ValueError(f"indexer_topk: w must be [B, T, I]={B, T, I}, got {w.shape}")
  if k.ndim != 3 or k.shape[0] != B or k.shape[2] != J:
    raise ValueError(f"indexer_topk: k must be [B, C, J] with B={B}, J={J}, got {k.shape}")
  if positions.shape != (B, T):
    raise ValueError(f"indexer_topk: positions must be [B, T]={B, T}, got {positions.shape}")
  if ratio < 1 or topk < 0 or block < 1:
    raise ValueError(f"indexer_topk: need ratio >= 1, topk >= 0, block >= 1; got {ratio}, {topk}, "
                     f"{block}")
  if (q_seg is None) != (k_seg is None):
    raise ValueError("indexer_topk: q_seg and k_seg go together")
  if q_seg is not None and (q_seg.shape != (B, T) or k_seg.shape != (B, k.shape[1])):
    raise ValueError(f"indexer_topk: q_seg must be [B, T], k_seg [B, C]; got {q_seg.shape}, "
                     f"{k_seg.shape}")


def indexer_topk(
  q: Float[Array, "B T I J"],
  w: Float[Array, "B T I"],
  k: Float[Array, "B C J"],
  positions: Int[Array, "B T"],
  *,
  ratio: int,
  topk: int,
  block: int,
  q_seg: Int[Array, "B T"] | None = None,
  k_seg: Int[Array, "B C"] | None = None,
  impl: Literal["auto", "reference", "pallas"] = "reference",
  interpret: bool = False,
) -> Int[Array, "B T P"]:
  """Selected entry indices [B, T, min(topk, C)] (int32, -1 = none); see reference.indexer_topk.

  Args:
    impl: "reference", "pallas" or "auto" (Pallas on GPU where the kernel compiles the call, the
      reference elsewhere; logged once, see `auto_impl`).
    interpret: run the Pallas body in the interpreter (always so on CPU).
  """
  _check(q, w, k, positions, ratio=ratio, topk=topk, block=block, q_seg=q_seg, k_seg=k_seg)
  kw = dict(ratio=ratio, topk=topk, block=block, q_seg=q_seg, k_seg=k_seg)
  if impl == "auto":
    impl = auto_impl(q)
  if resolve_impl("indexer_topk", impl) == "reference":
    return reference.indexer_topk(q, w, k, positions, **kw)
  from kernels_pallas.indexer_topk import kernel

  backend, interpret = pallas_backend(interpret)
  if backend == "tpu":  # the scoring kernel has no TPU body yet: say so, run the reference
    import logging

    logging.getLogger("kernels_pallas").warning("indexer_topk: no TPU body; runs the reference")
    return reference.indexer_topk(q, w, k, positions, **kw)
  return kernel.indexer_topk(q, w, k, positions, **kw, backend=backend, interpret=interpret)
