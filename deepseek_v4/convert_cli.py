"""`python -m deepseek_v4 convert`: hub safetensors <-> Orbax checkpoints
(docs/architecture.md#checkpoints).

  python -m deepseek_v4 convert HUB_FOLDER OUT_DIR --to orbax [--dtype bfloat16] [--layers K]
                                                              [--no-mtp] [--mesh fsdp=8]
  python -m deepseek_v4 convert ORBAX_DIR OUT_FOLDER --to hub [--step N] [--quantize fp8]

HUB_FOLDER is a hub or transformers folder (config.json + *.safetensors, plain or FP8/FP4-quantized
as published), read with `load_hf_checkpoint` (quantized weights dequantized into --dtype). OUT_DIR
then holds one Orbax checkpoint, step 0 (the model state and its ModelConfig, no optimizer), in the
layout of `checkpoint.io.Checkpointer`: `checkpoint.io.load_model(OUT_DIR)` and `generate
--checkpoint OUT_DIR` read it.

ORBAX_DIR is such a folder or a `train --out` folder (its latest checkpoint, or --step N; LoRA
adapters are merged; over routed experts kept as FP4 codes only the adapted experts are
requantized, `lora.strip_lora`); OUT_FOLDER gets config.json and hub-named safetensors
(`save_hf_checkpoint`, optionally FP8 / FP4-expert quantized in the official format).

The output is written into a temporary folder next to it and renamed into place only when complete,
so a failed or interrupted conversion never leaves a half-written OUT. An existing non-empty OUT is
refused unless --overwrite (which replaces the whole folder). tokenizer.json and
tokenizer_config.json next to the input are copied along.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ORBAX_STEP = 0  # the step number of a converted checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from deepseek_v4 import cli

  p = parser.add_argument
  p("input", metavar="INPUT", help="--to orbax: a hub / transformers folder (config.json + "
    "*.safetensors); --to hub: an Orbax folder (`convert --to orbax` or `train --out`)")
  p("output", metavar="OUT", help="the folder to write (must be absent or empty, or --overwrite)")
  p("--to", required=True, choices=("orbax", "hub"), help="the output format")
  p("--overwrite", action="store_true",
    help="replace an existing non-empty OUT (everything in it), once the new one is complete")
  p("--dtype", choices=("float32", "bfloat16"), default=None,
    help="--to orbax: storage and compute dtype (default float32; quantized weights dequantize "
         "exactly into either); --to hub: the dtype of the tensors written (default: as the "
         "checkpoint holds them)")
  p("--layers", type=cli.positive_int, default=None, metavar="K",
    help="--to orbax: only the first K layers (a partial model; its config says so)")
  p("--no-mtp", action="store_true", help="--to orbax: leave out the MTP block")
  p("--mesh", default=None, metavar="AXIS=N,...",
    help="--to orbax: place each tensor straight into its shards on this device mesh (e.g. "
         "fsdp=8 or expert=8), so no single device holds the whole model")
  p("--rules", default=None, metavar="NAME",
    help="--to orbax with --mesh: the sharding rule table, fsdp | fsdp_tp | fsdp_ep (default fsdp)")
  p("--step", type=int, default=None, metavar="N",
    help="--to hub: the checkpoint step to convert (default: the latest)")
  p("--quantize", choices=("fp8", "fp4-experts"), default=None,
    help="--to hub: store the linears in FP8 (fp8) and the routed experts in FP4 (fp4-experts), "
         "as the published checkpoints do (default: unquantized)")


# ----- checks (all before anything is read or written) --------------------------------------------
_ONLY_ORBAX = {"layers": "--layers", "no_mtp": "--no-mtp", "mesh": "--mesh", "rules": "--rules"}
_ONLY_HUB = {"step": "--step", "quantize": "--quantize"}


def check_flags(args: argparse.Namespace) -> None:
  """Refuses flags that do not apply to `--to` (naming flag and value)."""
  wrong = _ONLY_HUB if args.to == "orbax" else _ONLY_ORBAX
  for attr, flag in wrong.items():
    value = getattr(args, attr)
    if value is not None and value is not False:
      other = "hub" if args.to == "orbax" else "orbax"
      shown = flag if value is True else f"{flag} {value}"
      raise ValueError(f"{shown} applies to --to {other} only, not --to {args.to}")
  if args.rules is not None and args.mesh is None:
    raise ValueError(f"--rules {args.rules}: needs --mesh (without a mesh nothing is sharded)")
  if args.mesh is not None or args.rules is not None:
    from deepseek_v4 import sharding

    if args.rules is not None and args.rules not in sharding.RULES:
      raise ValueError(f"--rules {args.rules!r}: unknown; known: {sorted(sharding.RULES)}")
    if args.mesh is not None:
      try:
        sharding.parse_mesh(args.mesh)
      except ValueError as e:
        raise ValueError(f"--mesh {args.mesh}: {e}") from None


def find_input(path: str, to: str) -> str:
  """The checkpoint folder to read: `path` itself for a hub folder, the folder holding the step
  folders for an Orbax one (`path` or `path/checkpoints`)."""
  from deepseek_v4.generate_cli import training_checkpoints

  if not os.path.exists(path):
    raise FileNotFoundError(f"input {path!r} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"input {path!r} is a file; expected a folder")
  hub = os.path.isfile(os.path.join(path, "config.json"))
  orbax = training_checkpoints(path)
  if to == "orbax" and hub:
    return path
  if to == "hub" and orbax is not None:
    return orbax
  if to == "orbax" and orbax is not None:
    raise ValueError(f"--to orbax: input {path!r} is an Orbax checkpoint folder already (it "
                     "holds step folders and no config.json); --to hub converts it to safetensors")
  if to == "hub" and hub:
    raise ValueError(f"--to hub: input {path!r} is a hub / transformers folder already (it holds "
                     "config.json and no Orbax step folders); --to orbax converts it")
  raise ValueError(f"input {path!r} holds neither config.json (a hub / transformers checkpoint, "
                   "for --to orbax) nor numbered step folders, itself or under checkpoints/ (an "
                   "Orbax checkpoint from `convert --to orbax` or `train --out`, for --to hub)")


def check_output(out: str, src: str, overwrite: bool) -> None:
  """Refuses an output that is a file, holds or lies inside the input, or is a non-empty folder
  (unless `overwrite`)."""
  a, b = os.path.realpath(out), os.path.realpath(src)
  if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
    raise ValueError(f"output {out!r} and input {src!r} overlap; choose an output folder outside "
                     "the input")
  if os.path.lexists(out) and not os.path.isdir(out):
    raise ValueError(f"output {out!r} exists and is not a folder")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    n = len(os.listdir(out))
    raise ValueError(f"output {out!r} exists and is not empty ({n} entr"
                     f"{'y' if n == 1 else 'ies'}); pass --overwrite to replace it, or choose "
                     "another folder")


# ----- writing into a temporary sibling, then renaming --------------------------------------------
def write_atomically(out: str, write) -> None:
  """Calls `write(tmp)` on a fresh temporary folder next to `out`, then puts it in place of `out`
  (an empty or replaced `out` is removed only after `write` succeeded)."""
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.convert-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become OUT's mode
  try:
    write(tmp)
    if os.path.isdir(out):
      old = tmp + ".old"
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def copy_tokenizer(src: str, dst: str) -> list[str]:
  """Copies the tokenizer files of folder `src` into `dst`; returns the names copied."""
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def folder_bytes(path: str) -> int:
  """The bytes of every file under `path`."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def human(n: float) -> str:
  """Bytes as `3.4 MB` (decimal units, as `plan` prints)."""
  if n < 1000:
    return f"{n:.0f} B"
  for unit in ("KB", "MB", "GB"):
    n /= 1000
    if n < 1000 or unit == "GB":
      break
  return f"{n:.1f} {unit}"


# ----- the two directions -------------------------------------------------------------------------
def _mesh(args: argparse.Namespace):
  from deepseek_v4 import sharding

  if args.mesh is None:
    return None, None
  try:
    mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh))
  except ValueError as e:  # e.g. more devices than this host has
    raise ValueError(f"--mesh {args.mesh}: {e}") from None
  return mesh, args.rules or "fsdp"


def _mesh_text(mesh) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "one device"


def to_orbax(args: argparse.Namespace, src: str, out) -> None:
  """Hub folder `src` -> an Orbax checkpoint (step 0) in `args.output`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from deepseek_v4.checkpoint import files as ckpt_files
  from deepseek_v4.checkpoint import load_hf_checkpoint
  from deepseek_v4.checkpoint.io import Checkpointer
  from deepseek_v4.checkpoint.safetensors_io import list_checkpoint

  cfg = ckpt_files.read_config(src)
  if args.layers is not None and args.layers > cfg.num_layers:
    raise ValueError(f"--layers {args.layers}: the checkpoint has {cfg.num_layers} layers")
  mesh, rules = _mesh(args)
  listing = list_checkpoint(src)
  stored = sum(info.nbytes for info in listing.values())
  quantized = sum(k.endswith((".scale", ".weight_scale_inv")) for k in listing)
  dtype = args.dtype or "float32"
  start = time.perf_counter()
  model = load_hf_checkpoint(src, dtype=jnp.dtype(dtype), mesh=mesh, rules=rules,
                             num_layers=args.layers, mtp=not args.no_mtp)
  arrays = jax.tree.leaves(nnx.state(model))
  jax.block_until_ready(arrays)
  out.write(f"read {src}: {len(listing)} stored tensors, {human(stored)}"
            + (f" ({quantized} FP8/FP4-quantized weights)" if quantized else "")
            + f"; loaded {model.cfg.num_layers} layers + {model.cfg.num_mtp_layers} MTP as {dtype}"
            + ("" if mesh is None else f", sharded over {_mesh_text(mesh)} by {rules}")
            + f", in {time.perf_counter() - start:.1f} s\n")
  copied: list[str] = []

  def write(tmp: str) -> None:
    ck = Checkpointer(tmp, keep=1)
    try:
      ck.save(ORBAX_STEP, model, extra={"converted_from": os.path.abspath(src),
                                        "num_layers": args.layers, "mtp": not args.no_mtp})
    finally:
      ck.close()
    copied.extend(copy_tokenizer(args.input, tmp))

  start = time.perf_counter()
  write_atomically(args.output, write)
  out.write(f"wrote {args.output}: Orbax checkpoint step {ORBAX_STEP}, {len(arrays)} arrays "
            f"({human(sum(int(x.nbytes) for x in arrays))}; "
            f"{human(folder_bytes(args.output))} on disk)"
            + "".join(f" + {name}" for name in copied)
            + f", in {time.perf_counter() - start:.1f} s\n")


def to_hub(args: argparse.Namespace, src: str, out) -> None:
  """Orbax folder `src` (its `--step`, else latest) -> a hub folder in `args.output`."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from deepseek_v4.checkpoint import from_hub_tensors, save_hf_checkpoint, to_hub_tensors
  from deepseek_v4.checkpoint.io import restore_model
  from deepseek_v4.checkpoint.safetensors_io import list_checkpoint

  start = time.perf_counter()
  from deepseek_v4 import lora

  # Onto this process's first device, whatever mesh wrote it; LoRA adapters merged. Routed
  # experts kept as FP4 codes (QLoRA): only those with a nonzero adapter are requantized, the
  # others keep the bytes they were loaded with.
  model, meta = restore_model(src, args.step, merge_lora=False)
  lora.strip_lora(model, requantize_experts=model.options.keep_quantized == "experts")
  step = meta["step"]
  cfg = model.cfg
  if args.dtype is not None and not cfg.dtype == cfg.param_dtype == args.dtype:
    # The casts of a hub checkpoint loaded in --dtype (norms, mHC, router bias stay float32).
    name = jnp.dtype(args.dtype).name
    model = from_hub_tensors(dataclasses.replace(cfg, dtype=name, param_dtype=name),
                             to_hub_tensors(model), options=model.options)
  arrays = jax.tree.leaves(nnx.state(model))
  out.write(f"read {src}: step {step}, {len(arrays)} arrays "
            f"({human(sum(int(x.nbytes) for x in arrays))}), {model.cfg.num_layers} layers + "
            f"{model.cfg.num_mtp_layers} MTP, in {time.perf_counter() - start:.1f} s\n")
  copied: list[str] = []

  def write(tmp: str) -> None:
    save_hf_checkpoint(model, tmp, quantize=args.quantize)
    copied.extend(copy_tokenizer(args.input, tmp))

  start = time.perf_counter()
  write_atomically(args.output, write)
  listing = list_checkpoint(args.output)
  out.write(f"wrote {args.output}: config.json + {len(listing)} safetensors tensors "
            f"({human(sum(i.nbytes for i in listing.values()))}, "
            f"{args.quantize or 'unquantized'}; {human(folder_bytes(args.output))} on disk)"
            + "".join(f" + {name}" for name in copied)
            + f", in {time.perf_counter() - start:.1f} s\n")


def run(args: argparse.Namespace, out=None) -> int:
  out = out or sys.stdout
  check_flags(args)
  src = find_input(args.input, args.to)
  check_output(args.output, args.input, args.overwrite)
  start = time.perf_counter()
  (to_orbax if args.to == "orbax" else to_hub)(args, src, out)
  out.write(f"done in {time.perf_counter() - start:.1f} s\n")
  out.flush()
  return 0
