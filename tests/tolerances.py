"""The one table of test tolerances (STYLE.md §8). Never loosen an entry to make a test pass."""

# float32 pure-JAX function vs an independent NumPy re-derivation.
F32_FUNCTION = 1e-5
# float32 module stacks / whole model vs the transformers oracle: relative error of the logits
# (max |ours - ref| / max |ref|).
F32_MODEL_REL = 1e-4
# float32 decode / prefill vs the full forward pass (relative).
F32_DECODE_REL = 1e-5
# grouped matmul: the tiled path vs jax.lax.ragged_dot, float32 (relative; same dot products,
# only the summation order may differ).
F32_GMM_REL = 1e-6
# sharded vs unsharded, float32 (relative).
F32_SHARDED_REL = 1e-5
# bf16 compute vs the float32 reference.
BF16 = 2e-2


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref| (a scale-aware error for whole tensors)."""
  import numpy as np

  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))
# float32 kernel gradients (q, K=V, compressed entries, sink) vs jax.grad of the reference
# (relative).
F32_KERNEL_GRAD_REL = 1e-4
# plan's per-device memory vs XLA's compiled per-device memory (arguments + outputs - aliased +
# temporaries), |XLA / plan - 1|.
PLAN_VS_COMPILER_REL = 0.15
# float32 LoRA gradients of the whole model with the routed experts kept FP4 vs the same LoRA on
# the dequantized float base (relative): the same decoded weights, but the adapters run inside the
# expert loop (x A B) instead of merged into the weight (x (W + A B)^T), and the backward is a
# custom VJP instead of autodiff, so only the summation order differs; through a module stack
# like F32_MODEL_REL.
F32_QLORA_GRAD_REL = 1e-4
# context-parallel (sequence split over a `context` mesh axis) vs the one-device forward, float32
# (relative): the same sums, only the padding and the gathered entries' layout differ, as issue
# 23 asks.
F32_CONTEXT_PARALLEL_REL = 1e-5
# context-parallel gradients vs the one-device gradients, float32 (relative, per parameter): the
# shard_map transposes sum the parameters' per-device gradients in another order.
F32_CONTEXT_PARALLEL_GRAD_REL = 1e-4
# Wilson-Hilferty's chi-square quantile vs tabulated values (relative), df >= 10: the approximation
# errs by 0.6% at df = 10 and less above; the speculative sampling test derives its critical value
# with it (tests/test_speculative.py).
CHI2_QUANTILE_REL = 1e-2
