"""`python -m deepseek_v4 compile`: compile a real program for a GPU or TPU on this CPU host.

  python -m deepseek_v4 compile --target h200 --devices 8 --preset flash --layers 2 \\
      --mesh expert=8 --rules fsdp_ep --program forward --batch 8 --seq 4096

builds the model abstractly (shapes and shardings, no weights), traces the program (forward,
chunked prefill, decode step or training step), compiles it with XLA for compile-only devices of
the target, and prints XLA's per-device bytes beside `plan`'s estimate, the verdict against the
device memory and, on GPU, each Pallas kernel's shared memory, registers and spills
(deepseek_v4/aot/compile.py, docs/aot.md). Needs the `aot` extra; runs with JAX_PLATFORMS=cpu
(set here when unset). Exit status 1 when the compiler refuses the program (e.g. out of device
memory, or a kernel's shared memory over the limit).
"""

from __future__ import annotations

import argparse
import json
import os

from deepseek_v4 import cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from deepseek_v4 import sharding
  from deepseek_v4.aot import compile as aot
  from deepseek_v4.aot import targets

  p = parser.add_argument
  p("--target", required=True, choices=list(targets.TARGETS), help="the hardware to compile for")
  p("--devices", type=cli.positive_int, default=None,
    help="device count (default: the product of --mesh, else 1); GPUs: up to 8 per host")
  cli.add_config_arguments(parser)
  cli.add_options_arguments(parser, ("kernel_impl", "attn_block", "scan_layers"))
  p("--layers", type=cli.positive_int, default=None, metavar="K",
    help="keep only the first K layers of the config (a quick, smaller compile)")
  p("--mesh", default=None, help="axis sizes, e.g. expert=8 or fsdp=2,expert=4 (default: plan's "
    "recommended mesh for --devices)")
  p("--rules", choices=sorted(sharding.RULES), default=None,
    help="rule table (default: fsdp_ep with expert > 1, fsdp_tp with tensor > 1, else fsdp)")
  p("--program", choices=aot.PROGRAMS, default="forward",
    help="forward (logits of batch x seq), prefill (one chunk into a cache of capacity seq), "
    "decode (one token per row into that cache) or train (one optimizer step)")
  p("--batch", type=cli.positive_int, default=8, help="global rows (default 8)")
  p("--seq", type=cli.positive_int, default=4096,
    help="tokens per row (forward, train) or cache capacity (prefill, decode); default 4096")
  p("--chunk", type=cli.positive_int, default=None, help="prefill chunk length (default --seq)")
  p("--capacity-factor", type=float, default=None,
    help="expert-parallel MoE capacity factor (default: dropless)")
  g = parser.add_argument_group("training step (--program train)")
  g.add_argument("--optimizer", choices=["muon_v4", "adamw"], default="muon_v4")
  g.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: off)")
  g.add_argument("--lora-targets", default=None,
                 help="comma-separated projection names (default: TrainConfig's)")
  g.add_argument("--freeze", action="append", default=[], metavar="REGEX",
                 help="parameters not trained (re.search on dotted paths; repeatable)")
  g.add_argument("--remat", choices=["none", "full", "dots", "dots_no_batch"], default="full")
  g.add_argument("--grad-accum", type=cli.positive_int, default=1)
  g.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default=None)
  p("--headroom", type=cli.fraction, default=0.1,
    help="fraction of device memory the verdict keeps free, in [0, 1) (default 0.1)")
  p("--no-kernels", action="store_true",
    help="GPU: skip reading the Pallas kernels' resources (no XLA dump, no ptxas)")
  p("--dump", metavar="DIR", default=None, help="GPU: keep XLA's dump (PTX, thunks, HLO) in DIR")
  p("--json", metavar="PATH", help="also write the report as JSON")


def _cpu_platform() -> None:
  """Compile-only devices need JAX on its CPU backend: set JAX_PLATFORMS=cpu before JAX starts
  its backends (argparse has not started them), refuse another explicit choice."""
  current = os.environ.get("JAX_PLATFORMS", "")
  if current not in ("", "cpu"):
    raise ValueError(f"compile runs on the CPU backend (it builds compile-only devices of the "
                     f"target); got JAX_PLATFORMS={current!r}: unset it or set it to cpu")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  jax.config.update("jax_platforms", "cpu")


def _train_config(args: argparse.Namespace):
  from deepseek_v4 import train

  extra = {}
  if args.lora_targets:
    extra["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
  return train.TrainConfig(
    seq_len=args.seq, batch_size=args.batch, grad_accum=args.grad_accum,
    optimizer=args.optimizer, lora_rank=args.lora_rank, freeze=tuple(args.freeze),
    remat=args.remat, compute_dtype=args.compute_dtype, **extra)


def _check_flags(args: argparse.Namespace) -> None:
  train_only = {"--optimizer": args.optimizer != "muon_v4", "--lora-rank": args.lora_rank != 0,
                "--lora-targets": args.lora_targets is not None, "--freeze": bool(args.freeze),
                "--remat": args.remat != "full", "--grad-accum": args.grad_accum != 1,
                "--compute-dtype": args.compute_dtype is not None}
  given = [flag for flag, on in train_only.items() if on]
  if given and args.program != "train":
    raise ValueError(f"{', '.join(given)} apply to --program train only, not {args.program}")
  if args.chunk is not None and args.program != "prefill":
    raise ValueError(f"--chunk {args.chunk} applies to --program prefill only, not "
                     f"{args.program}")
  if args.capacity_factor is not None and args.capacity_factor <= 0:
    raise ValueError(f"--capacity-factor {args.capacity_factor} must be positive")
  if args.lora_rank < 0:
    raise ValueError(f"--lora-rank {args.lora_rank} must be >= 0")


def run(args: argparse.Namespace) -> int:
  import math

  _check_flags(args)
  _cpu_platform()
  from deepseek_v4 import sharding
  from deepseek_v4.aot import compile as aot

  cfg, _ = cli.config_from_args(args)
  if args.layers is not None:
    if args.layers > cfg.num_layers:
      raise ValueError(f"--layers {args.layers}: the config has {cfg.num_layers} layers")
    cfg = cfg.replace(compress_ratios=cfg.compress_ratios[:args.layers],
                      num_hash_layers=min(cfg.num_hash_layers, args.layers))
  devices = args.devices
  if args.mesh is not None:
    sizes = sharding.parse_mesh(args.mesh)
    n = math.prod(v for v in sizes.values() if v != -1)
    if devices is None:
      if -1 in sizes.values():
        raise ValueError(f"--mesh {args.mesh} has a -1 axis: give --devices")
      devices = n
  devices = devices or 1
  tcfg = _train_config(args) if args.program == "train" else None
  report = aot.compile_program(
    cfg, target=args.target, program=args.program, devices=devices, mesh=args.mesh,
    rules=args.rules, batch=args.batch, seq=args.seq, chunk=args.chunk, tcfg=tcfg,
    capacity_factor=args.capacity_factor, kernels=not args.no_kernels, headroom=args.headroom,
    dump_dir=args.dump, options=cli.options_from_args(args))
  print(aot.format_report(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report.to_dict(), f, indent=2)
  return 1 if report.error else 0
