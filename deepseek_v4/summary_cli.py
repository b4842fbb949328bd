"""`python -m deepseek_v4 summary`: parameters, KV-cache bytes and FLOPs per token (shapes only).

  python -m deepseek_v4 summary --preset flash --context 1048576 --json flash.json

What is counted and why is described in deepseek_v4/summary.py, which computes it.
"""

from __future__ import annotations

import argparse
import json

from deepseek_v4 import cli, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags of `python -m deepseek_v4 summary` (the config flags come from cli.py)."""
  cli.add_config_arguments(parser)
  parser.add_argument("--context", type=cli.positive_int, default=1048576,
                      help="context length for KV-cache and FLOPs (default 1048576)")
  parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON to PATH")
  cli.add_options_arguments(parser, ("keep_quantized",))


def run(args: argparse.Namespace) -> int:
  """Prints the summary table (and writes JSON if asked)."""
  cfg, name = cli.config_from_args(args)
  s = summary.summarize(cfg, args.context, name, keep_quantized=args.keep_quantized)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(s.to_dict(), f, indent=2)
  print(summary.format_summary(s))
  return 0
