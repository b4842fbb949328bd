"""`python -m deepseek_v4 plan`: per-device memory of a run on a device mesh, from shapes only.

  python -m deepseek_v4 plan --preset flash --devices 64 --train --device-memory 141GB
  python -m deepseek_v4 plan --config config.json --mesh fsdp=8,expert=8 --json plan.json
  python -m deepseek_v4 plan --preset flash --devices 4 --train --lora-rank 16 \
      --keep-quantized experts --seq 8192 --batch 4 --device-memory 141GB     # QLoRA

The flags map onto `plan.Settings` and `plan.make_plan`; what is exact and what is estimated is
described in deepseek_v4/plan.py and docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import math

from deepseek_v4 import cli, plan, sharding


def add_arguments(parser: argparse.ArgumentParser) -> None:
  cli.add_config_arguments(parser)
  parser.add_argument("--mesh", help="axis sizes, e.g. fsdp=8,expert=8 (default: the "
                      "recommended mesh for --devices)")
  parser.add_argument("--devices", type=cli.positive_int, default=None,
                      help="device count when --mesh is not given (default 8)")
  parser.add_argument("--devices-per-host", type=cli.positive_int, default=8)
  parser.add_argument("--rules", choices=sorted(sharding.RULES), default=None,
                      help="rule table (default: fsdp_ep with expert > 1, fsdp_tp with "
                      "tensor > 1, else fsdp)")
  parser.add_argument("--train", action="store_true", help="plan a training step (default: "
                      "inference with a KV cache)")
  parser.add_argument("--batch", type=cli.positive_int, default=8, help="global rows")
  parser.add_argument("--seq", type=cli.positive_int, default=4096,
                      help="training sequence length, or the inference cache capacity")
  parser.add_argument("--grad-accum", type=cli.positive_int, default=1)
  parser.add_argument("--remat", choices=["full", "none"], default="full")
  parser.add_argument("--optimizer", choices=["muon", "adamw"], default="muon")
  parser.add_argument("--moment-dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--param-dtype", choices=["float32", "bfloat16"], default=None,
                      help="matrix storage dtype (default: the config's)")
  parser.add_argument("--freeze", action="append", default=[], metavar="REGEX",
                      type=cli.arg_type(plan.parse_regex),
                      help="parameters not trained (re.search on dotted paths; repeatable)")
  parser.add_argument("--capacity-factor", type=cli.arg_type(plan.parse_capacity_factor),
                      default=None, help="expert-parallel MoE capacity factor (default: dropless)")
  parser.add_argument("--prefill-chunk", type=cli.positive_int, default=8192)
  parser.add_argument("--lora-rank", type=cli.positive_int, default=0,
                      help="--train: a LoRA run of this rank (only the adapters train; with "
                      "--keep-quantized experts: QLoRA over the released FP4 experts)")
  parser.add_argument("--lora-targets", default=None, help="comma-separated LoRA targets "
                      "(default wq_a,wq_b,wkv,wo_b; 'experts' adds the routed experts)")
  cli.add_options_arguments(parser, ("keep_quantized", "attn_block"))
  parser.add_argument("--gmm", choices=plan.GMM_PATHS, default="tiled",
                      help="grouped-matmul path of the routed experts (default tiled, what "
                      "'auto' runs on GPU; ragged_dot is TPU's)")
  parser.add_argument("--device-memory", type=cli.arg_type(plan.parse_bytes), default=None,
                      help="e.g. 141GB (H200), 80GB or 140GiB (a bare number counts bytes); "
                      "prints whether the plan fits")
  parser.add_argument("--headroom", type=cli.fraction, default=0.1,
                      help="fraction of device memory kept free for XLA, in [0, 1) "
                      "(default 0.1)")
  parser.add_argument("--context-parallel", type=cli.positive_int, default=1, metavar="N",
                      help="split each row's sequence over N devices (a `context` mesh axis of "
                      "size N beside --mesh; --devices counts all of them); docs/plan.md")
  parser.add_argument("--json", metavar="PATH", help="also write the plan as JSON")


def _lora_settings(args: argparse.Namespace) -> dict:
  if (args.lora_rank or args.lora_targets) and not args.train:
    raise ValueError("--lora-rank / --lora-targets plan a training run; add --train")
  if args.lora_targets and not args.lora_rank:
    raise ValueError(f"--lora-targets {args.lora_targets}: give --lora-rank R too")
  out = {"lora_rank": args.lora_rank}
  if args.lora_targets:
    out["lora_targets"] = tuple(t for t in args.lora_targets.split(",") if t)
  return out


def run(args: argparse.Namespace) -> int:
  cfg, name = cli.config_from_args(args)
  options = cli.options_from_args(args)
  if args.mesh:
    sizes = plan.parse_mesh(args.mesh)
    n = math.prod(sizes.values())
    if args.devices is not None and args.devices != n:
      raise ValueError(f"--mesh {args.mesh} has {n} devices but --devices={args.devices}")
  else:  # the recommended mesh for the devices left once the sequence is split
    devices = plan.devices_per_context(args.devices or 8, args.context_parallel)
    sizes = plan.default_mesh(cfg, devices, devices_per_host=args.devices_per_host,
                              train=args.train)
  if args.context_parallel > 1:
    sizes = plan.with_context(sizes, args.context_parallel)
  settings = plan.Settings(train=args.train, batch=args.batch, seq=args.seq,
                           grad_accum=args.grad_accum, remat=args.remat, optimizer=args.optimizer,
                           moment_dtype=args.moment_dtype, param_dtype=args.param_dtype,
                           freeze=tuple(args.freeze), capacity_factor=args.capacity_factor,
                           prefill_chunk=args.prefill_chunk, gmm=args.gmm,
                           **_lora_settings(args))
  result = plan.make_plan(cfg, sizes, args.rules, settings, name=name or "custom",
                          device_memory=args.device_memory, headroom=args.headroom,
                          options=options)
  print(plan.format_plan(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result.to_dict(), f, indent=2)
  return 0
