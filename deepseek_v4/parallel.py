"""Building and running a sharded model: parameters born in their shards, jitted forward and
train steps with explicit in/out shardings, and the MoE implementation a mesh and rule table
call for (expert parallelism when the rules split the experts).

Everything here is an explicit argument: the expert-parallel MoE is chosen by `moe_impl(mesh,
rules)` and handed to the model through `Options(moe=...)`, never read from a global.

Usage:
  mesh = sharding.make_mesh(fsdp=4, expert=2)
  model = parallel.init_model(cfg, mesh, "fsdp_ep")
  forward = parallel.jit_forward(model, mesh, "fsdp_ep")
  logits = forward(model, sharding.shard_batch(ids, mesh, "fsdp_ep"))
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from deepseek_v4.layers import moe_ep
from deepseek_v4.layers.moe import MoEImpl
from deepseek_v4.model import Options, Transformer
from deepseek_v4.sharding import (
  Rules,
  batch_sharding,
  get_rules,
  logical_to_spec,
  replicated,
  state_shardings,
  use,
  with_shardings,
)


def moe_impl(mesh: Mesh, rules: str | Rules, *, capacity_factor: float | None = None,
             gmm: str = "auto") -> MoEImpl:
  """The MoE implementation for `rules` on `mesh`: expert-parallel (tokens moved to the experts'
  devices) when the rules split the experts over a mesh axis, else local.

  Args:
    capacity_factor: expert parallelism only. None = dropless; a number c keeps at most
      ceil(c * tokens * k / expert_shards) pairs per source and destination device, later pairs
      dropped (see layers/moe_ep.py).
    gmm: grouped-matmul implementation (kernels_pallas/moe_gmm).
  """
  if capacity_factor is not None and capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be positive (or None: dropless)")
  return MoEImpl(gmm=gmm, expert_parallel=moe_ep.expert_parallel_layout(
    mesh, get_rules(rules), capacity_factor))


def init_model(cfg, mesh: Mesh, rules: str | Rules, *, seed: int = 0):
  """A `Transformer` whose parameters are created directly in their shards (never whole).

  The constructor runs under `jax.jit` with the rule table's shardings as `out_shardings`, so
  each device computes only its slice. Random values equal the unsharded `Transformer(cfg,
  rngs=nnx.Rngs(seed))` (JAX's partitionable threefry makes them layout-independent).
  """

  def build():
    return Transformer(cfg, rngs=nnx.Rngs(seed))

  abstract = nnx.eval_shape(build)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)

def abstract_model(cfg, mesh: Mesh, rules: str | Rules):
  """(graphdef, abstract state) with `jax.ShapeDtypeStruct`s carrying their NamedShardings.

  The restore target for Orbax: arrays land directly in the shards of `mesh` (any mesh shape,
  whatever mesh the checkpoint was written from).
  """

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  return graphdef, with_shardings(abs_state, mesh, rules)

def jit_forward(model, mesh: Mesh, rules: str | Rules, *, capacity_factor: float | None = None):
  """`forward(model, ids) -> logits` jitted with explicit shardings.

  In: parameters by the rule table, ids [B, T] by batch. Out: logits [B, T, V] by (batch, seq,
  vocab) activation rules. Tracing happens under `use(mesh, rules)`, so block boundaries and the
  MoE follow the strategy (`moe_impl`).
  """
  rules = get_rules(rules)
  opts = Options(moe=moe_impl(mesh, rules, capacity_factor=capacity_factor))
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules)
  cache: dict = {}

  def forward(model, ids):
    B, T = ids.shape
    key = (B, T)
    if key not in cache:
      V = model.cfg.vocab_size
      in_ids = batch_sharding(mesh, rules, (B, T))
      out = NamedSharding(mesh, logical_to_spec(("batch", "seq", "vocab"), (B, T, V), mesh,
                                                rules.activations, strict=False))

      def fn(state, ids):
        return nnx.merge(graphdef, state)(ids, opts=opts)

      cache[key] = jax.jit(fn, in_shardings=(shardings, in_ids), out_shardings=out)
    with use(mesh, rules):  # traced under the strategy
      return cache[key](nnx.state(model), ids)

  return forward


def jit_train_step(step: Callable, model, optimizer, mesh: Mesh, rules: str | Rules, *,
                   capacity_factor: float | None = None, donate: bool = True):
  """Wraps `step(model, optimizer, batch, *extra) -> metrics` as a jitted, sharded train step.

  `step` is plain NNX code that updates `model` and `optimizer` in place (not jitted itself), e.g.
  `functools.partial(train._train_step, tcfg=tcfg)`; it receives the MoE implementation of the
  strategy as the keyword `moe` (`moe_impl`). In and out: parameters and optimizer state
  by the rule table (state donated), every batch leaf [B, ...] by the batch axes, `extra`
  arguments (scalars such as a loss weight) replicated; metrics come back replicated. The
  returned `run(model, optimizer, batch, *extra) -> metrics` writes the new state into `model`
  and `optimizer`.
  """
  rules = get_rules(rules)
  moe = moe_impl(mesh, rules, capacity_factor=capacity_factor)
  graphdef, state = nnx.split((model, optimizer))
  shardings = state_shardings(state, mesh, rules)
  compiled: dict = {}

  def fn(state, batch, *extra):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = step(model, optimizer, batch, *extra, moe=moe)
    return nnx.state((model, optimizer)), metrics

  def run(model, optimizer, batch, *extra):
    key = str((jax.tree.map(lambda x: tuple(x.shape), batch), len(extra)))
    if key not in compiled:
      batch_in = jax.tree.map(lambda x: batch_sharding(mesh, rules, x.shape), batch)
      extra_in = (replicated(mesh),) * len(extra)
      compiled[key] = jax.jit(fn, in_shardings=(shardings, batch_in, *extra_in),
                              out_shardings=(shardings, replicated(mesh)),
                              donate_argnums=(0,) if donate else ())
    # Pin every leaf (optimizer counters are born uncommitted on one device), so the first and
    # later calls see the same input layout and share one compilation.
    state = jax.device_put(nnx.state((model, optimizer)), shardings)
    with use(mesh, rules):
      new_state, metrics = compiled[key](state, batch, *extra)
    nnx.update((model, optimizer), new_state)
    return metrics

  return run


