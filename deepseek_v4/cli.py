"""`python -m deepseek_v4 <subcommand>`: the command-line entry point.

Each subcommand lives in its own `<name>_cli.py` module, which defines `add_arguments(parser)` and
`run(args) -> int`; those and this one are the only modules that use argparse
(tests/test_layering.py), so the library stays free of flag parsing. Adding a subcommand is one
line in SUBCOMMANDS.
Only the module of the subcommand being run is imported, so `--help` stays cheap and one
subcommand's dependencies never affect another.

Errors in the user's input (an unknown preset, a bad `--set`, a missing or unreadable file, a bad
regex) are printed to stderr as one line `error: ...` naming the bad value, and exit with status 2,
the same as argparse's own usage errors. Any other exception is also one `error:` line (exit 1).
`--debug` (on every subcommand) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback

from deepseek_v4 import config

# name -> (module defining add_arguments/run, one-line help).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
  "summary": ("deepseek_v4.summary_cli",
              "parameters, KV-cache bytes and FLOPs per token, from shapes only"),
  "plan": ("deepseek_v4.plan_cli", "per-device memory of a run on a device mesh, from shapes only"),
  "generate": ("deepseek_v4.generate_cli", "generate text from a checkpoint, streamed"),
  "train": ("deepseek_v4.train_cli",
            "train or fine-tune (Muon, V4 losses, Orbax checkpoints); --demo runs on CPU"),
  "ablate": ("deepseek_v4.ablate_cli",
             "a grid of model variants x seeds, resumable, with a report"),
  "convert": ("deepseek_v4.convert_cli", "hub safetensors (FP8/FP4 or not) <-> Orbax checkpoints"),
  "compile": ("deepseek_v4.compile_cli", "compile a program for H100/H200/TPU on this CPU: XLA's "
              "bytes vs plan, GPU kernel resources"),
}

USAGE_ERROR = 2


# ----- shared flags (for every subcommand that builds a model config) -----------------------------
def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str = "flash") -> None:
  """`--preset` | `--config`, and repeated `--set field=value`.

  `--preset` stays None when not given (so a subcommand can tell an explicit choice from the
  default); `config_from_args` falls back to `default_preset`.
  """
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--preset", choices=sorted(config.PRESETS), default=None,
                     help=f"model preset (default {default_preset})")
  parser.set_defaults(default_preset=default_preset)
  group.add_argument("--config", metavar="PATH",
                     help="a hub or transformers config.json (or its folder)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="FIELD=VALUE", help="override a ModelConfig field (repeatable)")


def config_from_args(args: argparse.Namespace) -> tuple[config.ModelConfig, str | None]:
  """The config the flags describe, and the preset name when no field was overridden.

  Raises:
    ValueError: a bad override or an invalid resulting config (the message names the value).
    OSError: the config file cannot be read.
  """
  if args.config:
    cfg, name = config.ModelConfig.from_hf(args.config), None
  else:
    name = args.preset or args.default_preset
    cfg = config.PRESETS[name]()
  if args.overrides:
    cfg, name = config.parse_overrides(cfg, args.overrides), None
  return cfg, name


def int_at_least(text: str, minimum: int) -> int:
  """argparse helper: `text` as an integer >= minimum (accepts 1_048_576 style '1048576')."""
  try:
    value = int(text.replace("_", ""))
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"{text!r} must be >= {minimum}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1."""
  return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
  """argparse type: an integer >= 0."""
  return int_at_least(text, 0)


def arg_type(parse):
  """argparse type from a parser raising ValueError: argparse then prints the message itself
  (for a plain ValueError it prints only 'invalid <function name> value')."""
  def convert(text: str):
    try:
      return parse(text)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None

  convert.__name__ = parse.__name__
  return convert


def fraction(text: str) -> float:
  """argparse type: a number in [0, 1) (e.g. a share of memory kept free)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not 0 <= value < 1:
    raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1) (a fraction, e.g. 0.1)")
  return value


# ----- run options (deepseek_v4.Options), for the subcommands that use them ----------------------
def _bool(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0"):
    raise ValueError(f"{text!r}: expected true or false")
  return text.lower() in ("true", "1")


_OPTION_FLAGS = {
  "kernel_impl": dict(choices=["reference", "pallas", "auto"], default="reference",
                      help="attention/indexer kernels (default reference; auto = Pallas on "
                      "GPU/TPU)"),
  "attn_block": dict(type=positive_int, default=128, metavar="N",
                     help="queries per block of the attention and indexer (default 128)"),
  "scan_layers": dict(type=arg_type(_bool), default=True, metavar="BOOL",
                      help="stack repeated layers under lax.scan (default true; false unrolls)"),
  "keep_quantized": dict(choices=["experts"], default=None,
                         help="routed experts kept as their FP4 codes (inference, or LoRA "
                         "training: QLoRA; load_hf_checkpoint(keep_quantized='experts'))"),
}


def add_options_arguments(parser: argparse.ArgumentParser, fields: tuple[str, ...]) -> None:
  """One flag per `Options` field named in `fields` (`--kernel-impl`, `--attn-block`,
  `--scan-layers`, `--keep-quantized`); `options_from_args` reads them back."""
  for name in fields:
    parser.add_argument("--" + name.replace("_", "-"), dest=name, **_OPTION_FLAGS[name])
  parser.set_defaults(option_fields=tuple(fields))


def options_from_args(args: argparse.Namespace, **fields):
  """The `Options` of the flags `add_options_arguments` added, plus `fields`."""
  from deepseek_v4.options import Options

  given = {name: getattr(args, name) for name in args.option_fields}
  return Options(**{**given, **fields})


def one_line(message: str) -> str:
  """A multi-line message (e.g. a list of mismatching fields) joined into one line."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  out = lines[0] if lines else ""
  for line in lines[1:]:
    out += (" " if out.endswith(":") else "; ") + line
  return out


# ----- entry point --------------------------------------------------------------------------------
def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The parser; only `command`'s module is imported and given its flags (the others list their
  help line only), so one subcommand's imports never slow down or break another."""
  parser = argparse.ArgumentParser(prog="python -m deepseek_v4", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name, (module_name, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")
    if name == command:
      module = importlib.import_module(module_name)
      module.add_arguments(p)
      p.set_defaults(_run=module.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Parses `argv` (default sys.argv[1:]) and runs the subcommand; returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  command = next((a for a in argv if not a.startswith("-")), None)
  args = build_parser(command).parse_args(argv)
  try:
    return int(args._run(args) or 0)
  except BrokenPipeError:  # the reader (e.g. `| head`) stopped reading: not a usage error
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  except (ValueError, OSError, re.error) as e:  # the user's input: a bad value, file or regex
    _report(e, args.debug, "")
    return USAGE_ERROR
  except Exception as e:  # noqa: BLE001 - one line instead of a traceback; --debug shows it
    _report(e, args.debug, f"{type(e).__name__}: ")
    return 1


def _report(e: Exception, debug: bool, prefix: str) -> None:
  if debug:
    traceback.print_exc()
  print(f"error: {prefix}{one_line(str(e))}" + ("" if debug or not prefix else
                                                 " (rerun with --debug for the traceback)"),
        file=sys.stderr)
