"""Training throughput on CPU: our jitted train step vs transformers' PyTorch training step.

Both train the same config (default: the tiny preset without MTP, which transformers lacks) from
the same weights on the same batch, in float32, one after the other in this process:
  ours:         train.train_step (loss, backward, clipping, Muon + AdamW, router-bias update)
  transformers: DeepseekV4ForCausalLM forward with labels, backward, clip, torch.optim.AdamW
Compilation / warm-up steps are excluded from the timing. Prints tokens/s and the ratio.

  python scripts/bench_train.py [--preset tiny] [--set field=value ...] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def bench_ours(model, tcfg, ids, targets, steps, warmup):
  import jax

  from deepseek_v4 import Transformer, train

  opt = train.make_optimizer(model, tcfg)
  batch = train.as_batch(ids, targets)
  for _ in range(warmup):
    m = train.train_step(model, opt, batch, 0.3, tcfg=tcfg)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    m = train.train_step(model, opt, batch, 0.3, tcfg=tcfg)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps, float(m["loss"])


def bench_hf(ref, ids, steps, warmup, lr):
  import torch

  ref.train()
  opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
  x = torch.as_tensor(ids, dtype=torch.long)

  def step():
    opt.zero_grad(set_to_none=True)
    out = ref(input_ids=x, labels=x)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    opt.step()
    return out.loss.item()

  for _ in range(warmup):
    step()
  t = time.perf_counter()
  for _ in range(steps):
    loss = step()
  return (time.perf_counter() - t) / steps, loss


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--set", dest="overrides", action="append", default=[])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
  args = parser.parse_args(argv)

  import jax
  import torch
  from flax import nnx
  from transformers import DeepseekV4ForCausalLM

  from deepseek_v4 import Transformer, train
  from deepseek_v4.checkpoint import save_hf_checkpoint
  from deepseek_v4.config import PRESETS, parse_overrides

  cfg = parse_overrides(PRESETS[args.preset](num_mtp_layers=0), args.overrides)
  cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, args.seq))
  tcfg = train.TrainConfig(seq_len=args.seq, batch_size=args.batch, learning_rate=1e-3,
                           warmup_steps=1, decay_fraction=0.0, steps=10**6)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  with tempfile.TemporaryDirectory() as folder:
    save_hf_checkpoint(model, folder)
    ref = DeepseekV4ForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager")
  rng = np.random.default_rng(0)
  ids = rng.integers(2, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
  targets = np.concatenate([ids[:, 1:], np.full((args.batch, 1), -1, np.int32)], axis=1)
  tokens = args.batch * (args.seq - 1)

  t_ours, loss_ours = bench_ours(model, tcfg, ids, targets, args.steps, args.warmup)
  t_hf, loss_hf = bench_hf(ref, ids, args.steps, args.warmup, tcfg.learning_rate)
  res = {
    "config": f"{args.preset} {' '.join(args.overrides)}".strip(), "batch": args.batch,
    "seq": args.seq, "devices": f"jax {jax.devices()[0].platform} / torch {torch.get_num_threads()}"
                                f" threads",
    "ours_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_hf,
    "ratio": t_hf / t_ours, "ours_step_s": t_ours, "transformers_step_s": t_hf,
    "ours_last_loss": loss_ours, "transformers_last_loss": loss_hf,
  }
  print(f"config {res['config']}  batch {args.batch} x seq {args.seq}  ({res['devices']})")
  print(f"  ours (JAX, jit, Muon+AdamW):        {res['ours_tokens_per_s']:10,.0f} tokens/s "
        f"({t_ours * 1e3:.1f} ms/step)")
  print(f"  transformers (PyTorch eager, AdamW): "
        f"{res['transformers_tokens_per_s']:10,.0f} tokens/s ({t_hf * 1e3:.1f} ms/step)")
  print(f"  ratio ours / transformers: {res['ratio']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
