"""Forward-pass benchmark of a small-width DeepSeek-V4 at long sequence lengths (CPU, float32).

Each length runs in a fresh subprocess, so `ru_maxrss` (the peak resident memory of the process)
measures that length alone. Per length: compile time (lower + compile of the jitted forward),
steady-state time (median of `--repeats` runs, `block_until_ready`), peak RSS, RSS before compiling
(model + inputs + runtime), XLA's own memory analysis of the compiled program, and
`device.memory_stats()` when the backend reports it (CPU usually does not). The growth exponents are
least-squares slopes of log(value) vs log(T).

Speed against the machine: each child also times a plain jitted f32 matmul (`--matmul-size`^3,
fastest of at least 5 runs) in the same process, and each row reports the model's achieved GFLOP/s
(FLOPs from `deepseek_v4.summary`: the causal model count, not the work the implementation does)
and its percentage of that matmul's GFLOP/s, by wall time and by process CPU time (the CPU-time
ratio is steadier when other processes share the cores).

`--profile` traces one more forward per length (`jax.profiler`), takes each XLA op's self time
(nested events subtracted, summed over threads), maps the op to a model component through the
compiled HLO's source stack frames (and the `attention_<kind>` named scope for the layer kind),
and prints each component's share of the forward, that share of the median CPU time, its model
FLOPs and GFLOP per CPU second; the JSON row keeps the breakdown and the heaviest ops. Shares are
approximate: event times are wall durations (a descheduled thread still counts), and tracing adds
a little to every op, which weighs on loops of many small ops.

  python scripts/bench_forward.py                       # T = 2048, 4096, 8192, 16384
  python scripts/bench_forward.py --lengths 2048,4096 --repeats 2
  python scripts/bench_forward.py --lengths 8192 --profile

Writes benchmarks/results/bench_forward.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_forward.json")

# The small-width model: every layer kind (sliding, CSA, HCA at 128), MoE, mHC.
MODEL = dict(
  d_model=256, num_heads=64, head_dim=64, rope_dim=32, q_lora_rank=128, o_groups=8, o_lora_rank=64,
  compress_ratios=(0, 4, 128, 4), index_heads=8, index_head_dim=64, index_topk=512, num_experts=8,
  experts_per_token=2, moe_inter_dim=256, window=128, num_hash_layers=1,
  rope_original_max_position=65536, rope_factor=16.0, vocab_size=1024,
  max_position_embeddings=65536, num_mtp_layers=0,
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


def _timed(fn, repeats: int) -> tuple[list[float], list[float]]:
  """Wall and process-CPU seconds of `repeats` calls of fn (which must block until done)."""
  times, cpu_times = [], []
  for _ in range(repeats):
    c0, t0 = _cpu_seconds(), time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    cpu_times.append(_cpu_seconds() - c0)
  return times, cpu_times


def matmul_peak(n: int, repeats: int) -> dict:
  """GFLOP/s of a plain jitted f32 [n, n] @ [n, n] in this process: the fastest of at least 5 runs
  (a peak: the median moved by 15% between runs on shared cores), by wall and by CPU time."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul).lower(a, b).compile()
  mm(a, b).block_until_ready()
  times, cpu_times = _timed(lambda: mm(a, b).block_until_ready(), max(repeats, 5))
  flops = 2.0 * n**3
  return {"n": n, "flops": flops, "best_s": min(times), "best_cpu_s": min(cpu_times),
          "times_s": times, "cpu_times_s": cpu_times, "gflops": flops / min(times) / 1e9,
          "gflops_per_cpu_s": flops / min(cpu_times) / 1e9}


# ----- profile: XLA op self times -> model components ---------------------------------------------
def _hlo_tables(hlo: str) -> tuple[dict, dict]:
  """(instruction name -> (op_name, stack frame id, operand names, called computation),
  computation name -> its instruction names) from optimized HLO text."""
  instrs, comps, comp = {}, defaultdict(list), None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY )?%([\w.\-]+) ", line)
    if head and not line.startswith(" "):
      comp = head.group(1)
      continue
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if not m:
      continue
    name = m.group(1)
    op = re.search(r'op_name="([^"]*)"', line)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    args = line[m.end():].split("), ", 1)[0]
    instrs[name] = (op.group(1) if op else "", int(frame.group(1)) if frame else 0,
                    re.findall(r"%([\w.\-]+)", args), calls.group(1) if calls else None)
    comps[comp].append(name)
  return instrs, comps


def _stack_frames(hlo: str) -> dict[int, list[tuple[str, str]]]:
  """Stack frame id -> [(file, function)], innermost first, from the HLO text's tables (the
  printed parent id is the parent's id + 1, 1 meaning none)."""

  def table(name: str) -> str:
    m = re.search(r"^" + name + r"\n((?:\d+ .*\n)*)", hlo, re.M)
    return m.group(1) if m else ""

  files = dict(re.findall(r'^(\d+) "(.*)"$', table("FileNames"), re.M))
  funcs = dict(re.findall(r'^(\d+) "(.*)"$', table("FunctionNames"), re.M))
  locs = {k: (files.get(f, ""), funcs.get(fn, "")) for k, f, fn in re.findall(
    r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", table("FileLocations"), re.M)}
  raw = {int(k): (loc, int(parent) - 1) for k, loc, parent in re.findall(
    r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", table("StackFrames"), re.M)}
  out = {}
  for fid in raw:
    chain, f = [], fid
    while f in raw and len(chain) < 64:
      loc, f = raw[f]
      chain.append(locs.get(loc, ("", "")))
      if chain[-1][1] in ("Transformer.__call__", "forward"):
        break  # the model's entry: frames beyond it are the caller's
    out[fid] = chain
  return out


def component_of(frames: list[tuple[str, str]], op_name: str) -> str:
  """The `deepseek_v4.summary` FLOP component (or norms / embedding / other) an op belongs to,
  from its source stack (innermost first) and op_name (for the attention layer kind)."""
  kind = re.search(r"attention_(sliding|csa|hca)", op_name)
  kind = kind.group(1) if kind else "unknown"
  files = " ".join(f for f, _ in frames)
  funcs = {fn for _, fn in frames}
  rules = [("sparse_attention/", f"attn_core_{kind}"), ("indexer_topk/", "indexer_scores"),
           ("layers/indexer.py", "indexers"), ("layers/compressor.py", "compressors"),
           ("layers/mhc.py", "mhc"), ("layers/attention.py", f"attn_{kind}")]
  for path, comp in rules:
    if path in files:
      return comp
  if "SharedExpert.__call__" in funcs:
    return "shared_experts"
  if "moe_gmm/" in files or "moe_ffn.py" in files or "routed_experts" in funcs:
    return "routed_experts"
  if "layers/moe.py" in files:
    return "router_gates"
  if "layers/norms.py" in files:
    return "norms"
  if "Transformer.logits" in funcs:
    return "lm_head"
  if "Transformer.embed_tokens" in funcs:
    return "embedding"
  return "other"


def _op_source(name: str, instrs: dict, comps: dict, depth: int = 0) -> tuple[str, int]:
  """(op_name, stack frame) of an instruction; a fusion without its own metadata (XLA's
  YNNPACK fusions drop it) takes its fused computation's, else its operands'."""
  op, frame, operands, calls = instrs.get(name, ("", 0, [], None))
  if frame or depth > 3:
    return op, frame
  for inner in comps.get(calls, []) if calls else []:
    if instrs[inner][1]:
      return instrs[inner][0], instrs[inner][1]
  for o in operands:
    got = _op_source(o, instrs, comps, depth + 1)
    if got[1]:
      return got
  return op, frame


def _self_times(xplane: str) -> dict[str, float]:
  """Event name -> self time in seconds on the threads that run XLA:CPU ops (its worker pool and
  the client thread, which runs some ops inline), children subtracted; the client's wait for the
  whole program is left out."""
  import jax

  out = defaultdict(float)
  for plane in jax.profiler.ProfileData.from_file(xplane).planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name and "XLAPjRtCpuClient" not in line.name:
        continue
      events = sorted(((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                       if "wait for completion" not in e.name), key=lambda e: (e[0], -e[1]))
      stack = []  # [end, name, start, time of children]

      def pop():
        end, name, start, child = stack.pop()
        out[name] += (end - start - child) / 1e9
        if stack:
          stack[-1][3] += end - start

      for start, end, name in events:
        while stack and stack[-1][0] <= start:
          pop()
        stack.append([end, name, start, 0])
      while stack:
        pop()
  return out


def profile_forward(compiled, args: tuple, top: int = 25) -> dict:
  """One traced run of `compiled(*args)`: seconds of thread time per component and the heaviest
  ops (name, component, op_name, seconds)."""
  import glob

  import jax

  hlo = compiled.as_text()
  instrs, comps = _hlo_tables(hlo)
  frames = _stack_frames(hlo)
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    jax.profiler.start_trace(d)
    jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    traced_s = time.perf_counter() - t0
    times = _self_times(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[-1])
  per_comp, ops = defaultdict(float), []
  for name, sec in times.items():
    if name in instrs:
      op, frame = _op_source(name, instrs, comps)
      comp = component_of(frames.get(frame, []), op)
    else:
      op, comp = "", "runtime"  # the thunk executor and thread pool themselves
    per_comp[comp] += sec
    ops.append({"op": name, "component": comp, "op_name": op[-120:], "thread_s": sec})
  ops.sort(key=lambda o: -o["thread_s"])
  return {"traced_wall_s": traced_s, "thread_s": dict(per_comp), "top_ops": ops[:top]}


def run_one(T: int, batch: int, repeats: int, warmup: int, overrides: list[str],
            matmul_size: int = 2048, profile: bool = False) -> dict:
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
  peak = matmul_peak(matmul_size, repeats)
  last = {}

  def run():
    last["out"] = compiled(state, ids).block_until_ready()

  times, cpu_times = _timed(run, repeats)
  out = last["out"]
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
    "load_average_1m_at_end": os.getloadavg()[0], "matmul_peak": peak,
    "profile": profile_forward(compiled, (state, ids)) if profile else None,
  }


def _analytic_flops(cfg, lengths: list[int], batch: int) -> dict[int, dict[str, float]]:
  """Model FLOPs of the forward pass per `deepseek_v4.summary` component (weight matmuls and
  attention cores; causal, top-k and window counted exactly; the implementation also computes
  masked-out work, see the summary docs)."""
  from deepseek_v4 import summary

  counts = summary.count_params(cfg)
  out = {}
  for T in lengths:
    f = summary.flops_per_token(cfg, T, counts)
    out[T] = {k: batch * T * v for k, v in {**f.matmul, **f.attention_prefill_mean}.items()}
  return out


def add_rates(r: dict, flops: dict[str, float]) -> None:
  """Adds the model FLOPs, achieved GFLOP/s and percentage of the matmul peak to a row (and
  FLOPs, milliseconds and GFLOP/s per component to its profile)."""
  r["analytic_flops"] = sum(flops.values())
  r["gflops"] = r["analytic_flops"] / r["median_s"] / 1e9
  r["gflops_per_cpu_s"] = r["analytic_flops"] / r["median_cpu_s"] / 1e9
  peak = r["matmul_peak"]
  r["pct_of_matmul_peak"] = 100 * r["gflops"] / peak["gflops"]
  r["pct_of_matmul_peak_cpu"] = 100 * r["gflops_per_cpu_s"] / peak["gflops_per_cpu_s"]
  prof = r.get("profile")
  if not prof:
    return
  total = sum(prof["thread_s"].values())
  comps = {}
  for name in sorted(set(prof["thread_s"]) | {k for k, v in flops.items() if v},
                     key=lambda k: -prof["thread_s"].get(k, 0.0)):
    share = prof["thread_s"].get(name, 0.0) / total
    cpu_ms = 1e3 * share * r["median_cpu_s"]  # this component's part of the forward's CPU time
    f = flops.get(name, 0.0)
    comps[name] = {"share": share, "cpu_ms": cpu_ms, "flops": f,
                   "gflops_per_cpu_s": f / cpu_ms / 1e6 if cpu_ms > 0 and f else None}
  prof["components"] = comps


def format_profile(r: dict) -> str:
  """The per-component breakdown of one profiled row."""
  comps = r["profile"]["components"]
  head = ["component", "CPU ms", "% of forward", "model GFLOP", "GFLOP/CPU-s", "% of matmul peak"]
  peak = r["matmul_peak"]["gflops_per_cpu_s"]

  def rate(g):
    return ("-", "-") if g is None else (f"{g:.1f}", f"{100 * g / peak:.0f}")

  body = [[k, f"{c['cpu_ms']:,.0f}", f"{100 * c['share']:.1f}", f"{c['flops'] / 1e9:,.1f}",
           *rate(c["gflops_per_cpu_s"])] for k, c in comps.items()]
  body.append(["total", f"{1e3 * r['median_cpu_s']:,.0f}", "100.0",
               f"{r['analytic_flops'] / 1e9:,.1f}", *rate(r["gflops_per_cpu_s"])])
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  lines = [f"T={r['T']}: CPU time per component (self time of its XLA ops, "
           "as a share of the forward's median process CPU time); peak = the f32 matmul's GFLOP "
           f"per CPU second ({peak:.1f})"]
  lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(x, widths)))
            for x in [head, *body]]
  lines.insert(2, "-" * len(lines[1]))
  return "\n".join(lines)


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
         "--repeats", str(args.repeats), "--warmup", str(args.warmup),
         "--matmul-size", str(args.matmul_size)] + (["--profile"] if args.profile else [])
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
          "GFLOP/s", "% peak", "% peak cpu", "peak RSS MiB", "RSS pre-compile MiB", "XLA temp MiB",
          "load avg"]
  body = []
  for r in rows:
    if "error" in r:
      body.append([str(r["T"]), r["error"]] + [""] * (len(head) - 2))
      continue
    temp = (r["xla_memory_analysis"] or {}).get("temp_size_in_bytes")
    gflop = "-" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e9:,.0f}"
    body.append([str(r["T"]), f"{r['compile_s']:.1f}", f"{r['median_s']:.2f}",
                 f"{r['median_cpu_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                 f"{r['analytic_flops'] / 1e9:,.0f}", gflop, f"{r['gflops']:.1f}",
                 f"{r['pct_of_matmul_peak']:.1f}", f"{r['pct_of_matmul_peak_cpu']:.1f}",
                 _fmt_mib(r["peak_rss_bytes"]), _fmt_mib(r["rss_before_compile_bytes"]),
                 _fmt_mib(temp), f"{r['load_average_1m_at_end']:.1f}"])
  widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in [head, *body]]
  lines.insert(1, "-" * len(lines[0]))
  for r in rows:
    if "matmul_peak" in r:
      m = r["matmul_peak"]
      lines.append(f"T={r['T']}: f32 matmul {m['n']}^3 in the same process: {m['gflops']:.1f} "
                   f"GFLOP/s ({m['gflops_per_cpu_s']:.1f} per CPU second)")
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
  p.add_argument("--matmul-size", type=int, default=2048,
                 help="n of the f32 n x n x n matmul that measures the machine's peak")
  p.add_argument("--profile", action="store_true",
                 help="trace one more forward per length and break its time down by component")
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
    print(json.dumps(run_one(args.child, args.batch, args.repeats, args.warmup, args.overrides,
                             args.matmul_size, args.profile)))
    return 0
  rows = []
  for T in lengths:
    print(f"T={T} ...", file=sys.stderr, flush=True)
    rows.append(_child(T, args))
  analytic = _analytic_flops(cfg, lengths, args.batch)
  ok = [r for r in rows if "error" not in r]
  for r in ok:
    add_rates(r, analytic[r["T"]])
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
  for r in ok:
    if r.get("profile"):
      print("\n" + format_profile(r))
  from deepseek_v4 import hugepages

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"model": cfg.to_dict(), "rows": rows, "slopes": slopes,
               "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        **hugepages.status()}}, f, indent=2)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  sys.exit(main())
