"""Shared pieces of the sharding tests: a reduced tiny config, a batch and a plain LM train step.

The step is deliberately simple (next-token cross-entropy, SGD with momentum): it checks that the
sharded and the single-device step agree, not the training recipe (that is deepseek_v4.train's job).
SGD keeps the comparison meaningful: Adam's first step, g / (|g| + eps), amplifies rounding
noise in near-zero gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deepseek_v4

# Every layer kind (sliding + hash routing, CSA + indexer, HCA), 3 layers, short Sinkhorn: the
# sharded-vs-unsharded comparisons do not depend on depth, and CPU compile time does.
CFG = deepseek_v4.tiny(compress_ratios=(0, 4, 16), num_hash_layers=1, hc_sinkhorn_iters=3,
                       num_mtp_layers=0)
# The multi-host test's model: one CSA layer (the compile time of two processes on 2 cores).
CFG_SMALL = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, hc_sinkhorn_iters=2,
                             num_mtp_layers=0)
LR = 0.1


def batch(cfg, B: int = 8, T: int = 32, seed: int = 1) -> dict[str, np.ndarray]:
  ids = np.asarray(jax.random.randint(jax.random.key(seed), (B, T + 1), 0, cfg.vocab_size),
                   np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:]}


def lm_step(model, optimizer, batch, options=None) -> dict:
  """One optimizer step on next-token cross-entropy; updates model and optimizer in place."""

  def loss_fn(model):
    logits = model(batch["inputs"], options=options)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)
    return jnp.mean(nll)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return {"loss": loss}


def optimizer(model) -> nnx.Optimizer:
  return nnx.Optimizer(model, optax.sgd(LR, momentum=0.9), wrt=nnx.Param)


def flat_gradients(optimizer) -> dict[str, np.ndarray]:
  """The gradient of the first step, read from SGD's momentum buffer (0.9 * 0 + g = g)."""
  return {".".join(map(str, path)): np.asarray(jax.device_get(var.get_value()))
          for path, var in nnx.to_flat_state(nnx.state(optimizer))
          if "trace" in path}


def flat_params(model) -> dict[str, np.ndarray]:
  """Every parameter as a host array under its dotted path."""
  return {".".join(map(str, path)): np.asarray(jax.device_get(var.get_value()))
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
