"""Long-sequence prefill of a small-width DeepSeek-V4 on 8 CPU devices: context-parallel (the
sequence split over `context=8`, layers/context_parallel.py) against one device.

Per length and mode: the prefill program (the whole sequence through the trunk, the logits of the
last token; deepseek_v4/aot/long_context.py) is compiled, XLA's per-device bytes are read from
its memory analysis (arguments + temporaries + outputs - aliased), and the median wall time of
`--repeats` runs (after one warm-up run up to `--warmup-max` tokens) is measured. A program runs
only when all its devices' bytes fit `--host-budget` of this host's memory; otherwise its row
keeps the compiled bytes and says why it was not run (the one-device program materializes the
indexer's scores of every query at once, which grows with T squared; the context-parallel slice
runs its queries in blocks of `--query-block`). For the context-parallel program the collectives of the optimized
HLO are counted (deepseek_v4/aot/collectives.py): per layer kind, the neighbour exchange
(collective-permute) and the all-gathers of compressed entries and indexer keys issued by the
context-parallel attention, beside plan's arithmetic for them (deepseek_v4/plan_context.py).
The two modes' last-token logits are compared (relative error).

The 8 devices are simulated on this host's cores (XLA_FLAGS), so the context-parallel time is the
same work rearranged over the same cores plus the exchanges, not a speed-up; its per-device
memory is what each of 8 real devices would hold.

  python scripts/bench_long.py                        # T = 32K, 64K, 128K, 256K (about an hour)
  python scripts/bench_long.py --lengths 32768 --repeats 1

Writes benchmarks/results/bench_long.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_long.json")
DEVICES = 8

# bench_forward.py's small-width model (every layer kind, MoE, mHC), positions up to 256K.
MODEL = dict(
  d_model=256, num_heads=64, head_dim=64, rope_dim=32, q_lora_rank=128, o_groups=8, o_lora_rank=64,
  compress_ratios=(0, 4, 128, 4), index_heads=8, index_head_dim=64, index_topk=512, num_experts=8,
  experts_per_token=2, moe_inter_dim=256, window=128, num_hash_layers=1,
  rope_original_max_position=65536, rope_factor=16.0, vocab_size=1024,
  max_position_embeddings=1 << 20, num_mtp_layers=0,
)


def _exchange_per_layer(found) -> dict[str, dict[str, int]]:
  """Per layer kind, the bytes one layer's context-parallel attention moves, from the compiled
  program's collectives (those issued inside `attention_<kind>/shard_map`): scanned layers
  appear once per loop body, unrolled ones once each, so each kind's sum is divided by the
  instructions' layer count."""
  per_kind = collections.defaultdict(lambda: dict(permute=0, gather=0))
  for c in found:
    for kind in ("sliding", "csa", "hca"):
      if f"attention_{kind}/shard_map" in c.source:
        key = "permute" if c.op == "collective-permute" else "gather"
        per_kind[kind][key] += c.result_bytes
  return dict(per_kind)


def _bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)


def _run(cfg, T: int, mode: str, state, graphdef, args) -> dict:
  import jax
  import numpy as np

  from deepseek_v4 import parallel, sharding
  from deepseek_v4.aot import collectives, long_context

  devices = jax.devices()[:DEVICES] if mode == "context" else jax.devices()[:1]
  mesh = sharding.make_mesh(context=len(devices), devices=devices)
  shardings = sharding.state_shardings(state, mesh, "fsdp")
  placed = jax.device_put(state, shardings)
  opts = parallel.options(mesh, "fsdp")
  if opts.context is not None:
    opts = opts.replace(context=dataclasses.replace(opts.context, query_block=args.query_block))
  fn = long_context.prefill_program(graphdef, shardings, mesh, "fsdp", (1, T), options=opts)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T), dtype=np.int32)
  with sharding.use(mesh, "fsdp"):
    t0 = time.perf_counter()
    compiled = fn.lower(placed, ids).compile()
    compile_s = time.perf_counter() - t0
    per_device = _bytes(compiled)
    row = dict(mode=mode, T=T, devices=len(devices), compile_s=compile_s, seconds=None,
               bytes_per_device=per_device, logits=None)
    need = per_device * len(devices)
    if need > args.host_budget:
      row["not_run"] = (f"{len(devices)} x {per_device / 1e9:.2f} GB exceeds --host-budget "
                        f"{args.host_budget / 1e9:.0f} GB of this host")
    else:
      times = []
      for _ in range(args.repeats + (T <= args.warmup_max)):
        t0 = time.perf_counter()
        logits = jax.block_until_ready(compiled(placed, ids))
        times.append(time.perf_counter() - t0)
      row.update(seconds=statistics.median(times[-args.repeats:]),
                 logits=np.asarray(logits, np.float64))
  if mode == "context":
    found = collectives.collectives(compiled.as_text())
    row["exchange_per_layer_hlo"] = _exchange_per_layer(found)
    row["collective_totals"] = collectives.totals(found)
  return row


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--lengths", default="32768,65536,131072,262144")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--warmup-max", type=int, default=32768,
                 help="one untimed warm-up run before the timed ones up to this length")
  p.add_argument("--query-block", type=int, default=2048,
                 help="queries per block of a context-parallel slice (ContextParallel)")
  p.add_argument("--host-budget", type=float, default=12e9,
                 help="run a program only when its devices' bytes together fit this (bytes)")
  p.add_argument("--out", default=DEFAULT_OUT)
  args = p.parse_args(argv)

  import jax
  import numpy as np
  from flax import nnx

  import deepseek_v4
  from deepseek_v4 import hugepages, plan_context

  cfg = deepseek_v4.tiny(**MODEL)
  graphdef, state = nnx.split(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)))
  rows = []
  print(f"{'T':>8} {'mode':>8} {'compile s':>10} {'run s':>8} {'GB/device':>10} {'rel err':>9}  "
        "exchange per layer (HLO vs plan, KiB): sliding / CSA / HCA")
  for T in (int(x) for x in args.lengths.split(",")):
    one = _run(cfg, T, "one", state, graphdef, args)
    cp = _run(cfg, T, "context", state, graphdef, args)
    ref, got = one.pop("logits"), cp.pop("logits")
    err = (None if ref is None or got is None
           else float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))
    planned = {e.kind.split()[0].lower(): e for e in plan_context.exchanges(cfg, T, DEVICES,
                                                                            "float32")}
    hlo = cp["exchange_per_layer_hlo"]
    layers = collections.Counter(k.name for k in cfg.layer_kinds)
    cells = []
    for kind in ("sliding", "csa", "hca"):
      got = hlo.get(kind, dict(permute=0, gather=0))
      want = planned[kind]
      cells.append(f"{(got['permute'] + got['gather']) / layers[kind] / 1024:.0f}"
                   f"/{(want.neighbour + want.gathered) / 1024:.0f}")
      cp.setdefault("exchange_per_layer_plan", {})[kind] = dict(
        neighbour=want.neighbour, gathered=want.gathered, layers=layers[kind])
    cp["rel_err_vs_one_device"] = err
    for r in (one, cp):
      run_s = "not run" if r["seconds"] is None else f"{r['seconds']:.2f}"
      e = "" if r is one else ("-" if err is None else f"{err:.1e}")
      print(f"{T:>8} {r['mode']:>8} {r['compile_s']:>10.1f} {run_s:>8} "
            f"{r['bytes_per_device'] / 1e9:>10.3f} {e:>9}  "
            + ("  ".join(cells) if r is cp else r.get("not_run", "")), flush=True)
      if r is cp and "not_run" in r:
        print(f"{'':>8} {'':>8} {r['not_run']}")
    rows += [one, cp]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:  # after every length: a long run keeps what it measured
      json.dump(dict(model=MODEL, devices=DEVICES, jax=jax.__version__, rows=rows,
                     query_block=args.query_block, host_budget=args.host_budget,
                     **hugepages.status()), f, indent=2)
    print(f"wrote {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
  sys.path.insert(0, REPO)
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  sys.exit(main())
