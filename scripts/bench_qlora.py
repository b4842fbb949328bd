"""CPU speed and memory of LoRA training over routed experts kept as FP4 codes (QLoRA,
`keep_quantized="experts"`) vs the same LoRA over the dequantized float base.

Writes one official-format checkpoint (FP8 linears, FP4 experts) of a small but not toy model
(`--d-model`, `--inter`, `--experts`, two blocks: one hash-routed, one score-routed), then, each
in a fresh process, builds the LoRA run as `train --init` does (`train.build`, the checkpoint
loaded into it, the optimizer over the adapters), and times `--steps` training steps of
`--batch` x `--seq` tokens: the first step (compile + run), the tokens/s of the others, the
model's bytes, and the peak RSS above the process baseline after the load and over the whole
run. Prints a table and writes benchmarks/results/bench_qlora.json.

  python scripts/bench_qlora.py          # d_model 512, 32 experts of width 512, rank 8
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
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_qlora.json")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_load import _status  # noqa: E402  (the /proc reader of the load benchmark)

MODES = {"lora-float": None, "qlora-fp4": "experts"}
TARGETS = ("wq_a", "wq_b", "wkv", "wo_b", "shared_experts.w1", "shared_experts.w2",
           "shared_experts.w3")


def config(args):
  import deepseek_v4

  return deepseek_v4.tiny(d_model=args.d_model, moe_inter_dim=args.inter,
                          num_experts=args.experts, experts_per_token=4, compress_ratios=(0, 4),
                          num_hash_layers=1, num_mtp_layers=0, vocab_size=4096)


def run_one(path: str, mode: str, args) -> dict:
  """In a fresh process: build the LoRA run in `mode`, load the checkpoint into it, train."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepseek_v4 import train, train_cli
  from deepseek_v4.options import Options

  jnp.ones(4).block_until_ready()
  base = _status("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM restarts from the current RSS
  cfg = config(args)
  tcfg = train.TrainConfig(lora_rank=args.rank, lora_targets=TARGETS, seq_len=args.seq,
                           batch_size=args.batch, steps=args.steps)
  options = Options(keep_quantized=MODES[mode])
  model, _ = train.build(cfg, tcfg, options=options)
  train_cli._init_from(path)(model)
  optimizer = train.make_optimizer(model, tcfg)
  jax.block_until_ready(nnx.state(model))
  loaded_rss = _status("VmHWM")
  rng = np.random.default_rng(0)
  times, losses = [], []
  for _ in range(args.steps):
    ids = jnp.asarray(rng.integers(2, cfg.vocab_size, (args.batch, args.seq + 1)), jnp.int32)
    batch = train.as_batch(ids[:, :-1], ids[:, 1:], jnp.ones((args.batch, args.seq), bool),
                           None, None)
    t = time.perf_counter()
    m = train.train_step(model, optimizer, batch, 0.0, tcfg=tcfg, apply=True)
    losses.append(float(jax.device_get(m["loss"])))
    times.append(time.perf_counter() - t)
  steady = times[1:]
  leaves = jax.tree.leaves(nnx.state(model))
  return {"mode": mode, "first_step_s": times[0],
          "tokens_per_s": args.batch * args.seq * len(steady) / sum(steady),
          "model_bytes": sum(x.nbytes for x in leaves),
          "peak_rss_after_load": loaded_rss - base, "peak_rss": _status("VmHWM") - base,
          "losses": losses}


def table(rows: list[dict]) -> str:
  head = (f"{'mode':<12}{'1st step s':>11}{'tokens/s':>10}{'model MB':>10}"
          f"{'peak RSS MB (load)':>20}{'peak RSS MB':>13}")
  out = [head, "-" * len(head)]
  for r in rows:
    out.append(f"{r['mode']:<12}{r['first_step_s']:>11.1f}{r['tokens_per_s']:>10.0f}"
               f"{r['model_bytes'] / 1e6:>10.1f}{r['peak_rss_after_load'] / 1e6:>20.1f}"
               f"{r['peak_rss'] / 1e6:>13.1f}")
  return "\n".join(out)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--inter", type=int, default=512)
  p.add_argument("--experts", type=int, default=32)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--out", default=DEFAULT_OUT)
  p.add_argument("--_run", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._run:
    print(json.dumps(run_one(*args._run, args)))
    return 0

  import deepseek_v4
  from flax import nnx

  from deepseek_v4.checkpoint import save_hf_checkpoint

  cfg = config(args)
  path = tempfile.mkdtemp(prefix="dsv4_bench_qlora_")
  rows = []
  try:
    save_hf_checkpoint(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), path,
                       quantize="fp4-experts")
    for mode in MODES:
      cmd = [sys.executable, __file__, "--_run", path, mode] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k not in ("_run", "out")]
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
      if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        return 1
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  finally:
    shutil.rmtree(path, ignore_errors=True)
  print(table(rows))
  result = {
    "what": f"LoRA rank {args.rank} on {', '.join(TARGETS)}; 2 blocks, d_model {args.d_model}, "
            f"{args.experts} experts of width {args.inter}, float32; {args.steps} training steps "
            f"of {args.batch} x {args.seq} tokens on CPU (gmm 'auto' = tiled); qlora-fp4 keeps "
            "the routed experts as FP4 codes and decodes them inside the expert loop, forward "
            "and backward",
    "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    "config": {k: v for k, v in vars(args).items() if k not in ("_run", "out")},
    "rows": rows,
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
