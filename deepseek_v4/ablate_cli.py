"""`python -m deepseek_v4 ablate`: a grid of model variants x seeds, resumable, with a report.

  python -m deepseek_v4 ablate ablations/mtp.toml               # runs, resumes, reports
  python -m deepseek_v4 ablate ablations/mtp.toml --check       # validates the spec only

The spec format, the fairness rules and the output folder are described in deepseek_v4/ablate.py.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("spec", help="ablation spec: .toml, .json (or .yaml with PyYAML)")
  parser.add_argument("--out", metavar="DIR",
                      help="output folder (default runs/ablations/<spec name>); rerunning the "
                           "command continues an interrupted grid there")
  parser.add_argument("--check", action="store_true",
                      help="check the spec (every variant traced abstractly), print the grid, "
                           "run nothing")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  from deepseek_v4 import train_cli

  train_cli.add_mesh_arguments(parser, processes=False)  # each variant trains on the mesh


def run(args: argparse.Namespace) -> int:
  from deepseek_v4 import ablate, ablate_report  # jax and the trainer: not needed for --help

  from deepseek_v4 import train_cli

  mesh, rules = train_cli.mesh_from_args(args)
  spec = ablate.load_spec(args.spec)
  out = args.out or os.path.join("runs", "ablations", spec.name)
  ablate.check_out_dir(out)
  if args.check:
    configs = ablate.check_spec(spec)
    ablate.load_data(spec, configs)
    tcfg = next(iter(configs.values()))[1]
    print(f"{spec.name}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = "
          f"{len(spec.variants) * len(spec.seeds)} runs of {tcfg.steps} steps x "
          f"{tcfg.batch_size * tcfg.seq_len} tokens; all variants trace. Output: {out}")
    return 0
  with ablate.compile_cache():
    records = ablate.run_grid(spec, out, progress=not args.no_progress, mesh=mesh, rules=rules,
                              capacity_factor=args.capacity_factor)
  print(f"results: {os.path.join(out, 'results.md')}  curves: {os.path.join(out, 'curves.png')}")
  print(ablate_report.markdown(spec, records))
  return 0
