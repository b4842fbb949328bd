"""`python -m deepseek_v4 train`: pre-train or fine-tune on a text / JSONL file (or the embedded
demo corpus), with checkpoints, metrics.jsonl and loss.png in --out.

  python -m deepseek_v4 train --demo                       # tiny V4 on the stdlib sources, ~4 min
  python -m deepseek_v4 train --preset tiny --data corpus.txt --steps 500 --out runs/a
  python -m deepseek_v4 train ... --out runs/a --resume    # continue exactly where it stopped
  python -m deepseek_v4 train ... --out runs/a --resume --resume-step 300 --lr 1e-3  # after a
                                                           # divergence: from a kept checkpoint
  python -m deepseek_v4 train --init ckpt/ --data sft.jsonl --lora-rank 8

With `--init DIR` the architecture is DIR/config.json's; a `--preset`, `--config` or `--set` that
contradicts it is refused (only fields that change how the model runs, not what it computes, such
as dtype or init_std, may be set; run options such as --kernel-impl or --attn-block are flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import sys

from deepseek_v4 import cli
from deepseek_v4 import data as data_lib
from deepseek_v4 import train, trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
  cli.add_config_arguments(parser, default_preset="tiny")
  cli.add_options_arguments(parser, ("kernel_impl", "attn_block", "scan_layers",
                                     "keep_quantized"))
  p = parser.add_argument
  p("--demo", action="store_true",
    help="the demo: a tiny V4 (every layer kind) on the embedded stdlib corpus, then a sample")
  p("--data", metavar="PATH", help="a .txt / .jsonl file or a folder (default: the demo corpus)")
  p("--tokenizer", default="bytes", metavar="bytes|PATH", help="byte-level, or a tokenizer.json")
  p("--steps", type=cli.positive_int, help="optimizer steps (default: TrainConfig's)")
  p("--out", metavar="DIR",
    help="checkpoints, metrics.jsonl, loss.png (default runs/train; runs/demo with --demo)")
  p("--resume", action="store_true", help="continue from the latest checkpoint in --out")
  p("--resume-step", type=cli.positive_int, metavar="N",
    help="continue from the kept checkpoint of step N instead of the latest (implies --resume; "
         "later checkpoints are deleted)")
  p("--init", metavar="DIR",
    help="start from a transformers/hub checkpoint folder (fine-tuning); the architecture is "
         "DIR/config.json's")
  p("--seq-len", type=cli.positive_int)
  p("--batch-size", type=cli.positive_int)
  p("--grad-accum", type=cli.positive_int)
  p("--lr", type=float, help="peak learning rate")
  p("--warmup", type=int, help="warm-up steps")
  p("--remat", choices=["none", "full", "dots", "dots_no_batch"])
  p("--indexer-stage", choices=["off", "dense", "sparse"])
  p("--bf16", action="store_true", help="bfloat16 compute with float32 master weights")
  p("--freeze", action="append", default=[], metavar="REGEX",
    help="do not train parameters whose name matches (repeatable)")
  p("--lora-rank", type=cli.positive_int,
    help="LoRA fine-tuning with this rank >= 1 (only adapters train; omit it for full training)")
  p("--lora-alpha", type=float)
  p("--lora-targets", help="comma-separated projection names (default wq_a,wq_b,wkv,wo_b)")
  p("--packing", choices=["aligned", "concat", "pad"],
    help="aligned (recommended): documents share rows at aligned offsets with exact per-document "
         "attention masking; concat: documents joined with EOS, no masking (default); pad: one "
         "document per row")
  p("--log-every", type=cli.positive_int)
  p("--val-fraction", type=float, metavar="F",
    help="hold out this share of the documents (by document, fixed seed) for validation")
  p("--val-documents", type=cli.positive_int, metavar="N",
    help="hold out N documents for validation (instead of --val-fraction)")
  p("--eval-every", type=cli.positive_int, metavar="N",
    help="validation loss and bits per byte every N steps and at the last (default 50)")
  p("--save-every", type=cli.positive_int)
  p("--keep", type=cli.positive_int, help="checkpoints to keep")
  p("--diverge-factor", type=float, default=None, metavar="F",
    help="stop when the loss exceeds F x its running level (and by 3 nats; default 3; inf = "
         "only NaN / inf)")
  p("--diverge-grad-factor", type=float, default=None, metavar="F",
    help="stop when the gradient norm exceeds F x its running level (default 100)")
  p("--train-set", dest="train_overrides", action="append", default=[],
    metavar="FIELD=VALUE", help="override any TrainConfig field (repeatable)")
  p("--sample", type=cli.non_negative_int, default=200, metavar="N",
    help="tokens to sample at the end (0 = none)")
  p("--no-progress", action="store_true", help="no progress bar")
  p("--print-groups", action="store_true",
    help="print which optimizer (Muon / AdamW) each trained parameter gets, then exit")
  add_mesh_arguments(parser)


def add_mesh_arguments(parser: argparse.ArgumentParser, processes: bool = True) -> None:
  """`--mesh`, `--rules`, `--capacity-factor` and (`processes`) the multi-process flags."""
  from deepseek_v4 import sharding

  p = parser.add_argument
  p("--mesh", metavar="AXIS=SIZE,...",
    help="train on a device mesh, e.g. data=2,fsdp=2,expert=2 (axes data, fsdp, context, expert, "
         "tensor; context=N splits each sequence over N devices; one size may be -1: the rest; "
         "the product is the device count of all processes)")
  p("--rules", choices=sorted(sharding.RULES),
    help="sharding rules of --mesh (default fsdp; fsdp_ep splits the experts over 'expert')")
  p("--capacity-factor", type=float, metavar="C",
    help="expert-parallel MoE: keep at most C x the even share of token-expert pairs per device "
         "(default: dropless)")
  if not processes:
    parser.set_defaults(coordinator=None, num_processes=None, process_id=None)
    return
  p("--coordinator", metavar="HOST:PORT",
    help="address of process 0 for a multi-process run (default: SLURM detected, else one "
         "process)")
  p("--num-processes", type=cli.positive_int, metavar="N", help="processes in the run")
  p("--process-id", type=cli.non_negative_int, metavar="I", help="this process's index")


def mesh_from_args(args: argparse.Namespace):
  """Starts the multi-process runtime when asked, then (mesh, rules) of --mesh / --rules, or
  (None, None) without --mesh.

  Raises:
    ValueError: --rules or --capacity-factor without --mesh, a mesh whose size is not the device
      count, inconsistent process flags (the values named).
  """
  from deepseek_v4 import distributed

  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  if not args.mesh:
    for flag, value in (("--rules", args.rules), ("--capacity-factor", args.capacity_factor)):
      if value is not None:
        raise ValueError(f"{flag} {value} needs --mesh (e.g. --mesh data=2,fsdp=2,expert=2)")
    import jax

    if jax.process_count() > 1:
      raise ValueError(f"{jax.process_count()} processes but no --mesh: name the mesh over all "
                       f"{jax.device_count()} devices, e.g. --mesh data={jax.process_count()},"
                       "fsdp=-1")
    return None, None
  return distributed.mesh_and_rules(args.mesh, args.rules or "fsdp")


def run_options(args: argparse.Namespace, mesh, rules):
  """The run's whole `Options`, built once: the option flags, and on a mesh its MoE
  (`parallel.options`)."""
  if mesh is None:
    return cli.options_from_args(args)
  from deepseek_v4 import parallel

  fields = {name: getattr(args, name) for name in args.option_fields}
  return parallel.options(mesh, rules, capacity_factor=args.capacity_factor, **fields)




def _parse_train_overrides(tcfg: train.TrainConfig, items: list[str]) -> train.TrainConfig:
  fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
  updates = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--train-set {item!r}: expected field=value")
    name, raw = item.split("=", 1)
    if name not in fields:
      raise ValueError(f"--train-set {name}=...: unknown TrainConfig field; known: "
                       f"{sorted(fields)}")
    cur = getattr(tcfg, name)
    try:
      if isinstance(cur, bool):
        value = raw.lower() in ("1", "true")
      elif isinstance(cur, int):
        value = int(raw)
      elif isinstance(cur, float) or cur is None and name == "clip_norm":
        value = None if raw.lower() == "none" else float(raw)
      elif isinstance(cur, tuple):
        value = tuple(v for v in raw.split(",") if v)
      else:
        value = None if raw.lower() == "none" else raw
    except ValueError:
      raise ValueError(f"--train-set {name}={raw!r}: expected {type(cur).__name__}") from None
    updates[name] = value
  return dataclasses.replace(tcfg, **updates)


def train_config_from_args(args: argparse.Namespace, base: train.TrainConfig) -> train.TrainConfig:
  flags = {"steps": "steps", "seq_len": "seq_len", "batch_size": "batch_size",
           "grad_accum": "grad_accum", "lr": "learning_rate", "warmup": "warmup_steps",
           "remat": "remat", "indexer_stage": "indexer_stage", "lora_rank": "lora_rank",
           "lora_alpha": "lora_alpha", "packing": "packing", "log_every": "log_every",
           "save_every": "save_every", "keep": "keep_checkpoints", "val_fraction": "val_fraction",
           "val_documents": "val_documents", "eval_every": "eval_every"}
  updates = {field: getattr(args, a) for a, field in flags.items() if getattr(args, a) is not None}
  if args.bf16:
    updates["compute_dtype"] = "bfloat16"
  if args.freeze:
    for pattern in args.freeze:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"--freeze {pattern!r}: not a valid regular expression ({e})") from None
    updates["freeze"] = tuple(args.freeze)
  if args.lora_targets:
    updates["lora_targets"] = tuple(t for t in args.lora_targets.split(",") if t)
  return _parse_train_overrides(dataclasses.replace(base, **updates), args.train_overrides)


# ModelConfig fields that change how the model runs, not what it computes: `--set` may change them
# with `--init` (every other field comes from the checkpoint's config.json).
RUNTIME_FIELDS = ("dtype", "param_dtype", "init_std", "max_position_embeddings")


def _contradictions(ckpt, other, skip=()) -> list[str]:
  """`field: checkpoint X, other Y` for each architecture field that differs."""
  a, b = ckpt.to_dict(), other.to_dict()
  return [f"{k}={b[k]!r} (checkpoint {a[k]!r})" for k in a
          if k not in skip and a[k] != b[k]]


def init_config(args: argparse.Namespace):
  """The ModelConfig of `--init DIR` (its config.json) with the runtime-only `--set` fields.

  Raises:
    ValueError: a `--preset`, `--config` or `--set` contradicts the checkpoint (fields named).
  """
  from deepseek_v4 import config

  path = os.path.join(args.init, "config.json") if os.path.isdir(args.init) else args.init
  cfg = config.ModelConfig.from_hf(args.init)
  given = []
  if args.preset:
    given.append((f"--preset {args.preset}", config.PRESETS[args.preset]()))
  if args.config:
    given.append((f"--config {args.config}", config.ModelConfig.from_hf(args.config)))
  for flag, other in given:
    bad = _contradictions(cfg, other, skip=RUNTIME_FIELDS)
    if bad:
      raise ValueError(f"{flag} contradicts the architecture of --init {path!r}: "
                       f"{', '.join(bad)}; drop it (--init takes the architecture from the "
                       "checkpoint)")
  if args.overrides:
    new = config.parse_overrides(cfg, args.overrides)
    bad = _contradictions(cfg, new, skip=RUNTIME_FIELDS)
    if bad:
      raise ValueError(f"--set {', '.join(bad)} contradicts the architecture of --init "
                       f"{path!r}; with --init only {', '.join(RUNTIME_FIELDS)} may be set")
    cfg = new
  return cfg


def _init_from(folder: str, mesh=None, rules=None):
  """`fn(model)` copying the checkpoint in `folder` into the model (its LoRA adapters, if any,
  stay as initialized); on a mesh every tensor is read straight into its shards."""
  from deepseek_v4.checkpoint import load_hf_checkpoint
  from flax import nnx

  def init(model):
    src = load_hf_checkpoint(folder, config=model.cfg, dtype=model.cfg.param_dtype,
                             options=model.options, mesh=mesh, rules=rules)
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in nnx.to_flat_state(nnx.state(src)):
      if path in flat:
        flat[path].set_value(var[...].astype(flat[path].dtype))
    nnx.update(model, nnx.from_flat_state(flat))

  return init


def _divergence(args: argparse.Namespace) -> trainer.DivergenceCheck:
  updates = {k: v for k, v in (("loss_factor", args.diverge_factor),
                               ("grad_norm_factor", args.diverge_grad_factor)) if v is not None}
  try:
    return trainer.DivergenceCheck(**updates)
  except ValueError as e:
    flag = "--diverge-factor" if "loss_factor" in str(e) else "--diverge-grad-factor"
    raise ValueError(f"{flag}: {e}") from None


def _keep_tokenizer(spec: str, out: str) -> None:
  """Copies a tokenizer.json into --out, where `generate --checkpoint OUT` finds it."""
  if spec in (None, "", "bytes", "byte"):
    return
  src = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
  dst = os.path.join(out, "tokenizer.json")
  os.makedirs(out, exist_ok=True)
  if not (os.path.exists(dst) and os.path.samefile(src, dst)):
    shutil.copyfile(src, dst)


def _abstract_model(cfg, tcfg: train.TrainConfig, options):
  """The model the run trains (LoRA-wrapped if asked), shapes only: nothing is computed."""
  from deepseek_v4 import abstract

  return abstract.model(train.training_model_config(cfg, tcfg), lora=train.lora_spec(tcfg),
                        options=options)


def run(args: argparse.Namespace) -> int:
  from deepseek_v4 import distributed

  mesh, rules = mesh_from_args(args)  # first: the multi-process runtime starts before JAX works
  lead = distributed.is_lead()
  say = (lambda text: print(text, file=sys.stderr)) if lead else (lambda text: None)
  tok = data_lib.get_tokenizer(args.tokenizer)
  if args.demo:
    if args.init:
      raise ValueError("--demo trains its own tiny model; drop --init (or --demo)")
    cfg, base = trainer.demo_configs(tok.vocab_size)
    if args.overrides:
      from deepseek_v4.config import parse_overrides
      cfg = parse_overrides(cfg, args.overrides)
  elif args.init:
    cfg, base = init_config(args), train.TrainConfig()
  else:
    cfg, _ = cli.config_from_args(args)
    base = train.TrainConfig()
  tcfg = train_config_from_args(args, base)
  divergence = _divergence(args)
  trainer.check_settings(cfg, tcfg)
  options = run_options(args, mesh, rules)
  model = _abstract_model(cfg, tcfg, options)
  trainer.check_freeze(model, tcfg)  # before any data is read or anything compiles
  if args.print_groups:
    from flax import nnx

    from deepseek_v4 import optim

    rows = optim.describe(model, cfg, wrt=train.trainable_filter(tcfg, model.cfg,
                                                                options.scan_layers))
    # A stack of scanned layers trains as one tensor; the slices of its frozen layers do not.
    frozen = trainer.frozen_name(tcfg)
    print(optim.format_groups([r for r in rows if not frozen(r["name"])]))
    return 0
  out = args.out or ("runs/demo" if args.demo else "runs/train")
  # The demo continues (or just re-reports) its own earlier run instead of refusing to start.
  resume = (args.resume or args.resume_step is not None
            or (args.demo and args.out is None and os.path.isdir(out)))
  trainer.check_resume(out, resume)
  val = None
  if tcfg.val_fraction or tcfg.val_documents:  # held-out documents: loss and bits per byte
    from deepseek_v4 import evaluate

    rows, val = evaluate.load_split(args.data, tok, tcfg, align=data_lib.packing_align(cfg))
  else:
    rows = data_lib.load_rows(args.data, tok, tcfg.seq_len, tcfg.packing,
                              align=data_lib.packing_align(cfg))
  source = args.data or "the embedded demo corpus (Python stdlib sources)"
  held = "" if val is None else f" ({val.documents} documents held out for validation)"
  n = distributed.process_count()
  where = "" if mesh is None else (f" on mesh {_mesh_text(mesh)} ({rules.name}, {n} "
                                   f"process{'es' if n > 1 else ''})")
  say(f"training {cfg.num_layers}-layer V4 (d_model {cfg.d_model}, {cfg.num_experts} experts) "
      f"on {source}: {len(rows)} rows of {tcfg.seq_len} tokens{held}, {tcfg.steps} steps{where} "
      f"-> {out}")
  if lead:
    _keep_tokenizer(args.tokenizer, out)
  try:
    result = trainer.fit(cfg, tcfg, rows, out, resume=resume, resume_step=args.resume_step,
                         progress=not args.no_progress, divergence=divergence,
                         init_model=_init_from(args.init, mesh, rules) if args.init else None,
                         val=val, options=options, mesh=mesh, rules=rules)
  except trainer.TrainingDiverged as e:
    say(f"error: {e}")
    return 1
  if lead:
    print(trainer.summary(result))
    print(f"metrics: {os.path.join(out, 'metrics.jsonl')}  curve: "
          f"{os.path.join(out, 'loss.png')}")
  if args.sample > 0:  # every process runs the decoding program; process 0 prints
    prompt = "def " if args.data is None else tok.decode(rows.inputs[0, :16])
    text = trainer.sample_text(result.model, tok, prompt, args.sample, mesh=mesh, rules=rules)
    if lead:
      print(f"sample:\n{prompt}{text}")
  return 0


def _mesh_text(mesh) -> str:
  return ",".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "one device"
