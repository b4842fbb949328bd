"""Sharded training steps on one or many hosts (the program scripts/slurm_train.sh launches).

    # one host, 8 GPUs:
    python scripts/multihost_train.py --preset tiny --mesh fsdp=2,expert=4 --rules fsdp_ep
    # several hosts: one process per host, under SLURM (auto-detected) or explicitly:
    python scripts/multihost_train.py --coordinator host0:1234 --num-processes 2 --process-id 0 \
        --preset flash --checkpoint /ckpt/flash --mesh fsdp=2,expert=8 --rules fsdp_ep

Every process runs this same program. It starts JAX's distributed runtime, builds the global mesh,
creates (or loads, with --checkpoint) the model directly in its shards, and runs `--steps` steps
of train.py's step (Muon/AdamW, V4 losses) jitted with explicit shardings. The data are random
tokens: this checks the setup and measures step time; real data loading is train_cli.py's.
Process 0 prints the metrics.
"""

from __future__ import annotations

import argparse
import functools
import time


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--coordinator", help="host:port of process 0 (default: SLURM auto-detection)")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
  p.add_argument("--checkpoint", help="hub/transformers safetensors folder, loaded sharded")
  p.add_argument("--mesh", default="fsdp=-1", help="e.g. data=2,fsdp=4,expert=2 (-1: the rest)")
  p.add_argument("--rules", default="fsdp", help="fsdp | fsdp_tp | fsdp_ep")
  p.add_argument("--capacity-factor", type=float, default=None, help="EP MoE; default dropless")
  p.add_argument("--batch", type=int, default=8, help="global rows per step")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--freeze", action="append", default=[], metavar="REGEX",
                 help="parameters not trained (TrainConfig.freeze), e.g. 'ffn\\.experts\\.'")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  from deepseek_v4 import parallel, sharding

  sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from deepseek_v4 import config, train
  from deepseek_v4.checkpoint import load_hf_checkpoint

  cfg = config.parse_overrides(config.PRESETS[args.preset](), args.overrides)
  mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh))
  lead = jax.process_index() == 0
  if lead:
    print(f"{jax.process_count()} processes, {jax.device_count()} devices, mesh "
          f"{dict(mesh.shape)}, rules {args.rules}", flush=True)
  if args.checkpoint:
    model = load_hf_checkpoint(args.checkpoint, jnp.dtype(cfg.dtype), config=cfg, mesh=mesh,
                               rules=args.rules)
  else:
    model = parallel.init_model(cfg, mesh, args.rules)
  tcfg = train.TrainConfig(seq_len=args.seq, batch_size=args.batch, steps=args.steps,
                           learning_rate=args.lr, warmup_steps=1, freeze=tuple(args.freeze))
  opt = train.make_optimizer(model, tcfg)
  step = parallel.jit_train_step(functools.partial(train.train_step_fn, tcfg=tcfg), model, opt,
                                 mesh, args.rules,
                                 options=parallel.options(mesh, args.rules,
                                                          capacity_factor=args.capacity_factor))
  rng = np.random.default_rng(0)  # the same global batch on every process; each keeps its shards
  for i in range(args.steps):
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
    batch = {k: sharding.shard_batch(v, mesh, args.rules) for k, v in batch.items()}
    t = time.perf_counter()
    metrics = step(model, opt, batch, jnp.float32(tcfg.mtp_weight))
    loss = float(metrics["loss"])  # replicated: readable on every process
    if lead:
      print(f"step {i}: loss {loss:.4f}  grad_norm {float(metrics['grad_norm']):.3f}  "
            f"{time.perf_counter() - t:.2f}s", flush=True)


if __name__ == "__main__":
  main()
