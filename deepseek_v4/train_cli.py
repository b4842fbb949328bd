"""`python -m deepseek_v4 train`: pre-train or fine-tune on a text / JSONL file (or the embedded
demo corpus), with checkpoints, metrics.jsonl and loss.png in --out.

  python -m deepseek_v4 train --demo                       # tiny V4 on the stdlib sources, ~4 min
  python -m deepseek_v4 train --preset tiny --data corpus.txt --steps 500 --out runs/a
  python -m deepseek_v4 train ... --out runs/a --resume    # continue exactly where it stopped
  python -m deepseek_v4 train --config ckpt/ --init ckpt/ --data sft.jsonl --lora-rank 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from deepseek_v4 import cli
from deepseek_v4 import data as data_lib
from deepseek_v4 import train, trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
  cli.add_config_arguments(parser)
  parser.set_defaults(preset="tiny")
  p = parser.add_argument
  p("--demo", action="store_true",
    help="the demo: a tiny V4 (every layer kind) on the embedded stdlib corpus, then a sample")
  p("--data", metavar="PATH", help="a .txt / .jsonl file or a folder (default: the demo corpus)")
  p("--tokenizer", default="bytes", metavar="bytes|PATH", help="byte-level, or a tokenizer.json")
  p("--steps", type=cli.positive_int, help="optimizer steps (default: TrainConfig's)")
  p("--out", metavar="DIR",
    help="checkpoints, metrics.jsonl, loss.png (default runs/train; runs/demo with --demo)")
  p("--resume", action="store_true", help="continue from the latest checkpoint in --out")
  p("--init", metavar="DIR", help="start from a transformers/hub checkpoint folder (fine-tuning)")
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
  p("--lora-rank", type=int, help="LoRA fine-tuning with this rank (only adapters train)")
  p("--lora-alpha", type=float)
  p("--lora-targets", help="comma-separated projection names (default wq_a,wq_b,wkv,wo_b)")
  p("--packing", choices=["aligned", "concat", "pad"],
    help="aligned (recommended): documents share rows at aligned offsets with exact per-document "
         "attention masking; concat: documents joined with EOS, no masking (default); pad: one "
         "document per row")
  p("--log-every", type=cli.positive_int)
  p("--save-every", type=cli.positive_int)
  p("--keep", type=cli.positive_int, help="checkpoints to keep")
  p("--train-set", dest="train_overrides", action="append", default=[],
    metavar="FIELD=VALUE", help="override any TrainConfig field (repeatable)")
  p("--sample", type=int, default=200, metavar="N", help="tokens to sample at the end (0 = none)")
  p("--no-progress", action="store_true", help="no progress bar")
  p("--print-groups", action="store_true",
    help="print which optimizer (Muon / AdamW) each trained parameter gets, then exit")


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
           "save_every": "save_every", "keep": "keep_checkpoints"}
  updates = {field: getattr(args, a) for a, field in flags.items() if getattr(args, a) is not None}
  if args.bf16:
    updates["compute_dtype"] = "bfloat16"
  if args.freeze:
    updates["freeze"] = tuple(args.freeze)
  if args.lora_targets:
    updates["lora_targets"] = tuple(t for t in args.lora_targets.split(",") if t)
  return _parse_train_overrides(dataclasses.replace(base, **updates), args.train_overrides)


def _init_from(folder: str):
  from deepseek_v4.checkpoint import load_hf_checkpoint
  from flax import nnx

  def init(model):
    src = load_hf_checkpoint(folder, config=model.cfg, dtype=model.cfg.param_dtype)
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in nnx.to_flat_state(nnx.state(src)):
      if path in flat:
        flat[path].set_value(var[...].astype(flat[path].dtype))
    nnx.update(model, nnx.from_flat_state(flat))

  return init


def run(args: argparse.Namespace) -> int:
  tok = data_lib.get_tokenizer(args.tokenizer)
  if args.demo:
    cfg, base = trainer.demo_configs(tok.vocab_size)
    if args.overrides:
      from deepseek_v4.config import parse_overrides
      cfg = parse_overrides(cfg, args.overrides)
  else:
    cfg, _ = cli.config_from_args(args)
    base = train.TrainConfig()
  tcfg = train_config_from_args(args, base)
  if args.print_groups:
    from flax import nnx

    from deepseek_v4 import optim
    from deepseek_v4.model import Transformer

    model = nnx.eval_shape(lambda: Transformer(train.training_model_config(cfg, tcfg),
                                               rngs=nnx.Rngs(0)))
    if tcfg.lora_rank:
      from deepseek_v4 import lora
      lora.apply_lora(model, tcfg.lora_targets, rank=tcfg.lora_rank, alpha=tcfg.lora_alpha,
                      rngs=nnx.Rngs(0))
    print(optim.format_groups(optim.describe(nnx.state(model, train.trainable_filter(tcfg)),
                                             cfg)))
    return 0
  out = args.out or ("runs/demo" if args.demo else "runs/train")
  # The demo continues (or just re-reports) its own earlier run instead of refusing to start.
  resume = args.resume or (args.demo and args.out is None)
  rows = data_lib.load_rows(args.data, tok, tcfg.seq_len, tcfg.packing,
                            align=data_lib.packing_align(cfg))
  source = args.data or "the embedded demo corpus (Python stdlib sources)"
  print(f"training {cfg.num_layers}-layer V4 (d_model {cfg.d_model}, {cfg.num_experts} experts) "
        f"on {source}: {len(rows)} rows of {tcfg.seq_len} tokens, {tcfg.steps} steps -> "
        f"{out}", file=sys.stderr)
  try:
    result = trainer.fit(cfg, tcfg, rows, out, resume=resume,
                         progress=not args.no_progress,
                         init_model=_init_from(args.init) if args.init else None)
  except trainer.TrainingDiverged as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(trainer.summary(result))
  print(f"metrics: {os.path.join(out, 'metrics.jsonl')}  curve: {os.path.join(out, 'loss.png')}")
  if args.sample > 0:
    prompt = "def " if args.data is None else tok.decode(rows.inputs[0, :16])
    text = trainer.sample_text(result.model, tok, prompt, args.sample)
    print(f"sample:\n{prompt}{text}")
  return 0
