"""plan vs the compiler: XLA's per-device memory for every row of docs/plan.md, beside `plan`'s.

Each row is compiled for compile-only H200s on this CPU (`deepseek_v4.aot.memory.measure`: the
prefill step for inference rows, the training step for training rows, every argument placed by
the row's rule table). Compiling all 43 Flash layers is slow on a small host, so a row is compiled
at reduced depths (Flash's first layers, the same layer kinds and scanned period) and:

* inference rows: compiled at two depths (default 7 and 9 layers: two and three repeats of the
  scanned CSA/HCA period) and extrapolated linearly in the layer count to all 43 layers; plan's
  figure is its full-depth total;
* training rows: compiled at one depth (default 2 layers, each compile takes minutes here) and
  compared with plan's figure for that same truncated model.

The ratio is XLA / plan. Rows the project cannot run are listed, not compiled (bfloat16 Muon
momentum: train/optimizer.py builds float32 moments).

Prints a table and writes benchmarks/results/plan_vs_compiler.json (rows measured by earlier
invocations are kept, so rows can be run one per process: --rows NAME).

  JAX_PLATFORMS=cpu python scripts/bench_plan_vs_compiler.py [--rows a,b] [--depths 7,9]
      [--train-depth 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import platform
import sys
import time

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results",
                   "plan_vs_compiler.json")


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  what: str
  mesh: dict
  settings: dict
  compilable: str | None = None  # why not, when the project cannot run it


ROWS = (
  Row("infer-8x4096", "inference, 8 x H200, 8 rows x 4096 (the issue's forward)", dict(expert=8),
      dict(batch=8, seq=4096)),
  Row("infer-8x64k", "inference, 8 x H200, 8 rows x 64K context", dict(expert=8),
      dict(batch=8, seq=65536)),
  Row("infer-16x64k", "inference, 2 x 8 x H200, 16 rows x 64K", dict(data=2, expert=8),
      dict(batch=16, seq=65536)),
  Row("infer-8x1m", "inference, 8 x H200, 8 rows x 1M, chunk 4096, capacity 2", dict(expert=8),
      dict(batch=8, seq=1048576, prefill_chunk=4096, capacity_factor=2.0)),
  Row("train-8", "full fine-tuning, 8 x H200, 8 x 4096", dict(expert=8),
      dict(train=True, batch=8, seq=4096)),
  Row("train-8-frozen", "fine-tuning, routed experts frozen, 8 x H200, capacity 1.25",
      dict(expert=8), dict(train=True, batch=8, seq=4096, freeze=(r"ffn\.experts\.",),
                           capacity_factor=1.25)),
  Row("train-16", "full fine-tuning, 2 x 8 x H200, 16 x 4096", dict(expert=16),
      dict(train=True, batch=16, seq=4096)),
  Row("train-16-bf16", "full fine-tuning, 2 x 8 x H200, bf16 momentum, capacity 1.25",
      dict(expert=16), dict(train=True, batch=16, seq=4096, moment_dtype="bfloat16",
                            capacity_factor=1.25),
      compilable="train/optimizer.py builds float32 Muon momentum only"),
  Row("train-16-frozen", "fine-tuning, routed experts frozen, 2 x 8 x H200, capacity 1.25",
      dict(expert=16), dict(train=True, batch=16, seq=4096, freeze=(r"ffn\.experts\.",),
                            capacity_factor=1.25)),
)


def run_row(row: Row, depths: tuple[int, int], train_depth: int) -> dict:
  import deepseek_v4
  from deepseek_v4 import plan
  from deepseek_v4.aot import memory

  flash = deepseek_v4.flash()
  s = plan.Settings(**row.settings)
  full = plan.make_plan(flash, row.mesh, None, s, device_memory=141 * 10**9)
  out = dict(name=row.name, what=row.what, mesh=full.mesh, settings=dataclasses.asdict(s),
             plan_full_gb=full.total / 1e9, plan_fits=full.fits)
  if row.compilable:
    return {**out, "compiled": False, "why": row.compilable}
  if s.train:
    cfg = memory.truncated(flash, train_depth)
    m = memory.measure(cfg, row.mesh, s, "h200")
    return {**out, "compiled": True, "layers": train_depth, "xla": m.to_dict(),
            "plan_gb": m.plan / 1e9, "ratio": m.ratio}
  (a, b) = depths
  ma = memory.measure(memory.truncated(flash, a), row.mesh, s, "h200")
  mb = memory.measure(memory.truncated(flash, b), row.mesh, s, "h200")
  m = memory.extrapolate((a, ma), (b, mb), flash.num_layers, full.total)
  return {**out, "compiled": True, "layers": flash.num_layers, "extrapolated_from": [a, b],
          "xla": m.to_dict(), "xla_at_depths": [ma.to_dict(), mb.to_dict()],
          "plan_gb": full.total / 1e9, "ratio": m.ratio}


def replan(result: dict, train_depth_default: int) -> dict:
  """`result` with plan's figures recomputed by the current plan.py (XLA's numbers kept)."""
  import deepseek_v4
  from deepseek_v4 import plan
  from deepseek_v4.aot import memory

  row = {r.name: r for r in ROWS}[result["name"]]
  flash = deepseek_v4.flash()
  s = plan.Settings(**row.settings)
  full = plan.make_plan(flash, row.mesh, None, s, device_memory=141 * 10**9)
  out = {**result, "plan_full_gb": full.total / 1e9, "plan_fits": full.fits}
  if not result.get("compiled"):
    return out
  depth = result["layers"] if s.train else flash.num_layers
  at = plan.make_plan(memory.truncated(flash, depth), row.mesh, None, s).total
  out["plan_gb"] = at / 1e9
  out["xla"] = {**result["xla"], "plan": at, "ratio": result["xla"]["total"] / at}
  out["ratio"] = out["xla"]["ratio"]
  return out


def table(results: list[dict]) -> str:
  """Markdown: per row, plan and XLA at the compiled depth, and plan's full-depth verdict."""
  head = ("| row | mesh | layers | plan GB | XLA args | XLA temp | XLA out | XLA total | "
          "XLA / plan | plan, all 43 layers |")
  out = [head, "|" + "---|" * 10]
  for r in results:
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
    verdict = f"{r['plan_full_gb']:.1f} GB, {'fits' if r['plan_fits'] else 'does not fit'}"
    if not r.get("compiled"):
      out.append(f"| {r['what']} | {mesh} | - | - | not compiled: {r['why']} | | | | | "
                 f"{verdict} |")
      continue
    x = r["xla"]
    layers = (f"{r['layers']} (from {r['extrapolated_from'][0]}, {r['extrapolated_from'][1]})"
              if "extrapolated_from" in r else str(r["layers"]))
    out.append(f"| {r['what']} | {mesh} | {layers} | {r['plan_gb']:.1f} | "
               f"{x['arguments'] / 1e9:.1f} | {x['temporaries'] / 1e9:.1f} | "
               f"{(x['output'] - x['aliased']) / 1e9:.1f} | {x['total'] / 1e9:.1f} | "
               f"{r['ratio']:.2f} | {verdict} |")
  return "\n".join(out)


def _save(path: str, saved: dict) -> None:
  results = [saved[r.name] for r in ROWS if r.name in saved]
  with open(path, "w") as f:
    json.dump(dict(target="h200 (compile-only, 141 GB)", host=platform.node(),
                   python=sys.version.split()[0], rows=results), f, indent=2)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(r.name for r in ROWS),
                      help="comma-separated row names (default: all)")
  parser.add_argument("--depths", default="7,9", help="inference: two compiled depths")
  parser.add_argument("--train-depth", type=int, default=2)
  parser.add_argument("--out", default=OUT)
  parser.add_argument("--print-only", action="store_true", help="print the saved table")
  parser.add_argument("--replan", action="store_true", help="recompute plan's figures of the "
                      "saved rows with the current plan.py (no compiling), save and print")
  args = parser.parse_args(argv)
  names = {r.name: r for r in ROWS}
  wanted = [n for n in args.rows.split(",") if n]
  unknown = [n for n in wanted if n not in names]
  if unknown:
    parser.error(f"--rows: unknown {unknown}; expected some of {list(names)}")
  depths = tuple(int(d) for d in args.depths.split(","))
  if len(depths) != 2 or depths[0] == depths[1]:
    parser.error(f"--depths {args.depths!r}: two different layer counts expected, e.g. 7,9")
  saved = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      saved = {r["name"]: r for r in json.load(f)["rows"]}
  if args.replan:
    saved = {n: replan(r, args.train_depth) for n, r in saved.items()}
    _save(args.out, saved)
  elif not args.print_only:
    for n in wanted:
      t0 = time.perf_counter()
      saved[n] = run_row(names[n], depths, args.train_depth)
      saved[n]["wall_s"] = time.perf_counter() - t0
      print(f"{n}: {json.dumps(saved[n].get('ratio'))} in {saved[n]['wall_s']:.0f} s",
            flush=True)
      _save(args.out, saved)
  print(table([saved[r.name] for r in ROWS if r.name in saved]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
