"""Tune the GPU Pallas kernels' tiles by compiling them for H100 and H200 on this CPU host.

For each kernel (sparse attention forward, dQ, dKV, decode forward; the indexer's scoring kernel)
and each target, candidate tiles are tried in the order of the pick rule, and the first that
compiles for EVERY layer kind (CSA, HCA, sliding window) at Flash AND Pro shapes with
  * shared memory within the target's per-block limit (XLA refuses more: RESOURCE_EXHAUSTED), and
  * zero register spills (ptxas -v on the PTX XLA produced)
is kept. That is the tuner's first filter; the second, timing the survivors on the device, needs a
GPU and is not run here. Pick rule, stated: the largest tile (block_q * block_k), then the larger
query block (fewer programs re-reading the same keys), then more pipeline stages, then fewer warps.
`--all` compiles every candidate (Flash shapes, every kind) for the full table.

While one kernel is tuned, the others run with a small tile that compiles everywhere (SMALL), so a
failure belongs to the kernel under test. Prints a table and writes
benchmarks/results/tune_kernel_blocks.json; the chosen tiles are the defaults in
kernels_pallas/sparse_attention/blocks.py and kernels_pallas/indexer_topk/kernel.py.

  JAX_PLATFORMS=cpu python scripts/tune_kernel_blocks.py [--targets h100 h200] [--all]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from deepseek_v4.aot import compile as aot_compile  # noqa: E402
from deepseek_v4.aot import targets  # noqa: E402
from kernels_pallas.indexer_topk import kernel as idx_kernel  # noqa: E402
from kernels_pallas.sparse_attention import kernel as sa_kernel  # noqa: E402
from kernels_pallas.sparse_attention.blocks import BlockSizes, Tile  # noqa: E402

# V4's widths (config.flash() / config.pro()) and the compiled shapes: deepseek_v4/aot/compile.py.
PRESETS = aot_compile.KERNEL_PRESETS
H, T_TRAIN = aot_compile.HEAD_DIM, aot_compile.KERNEL_TOKENS
KINDS = ("csa", "hca", "window")  # most demanding first: a failing candidate fails early
SMALL = Tile(block_q=16, block_k=16, num_warps=4, num_stages=1)
ATTN_KERNELS = ("fwd", "dq", "dkv", "decode")
KERNEL_NAMES = {"fwd": ("v4_sparse_attention_fwd",), "decode": ("v4_sparse_attention_fwd",),
                "dq": ("v4_sparse_attention_dq",),
                "dkv": ("v4_sparse_attention_dkv_band", "v4_sparse_attention_dkv_hca")}


def attention_program(kernel: str, kind: str, preset: str, bs: BlockSizes, target: str):
  """(fn, abstract args) of the kernel path that runs `kernel` for a layer kind, with tiles `bs`.

  fwd: forward with lse at T_TRAIN; dq / dkv: the gradient of a loss of out and lse (forward, dQ
  and dKV kernels); decode: one token per row against the decode ring (and entries).
  """
  attention = functools.partial(sa_kernel.sparse_attention, block_sizes=bs)
  return aot_compile.attention_program(attention, target, kind, **PRESETS[preset],
                                       decode=kernel == "decode", grad=kernel in ("dq", "dkv"))


def indexer_program(preset: str, bs: idx_kernel.BlockSizes, target: str):
  """(fn, abstract args) of the indexer's top-k over T_TRAIN queries (CSA entries T/4)."""
  topk = functools.partial(idx_kernel.indexer_topk, block_sizes=bs)
  return aot_compile.indexer_program(topk, target, P=PRESETS[preset]["P"])


def check(target: str, fn, args, names) -> dict:
  """Compiles fn for `target`; the named kernels' resources, and whether all of them are there
  and fit (shared memory within the limit, zero spills)."""
  limit = aot_compile.shared_memory_limit(target)
  t0 = time.perf_counter()
  try:
    with targets.compiling_for(target):
      lowered = jax.jit(fn).lower(*args)
      kernels = aot_compile.gpu_kernel_resources(lowered)
  except Exception as e:  # the compiler's refusal is a result here, not an error
    msg = str(e).strip().splitlines()[0][:160]
    return dict(ok=False, error=msg, seconds=round(time.perf_counter() - t0, 2))
  found = [k for k in kernels if k.name in names]
  rows = [dict(name=k.name, shared_memory=k.shared_memory_bytes, registers=k.registers,
               spill_bytes=k.spill_bytes, threads=k.threads[0]) for k in found]
  ok = {k.name for k in found} == set(names) and all(
    r["shared_memory"] <= limit and r["spill_bytes"] == 0 for r in rows)
  return dict(ok=ok, kernels=rows, seconds=round(time.perf_counter() - t0, 2))


def accumulator_registers(kernel: str, tile: Tile) -> int:
  """Registers per thread that the kernel's f32 accumulator alone takes: [block_q, H] (forward,
  decode, dQ) or [block_k, H] (dKV) spread over the program's threads."""
  rows = tile.block_k if kernel == "dkv" else tile.block_q
  return rows * H // (32 * tile.num_warps)


def attention_candidates(kernel: str, sweep_all: bool) -> list[Tile]:
  """Tiles in the pick rule's order (largest tile, larger query block, more stages, fewer warps).

  Without `sweep_all`, tiles whose accumulator alone takes over 64 of a thread's 255 registers
  are not compiled (at head dim 512 every such tile spilled in the full sweep: the matmul
  operands and the probabilities need the rest); nor are 3-stage pipelines of 64-key blocks.
  """
  tiles = [Tile(q, k, w, s) for q, k, w, s in
           itertools.product((16, 32, 64), (16, 32, 64), (4, 8), (1, 2, 3))]
  if not sweep_all:
    tiles = [t for t in tiles if accumulator_registers(kernel, t) <= 64
             and not (t.num_stages == 3 and t.block_k == 64)]
  return sorted(tiles, key=lambda t: (-t.block_q * t.block_k, -t.block_q, -t.num_stages,
                                      t.num_warps))


def indexer_candidates() -> list[idx_kernel.BlockSizes]:
  """block_c entries per step, in the same rule (largest, more stages, fewer warps)."""
  c = [idx_kernel.BlockSizes(block_c=b, num_warps=w, num_stages=s)
       for b, w, s in itertools.product((32, 64, 128, 256), (4, 8), (1, 2, 3))]
  return sorted(c, key=lambda b: (-b.block_c, -b.num_stages, b.num_warps))


def with_tile(kernel: str, tile: Tile) -> BlockSizes:
  parts = dict(fwd=SMALL, dq=SMALL, dkv=SMALL, decode=SMALL)
  parts[kernel] = tile
  return BlockSizes(**parts)


def tune_attention(kernel: str, target: str, sweep_all: bool, log) -> dict:
  """Tries candidates for one kernel on one target; returns the pick and every result."""
  kinds = ("csa", "hca") if kernel == "dkv" else KINDS  # window's dKV is HCA's band kernel
  tried, pick = [], None
  for tile in attention_candidates(kernel, sweep_all):
    results, ok = {}, True
    for preset in ("flash", "pro"):
      if not ok or (sweep_all and pick is not None and preset == "pro"):
        break
      for kind in kinds:
        fn, args = attention_program(kernel, kind, preset, with_tile(kernel, tile), target)
        names = KERNEL_NAMES[kernel][:1] if kernel == "dkv" and kind != "hca" else \
          KERNEL_NAMES[kernel]
        r = check(target, fn, args, names)
        results[f"{preset}/{kind}"] = r
        log(kernel, target, tile, preset, kind, r)
        if not r["ok"]:
          ok = False
          break
    tried.append(dict(tile=tile.__dict__, ok=ok, results=results))
    if ok and pick is None:
      pick = tile
      if not sweep_all:
        break
  return dict(pick=pick.__dict__ if pick else None, tried=tried)


def tune_indexer(target: str, sweep_all: bool, log) -> dict:
  tried, pick = [], None
  for bs in indexer_candidates():
    results, ok = {}, True
    for preset in ("flash", "pro"):
      r = check(target, *indexer_program(preset, bs, target), ("v4_indexer_scores",))
      results[preset] = r
      log("indexer", target, bs, preset, "csa", r)
      if not r["ok"]:
        ok = False
        break
    tried.append(dict(tile=dict(block_c=bs.block_c, num_warps=bs.num_warps,
                                num_stages=bs.num_stages), ok=ok, results=results))
    if ok and pick is None:
      pick = bs
      if not sweep_all:
        break
  return dict(pick=tried[[t["ok"] for t in tried].index(True)]["tile"] if pick else None,
              tried=tried)


def _fmt(tile) -> str:
  if isinstance(tile, Tile):
    return f"q{tile.block_q} k{tile.block_k} w{tile.num_warps} s{tile.num_stages}"
  return f"c{tile.block_c} w{tile.num_warps} s{tile.num_stages}"


def _log(kernel, target, tile, preset, kind, r):
  if r["ok"] or "kernels" in r:
    detail = "; ".join(f"{k['name'].replace('v4_sparse_attention_', '')}: "
                       f"{k['shared_memory'] // 1024} KB smem, {k['registers']} regs, "
                       f"{k['spill_bytes']} B spill" for k in r.get("kernels", []))
  else:
    detail = r["error"]
  print(f"{kernel:8s} {target:5s} {_fmt(tile):18s} {preset:5s} {kind:6s} "
        f"{'PASS' if r['ok'] else 'fail':4s} {r['seconds']:5.1f}s  {detail}", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", nargs="+", default=["h100", "h200"], choices=["h100", "h200"])
  parser.add_argument("--kernels", nargs="+", default=[*ATTN_KERNELS, "indexer"],
                      choices=[*ATTN_KERNELS, "indexer"])
  parser.add_argument("--all", action="store_true", help="compile every candidate (slow)")
  parser.add_argument("--out", default="benchmarks/results/tune_kernel_blocks.json")
  a = parser.parse_args(argv)
  for t in a.targets:
    why = targets.missing_backend(targets.target(t))
    if why:
      print(why, file=sys.stderr)
      return 2
  print(f"{'kernel':8s} {'tgt':5s} {'tile':18s} {'shape':5s} {'kind':6s} ok")
  results = {}
  for target in a.targets:
    results[target] = {}
    for kernel in a.kernels:
      if kernel == "indexer":
        results[target][kernel] = tune_indexer(target, a.all, _log)
      else:
        results[target][kernel] = tune_attention(kernel, target, a.all, _log)
  print("\nchosen (first filter only: compiles within shared memory, zero spills; not timed)")
  for target, per in results.items():
    for kernel, r in per.items():
      print(f"  {target:5s} {kernel:8s} {r['pick']}")
  out = Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  c = aot_compile
  meta = dict(jax=jax.__version__,
              shapes=dict(presets=PRESETS, H=H, W=c.WINDOW, I=c.INDEXER_HEADS, J=c.INDEXER_DIM,
                          T=T_TRAIN, decode_B=c.DECODE_ROWS, decode_C=c.DECODE_ENTRIES),
              limits={t: c.shared_memory_limit(t) for t in a.targets},
              rule="largest block_q*block_k, then larger block_q, more stages, fewer warps",
              timed=False)
  out.write_text(json.dumps(dict(meta=meta, results=results), indent=1, default=str))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
