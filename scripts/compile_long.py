"""Flash at a million tokens, compiled for 8 x H200 on this CPU (deepseek_v4/aot/long_context.py).

Rows (one sequence each, the sequence split over `context=8`, parameters ZeRO-sharded along it
with `long_context.zero_over_context("fsdp_ep")`; the rule tables alone replicate them along
the context axis, 582 GB per GPU):

* prefill of 1,048,576 tokens (the trunk and the last token's logits), compiled at `--layers`
  truncations of Flash (default 7, 9 and 43: the scanned [HCA, CSA] period twice and three
  times, laid out as in the 43-layer model, and the whole model), also extrapolated linearly
  through the first two to all 43 layers, as docs/plan.md does for its inference rows; the
  parameters in XLA-chosen layouts (`--param-layouts auto`, aot.long_context.prefill_program);
* one chunk of `--chunk` tokens (default 262,144: the 1M prompt in 4 chunks) of a chunked
  context-parallel prefill into the gathered cache of all `--seq` tokens (43 layers);
* LoRA training (rank 8, base frozen, AdamW on the adapters, `--train-remat full`: each block's
  input streams kept, the rest recomputed; the context-parallel attention also rematerializes
  per query block) of 131,072 tokens, compiled at `--train-layers` layers (default all 43), the
  train state in XLA-chosen layouts as well.

Each row prints XLA's per-device bytes beside plan's for the same (truncated) model, the verdict
against the H200's 141 GB, the per-layer exchanges counted in the compiled program beside
plan_context's arithmetic, and the compile time. Writes benchmarks/results/compile_long.json.

  python scripts/compile_long.py                      # about 10-20 min on 2 CPU cores
  python scripts/compile_long.py --layers 5 --no-train
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "compile_long.json")
H200 = 141e9


def _exchange(report) -> dict[str, dict[str, float]]:
  """Result bytes of the context-parallel attention's collectives per layer kind, per instruction
  (each CP layer issues one halo permute and one all-gather per gathered array)."""
  out = collections.defaultdict(lambda: collections.defaultdict(list))
  for c in report.collectives:
    for kind in ("sliding", "csa", "hca"):
      if f"attention_{kind}/shard_map/" in c.source:
        out[kind][c.op].append(c.result_bytes)
  return {k: {op: sorted(set(v)) for op, v in ops.items()} for k, ops in out.items()}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", default="7,9,43")
  p.add_argument("--train-layers", type=int, default=43)
  p.add_argument("--seq", type=int, default=1 << 20)
  p.add_argument("--train-seq", type=int, default=1 << 17)
  p.add_argument("--no-train", action="store_true")
  p.add_argument("--chunk", type=int, default=1 << 18,
                 help="tokens per chunk of the chunked-prefill row (0: no such row)")
  p.add_argument("--train-remat", default="full", choices=("none", "full"),
                 help="the training row's activation rematerialization per block")
  p.add_argument("--param-layouts", default="auto", choices=("default", "auto"),
                 help="parameter (and train state) layouts: row-major, or XLA's choice "
                 "(aot.long_context.prefill_program, parallel.train_step_program)")
  p.add_argument("--kernel-impl", default="auto", choices=("auto", "reference", "pallas"),
                 help="the attention kernels (Options.kernel_impl): auto runs the Pallas "
                 "sparse attention and indexer top-k on the H200, each checked by ptxas")
  p.add_argument("--out", default=DEFAULT_OUT)
  args = p.parse_args(argv)

  import deepseek_v4
  from deepseek_v4 import plan, plan_context, train
  from deepseek_v4.aot import long_context, memory
  from deepseek_v4.options import Options

  options = Options(kernel_impl=args.kernel_impl)

  flash = deepseek_v4.flash()
  rules = long_context.zero_over_context("fsdp_ep")
  mesh = dict(context=8)
  rows = []

  def record(name, cfg, report, extra=None):
    row = dict(name=name, **report.to_dict(), **(extra or {}), kernel_impl=args.kernel_impl)
    row.pop("collectives")
    row["exchange_hlo"] = _exchange(report)
    rows.append(row)
    print(f"{name}: {cfg.num_layers} layers, XLA {report.total_bytes / 1e9:.2f} GB per GPU "
          f"(arguments {report.argument_bytes / 1e9:.2f}, temporaries "
          f"{report.temp_bytes / 1e9:.2f}), plan {report.plan_bytes / 1e9:.2f} GB, XLA / plan "
          f"{report.plan_ratio:.2f}; lowered {report.lower_seconds:.0f} s, compiled "
          f"{report.compile_seconds:.0f} s", flush=True)
    print(f"  exchanges in the compiled program (bytes per instruction): {row['exchange_hlo']}")
    for k in report.kernels:
      print(f"  Pallas kernel {k.name}: {k.registers} registers, {k.spill_bytes} bytes spilled, "
            f"{k.shared_memory_bytes} bytes of shared memory")

  prefill = []
  for k in (int(x) for x in args.layers.split(",")):
    cfg = memory.truncated(flash, k)
    r = long_context.compile_long(cfg, "h200", mesh, rules, "prefill", args.seq,
                                  param_layouts=args.param_layouts, options=options)
    record("prefill", cfg, r, dict(param_layouts=args.param_layouts))
    prefill.append((k, r))
  if len(prefill) >= 2:
    (la, a), (lb, b) = prefill[0], prefill[1]
    line = lambda f: f(a) + (f(b) - f(a)) * (flash.num_layers - la) / (lb - la)
    full = line(lambda r: r.total_bytes)
    p43 = plan.make_plan(flash, mesh, rules, plan.Settings(batch=1, seq=args.seq,
                                                           prefill_chunk=args.seq))
    planned = sum(b for label, b, _ in p43.lines if not label.startswith("KV cache"))
    verdict = "fits" if full <= H200 else "does not fit"
    rows.append(dict(name="prefill, 43 layers (extrapolated)", total_bytes=full,
                     plan_bytes=planned, plan_ratio=full / planned, verdict=verdict))
    print(f"prefill, all 43 layers (linear through {la} and {lb}): XLA {full / 1e9:.1f} GB per "
          f"GPU, plan {planned / 1e9:.1f} GB, XLA / plan {full / planned:.2f}: {verdict} in "
          f"141 GB")
  if args.chunk:
    r = long_context.compile_long(flash, "h200", mesh, rules, "prefill_chunk", args.seq,
                                  chunk=args.chunk, param_layouts=args.param_layouts,
                                  options=options)
    verdict = "fits" if r.total_bytes <= H200 else "does not fit"
    record(f"prefill chunk of {args.chunk} into a {args.seq}-token cache", flash, r,
           dict(param_layouts=args.param_layouts, verdict=verdict, chunk=args.chunk))
    print(f"  chunked prefill ({args.seq // args.chunk} chunks of {args.chunk}): {verdict} in "
          "141 GB, the gathered cache included")
  ex = {e.kind: (e.neighbour, e.entries, e.index_keys)
        for e in plan_context.exchanges(flash, args.seq, 8)}
  print(f"  plan_context per layer (neighbour, entries, index keys): {ex}")
  if not args.no_train:
    cfg = memory.truncated(flash, args.train_layers)
    tcfg = train.TrainConfig(seq_len=args.train_seq, batch_size=1, lora_rank=8,
                             optimizer="adamw", remat=args.train_remat)
    r = long_context.compile_long(cfg, "h200", mesh, rules, "train", args.train_seq, tcfg=tcfg,
                                  param_layouts=args.param_layouts, options=options)
    verdict = "fits" if r.total_bytes <= H200 else "does not fit"
    record("LoRA training", cfg, r, dict(param_layouts=args.param_layouts, verdict=verdict,
                                         remat=args.train_remat))
    print(f"  LoRA training of {args.train_seq} tokens at {cfg.num_layers} layers: {verdict} in "
          "141 GB")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(rows=rows, plan_context=ex, mesh=mesh, rules=rules.name), f, indent=2,
              default=str)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  sys.exit(main())
