"""Tile sizes of the sparse-attention Pallas kernels (kernel.py): one `Tile` per kernel, per target.

Four kernels, four tiles: the forward, the backward's dQ and dKV kernels, and the forward of a
decode step (a call with a decode ring, `keys.ring`). Triton keeps a program's matmul operands in
shared memory and its accumulators in registers, and at V4's head dim (512) both run out: an
[64, 512] f32 accumulator alone is 128 registers a thread at 8 warps. So the tiles are chosen per
target by compiling them: `scripts/tune_kernel_blocks.py` compiles candidates for the
compile-only H100 and H200 (deepseek_v4.aot.targets) at Flash and Pro shapes, every layer kind, in
the order of a stated rule (the largest tile block_q * block_k, then the larger query block, more
pipeline stages, fewer warps), and keeps the first within the shared-memory limit with zero
register spills (ptxas). Timing on the device would be the second filter; the defaults below
passed only the first (benchmarks/results/tune_kernel_blocks.json).

"interpret" holds the tiles of the CPU interpreter, where no budget applies and fewer, larger steps
run faster.
"""

from __future__ import annotations

import dataclasses

from kernels_pallas.common import platform


def _pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class Tile:
  """One kernel's launch shape.

  Attributes:
    block_q: query heads per program (the rows of every matmul); dKV: heads per inner step.
    block_k: keys per loop step; dKV: keys per program (each program owns its keys' gradient).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages of the key loop.
  """

  block_q: int
  block_k: int
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k", "num_warps"):
      value = getattr(self, name)
      if not _pow2(value):
        raise ValueError(f"Tile: {name}={value} must be a power of two >= 1")
    if self.num_stages < 1:
      raise ValueError(f"Tile: num_stages={self.num_stages} must be >= 1")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The tiles of one call's kernels, and `bwd_chunk` tokens per CSA gradient scatter chunk."""

  fwd: Tile
  dq: Tile
  dkv: Tile
  decode: Tile
  bwd_chunk: int = 1024

  def __post_init__(self):
    if self.bwd_chunk < 1:
      raise ValueError(f"BlockSizes: bwd_chunk={self.bwd_chunk} must be >= 1")

  @classmethod
  def uniform(cls, block_q: int, block_k: int, block_kv: int | None = None, num_warps: int = 4,
              num_stages: int = 2, bwd_chunk: int = 1024) -> "BlockSizes":
    """The same tile for every kernel (`block_kv` keys per dKV program, default `block_k`)."""
    t = Tile(block_q, block_k, num_warps, num_stages)
    kv = Tile(block_q, block_kv or block_k, num_warps, num_stages)
    return cls(fwd=t, dq=t, dkv=kv, decode=t, bwd_chunk=bwd_chunk)

  @classmethod
  def default(cls, target: str | None = None) -> "BlockSizes":
    """The tuned tiles of `target` ("h100", "h200", "interpret"); None: the platform traced for."""
    target = target or default_target()
    if target not in DEFAULTS:
      raise ValueError(f"BlockSizes.default: target must be one of {sorted(DEFAULTS)}, "
                       f"got {target!r}")
    return DEFAULTS[target]

  @property
  def key_multiple(self) -> int:
    """Every key-side length (ring slots, entries, top-k slots) is padded to this multiple, so
    each kernel's key block divides it (all are powers of two)."""
    return max(t.block_k for t in (self.fwd, self.dq, self.dkv, self.decode))

  def head_multiple(self, num_heads_pow2: int) -> int:
    """Query heads are padded to this multiple: each kernel's (clamped) head block divides it."""
    return max(min(t.block_q, num_heads_pow2) for t in (self.fwd, self.dq, self.dkv, self.decode))


def default_target() -> str:
  """"interpret" off GPU; on GPU the chip: "h200" for an H200, else "h100" (the other sm_90 part;
  also what ahead-of-time compilation on a CPU host gets, which sees only the platform)."""
  if platform() != "gpu":
    return "interpret"
  import jax

  if jax.default_backend() == "gpu" and "H200" in jax.devices()[0].device_kind.upper():
    return "h200"
  return "h100"


# Chosen by scripts/tune_kernel_blocks.py (benchmarks/results/tune_kernel_blocks.json): the first
# tile in the pick rule's order that compiles for H100 and H200 at Flash and Pro shapes, every
# layer kind, within shared memory (232,448 B a block) and without spills. Per kernel, at Flash
# CSA on H100: fwd 160 KB / 196 registers; dQ 128 KB / 227; dKV 162 KB / 170; decode 160 KB / 200.
# The tiles (64 heads x 64 keys, 2 stages, one tile for all) spilled in the forward and
# overflowed shared memory in dQ (394 KB). Not timed on a device: compile check only.
_SM90 = BlockSizes(
  fwd=Tile(block_q=32, block_k=64, num_warps=8, num_stages=1),
  dq=Tile(block_q=32, block_k=32, num_warps=8, num_stages=1),
  dkv=Tile(block_q=32, block_k=32, num_warps=8, num_stages=3),
  decode=Tile(block_q=32, block_k=64, num_warps=8, num_stages=1),
)
DEFAULTS: dict[str, BlockSizes] = {
  "interpret": BlockSizes.uniform(block_q=64, block_k=64, block_kv=32, num_warps=8),
  "h100": _SM90,
  "h200": _SM90,
}


# What the tiles above were compiled and checked at (scripts/tune_kernel_blocks.py,
# tests/aot/test_gpu_kernels.py): bfloat16 operands up to V4's head dim, 512. float32 operands take
# Triton's full-precision dot path, which spilled thousands of bytes at every width tried (the
# indexer kernel at 16 x 64: 13.8 KB); other dtypes and wider heads were never compiled.
MAX_HEAD_DIM = 512
GPU_DTYPES = ("bfloat16",)


def why_unsupported_gpu(head_dim: int, dtype) -> str | None:
  """Why the GPU body's tuned tiles are not known to compile a call (head dim, dtype), or None.

  Every other shape is free: heads, tokens, window, entries and picks change only the grid, the
  loop counts and the padding, not what one program holds.
  """
  import numpy as np

  name = np.dtype(dtype).name
  if name not in GPU_DTYPES:
    return f"dtype {name} (the GPU tiles were compiled for {', '.join(GPU_DTYPES)})"
  padded = 1 << max(0, (int(head_dim) - 1).bit_length())
  if padded > MAX_HEAD_DIM:
    return (f"head dim {head_dim} (padded {padded}) is wider than the {MAX_HEAD_DIM} the GPU "
            "tiles were compiled for")
  return None
