#!/usr/bin/env bash
# One prepared device run for the attention kernels, under 8 minutes on one H200.
#
#   PYTHONPATH=. bash scripts/device_check.sh [OUT_DIR]
#
# Runs from the checkout with the machine's own Python/JAX (no pip install: the device image has
# no network). Prints versions and the device, runs the AOT compile checks of the GPU kernels
# natively (tests/aot/test_gpu_kernels.py with DSV4_AOT_NATIVE=1: the same Flash/Pro cases, each
# kernel's shared memory, registers and spills, compiled by this GPU's XLA instead of for a
# compile-only H100/H200), then the `gpu`-marked kernel tests natively (not interpreted: the
# Triton kernels compile for the GPU and are checked against the references), then
# scripts/bench_kernels.py (Pallas beside the reference, Flash and Pro shapes). Everything lands
# in OUT_DIR (default: $OUT if set, else benchmarks/results/device_check_<time>).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:-.}:."
# tests/conftest.py defaults JAX_PLATFORMS to cpu (8 simulated devices): name the GPU here, or the
# gpu-marked tests would run on the CPU and skip themselves.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
OUT_DIR="${1:-${OUT:-benchmarks/results/device_check_$(date +%Y%m%d_%H%M%S)}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
exec > >(tee "$OUT_DIR/device_check.log") 2>&1
start=$(date +%s)
echo "== versions"
$PY - <<'PY'
import sys, jax
print("python", sys.version.split()[0], "| jax", jax.__version__)
try:
  import jaxlib; print("jaxlib", jaxlib.__version__)
except Exception as e: print("jaxlib ?", e)
try:
  import triton; print("triton", triton.__version__)
except Exception as e: print("triton (python package) not importable:", e)
print("devices", jax.devices())
d = jax.devices()[0]; print("device_kind", d.device_kind, "| platform", d.platform)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

echo "== AOT compile checks of the GPU kernels, native (DSV4_AOT_NATIVE=1), budget 120 s"
DSV4_AOT_NATIVE=1 timeout 120 $PY -m pytest -q -m aot tests/aot/test_gpu_kernels.py \
  -p no:cacheprovider --junitxml="$OUT_DIR/tests_aot_native.xml" -o addopts="" -rA 2>&1 | tail -40
echo "aot rc=${PIPESTATUS[0]}"

echo "== kernel tests, native (gpu-marked), budget 170 s"
timeout 170 $PY -m pytest -q -m gpu tests/kernels -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_gpu.xml" -o addopts="" -rA 2>&1 | tail -60
echo "tests rc=${PIPESTATUS[0]}"

left=$(( 450 - ($(date +%s) - start) ))
echo "== bench_kernels.py, budget ${left} s (rows print as they finish; partial results kept)"
timeout "$left" $PY scripts/bench_kernels.py --presets flash,pro --seq 8192,32768 --reps 3 \
  --out "$OUT_DIR/bench_kernels.json"
echo "bench rc=$?"
echo "== done in $(( $(date +%s) - start )) s; output in $OUT_DIR"
ls -la "$OUT_DIR"
