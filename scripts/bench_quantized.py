"""CPU speed and memory of routed experts kept in FP4 (`keep_quantized="experts"`) vs bfloat16.

Writes one official-format checkpoint (FP8 linears, FP4 experts; `bench_load.write`) at Flash's
widths with `--layers` layers and `--experts` experts, then, each in a fresh process, loads it in
bfloat16 with the experts dequantized (`keep_quantized=None`) or kept as stored, and times a
jitted forward of `--batch` x `--tokens` tokens: the load, the first call (compile + run), the
median of `--repeats` steady calls, the model's bytes and the peak RSS above the process
baseline (load + compile + run). Prints a table and writes benchmarks/results/bench_quantized.json.

  python scripts/bench_quantized.py                # 1 layer (+ MTP), 16 experts, 1 x 64 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_quantized.json")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_load  # noqa: E402  (the checkpoint writer and /proc readers)

MODES = {"bf16": None, "kept-fp4": "experts"}


def run_one(path: str, mode: str, batch: int, tokens: int, repeats: int) -> dict:
  """In a fresh process: load in `mode`, then time the forward; peak RSS covers all of it."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepseek_v4.checkpoint import load_hf_checkpoint

  jnp.ones(4).block_until_ready()
  base = bench_load._status("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from the current RSS
  t = time.perf_counter()
  model = load_hf_checkpoint(path, dtype=jnp.bfloat16, keep_quantized=MODES[mode])
  jax.block_until_ready(nnx.state(model))
  load_s = time.perf_counter() - t
  loaded_rss = bench_load._status("VmHWM")
  ids = jnp.asarray(np.random.default_rng(0).integers(2, model.cfg.vocab_size, (batch, tokens)),
                    jnp.int32)
  forward = nnx.jit(lambda m, x: m(x))
  t = time.perf_counter()
  logits = forward(model, ids).block_until_ready()
  first_s = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    forward(model, ids).block_until_ready()
    times.append(time.perf_counter() - t)
  leaves = jax.tree.leaves(nnx.state(model))
  return {"mode": mode, "load_s": load_s, "first_call_s": first_s,
          "forward_s": statistics.median(times),
          "model_bytes": sum(x.nbytes for x in leaves),
          "peak_rss_after_load": loaded_rss - base,
          "peak_rss": bench_load._status("VmHWM") - base,
          "logits_checksum": float(np.abs(np.asarray(logits, np.float32)).mean())}


def table(rows: list[dict]) -> str:
  head = (f"{'mode':<10}{'load s':>8}{'1st call s':>12}{'forward s':>11}{'model GB':>10}"
          f"{'peak RSS GB (load)':>20}{'peak RSS GB':>13}")
  out = [head, "-" * len(head)]
  for r in rows:
    out.append(f"{r['mode']:<10}{r['load_s']:>8.2f}{r['first_call_s']:>12.2f}"
               f"{r['forward_s']:>11.3f}{r['model_bytes'] / 1e9:>10.2f}"
               f"{r['peak_rss_after_load'] / 1e9:>20.2f}{r['peak_rss'] / 1e9:>13.2f}")
  return "\n".join(out)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=1)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=DEFAULT_OUT)
  p.add_argument("--_run", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._run:
    print(json.dumps(run_one(*args._run, args.batch, args.tokens, args.repeats)))
    return 0

  cfg = bench_load.config(args.layers, args.experts)
  path = tempfile.mkdtemp(prefix="dsv4_bench_quantized_")
  rows = []
  try:
    bench_load.write(path, cfg, "fp4-experts", 1 << 30)
    for mode in MODES:
      cmd = [sys.executable, __file__, "--_run", path, mode, "--batch", str(args.batch),
             "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
      if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        return 1
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  finally:
    shutil.rmtree(path, ignore_errors=True)
  print(table(rows))
  result = {
    "what": f"Flash widths, {args.layers} layer(s) + MTP, {args.experts} experts, official FP4/FP8 "
            f"checkpoint loaded in bfloat16; forward of {args.batch} x {args.tokens} tokens on CPU "
            "(gmm 'auto' = tiled); kept-fp4 decodes each tile's expert inside the loop",
    "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    "rows": rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  sys.exit(main())
