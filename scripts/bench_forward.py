"""Forward-pass benchmark of a small-width DeepSeek-V4 at long sequence lengths (CPU, float32).

Each length runs in a fresh subprocess, so `ru_maxrss` (the peak resident memory of the process)
measures that length alone. Per length: compile time (lower + compile of the jitted forward),
steady-state time (median of `--repeats` runs, `block_until_ready`), peak RSS, RSS before compiling
(model + inputs + runtime), XLA's own memory analysis of the compiled program, and
`device.memory_stats()` when the backend reports it (CPU usually does not). The growth exponents are
least-squares slopes of log(value) vs log(T).

  python scripts/bench_forward.py                       # T = 2048, 4096, 8192, 16384
  python scripts/bench_forward.py --lengths 2048,4096 --repeats 2

Writes benchmarks/results/bench_forward.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_forward.json")

# The small-width model: every layer kind (sliding, CSA, HCA at 128), MoE, mHC.
MODEL = dict(
  d_model=256, num_heads=64, head_dim=64, rope_dim=32, q_lora_rank=128, o_groups=8, o_lora_rank=64,
  compress_ratios=(0, 4, 128, 4), index_heads=8, index_head_dim=64, index_topk=512, num_experts=8,
  experts_per_token=2, moe_inter_dim=256, window=128, num_hash_layers=1,
  rope_original_max_position=65536, rope_factor=16.0, vocab_size=1024,
  max_position_embeddings=65536, attn_block=128, num_mtp_layers=0,
)


def _config(overrides: list[str]):
  import deepseek_v4
  from deepseek_v4 import config

  return config.parse_overrides(deepseek_v4.tiny(**MODEL), overrides)


def _rss_bytes() -> int:
  """Peak RSS of this process so far (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if platform.system() == "Darwin" else peak * 1024


def _cpu_seconds() -> float:
  """User + system CPU time of this process (all threads): less sensitive than wall time to
  other processes competing for the cores."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run_one(T: int, batch: int, repeats: int, warmup: int, overrides: list[str]) -> dict:
  """Benchmarks one length in this process; returns the measurements."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from deepseek_v4.model import Transformer

  cfg = _config(overrides)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ids = jax.random.randint(jax.random.key(1), (batch, T), 0, cfg.vocab_size, jnp.int32)

  @jax.jit
  def forward(state, ids):
    return nnx.merge(graphdef, state)(ids)

  rss_before = _rss_bytes()
  t0 = time.perf_counter()
  compiled = forward.lower(state, ids).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):  # first-run allocations and thread-pool start-up
    compiled(state, ids).block_until_ready()
  times, cpu_times = [], []
  for _ in range(repeats):
    c0, t0 = _cpu_seconds(), time.perf_counter()
    out = compiled(state, ids)
    out.block_until_ready()
    times.append(time.perf_counter() - t0)
    cpu_times.append(_cpu_seconds() - c0)
  finite = bool(jnp.all(jnp.isfinite(out)))
  mem = compiled.memory_analysis()
  xla = None if mem is None else {
    k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                      "temp_size_in_bytes", "generated_code_size_in_bytes")
    if hasattr(mem, k)
  }
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  device = jax.devices()[0]
  try:
    device_stats = device.memory_stats()
  except Exception as e:  # some backends raise instead of returning None
    device_stats = f"unavailable: {e}"
  return {
    "T": T, "batch": batch, "params": int(n_params), "compile_s": compile_s,
    "median_s": statistics.median(times), "times_s": times,
    "median_cpu_s": statistics.median(cpu_times), "cpu_times_s": cpu_times,
    "tokens_per_s": batch * T / statistics.median(times), "peak_rss_bytes": _rss_bytes(),
    "rss_before_compile_bytes": rss_before, "xla_memory_analysis": xla,
    "device_memory_stats": device_stats, "device": str(device), "finite": finite,
    "xla_flops": float(cost["flops"]) if cost and "flops" in cost else None,
    "load_average_1m_at_end": os.getloadavg()[0],
  }


def _analytic_flops(cfg, lengths: list[int], batch: int) -> dict[int, float]:
  """Model FLOPs of the forward pass from deepseek_v4.summary (causal, top-k and window
  counted exactly; the implementation also computes masked-out work, see the summary docs)."""
  from deepseek_v4 import summary

  counts = summary.count_params(cfg)
  return {T: batch * T * summary.flops_per_token(cfg, T, counts).total_prefill_mean
          for T in lengths}


def slope(xs: list[float], ys: list[float]) -> float | None:
  """Least-squares slope of log(y) vs log(x) (the growth exponent); None with < 2 points."""
  pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
  if len(pts) < 2:
    return None
  mx = sum(p[0] for p in pts) / len(pts)
  my = sum(p[1] for p in pts) / len(pts)
  return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def _child(T: int, args: argparse.Namespace) -> dict:
  """Runs one length in a fresh interpreter; a crash (e.g. out of memory) becomes an error row."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", str(T), "--batch", str(args.batch),
         "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
  cmd += [f"--set={s}" for s in args.overrides]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode or not lines:
    return {"T": T, "error": f"exit status {proc.returncode}", "stderr_tail": proc.stderr[-2000:]}
  return json.loads(lines[-1])


def _fmt_mib(b) -> str:
  return "-" if b is None else f"{b / 2**20:,.0f}"


def format_table(rows: list[dict], slopes: dict) -> str:
  head = ["T", "compile s", "median s", "cpu s", "tok/s", "model GFLOP", "XLA GFLOP",
          "peak RSS MiB", "RSS pre-compile MiB", "XLA temp MiB", "load avg"]
  body = []
  for r in rows:
    if "error" in r:
      body.append([str(r["T"]), r["error"]] + [""] * (len(head) - 2))
      continue
    temp = (r["xla_memory_analysis"] or {}).get("temp_size_in_bytes")
    gflop = "-" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e9:,.0f}"
    body.append([str(r["T"]), f"{r['compile_s']:.1f}", f"{r['median_s']:.2f}",
                 f"{r['median_cpu_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                 f"{r['analytic_flops'] / 1e9:,.0f}", gflop,
                 _fmt_mib(r["peak_rss_bytes"]), _fmt_mib(r["rss_before_compile_bytes"]),
                 _fmt_mib(temp), f"{r['load_average_1m_at_end']:.1f}"])
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head, *body]]
  lines.insert(1, "-" * len(lines[0]))
  lines.append("growth exponents (log-log slope vs T): " + ", ".join(
    f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in slopes.items()))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="2048,4096,8192,16384",
                 help="comma-separated sequence lengths (default 2048,4096,8192,16384)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3, help="timed runs per length (median)")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a field of the benchmark model (repeatable)")
  p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
  p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  try:
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    cfg = _config(args.overrides)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.child is not None:
    print(json.dumps(run_one(args.child, args.batch, args.repeats, args.warmup, args.overrides)))
    return 0
  rows = []
  for T in lengths:
    print(f"T={T} ...", file=sys.stderr, flush=True)
    rows.append(_child(T, args))
  analytic = _analytic_flops(cfg, lengths, args.batch)
  for r in rows:
    r["analytic_flops"] = analytic[r["T"]]
  ok = [r for r in rows if "error" not in r]
  Ts = [r["T"] for r in ok]
  slopes = {
    "time": slope(Ts, [r["median_s"] for r in ok]),
    "cpu_time": slope(Ts, [r["median_cpu_s"] for r in ok]),
    "model_flops": slope(Ts, [r["analytic_flops"] for r in ok]),
    "xla_flops": slope(Ts, [r["xla_flops"] for r in ok]),
    "peak_rss": slope(Ts, [r["peak_rss_bytes"] for r in ok]),
    "peak_rss_minus_pre_compile": slope(
      Ts, [r["peak_rss_bytes"] - r["rss_before_compile_bytes"] for r in ok]),
    "xla_temp": slope(Ts, [(r["xla_memory_analysis"] or {}).get("temp_size_in_bytes")
                           for r in ok]),
  }
  print(format_table(rows, slopes))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"model": cfg.to_dict(), "rows": rows, "slopes": slopes,
               "host": {"cpus": os.cpu_count(), "platform": platform.platform()}}, f, indent=2)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  sys.exit(main())
