"""Compile time and peak compile memory of the forward and the training step vs depth (CPU).

A narrow model with Flash's layer schedule (2 sliding + hash, CSA + hash, then (HCA, CSA) x 20,
MTP): at `--layers 5,43` it is compiled once per (depth, program) in a fresh subprocess, so the
process's peak RSS belongs to that compilation alone. Times are `jit(...).lower(...).compile()`
(tracing included). With scanned layers the 43-layer model should compile in about the time of
the 5-layer one; unrolled, compile time grows with depth.

  python scripts/bench_compile.py                        # layers 5 and 43, forward + train step
  python scripts/bench_compile.py --set scan_layers=false  # the unrolled stack, for comparison
  python scripts/bench_compile.py --tag before --out /tmp/c.json  # any checkout of the repo

Writes benchmarks/results/bench_compile.json (one entry per tag, merged into the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "bench_compile.json")

# Flash's schedule at a narrow width (every layer kind, hash and learned routing, MTP).
NARROW = dict(
  d_model=64, num_heads=4, head_dim=64, rope_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16,
  window=16, index_heads=2, index_head_dim=32, index_topk=8, num_experts=8, experts_per_token=2,
  moe_inter_dim=32, vocab_size=512, max_position_embeddings=4096, rope_original_max_position=512,
)
RUN = dict(attn_block=64)  # deepseek_v4.Options fields


def _config(layers: int, overrides: list[str]):
  """(ModelConfig, Options): each field=value goes to whichever of the two has the field."""
  import deepseek_v4

  flash, base = deepseek_v4.flash(), deepseek_v4.Options()
  kw, run = dict(NARROW, compress_ratios=flash.compress_ratios[:layers]), dict(RUN)
  for item in overrides:  # plain field=value
    key, _, value = item.partition("=")
    target, old = (run, getattr(base, key)) if hasattr(base, key) else (kw, getattr(flash, key))
    target[key] = ((value.lower() in ("1", "true", "yes")) if isinstance(old, bool)
                   else type(old)(value))
  return deepseek_v4.flash(**kw), base.replace(**run)


def _peak_rss() -> int:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if platform.system() == "Darwin" else peak * 1024


def _child(layers: int, program: str, overrides: list[str], seq: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepseek_v4 import train
  from deepseek_v4.model import Transformer

  cfg, options = _config(layers, overrides)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, seq + 1)), jnp.int32)
  if program == "forward":
    model = Transformer(cfg, rngs=nnx.Rngs(0), options=options)
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    args = (state, ids[:, :-1])
  else:
    tcfg = train.TrainConfig(seq_len=seq, batch_size=2, remat="full")
    model, opt = train.build(cfg, tcfg, options=options)
    graphdef, state = nnx.split((model, opt))
    batch = train.as_batch(np.asarray(ids[:, :-1]), np.asarray(ids[:, 1:]))

    def step(st, b):
      m, o = nnx.merge(graphdef, st)
      metrics = train.train_step_fn(m, o, b, 0.3, tcfg)
      return nnx.state((m, o)), metrics

    fn = jax.jit(step)
    args = (state, batch)
  rss0 = _peak_rss()
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))  # it runs
  return dict(layers=layers, program=program, compile_s=seconds, peak_rss_gb=_peak_rss() / 1e9,
              rss_before_compile_gb=rss0 / 1e9, jax=jax.__version__)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", default="5,43", help="comma-separated depths (default 5,43)")
  p.add_argument("--programs", default="forward,train_step")
  p.add_argument("--seq", type=int, default=128, help="tokens per row (batch 2)")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 help="ModelConfig or Options field=value (repeatable)")
  p.add_argument("--tag", default="current", help="name of this run in the JSON (e.g. before)")
  p.add_argument("--out", default=DEFAULT_OUT)
  p.add_argument("--child", nargs=2, metavar=("LAYERS", "PROGRAM"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_child(int(args.child[0]), args.child[1], args.overrides, args.seq)))
    return 0
  try:
    depths = [int(x) for x in args.layers.split(",")]
  except ValueError:
    p.error(f"--layers {args.layers!r}: expected comma-separated integers")
  programs = args.programs.split(",")
  bad = set(programs) - {"forward", "train_step"}
  if bad:
    p.error(f"--programs: unknown {sorted(bad)}; expected forward, train_step")
  rows = []
  for program in programs:
    for depth in depths:
      cmd = [sys.executable, os.path.abspath(__file__), "--child", str(depth), program,
             "--seq", str(args.seq)] + [f"--set={o}" for o in args.overrides]
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd(),
                           env=dict(os.environ, PYTHONPATH=os.getcwd()))
      if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      r = rows[-1]
      print(f"{program:<11} layers {depth:>3}: compile {r['compile_s']:7.1f} s   "
            f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
  ratios = {}
  for program in programs:
    by = {r["layers"]: r for r in rows if r["program"] == program}
    if len(by) > 1:
      lo, hi = by[min(by)], by[max(by)]
      ratios[program] = hi["compile_s"] / lo["compile_s"]
      print(f"{program}: {max(by)} layers / {min(by)} layers = {ratios[program]:.2f}x")
  result = json.load(open(args.out)) if os.path.exists(args.out) else {}
  result[args.tag] = dict(rows=rows, ratio_deepest_to_shallowest=ratios, seq=args.seq,
                          overrides=args.overrides, model=NARROW)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out} [{args.tag}]")
  return 0


if __name__ == "__main__":
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  sys.exit(main())
