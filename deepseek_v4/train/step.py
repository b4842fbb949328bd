"""The training step (docs/architecture.md#training): building a model and its optimizer, and
`train_step` (one `nnx.jit` with the model and optimizer donated), which differentiates `loss_fn`
with respect to the trainable parameters, accumulates gradients over micro-batches, applies the
optimizer (clipping, Muon/AdamW, schedule), then moves each learned router's balancing bias one
notch toward balance (a state update, not a gradient step; docs/architecture.md#load-balancing).
It returns a dict of scalar metrics. `train_step_fn` is the same step unjitted, for callers that
jit it themselves (`parallel.jit_train_step`, the aot compiler).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepseek_v4 import losses
from deepseek_v4.config import ModelConfig
from deepseek_v4.model import Transformer
from deepseek_v4.options import Options
from deepseek_v4.train.config import TrainConfig, lora_spec, training_model_config, wsd_schedule
from deepseek_v4.train.loss import loss_fn
from deepseek_v4.train.optimizer import freeze_mask, make_optimizer


# ----- construction -------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, tcfg: TrainConfig, rngs=nnx.Rngs,
                options: Options = Options()) -> Transformer:
  """The freshly initialized model a run trains (LoRA-wrapped if asked, built with `options`);
  `rngs(seed)` makes the key streams (`deepseek_v4.abstract.ShapeOnlyRngs` for a shapes-only
  build). `parallel.init_sharded(lambda: build_model(...), mesh, rules)` builds it in its shards."""
  from deepseek_v4 import lora as lora_lib

  return lora_lib.build_model(training_model_config(cfg, tcfg), lora_spec(tcfg),
                              rngs=rngs(tcfg.seed), adapter_rngs=rngs(tcfg.seed + 1),
                              options=options)


def build(cfg: ModelConfig, tcfg: TrainConfig, rngs=nnx.Rngs, options: Options = Options()
          ) -> tuple[Transformer, nnx.Optimizer]:
  """`build_model` and its optimizer."""
  model = build_model(cfg, tcfg, rngs, options)
  return model, make_optimizer(model, tcfg)


# ----- the step -----------------------------------------------------------------------------------
def _grads(model: Transformer, wrt, batch: dict, tcfg: TrainConfig, mtp_weight,
           options: Options | None = None):
  """Loss, aux and gradients, averaged over `grad_accum` micro-batches (a lax.scan)."""
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def pure_loss(params, mb):
    return loss_fn(nnx.merge(graphdef, params, rest), mb, tcfg, mtp_weight, options)

  grad_fn = jax.value_and_grad(pure_loss, has_aux=True)
  A = tcfg.grad_accum
  if A == 1:
    (loss, aux), grads = grad_fn(params, batch)
    return loss, aux, grads
  micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)

  def body(carry, mb):
    (loss, aux), g = grad_fn(params, mb)
    acc = jax.tree.map(jnp.add, carry, (loss, aux, g))
    return acc, None

  (l0, a0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
  (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
  scale = lambda x: x / A if jnp.issubdtype(x.dtype, jnp.floating) else x
  aux = {k: (v if k in ("loads", "tokens") else scale(v)) for k, v in aux.items()}
  return loss / A, aux, jax.tree.map(scale, grads)


def update_router_biases(model: Transformer, loads: jax.Array, speed: float) -> None:
  """Aux-loss-free balancing after the step: one sign step per learned router
  (docs/architecture.md#load-balancing).

  `loads` [n, E] has one row per learned-routing layer in official order, then the MTP block."""
  cfg = model.cfg
  row = {i: n for n, i in enumerate(i for i in range(cfg.num_layers) if not cfg.is_hash_layer(i))}
  update = jax.vmap(losses.router_bias_update, in_axes=(0, 0, None))
  for group in model.groups:
    spec = group.spec
    for s, block in enumerate(group.blocks):
      if spec.hashed[s]:
        continue
      rows = jnp.asarray([row[spec.layer(r, s)] for r in range(spec.count)])
      bias = block.ffn.gate.bias
      if spec.scanned:
        bias.set_value(update(bias[...], loads[rows], speed))
      else:
        bias.set_value(losses.router_bias_update(bias[...], loads[rows[0]], speed))
  for k, m in enumerate(model.mtp):
    bias = m.ffn.gate.bias
    bias.set_value(losses.router_bias_update(bias[...], loads[len(row) + k], speed))


def _apply_update(model: Transformer, optimizer: nnx.Optimizer, grads, loads: jax.Array,
                  tcfg: TrainConfig) -> None:
  """The optimizer step, then the router-bias step (in place)."""
  optimizer.update(model, grads)
  if loads.shape[0] and model.cfg.router_bias:
    update_router_biases(model, loads, tcfg.bias_update_speed)


def train_step_fn(model: Transformer, optimizer: nnx.Optimizer, batch: dict, mtp_weight,
                  tcfg: TrainConfig, options: Options | None = None,
                  apply=True) -> dict[str, jax.Array]:
  """`train_step` unjitted (arguments and metrics as documented there): for callers that trace it
  under their own jit, e.g. `parallel.jit_train_step(functools.partial(train_step_fn, tcfg=tcfg),
  ...)`."""
  loss, aux, grads = _grads(model, optimizer.wrt, batch, tcfg, mtp_weight, options)
  grads = freeze_mask(grads, tcfg, model.cfg, model.options.scan_layers)
  lr = wsd_schedule(tcfg)(optimizer.step[...])
  grad_norm = optax.tree.norm(grads)
  loads = aux["loads"]
  if apply is True:  # a Python constant: the update is unconditional
    _apply_update(model, optimizer, grads, loads, tcfg)
  else:  # traced: one compiled program serves both the step and the metrics-only probe
    graphdef, state = nnx.split((model, optimizer))

    def update(state):
      m, o = nnx.merge(graphdef, state)
      _apply_update(m, o, grads, loads, tcfg)
      return nnx.state((m, o))

    nnx.update((model, optimizer), jax.lax.cond(apply, update, lambda s: s, state))
  if loads.shape[0]:
    imbalance = jnp.mean(jax.vmap(losses.load_imbalance)(loads))
  else:
    imbalance = jnp.ones(())
  return dict(loss=loss, lm_loss=aux["lm_loss"], mtp_loss=aux["mtp_loss"],
              balance_loss=aux["balance_loss"], indexer_loss=aux["indexer_loss"],
              grad_norm=grad_norm, lr=lr, load_imbalance=imbalance, tokens=aux["tokens"])


train_step = nnx.jit(train_step_fn, static_argnames=("tcfg", "options"),
                     donate_argnames=("model", "optimizer"))
train_step.__doc__ = """One optimizer step (jitted; `model` and `optimizer` are donated).

Args:
  model, optimizer: updated in place.
  batch: see `loss_fn`; leading axis batch_size (split into grad_accum micro-batches).
  mtp_weight: lambda of the MTP loss for this step (a traced scalar: no recompiles).
  tcfg: run settings (static).
  options: the run's `Options` (static; default `model.options`), e.g. `parallel.options(mesh,
    rules)`; the indexer stage and remat come from `tcfg`.
  apply: False computes the metrics without changing the model or optimizer. Pass it as a bool
    in every call (True / False) and both share one compiled program (`trainer.fit` measures
    the parameters it is about to save this way); left at its default, the update is
    unconditional.
Returns:
  {loss, lm_loss, mtp_loss, balance_loss, indexer_loss, grad_norm (before clipping), lr (of this
  step), load_imbalance (max/mean expert load, mean over learned layers), tokens}.
"""


def as_batch(inputs: np.ndarray, targets: np.ndarray, input_mask: np.ndarray | None = None,
             segments: np.ndarray | None = None, positions: np.ndarray | None = None
             ) -> dict[str, jax.Array]:
  """Device arrays in the layout `loss_fn` reads."""
  out = {"inputs": jnp.asarray(inputs, jnp.int32), "targets": jnp.asarray(targets, jnp.int32)}
  if input_mask is not None:
    out["input_mask"] = jnp.asarray(input_mask, jnp.float32)
  if segments is not None:
    out["segments"] = jnp.asarray(segments, jnp.int32)
  if positions is not None:
    out["positions"] = jnp.asarray(positions, jnp.int32)
  return out
