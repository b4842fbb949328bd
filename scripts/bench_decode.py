"""Decode-step latency and prefill time of a small-width DeepSeek-V4 on CPU (float32), with the
KV cache of deepseek_v4.cache.

Decode: the V4 design makes a step nearly flat in the context (window W + the indexer's top-k +
ctx/128 HCA entries are attended; the indexer scores one query against ctx/4 small keys), so the
step at 32K should cost under 2x the step at 1K. Prefill: time at 2K, 8K, 32K and its growth
exponent (log-log slope). Cache bytes per token of context (measured from the cache's arrays, at
BF16 like the reference) are checked against `python -m deepseek_v4 summary`'s prediction.

  python scripts/bench_decode.py                        # contexts 1K, 8K, 32K; prefill 2K, 8K, 32K
  python scripts/bench_decode.py --contexts 1024,4096 --prefill 1024,4096 --steps 10

Writes benchmarks/results/bench_decode.json. Times are wall-clock medians; CPU seconds (user +
system of this process) are reported too, as they are less sensitive to other processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_decode.json")

# The small-width model of scripts/bench_forward.py: every layer kind (sliding, CSA, HCA at 128).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import MODEL, slope  # noqa: E402


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def cache_bytes_check(cfg, contexts: list[int]) -> dict:
  """Bytes per token of context of our cache (BF16 storage, from the arrays' shapes) vs the
  summary's prediction (docs/architecture.md#cache-bytes, all-BF16 column)."""
  import jax
  import jax.numpy as jnp

  from deepseek_v4 import cache as cache_lib
  from deepseek_v4 import summary

  def nbytes(n):
    shapes = jax.eval_shape(lambda: cache_lib.init_cache(cfg, 1, n, jnp.bfloat16))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  lcm = cache_lib.capacity_multiple(cfg)
  lo, hi = lcm * 8, lcm * 8 + lcm * 64
  measured = (nbytes(hi) - nbytes(lo)) / (hi - lo)
  predicted = summary.kv_cache(cfg, hi).per_token_bf16
  return {
    "measured_bytes_per_token": measured,
    "summary_bytes_per_token": predicted,
    "formula_bytes_per_token": cache_lib.bytes_per_token(cfg, jnp.bfloat16),
    "equal": math.isclose(measured, predicted, rel_tol=0, abs_tol=1e-9),
    "total_bytes_bf16": {str(n): nbytes(n) for n in contexts},
  }


def run(contexts: list[int], prefill: list[int], steps: int, warmup: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import deepseek_v4
  from deepseek_v4 import cache as cache_lib
  from deepseek_v4 import decoding

  cfg = deepseek_v4.tiny(**MODEL)
  model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  step = decoding.step_fn(model)
  lcm = cache_lib.capacity_multiple(cfg)
  rng = np.random.default_rng(0)
  pre_rows, dec_rows = [], []
  for L in sorted(set(contexts) | set(prefill)):
    print(f"context {L} ...", file=sys.stderr, flush=True)
    cap = -(-(L + warmup + steps) // lcm) * lcm
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, L)), jnp.int32)
    n_valid = jnp.array([L], jnp.int32)
    cache = cache_lib.init_cache(cfg, 1, cap)
    t0 = time.perf_counter()
    compiled = decoding._extend_jit.lower(graphdef, state, cache, ids, n_valid,
                                          last_only=True).compile()
    compile_s = time.perf_counter() - t0
    c0, t0 = _cpu_seconds(), time.perf_counter()
    logits, cache = compiled(state, cache, ids, n_valid)
    logits.block_until_ready()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if L in prefill:
      pre_rows.append({"T": L, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": L / wall,
                       "compile_s": compile_s,
                       "finite": bool(jnp.isfinite(logits).all()),
                       "load_average_1m": os.getloadavg()[0]})
    if L not in contexts:
      continue
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
    one = jnp.ones((1,), jnp.int32)
    t0 = time.perf_counter()
    for _ in range(warmup):  # the first call compiles the step for this capacity
      out, cache = step(cache, tok, one)
    out.block_until_ready()
    first_s = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(steps):
      c0, t0 = _cpu_seconds(), time.perf_counter()
      out, cache = step(cache, tok, one)
      out.block_until_ready()
      walls.append(time.perf_counter() - t0)
      cpus.append(_cpu_seconds() - c0)
    dec_rows.append({"context": L, "capacity": cap, "median_ms": 1e3 * statistics.median(walls),
                     "min_ms": 1e3 * min(walls), "median_cpu_ms": 1e3 * statistics.median(cpus),
                     "warmup_incl_compile_s": first_s, "steps": steps,
                     "finite": bool(jnp.isfinite(out).all()),
                     "load_average_1m": os.getloadavg()[0]})
  return {"model": cfg.to_dict(), "prefill": pre_rows, "decode": dec_rows,
          "cache": cache_bytes_check(cfg, contexts)}


def format_report(res: dict) -> str:
  lines = ["decode step (batch 1, float32):",
           f"{'context':>8} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} {'x 1st':>6}"]
  base = res["decode"][0]
  for r in res["decode"]:
    lines.append(f"{r['context']:>8} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} "
                 f"{r['median_cpu_ms']:>8.2f} {r['median_ms'] / base['median_ms']:>6.2f}")
  lines += ["", "prefill (batch 1, float32, one chunk):",
            f"{'T':>8} {'wall s':>8} {'cpu s':>8} {'tok/s':>8} {'compile s':>10}"]
  for r in res["prefill"]:
    lines.append(f"{r['T']:>8} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['tokens_per_s']:>8.0f}"
                 f" {r['compile_s']:>10.1f}")
  s = res["slopes"]
  lines.append(f"prefill growth exponent: wall {s['prefill_wall']:.2f}, cpu {s['prefill_cpu']:.2f}")
  c = res["cache"]
  lines += ["", f"cache bytes / token (BF16): measured {c['measured_bytes_per_token']:.2f}, "
            f"summary {c['summary_bytes_per_token']:.2f} -> "
            f"{'equal' if c['equal'] else 'DIFFERENT'}"]
  lines.append(f"decode flat: step at {res['decode'][-1]['context']} = "
               f"{res['flat_ratio']:.2f}x the step at {base['context']} "
               f"({'PASS' if res['flat_ratio'] < 2 else 'FAIL'}: < 2x)")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--contexts", default="1024,8192,32768", help="decode contexts")
  p.add_argument("--prefill", default="2048,8192,32768", help="prefill lengths")
  p.add_argument("--steps", type=int, default=30, help="timed decode steps per context")
  p.add_argument("--warmup", type=int, default=3, help="untimed decode steps (incl. compile)")
  p.add_argument("--out", default=DEFAULT_OUT)
  args = p.parse_args(argv)
  contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
  prefill = [int(x) for x in args.prefill.split(",") if x.strip()]
  res = run(contexts, prefill, args.steps, args.warmup)
  pre = res["prefill"]
  res["slopes"] = {"prefill_wall": slope([r["T"] for r in pre], [r["wall_s"] for r in pre]),
                   "prefill_cpu": slope([r["T"] for r in pre], [r["cpu_s"] for r in pre])}
  res["flat_ratio"] = res["decode"][-1]["median_ms"] / res["decode"][0]["median_ms"]
  res["host"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
  print(format_report(res))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=2)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0 if res["cache"]["equal"] and res["flat_ratio"] < 2 else 1


if __name__ == "__main__":
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  sys.exit(main())
