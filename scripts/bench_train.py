"""Training throughput on CPU: our jitted train step vs transformers' PyTorch training step.

Both train the same config (default: the tiny preset without MTP, which transformers lacks) from
the same weights on the same batch, in float32, in this process; the two are timed alternately
`--repeats` times and the medians kept (the machine may be shared):
  ours:         train.train_step (V4 losses, backward, clipping, AdamW, router-bias update)
  transformers: DeepseekV4ForCausalLM forward with labels, backward, clip, torch.optim.AdamW
The ratio compares the same optimizer (AdamW); ours with DeepSeek's Muon is timed too (at small
batches its Newton-Schulz iterations, O(n^3) per matrix, dominate the step).
Compilation / warm-up steps are excluded from the timing. Prints tokens/s and the ratio and writes
benchmarks/results/bench_train.json.

With `--mesh`, the real trainer (`trainer.fit`, the same loop `train --mesh` runs) trains the same
model on the same rows on one device and on a mesh of `--devices` simulated CPU devices (XLA's
host platform split into that many devices), `--repeats` times each, alternately; the tokens/s of
the steps after the first (which compiles) are kept, medians reported. Writes
benchmarks/results/bench_train_mesh.json.

  python scripts/bench_train.py [--preset tiny] [--set field=value ...] [--batch 8] [--seq 128]
  python scripts/bench_train.py --mesh data=2,fsdp=2,expert=2 --rules fsdp_ep [--devices 8]
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

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks", "results", "bench_train.json")


# A wider variant (`--wide`): d_model 256, 16 experts. The MoE's grouped matmuls run on the tiled
# CPU path (kernels_pallas/moe_gmm; `jax.lax.ragged_dot` would be a masked product over every
# expert on XLA:CPU).
WIDE = ["d_model=256", "num_heads=8", "head_dim=128", "rope_dim=64", "q_lora_rank=128",
        "o_groups=4", "o_lora_rank=64", "moe_inter_dim=256", "num_experts=16",
        "experts_per_token=4", "index_heads=8", "index_head_dim=64", "window=32",
        "vocab_size=4096"]

# V4-shaped routing at small width (`--moe64`): WIDE with 64 routed experts, top-6 (as
# Flash routes 6 of 256) and the shared expert.
MOE64 = WIDE + ["num_experts=64", "experts_per_token=6", "num_shared_experts=1",
                "moe_inter_dim=128"]


def bench_ours(model, opt, tcfg, ids, targets, steps, warmup):
  import jax

  from deepseek_v4 import train

  batch = train.as_batch(ids, targets)
  for _ in range(warmup):
    jax.block_until_ready(train.train_step(model, opt, batch, 0.3, tcfg=tcfg))
  t = time.perf_counter()
  for _ in range(steps):
    m = train.train_step(model, opt, batch, 0.3, tcfg=tcfg)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps, float(m["loss"])


def bench_hf(ref, opt, ids, steps, warmup):
  import torch

  ref.train()
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


def bench_mesh(args) -> int:
  """One device vs a mesh, through `trainer.fit` (see the module docstring)."""
  import jax

  from deepseek_v4 import data as data_lib
  from deepseek_v4 import distributed, hugepages, train, trainer
  from deepseek_v4.config import PRESETS, parse_overrides

  if args.wide or args.moe64:
    args.overrides = (MOE64 if args.moe64 else WIDE) + args.overrides
  cfg = parse_overrides(PRESETS[args.preset](), args.overrides)
  cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, args.seq))
  mesh, rules = distributed.mesh_and_rules(args.mesh, args.rules)
  steps = args.steps + 1  # the first step compiles and is not timed
  tcfg = train.TrainConfig(seq_len=args.seq, batch_size=args.batch, steps=steps,
                           learning_rate=1e-3, warmup_steps=1, log_every=1)
  toks = np.random.default_rng(0).integers(2, cfg.vocab_size, 64 * args.seq + 1).astype(np.int32)
  rows = data_lib.pack([(toks, np.ones(len(toks), bool))], args.seq)
  runs = {"one device": {}, f"mesh {args.mesh} ({args.rules})": dict(mesh=mesh, rules=rules)}
  rates = {name: [] for name in runs}
  losses = {}
  for _ in range(args.repeats):
    for name, placement in runs.items():
      result = trainer.fit(cfg, tcfg, rows, progress=False, log=lambda s: None, **placement)
      rates[name].append(result.tokens_per_s)
      losses[name] = result.losses
  med = {name: float(np.median(r)) for name, r in rates.items()}
  one, on_mesh = med.values()
  res = {"config": f"{args.preset} {' '.join(args.overrides)}".strip(), "batch": args.batch,
         "seq": args.seq, "steps_timed": args.steps, "devices": jax.device_count(),
         "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
         "tokens_per_s": med, "tokens_per_s_all": rates, "mesh_over_one_device": on_mesh / one,
         "losses": losses, **hugepages.status()}
  print(f"config {res['config']}  batch {args.batch} x seq {args.seq}, {args.steps} timed steps, "
        f"{jax.device_count()} {res['platform']} devices on {os.cpu_count()} cores")
  print(f"  {'run':44s} {'tokens/s':>10s}")
  for name, rate in med.items():
    print(f"  {name:44s} {rate:10,.0f}")
  print(f"  mesh / one device: {on_mesh / one:.2f}x")
  out = args.json if args.json != DEFAULT_OUT else DEFAULT_OUT.replace(".json", "_mesh.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(res, f, indent=2)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      help="ModelConfig overrides")
  parser.add_argument("--wide", action="store_true", help="the d_model-256 variant (WIDE)")
  parser.add_argument("--moe64", action="store_true",
                      help="the d_model-256 variant with 64 experts, top-6 (MOE64)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-muon", action="store_true", help="skip the Muon timing of ours")
  parser.add_argument("--json", metavar="PATH", default=DEFAULT_OUT,
                      help="where to write the results as JSON (default %(default)s)")
  parser.add_argument("--mesh", metavar="AXIS=SIZE,...",
                      help="compare trainer.fit on one device with this mesh (e.g. "
                           "data=2,fsdp=2,expert=2) instead of ours vs transformers")
  parser.add_argument("--rules", default="fsdp_ep", help="sharding rules of --mesh")
  parser.add_argument("--devices", type=int, default=8,
                      help="simulated CPU devices for --mesh (default 8)")
  args = parser.parse_args(argv)
  if args.mesh:
    # Before JAX starts its backend: the host platform split into --devices devices.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    return bench_mesh(args)

  import jax
  import optax
  import torch
  from flax import nnx
  from transformers import DeepseekV4ForCausalLM

  from deepseek_v4 import Transformer, hugepages, train
  from deepseek_v4.checkpoint import save_hf_checkpoint
  from deepseek_v4.config import PRESETS, parse_overrides

  if args.wide or args.moe64:
    args.overrides = (MOE64 if args.moe64 else WIDE) + args.overrides
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

  # Same optimizer on both sides (AdamW, same hyperparameters), plus ours with DeepSeek's Muon.
  adamw = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(tcfg.learning_rate, b1=0.9, b2=0.95, eps=1e-8,
                                  weight_decay=0.1))
  model_muon = Transformer(cfg, rngs=nnx.Rngs(0))  # same weights, own buffers (donation)
  opt = nnx.Optimizer(model, adamw, wrt=nnx.Param)
  opt_muon = train.make_optimizer(model_muon, tcfg)
  torch_opt = torch.optim.AdamW(ref.parameters(), lr=tcfg.learning_rate, betas=(0.9, 0.95),
                                eps=1e-8, weight_decay=0.1)
  ours_t, muon_t, hf_t = [], [], []
  for r in range(args.repeats):
    warm = args.warmup if r == 0 else 0
    t_ours, loss_ours = bench_ours(model, opt, tcfg, ids, targets, args.steps, warm)
    t_hf, loss_hf = bench_hf(ref, torch_opt, ids, args.steps, warm)
    ours_t.append(t_ours)
    hf_t.append(t_hf)
    if not args.no_muon:
      muon_t.append(bench_ours(model_muon, opt_muon, tcfg, ids, targets, args.steps, warm)[0])
  t_ours, t_hf = float(np.median(ours_t)), float(np.median(hf_t))
  t_muon = float(np.median(muon_t)) if muon_t else None
  res = {
    "config": f"{args.preset} {' '.join(args.overrides)}".strip(), "batch": args.batch,
    "seq": args.seq, "devices": f"jax {jax.devices()[0].platform} / torch {torch.get_num_threads()}"
                                f" threads",
    "ours_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_hf,
    "ratio": t_hf / t_ours, "ours_step_s": t_ours, "transformers_step_s": t_hf,
    "ours_last_loss": loss_ours, "transformers_last_loss": loss_hf,
    "ours_step_s_all": ours_t, "transformers_step_s_all": hf_t,
    "ours_muon_tokens_per_s": tokens / t_muon if t_muon else None, "ours_muon_step_s_all": muon_t,
    **hugepages.status(),
  }
  print(f"config {res['config']}  batch {args.batch} x seq {args.seq}  ({res['devices']})")
  print(f"  ours (JAX, jit, AdamW):              {res['ours_tokens_per_s']:10,.0f} tokens/s "
        f"({t_ours * 1e3:.1f} ms/step)")
  print(f"  transformers (PyTorch eager, AdamW): "
        f"{res['transformers_tokens_per_s']:10,.0f} tokens/s ({t_hf * 1e3:.1f} ms/step)")
  print(f"  ratio ours / transformers (same optimizer): {res['ratio']:.2f}x")
  if t_muon:
    print(f"  ours with DeepSeek's Muon + AdamW:    {tokens / t_muon:10,.0f} tokens/s "
          f"({t_muon * 1e3:.1f} ms/step; Newton-Schulz is O(n^3) per matrix, amortized only by "
          "large batches)")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == "__main__":
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  sys.exit(main())
