#!/bin/bash
# Sharded training across hosts under SLURM: one task (process) per node, each owning its 8 GPUs.
#
#   sbatch scripts/slurm_train.sh                        # 2 nodes x 8 GPUs, Flash, EP=16
#   NODES_MESH="data=2,fsdp=1,expert=8" sbatch ...        # another mesh (product = total GPUs)
#
# JAX reads SLURM_* (job id, node list, task count, task id) in jax.distributed.initialize(): the
# coordinator is the first node of the allocation, so no address or port is passed. See
# docs/multihost.md.
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

PRESET=${PRESET:-flash}
MESH=${NODES_MESH:-"fsdp=1,expert=16"}     # docs/plan.md: Flash training, all devices in EP
RULES=${RULES:-fsdp_ep}
CHECKPOINT=${CHECKPOINT:-}                  # a safetensors folder on shared storage (optional)
# Full fine-tuning of Flash does not fit 16 x H200 with float32 Muon momentum (see docs/plan.md):
# by default the routed experts stay frozen. FREEZE="" trains everything (needs more GPUs).
FREEZE=${FREEZE-'ffn\.experts\.'}
FREEZE_ARGS=()
[[ -n "$FREEZE" ]] && FREEZE_ARGS=(--freeze "$FREEZE")

# JAX preallocates 75% of GPU memory by default; the plan assumes ~90% usable.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# NCCL over InfiniBand between nodes; adjust the interface names to the cluster.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}

python -m deepseek_v4 plan --preset "$PRESET" --mesh "$MESH" --rules "$RULES" --train \
  --batch "${BATCH:-16}" --seq "${SEQ:-4096}" --capacity-factor "${CAPACITY:-1.25}" \
  "${FREEZE_ARGS[@]}" --device-memory 141GB

srun --kill-on-bad-exit=1 python scripts/multihost_train.py \
  --preset "$PRESET" --mesh "$MESH" --rules "$RULES" \
  --batch "${BATCH:-16}" --seq "${SEQ:-4096}" --steps "${STEPS:-10}" \
  --capacity-factor "${CAPACITY:-1.25}" "${FREEZE_ARGS[@]}" \
  ${CHECKPOINT:+--checkpoint "$CHECKPOINT"}
