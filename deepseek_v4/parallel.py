"""Building and running a sharded model: parameters born in their shards, jitted forward and
train steps with explicit in/out shardings, and the MoE implementation a mesh and rule table
call for (expert parallelism when the rules split the experts).

Everything here is an explicit argument: `options(mesh, rules)` builds the whole `Options` of a
mesh once (the expert-parallel MoE when the rules split the experts) and every entry point takes
it whole, never from a global.

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

from deepseek_v4 import abstract
from deepseek_v4.layers import context_parallel, moe_ep
from deepseek_v4.layers.moe import MoEImpl
from deepseek_v4.model import Transformer
from deepseek_v4.options import Options
from deepseek_v4.sharding import (
  Rules,
  get_rules,
  logical_to_spec,
  replicated,
  state_shardings,
  token_sharding,
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


def options(mesh: Mesh, rules: str | Rules, *, capacity_factor: float | None = None,
            gmm: str = "auto", **fields) -> Options:
  """The whole `Options` of a run on `mesh` under `rules`: the MoE implementation of the
  strategy (`moe_impl`), the context-parallel layout when the rules split the sequence over a
  mesh axis (`context_parallel_layout`), and the other `fields` (kernel_impl, attn_block, ...)."""
  return Options(moe=moe_impl(mesh, rules, capacity_factor=capacity_factor, gmm=gmm),
                 context=context_parallel.context_parallel_layout(mesh, get_rules(rules)),
                 **fields)


def mesh_options(model, mesh: Mesh, rules: str | Rules) -> Options:
  """The model's own options with the MoE of the mesh and, when the rules split the sequence
  over a mesh axis, its context-parallel layout."""
  return model.options.replace(moe=moe_impl(mesh, rules),
                               context=context_parallel.context_parallel_layout(mesh, rules))


def _mesh_options(model, mesh: Mesh, rules, options: Options | None) -> Options:
  """`options` as given, else `mesh_options`."""
  return mesh_options(model, mesh, rules) if options is None else options


def init_model(cfg, mesh: Mesh, rules: str | Rules, *, seed: int = 0,
               options: Options = Options()):
  """A `Transformer` whose parameters are created directly in their shards (never whole).

  The constructor runs under `jax.jit` with the rule table's shardings as `out_shardings`, so
  each device computes only its slice. Random values equal the unsharded `Transformer(cfg,
  rngs=nnx.Rngs(seed))` (JAX's partitionable threefry makes them layout-independent). The model
  is built with `options` (its build-time fields shape the tree; see `Transformer`).
  """

  def build():
    return Transformer(cfg, rngs=nnx.Rngs(seed), options=options)

  graphdef, abs_state = nnx.split(abstract.model(cfg, options=options))
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def init_sharded(make: Callable[[], nnx.Module], mesh: Mesh, rules: str | Rules) -> nnx.Module:
  """`make()` (a module constructor taking no arguments, e.g. a LoRA-wrapped training model)
  with every parameter created directly in its shards by the rule table, as `init_model` does
  for a plain `Transformer`: the values equal an unsharded `make()`."""
  graphdef, abs_state = nnx.split(nnx.eval_shape(make))
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_model(cfg, mesh: Mesh, rules: str | Rules, *, options: Options = Options()):
  """(graphdef, abstract state) with `jax.ShapeDtypeStruct`s carrying their NamedShardings.

  The restore target for Orbax: arrays land directly in the shards of `mesh` (any mesh shape,
  whatever mesh the checkpoint was written from).
  """
  graphdef, abs_state = nnx.split(abstract.model(cfg, options=options))
  return graphdef, with_shardings(abs_state, mesh, rules)


def forward_program(graphdef, shardings, mesh: Mesh, rules: str | Rules, shape: tuple[int, int],
                    vocab_size: int, *, options: Options, keep_unused: bool = False):
  """`fn(state, ids) -> logits` jitted with explicit shardings, for ids of `shape` [B, T].

  In: `state` (of `graphdef`) by `shardings`, ids by (batch, seq). Out: logits [B, T, V] by
  (batch, seq, vocab) activation rules: with a `context` axis (rule `seq`) and T divisible by it,
  the sequence stays split from the ids to the logits (docs/context_parallel.md). Works from a
  real model's split or an abstract one (`abstract.model`), which is how the ahead-of-time
  compiler (deepseek_v4/aot) builds the same program. Trace it under `use(mesh, rules)`.
  `keep_unused`: keep parameters the forward never reads (the MTP block) as arguments, as a run
  holds them.
  """
  rules = get_rules(rules)
  in_ids = token_sharding(mesh, rules, shape)
  out = NamedSharding(mesh, logical_to_spec(("batch", "seq", "vocab"), (*shape, vocab_size), mesh,
                                            rules.activations, strict=False))

  def fn(state, ids):
    return nnx.merge(graphdef, state)(ids, options=options)

  return jax.jit(fn, in_shardings=(shardings, in_ids), out_shardings=out, keep_unused=keep_unused)


def jit_forward(model, mesh: Mesh, rules: str | Rules, *, options: Options | None = None):
  """`forward(model, ids) -> logits` jitted with explicit shardings (`forward_program`).

  In: parameters by the rule table, ids [B, T] by batch. Out: logits [B, T, V] by (batch, seq,
  vocab) activation rules. Tracing happens under `use(mesh, rules)`, so block boundaries and the
  MoE follow the strategy. `options`: the run's whole `Options` (e.g. `options(mesh, rules,
  capacity_factor=...)`); default the model's own with the MoE of the mesh (`moe_impl`).
  """
  rules = get_rules(rules)
  run_options = _mesh_options(model, mesh, rules, options)
  graphdef, state = nnx.split(model)
  shardings = state_shardings(state, mesh, rules)
  cache: dict = {}

  def forward(model, ids):
    key = tuple(ids.shape)
    if key not in cache:
      cache[key] = forward_program(graphdef, shardings, mesh, rules, key, model.cfg.vocab_size,
                                   options=run_options)
    with use(mesh, rules):  # traced under the strategy
      return cache[key](nnx.state(model), ids)

  return forward


def train_step_program(step: Callable, graphdef, shardings, mesh: Mesh, rules: str | Rules,
                       batch, n_extra: int, *, options: Options, donate: bool = True,
                       keep_unused: bool = False, state_layouts: str = "default"):
  """`fn(state, batch, *extra) -> (new state, metrics)` jitted with explicit shardings.

  `state` is the split (model, optimizer) of `graphdef`, placed by `shardings`; `batch` a pytree
  of [B, ...] arrays or `jax.ShapeDtypeStruct`s (only shapes are read; each leaf is split by the
  batch axes); `n_extra` replicated scalars.
  `step(model, optimizer, batch, *extra, options=options)` updates both in place. Works from a real or an
  abstract (`abstract.train_state`) model and optimizer. Trace it under `use(mesh, rules)`.

  `state_layouts`: "default" (row-major) or "auto": XLA picks the state's device layouts, in and
  out alike (`jax.experimental.layout.Layout.AUTO`), so scanned weights are stored the way the
  layer loop reads them instead of transposed whole before it (docs/plan.md "Context
  parallelism"); a caller then places the state in `compiled.input_formats`.
  """
  rules = get_rules(rules)
  if state_layouts not in ("default", "auto"):
    raise ValueError(f"state_layouts={state_layouts!r}; expected 'default' or 'auto'")
  if state_layouts == "auto":
    from jax.experimental.layout import Format, Layout

    shardings = jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings)

  def fn(state, batch, *extra):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = step(model, optimizer, batch, *extra, options=options)
    return nnx.state((model, optimizer)), metrics

  batch_in = jax.tree.map(lambda x: token_sharding(mesh, rules, x.shape), batch)
  extra_in = (replicated(mesh),) * n_extra
  return jax.jit(fn, in_shardings=(shardings, batch_in, *extra_in),
                 out_shardings=(shardings, replicated(mesh)),
                 donate_argnums=(0,) if donate else (), keep_unused=keep_unused)


def jit_train_step(step: Callable, model, optimizer, mesh: Mesh, rules: str | Rules, *,
                   options: Options | None = None, donate: bool = True):
  """Wraps `step(model, optimizer, batch, *extra) -> metrics` as a jitted, sharded train step
  (`train_step_program`).

  `step` is plain NNX code that updates `model` and `optimizer` in place (not jitted itself), e.g.
  `functools.partial(train.train_step_fn, tcfg=tcfg)`; it receives the run's whole `Options` as the
  keyword `options` (default: the model's own with the MoE of the mesh, `moe_impl`). In and out: parameters and optimizer state
  by the rule table (state donated), every batch leaf [B, ...] by the batch axes, `extra`
  arguments (scalars such as a loss weight) replicated; metrics come back replicated. The
  returned `run(model, optimizer, batch, *extra) -> metrics` writes the new state into `model`
  and `optimizer`.
  """
  rules = get_rules(rules)
  run_options = _mesh_options(model, mesh, rules, options)
  graphdef, state = nnx.split((model, optimizer))
  shardings = state_shardings(state, mesh, rules)
  compiled: dict = {}

  def run(model, optimizer, batch, *extra):
    key = str((jax.tree.map(lambda x: tuple(x.shape), batch), len(extra)))
    if key not in compiled:
      compiled[key] = train_step_program(step, graphdef, shardings, mesh, rules, batch,
                                         len(extra), options=run_options, donate=donate)
    # Pin every leaf (optimizer counters are born uncommitted on one device), so the first and
    # later calls see the same input layout and share one compilation.
    state = jax.device_put(nnx.state((model, optimizer)), shardings)
    with use(mesh, rules):
      new_state, metrics = compiled[key](state, batch, *extra)
    nnx.update((model, optimizer), new_state)
    return metrics

  return run


