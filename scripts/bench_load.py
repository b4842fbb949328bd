"""Load speed and host memory of a quantized hub checkpoint at Flash's real widths.

Writes a checkpoint in the official format (FP8 128x128 linears, FP4 1x32 experts, E8M0 scales,
sharded + index) for DeepSeek-V4-Flash's widths (d_model 4096, 64 heads of 512, expert width 2048,
vocab 129,280) with only `--layers` layers and `--experts` experts, from random weights generated
tensor by tensor, then loads it in bfloat16 in a fresh process and reports seconds, GB/s read
(checkpoint bytes / seconds; the files are in the page cache, just written), the peak RSS above
the process baseline, the loaded model's bytes, and `plan`'s prediction of the parameter memory.

  python scripts/bench_load.py                     # 2 layers, 16 experts, fp4-experts
  python scripts/bench_load.py --quantize fp8 --keep /tmp/flash2

Writes benchmarks/results/bench_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_load.json")
sys.path.insert(0, REPO)


def _status(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(key)


def config(layers: int, experts: int):
  import deepseek_v4

  flash = deepseek_v4.flash()
  return flash.replace(compress_ratios=flash.compress_ratios[:layers], num_experts=experts,
                       num_hash_layers=min(flash.num_hash_layers, layers))


class _Random:
  """A random float tensor, generated when written (one tensor in memory at a time)."""

  def __init__(self, name: str, shape: tuple[int, ...], seed: int):
    self.name, self.shape, self.ndim, self.seed = name, shape, len(shape), seed

  def __array__(self, dtype=None, copy=None):
    import numpy as np

    rng = np.random.default_rng(self.seed)
    if self.name.endswith("norm.weight"):
      out = np.ones(self.shape, np.float32)
    else:
      out = rng.standard_normal(self.shape, dtype=np.float32)
      out *= 1.0 / np.sqrt(self.shape[-1])
    return out if dtype is None else out.astype(dtype)


def write(path: str, cfg, quantize: str, max_shard_bytes: int) -> None:
  import ml_dtypes
  import numpy as np
  from deepseek_v4 import abstract as abstract_lib
  from deepseek_v4.checkpoint import files
  from deepseek_v4.checkpoint.convert import expected_tensors
  from deepseek_v4.checkpoint.safetensors_io import Pending
  from deepseek_v4.config_hf import fields_to_hf

  abstract = abstract_lib.model(cfg)
  tensors = {}
  for i, (name, (shape, _)) in enumerate(sorted(expected_tensors(abstract).items())):
    if name.endswith("tid2eid"):
      ids = np.random.default_rng(i).integers(0, cfg.num_experts, shape, dtype=np.int64)
      tensors[name] = Pending(shape, np.dtype(np.int64), lambda ids=ids: ids)
    elif files._FP8_LINEARS.search(name) or files._EXPERTS.search(name):
      tensors[name] = _Random(name, shape, i)  # quantized when written
    else:  # as published: BF16 matrices and norms, F32 mHC / sinks / ape / router bias
      f32 = len(shape) < 2 and not name.endswith("norm.weight") or "hc_" in name or name.endswith(
        ("ape", "attn_sink"))
      dt = np.dtype(np.float32 if f32 else ml_dtypes.bfloat16)
      tensors[name] = Pending(shape, dt, lambda r=_Random(name, shape, i), dt=dt: np.asarray(r, dt))
  stored = files.stored_tensors(tensors, quantize)
  hf = {**fields_to_hf(cfg), "quantization_config": files.quantization_config(quantize)}
  from deepseek_v4.checkpoint.safetensors_io import replace_checkpoint, write_checkpoint_files

  def put(tmp):
    names = write_checkpoint_files(tmp, stored, max_shard_bytes=max_shard_bytes,
                                   metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    return names + ["config.json"]

  replace_checkpoint(path, put)


def load(path: str) -> dict:
  """Runs in a fresh process: one bfloat16 load, timed, with its peak RSS."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from deepseek_v4.checkpoint import load_hf_checkpoint

  jnp.ones(4).block_until_ready()
  base = _status("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from the current RSS
  t = time.perf_counter()
  model = load_hf_checkpoint(path, dtype=jnp.bfloat16)
  jax.block_until_ready(nnx.state(model))
  seconds = time.perf_counter() - t
  leaves = jax.tree.leaves(nnx.state(model))
  return {"seconds": seconds, "base_rss": base, "peak_rss": _status("VmHWM"),
          "final_rss": _status("VmRSS"), "model_bytes": sum(x.nbytes for x in leaves),
          "largest_leaf_bytes": max(x.nbytes for x in leaves)}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--quantize", default="fp4-experts", choices=["fp8", "fp4-experts"])
  p.add_argument("--shard-gb", type=float, default=1.0)
  p.add_argument("--keep", help="write the checkpoint here and keep it (default: a temp folder)")
  p.add_argument("--out", default=DEFAULT_OUT)
  p.add_argument("--_load", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._load:
    print(json.dumps(load(args._load)))
    return 0

  from deepseek_v4 import plan
  from deepseek_v4.checkpoint.safetensors_io import list_checkpoint

  cfg = config(args.layers, args.experts)
  path = args.keep or tempfile.mkdtemp(prefix="dsv4_bench_load_")
  try:
    t = time.perf_counter()
    write(path, cfg, args.quantize, int(args.shard_gb * 2**30))
    write_s = time.perf_counter() - t
    listing = list_checkpoint(path)
    disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    largest = max(i.nbytes for i in listing.values())
    out = subprocess.run([sys.executable, __file__, "--_load", path], capture_output=True,
                         text=True, cwd=REPO)
    if out.returncode:
      sys.stderr.write(out.stderr[-4000:])
      return 1
    r = json.loads(out.stdout.strip().splitlines()[-1])
  finally:
    if not args.keep:
      shutil.rmtree(path, ignore_errors=True)
  pl = plan.make_plan(cfg, {}, settings=plan.Settings(batch=1, seq=min(4096, cfg.max_position_embeddings)))
  planned_params = sum(b for label, b, _ in pl.lines if "param" in label.lower())
  result = {
    "what": f"Flash widths, {args.layers} layers, {args.experts} experts, {args.quantize}, "
            "loaded in bfloat16 on CPU (files in the page cache)",
    "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    "files": len([f for f in os.listdir(path)]) if args.keep else None,
    "checkpoint_bytes": disk, "largest_stored_tensor_bytes": largest,
    "write_seconds": round(write_s, 2),
    "load_seconds": round(r["seconds"], 2),
    "read_GB_per_s": round(disk / r["seconds"] / 1e9, 3),
    "model_bytes": r["model_bytes"], "largest_leaf_bytes": r["largest_leaf_bytes"],
    "plan_param_bytes": planned_params,
    "peak_rss_above_base": r["peak_rss"] - r["base_rss"],
    "peak_minus_final_rss": r["peak_rss"] - r["final_rss"],
    "plan_lines": [(label, b) for label, b, _ in pl.lines],
  }
  print(json.dumps(result, indent=2))
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
