#!/bin/bash
# Training / fine-tuning across hosts under SLURM: one task (process) per node, each owning its 8
# GPUs, every task running the same `python -m deepseek_v4 train` (the one trainer: real data,
# LoRA, freezing, validation, Orbax checkpoints written shard by shard, --resume on any mesh).
#
#   DATA=/shared/sft.jsonl sbatch scripts/slurm_train.sh          # 2 nodes x 8 GPUs, Flash, EP=16
#   DATA=... INIT=/shared/V4-Flash LORA_RANK=8 sbatch scripts/slurm_train.sh   # LoRA fine-tuning
#   NODES_MESH="data=2,fsdp=1,expert=8" sbatch ...                  # another mesh (product = GPUs)
#   RESUME=1 sbatch ...                                             # continue the run in OUT
#
# JAX reads SLURM_* (job id, node list, task count, task id) in jax.distributed.initialize(): the
# coordinator is the first node of the allocation, so no address or port is passed (the train CLI
# detects SLURM). OUT and DATA must be on storage every node sees. See docs/multihost.md.
#SBATCH --job-name=dsv4-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"

DATA=${DATA:?set DATA to a .txt / .jsonl file or folder on shared storage}
OUT=${OUT:-runs/slurm-${SLURM_JOB_ID:-local}}
PRESET=${PRESET:-flash}
MESH=${NODES_MESH:-"fsdp=1,expert=16"}     # docs/plan.md: Flash training, all devices in EP
RULES=${RULES:-fsdp_ep}
INIT=${INIT:-}                              # a hub/transformers folder on shared storage (optional)
# Full fine-tuning of Flash does not fit 16 x H200 with float32 Muon momentum (see docs/plan.md):
# by default the routed experts stay frozen. FREEZE="" trains everything (needs more GPUs).
FREEZE=${FREEZE-'ffn\.experts\.'}
ARGS=()
[[ -n "$FREEZE" ]] && ARGS+=(--freeze "$FREEZE")
[[ -n "$INIT" ]] && ARGS+=(--init "$INIT") || ARGS+=(--preset "$PRESET")
[[ -n "${LORA_RANK:-}" ]] && ARGS+=(--lora-rank "$LORA_RANK")
[[ -n "${RESUME:-}" ]] && ARGS+=(--resume)

# JAX preallocates 75% of GPU memory by default; the plan assumes ~90% usable.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# NCCL over InfiniBand between nodes; adjust the interface names to the cluster.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}

MODEL=(--preset "$PRESET")
[[ -n "$INIT" ]] && MODEL=(--config "$INIT")
python -m deepseek_v4 plan "${MODEL[@]}" --mesh "$MESH" --rules "$RULES" --train \
  --batch "${BATCH:-16}" --seq "${SEQ:-4096}" --capacity-factor "${CAPACITY:-1.25}" \
  ${FREEZE:+--freeze "$FREEZE"} --device-memory 141GB

srun --kill-on-bad-exit=1 python -m deepseek_v4 train \
  --data "$DATA" --out "$OUT" --mesh "$MESH" --rules "$RULES" \
  --batch-size "${BATCH:-16}" --seq-len "${SEQ:-4096}" --steps "${STEPS:-1000}" \
  --capacity-factor "${CAPACITY:-1.25}" --bf16 --remat "${REMAT:-full}" --no-progress \
  "${ARGS[@]}"
