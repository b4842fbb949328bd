"""The documented call `logits = model(ids)` vs an explicit `nnx.jit` forward (CPU, float32).

`model(ids)` outside a trace runs a cached compiled forward (`Transformer.__call__`); this script
checks that the call a notebook makes costs no more than the compiled form. Per length T:

- `model(ids)`: the first call (trace + compile + run) and the steady state;
- `nnx.jit(lambda m, x: m(x))(model, ids)`: the same two numbers;
- `model(ids, jit=False)`: op-by-op execution, the behaviour before the cached forward (and the
  opt-out), first call and steady state over `--eager-repeats` calls (0 skips it).

Steady-state times are medians of `--repeats` calls, `model(ids)` and `nnx.jit` interleaved so
that load from other processes on shared cores hits both alike. `ratio` = steady `model(ids)` /
steady `nnx.jit` (the target is <= 1.2); `eager_ratio` = steady op-by-op / steady `nnx.jit`.
The outputs of the three calls are compared (max |difference|) as a sanity check.

  python scripts/bench_eager.py                         # the issue's model, T = 128, 512, 2048
  python scripts/bench_eager.py --preset tiny --lengths 32,256 --eager-repeats 1

Writes benchmarks/results/bench_eager.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_eager.json")


def _config(preset: str, overrides: list[str]):
  import deepseek_v4
  from deepseek_v4 import config

  if preset == "issue":  # the small-width model of bench_forward.py: 64 heads, every layer kind
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_forward import MODEL

    cfg = deepseek_v4.tiny(**MODEL)
  else:
    cfg = config.PRESETS[preset]()
  return config.parse_overrides(cfg, overrides)


def _seconds(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def measure(model, T: int, batch: int, repeats: int, eager_repeats: int, seed: int) -> dict:
  """One row: first-call and steady-state seconds of each form at length T."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (batch, T)), jnp.int32)
  explicit = nnx.jit(lambda m, x: m(x))
  outs = {}

  def call(name, fn):
    def run():
      outs[name] = jax.block_until_ready(fn())
    return run

  documented = call("model(ids)", lambda: model(ids))
  compiled = call("nnx.jit", lambda: explicit(model, ids))
  eager = call("jit=False", lambda: model(ids, jit=False))
  row = {"T": T, "batch": batch, "first_s": {}, "steady_s": {}, "times_s": {}}
  row["first_s"]["model(ids)"] = _seconds(documented)
  row["first_s"]["nnx.jit"] = _seconds(compiled)
  times = {"model(ids)": [], "nnx.jit": []}
  for _ in range(repeats):  # interleaved
    times["model(ids)"].append(_seconds(documented))
    times["nnx.jit"].append(_seconds(compiled))
  if eager_repeats:
    row["first_s"]["jit=False"] = _seconds(eager)
    times["jit=False"] = [_seconds(eager) for _ in range(eager_repeats)]
  row["times_s"] = times
  row["steady_s"] = {k: statistics.median(v) for k, v in times.items()}
  ref = np.asarray(outs["nnx.jit"])
  row["max_abs_diff_vs_nnx_jit"] = {k: float(np.max(np.abs(np.asarray(v) - ref)))
                                    for k, v in outs.items() if k != "nnx.jit"}
  row["ratio"] = row["steady_s"]["model(ids)"] / row["steady_s"]["nnx.jit"]
  if eager_repeats:
    row["eager_ratio"] = row["steady_s"]["jit=False"] / row["steady_s"]["nnx.jit"]
  return row


def format_report(res: dict) -> str:
  lines = [f"model: {res['model']} ({res['params']:,} parameters), batch {res['batch']}, "
           f"{res['repeats']} interleaved repeats", "",
           f"{'T':>6} | {'model(ids) first':>16} {'steady':>9} | {'nnx.jit first':>13} "
           f"{'steady':>9} | {'ratio':>6} | {'jit=False first':>15} {'steady':>9} "
           f"{'x nnx.jit':>9}"]
  for r in res["rows"]:
    f, s = r["first_s"], r["steady_s"]
    eager = (f"{f['jit=False']:>14.2f}s {s['jit=False']:>8.3f}s {r['eager_ratio']:>8.1f}x"
             if "jit=False" in s else f"{'-':>15} {'-':>9} {'-':>9}")
    lines.append(f"{r['T']:>6} | {f['model(ids)']:>15.2f}s {s['model(ids)']:>8.4f}s | "
                 f"{f['nnx.jit']:>12.2f}s {s['nnx.jit']:>8.4f}s | {r['ratio']:>5.2f}x | {eager}")
  worst = max(r["ratio"] for r in res["rows"])
  lines += ["", f"worst steady ratio model(ids) / nnx.jit: {worst:.2f}x "
            f"({'PASS' if worst <= 1.2 else 'FAIL'}: <= 1.2x)"]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="issue", help="issue (bench_forward's model), tiny, ...")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
  p.add_argument("--lengths", default="128,512,2048")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=10, help="steady-state calls of each form")
  p.add_argument("--eager-repeats", type=int, default=2, help="op-by-op calls (0: skip)")
  p.add_argument("--out", default=DEFAULT_OUT)
  args = p.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
  if not lengths or min(lengths) < 1 or args.repeats < 1 or args.eager_repeats < 0:
    p.error(f"--lengths {args.lengths!r}, --repeats {args.repeats}, --eager-repeats "
            f"{args.eager_repeats}: need positive lengths, repeats >= 1, eager repeats >= 0")

  import jax
  from flax import nnx

  import deepseek_v4
  from deepseek_v4 import hugepages

  cfg = _config(args.preset, args.set)
  model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))
  rows = [measure(model, T, args.batch, args.repeats, args.eager_repeats, seed=i)
          for i, T in enumerate(lengths)]
  params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  res = {"model": args.preset, "overrides": args.set, "params": params,
         "batch": args.batch, "repeats": args.repeats, "eager_repeats": args.eager_repeats,
         "rows": rows, "worst_ratio": max(r["ratio"] for r in rows),
         "host": {"cpus": os.cpu_count(), "platform": platform.platform(),
                  "jax": jax.__version__, "hugepages": hugepages.status()}}
  print(format_report(res))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=2)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0 if res["worst_ratio"] <= 1.2 else 1


if __name__ == "__main__":
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  sys.exit(main())
