"""Device mesh, logical-axis rule tables, activation constraints and sharded placement (STYLE §5).

This is the only module that names physical mesh axes: `("data", "fsdp", "expert", "tensor")`.

  * data:   pure data parallelism; parameters are replicated along it (across hosts, typically).
  * fsdp:   data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3).
  * expert: expert parallelism; each device holds E / expert routed experts and tokens move to
            them with an all-to-all (layers/moe_ep.py). The axis also carries batch.
  * tensor: Megatron-style tensor parallelism over heads, FFN width and vocabulary.

Layers tag every parameter with logical names (`layers/params.py`: `("expert", "mlp", "embed")`);
a `Rules` table maps each name to mesh axes, one table for parameters and one for activations
(under FSDP the weights' `embed` and the activations' `batch` share the `fsdp` axis, which one
table cannot express). Resolution is strict: every logical name must be in the table, and a mesh
axis whose size does not divide the dimension raises an error naming both numbers. A mesh axis is
used at most once per array: when two dimensions of one parameter map to the same axis, the first
(leftmost) keeps it.

Usage:
  mesh = make_mesh(fsdp=4, expert=2)
  model = init_model(cfg, mesh, "fsdp_ep")          # parameters born sharded
  forward = jit_forward(model, mesh, "fsdp_ep")     # explicit in/out shardings
  logits = forward(model, shard_batch(ids, mesh, "fsdp_ep"))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

AxisRule = tuple[str, "str | tuple[str, ...] | None"]


# ----- rule tables -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rules:
  """A sharding strategy: logical name -> mesh axis (or axes, or None) for params and activations.

  Attributes:
    name: the strategy's name (`fsdp`, `fsdp_tp`, `fsdp_ep`).
    params: rules for parameter (and optimizer-state) dimensions.
    activations: rules for activation dimensions, used by `constrain` and the input shardings.
  """

  name: str
  params: tuple[AxisRule, ...]
  activations: tuple[AxisRule, ...]

  @property
  def expert_parallel(self) -> bool:
    """Routed experts are sharded over a mesh axis, so the MoE dispatches tokens to them."""
    return dict(self.params)["expert"] is not None

  def replace(self, **overrides) -> "Rules":
    return dataclasses.replace(self, **overrides)


# Every logical parameter name used by the layers. Each table lists all of them, so a grep finds
# every placement and a typo in a layer fails loudly.
_PARAM_NAMES = ("vocab", "embed", "embed_in", "q_lora", "q_heads", "head_dim", "o_lora",
                "o_group_in", "heads", "comp_width", "index_heads", "expert", "mlp", "hc_mix",
                "hc_embed")
_ACT_NAMES = ("batch", "seq", "streams", "embed", "heads", "mlp", "vocab", "expert", "cache_seq",
              "head_dim")


def _table(names: Sequence[str], **placed) -> tuple[AxisRule, ...]:
  unknown = set(placed) - set(names)
  if unknown:
    raise ValueError(f"rules name unknown logical axes {sorted(unknown)}")
  return tuple((n, placed.get(n)) for n in names)


# FSDP (ZeRO-3): every large matrix is split along one dimension over `fsdp`; `data` replicates.
RULES_fsdp = Rules(
  name="fsdp",
  params=_table(_PARAM_NAMES, embed="fsdp", q_lora="fsdp", o_lora="fsdp", hc_embed="fsdp"),
  activations=_table(_ACT_NAMES, batch=("data", "fsdp")),
)

# FSDP + tensor parallelism: heads, FFN width, output groups and vocabulary split over `tensor`
# (column-parallel in, row-parallel out), the rest as in FSDP.
RULES_fsdp_tp = Rules(
  name="fsdp_tp",
  params=_table(_PARAM_NAMES, embed="fsdp", q_lora="fsdp", hc_embed="fsdp", o_group_in="fsdp",
                q_heads="tensor", heads="tensor", index_heads="tensor", o_lora="tensor",
                mlp="tensor", vocab="tensor"),
  activations=_table(_ACT_NAMES, batch=("data", "fsdp"), heads="tensor", mlp="tensor",
                     vocab="tensor"),
)

# FSDP + expert parallelism: routed experts split over `expert`, tokens over (data, fsdp, expert);
# the dense parameters are ZeRO-sharded over (fsdp, expert) so no device holds a full copy.
RULES_fsdp_ep = Rules(
  name="fsdp_ep",
  params=_table(_PARAM_NAMES, expert="expert", embed=("fsdp", "expert"),
                q_lora=("fsdp", "expert"), o_lora=("fsdp", "expert"),
                hc_embed=("fsdp", "expert")),
  activations=_table(_ACT_NAMES, batch=("data", "fsdp", "expert"), expert="expert"),
)

RULES: dict[str, Rules] = {r.name: r for r in (RULES_fsdp, RULES_fsdp_tp, RULES_fsdp_ep)}


def get_rules(rules: str | Rules) -> Rules:
  """A `Rules` table from its name (or itself)."""
  if isinstance(rules, Rules):
    return rules
  if rules not in RULES:
    raise ValueError(f"unknown sharding rules {rules!r}; known: {sorted(RULES)}")
  return RULES[rules]


# ----- mesh --------------------------------------------------------------------------------------
def parse_mesh(text: str) -> dict[str, int]:
  """`"fsdp=8,expert=2"` -> {"data": 1, "fsdp": 8, "expert": 2, "tensor": 1}."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in sizes:
      raise ValueError(f"mesh entry {item!r}: expected AXIS=SIZE with AXIS in {MESH_AXES}")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"mesh entry {item!r}: size {value!r} is not an integer") from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ValueError(f"mesh entry {item!r}: size must be >= 1 (or -1 for 'the rest')")
  return sizes


def mesh_shape(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *,
               num_devices: int) -> dict[str, int]:
  """Axis sizes with at most one `-1` filled in; checks the product equals `num_devices`."""
  sizes = dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor)
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {_fmt(sizes)}: at most one axis may be -1")
  bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or (v < 1 and v != -1)}
  if bad:
    raise ValueError(f"mesh {_fmt(sizes)}: axis sizes must be positive integers, got {bad}")
  if free:
    rest = math.prod(v for v in sizes.values() if v != -1)
    if num_devices % rest:
      raise ValueError(f"mesh {_fmt(sizes)}: {num_devices} devices are not divisible by the "
                       f"product {rest} of the other axes")
    sizes[free[0]] = num_devices // rest
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(f"mesh {_fmt(sizes)} has {total} devices, but {num_devices} devices are "
                     f"available; the product of the axis sizes must equal the device count")
  return sizes


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 4-axis mesh `(data, fsdp, expert, tensor)` over all devices (every process's, if several).

  Axis order puts `tensor` innermost, so tensor- and expert-parallel groups stay inside a host
  (NVLink) and `data`, outermost, crosses hosts. One axis may be -1: "all remaining devices".

  Raises:
    ValueError: the product of the sizes differs from the device count (both are named).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(data, fsdp, expert, tensor, num_devices=len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _fmt(sizes: Mapping[str, int]) -> str:
  return ",".join(f"{k}={v}" for k, v in sizes.items())


def _sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
  return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


# ----- logical names -> PartitionSpec ------------------------------------------------------------
def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh | Mapping[str, int], table: Sequence[AxisRule], *,
                    what: str = "array", strict: bool = True) -> P:
  """The PartitionSpec of an array whose dimensions carry logical `names`.

  Args:
    names: one logical name (or None = replicated) per dimension.
    shape: the array's shape (checked for divisibility).
    mesh: a Mesh, or just its axis sizes (`plan` computes shardings without devices).
    table: (logical, mesh axis | axes | None) pairs.
    what: how errors name the array (e.g. its parameter path).
    strict: raise when a mesh axis does not divide its dimension (parameters); when False the
      axis is dropped for that dimension instead (activations such as a decode batch of 1).
  Raises:
    ValueError: a name missing from the table, or (strict) a size that does not divide.
  """
  if len(names) != len(shape):
    raise ValueError(f"{what}: {len(names)} logical names {tuple(names)} for shape {tuple(shape)}")
  rules = dict(table)
  sizes = _sizes(mesh)
  used: set[str] = set()
  spec = []
  for dim, (name, size) in enumerate(zip(names, shape)):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"{what}: logical axis {name!r} is not in the rules table "
                       f"(known: {sorted(rules)})")
    target = rules[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    for a in axes:
      if a not in sizes:
        raise ValueError(f"{what}: rules map {name!r} to mesh axis {a!r}, which the mesh "
                         f"{_fmt(sizes)} does not have")
    n = math.prod(sizes[a] for a in axes)
    if axes and size % n:
      if strict:
        over = (f"mesh axis {axes[0]!r} of size {n}" if len(axes) == 1 else
                f"mesh axes {' x '.join(axes)} of total size {n}")
        raise ValueError(f"{what}: dimension {dim} ({name!r}) has size {size}, which is not "
                         f"divisible by the {over}")
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def variable_names(var: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names a Variable was created with (replicated if it has none)."""
  names = var.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * len(var.shape)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def state_specs(state, mesh: Mesh | Mapping[str, int], rules: str | Rules):
  """The PartitionSpec of every Variable of an nnx State (same tree, Variables hold specs).

  Works for abstract states (`nnx.eval_shape`) and for optimizer states whose Variables copy the
  parameters' `out_sharding` metadata.
  """
  table = get_rules(rules).params

  def one(path, var):
    if not _is_var(var):
      return var
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return var.replace(logical_to_spec(variable_names(var), var.shape, mesh, table, what=name))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def state_shardings(state, mesh: Mesh, rules: str | Rules):
  """The NamedSharding of every Variable of an nnx State."""
  specs = state_specs(state, mesh, rules)
  return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())) if _is_var(v) else v,
                      specs, is_leaf=_is_var)


def flat_shardings(state, mesh: Mesh, rules: str | Rules) -> dict[tuple, NamedSharding]:
  """`{state path: NamedSharding}` for every Variable (the flat form loaders use)."""
  return {path: var.get_value()
          for path, var in nnx.to_flat_state(state_shardings(state, mesh, rules))}


def model_shardings(model: nnx.Module, mesh: Mesh, rules: str | Rules):
  """The NamedSharding of every parameter and variable of `model` (an nnx State)."""
  return state_shardings(nnx.state(model), mesh, rules)


# ----- activation context ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Context:
  mesh: Mesh
  rules: Rules
  capacity_factor: float | None


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("dsv4_sharding",
                                                                           default=None)


@contextlib.contextmanager
def use(mesh: Mesh, rules: str | Rules, *, capacity_factor: float | None = None):
  """Activates `mesh` and `rules` for `constrain` and the expert-parallel MoE while tracing.

  Enter it outside `jax.jit` (it also enters `jax.set_mesh`), around the call that traces.

  Args:
    capacity_factor: expert-parallel MoE only. None = dropless (every token-expert pair is
      computed; the all-to-all buffers have the worst-case size). A number c keeps at most
      ceil(c * tokens * k / expert_shards) pairs per source device and destination device; later
      pairs are dropped (see layers/moe_ep.py).
  """
  if capacity_factor is not None and capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor} must be positive (or None: dropless)")
  token = _CONTEXT.set(_Context(mesh, get_rules(rules), capacity_factor))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _CONTEXT.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout through the activation rules; a no-op without `use(...)`.

  Mesh axes that do not divide a dimension are dropped for it (a decode batch of 1 stays
  replicated instead of failing).
  """
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  spec = logical_to_spec(logical_axes, x.shape, ctx.mesh, ctx.rules.activations,
                         what="activation", strict=False)
  return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """The expert-parallel layout the MoE uses inside `shard_map` (specs come from the rules).

  Attributes:
    mesh: the device mesh.
    token_axes: mesh axes the tokens are split over (the activation rule of "batch").
    expert_axis: the mesh axis the routed experts are split over (the param rule of "expert").
    capacity_factor: None = dropless; see `use`.
  """

  mesh: Mesh
  token_axes: tuple[str, ...]
  expert_axis: str
  capacity_factor: float | None

  @property
  def token_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.token_axes)

  @property
  def expert_shards(self) -> int:
    return self.mesh.shape[self.expert_axis]

  def token_spec(self, ndim: int) -> P:
    """Tokens on dimension 0 split over every token axis, the rest replicated."""
    return P(self.token_axes, *([None] * (ndim - 1)))

  def expert_spec(self, ndim: int) -> P:
    """Experts on dimension 0 split over the expert axis, the rest gathered."""
    return P(self.expert_axis, *([None] * (ndim - 1)))


def expert_parallel() -> ExpertParallel | None:
  """The active expert-parallel layout, or None when the MoE should run its local path."""
  ctx = _CONTEXT.get()
  if ctx is None or not ctx.rules.expert_parallel:
    return None
  expert_axis = dict(ctx.rules.params)["expert"]
  if not isinstance(expert_axis, str):
    raise ValueError(f"rules {ctx.rules.name}: 'expert' must map to one mesh axis for expert "
                     f"parallelism, got {expert_axis!r}")
  batch = dict(ctx.rules.activations)["batch"]
  token_axes = (batch,) if isinstance(batch, str) else tuple(batch or ())
  if expert_axis not in token_axes:
    raise ValueError(f"rules {ctx.rules.name}: the activation 'batch' axes {token_axes} must "
                     f"include the expert axis {expert_axis!r} (tokens are exchanged along it)")
  return ExpertParallel(ctx.mesh, token_axes, expert_axis, ctx.capacity_factor)


# ----- creation and placement --------------------------------------------------------------------
def init_model(cfg, mesh: Mesh, rules: str | Rules, *, seed: int = 0):
  """A `Transformer` whose parameters are created directly in their shards (never whole).

  The constructor runs under `jax.jit` with the rule table's shardings as `out_shardings`, so
  each device computes only its slice. Random values equal the unsharded `Transformer(cfg,
  rngs=nnx.Rngs(seed))` (JAX's partitionable threefry makes them layout-independent).
  """
  from deepseek_v4.model import Transformer

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
  from deepseek_v4.model import Transformer

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abstract)
  return graphdef, with_shardings(abs_state, mesh, rules)


def with_shardings(abs_state, mesh: Mesh, rules: str | Rules):
  """An abstract state whose leaves are ShapeDtypeStructs with the rule table's shardings."""
  shardings = state_shardings(abs_state, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abs_state, shardings)


def put_host_array(value: np.ndarray | Callable[[tuple[slice, ...]], np.ndarray],
                   shape: Sequence[int], dtype, sharding: NamedSharding) -> jax.Array:
  """A global array built from host data, transferring to each device only its own shard.

  Args:
    value: the full host array, or a function returning the block at a tuple of slices (so a
      caller can assemble e.g. a slice of stacked experts without materializing all of them).
    shape / dtype: of the global array.
    sharding: where it goes. On several hosts each process fills only its addressable shards.
  """
  dtype = jnp.dtype(dtype)
  get = value if callable(value) else (lambda idx: value[idx])

  def block(idx):
    return np.asarray(get(idx)).astype(dtype, copy=False)

  return jax.make_array_from_callback(tuple(shape), sharding, block)


# ----- inputs, outputs and jitted entry points ---------------------------------------------------
def activation_sharding(mesh: Mesh, rules: str | Rules, names: Sequence[str | None],
                        shape: Sequence[int], *, what: str = "input") -> NamedSharding:
  """NamedSharding of an activation-like array (strict: a non-dividing batch is an error)."""
  spec = logical_to_spec(names, shape, mesh, get_rules(rules).activations, what=what)
  return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, rules: str | Rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [B, ...] input batch: B over the batch axes, the rest replicated."""
  names = ("batch",) + (None,) * (len(shape) - 1)
  return activation_sharding(mesh, rules, names, shape, what="input batch")


def shard_batch(x: np.ndarray | jax.Array, mesh: Mesh, rules: str | Rules) -> jax.Array:
  """Places a global [B, ...] batch (held whole by every process) into its batch shards."""
  x = np.asarray(x)
  return put_host_array(x, x.shape, x.dtype, batch_sharding(mesh, rules, x.shape))


def jit_forward(model, mesh: Mesh, rules: str | Rules, *, capacity_factor: float | None = None):
  """`forward(model, ids) -> logits` jitted with explicit shardings.

  In: parameters by the rule table, ids [B, T] by batch. Out: logits [B, T, V] by (batch, seq,
  vocab) activation rules. Tracing happens under `use(mesh, rules)`, so block boundaries and the
  MoE follow the strategy.
  """
  rules = get_rules(rules)
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
        return nnx.merge(graphdef, state)(ids)

      cache[key] = jax.jit(fn, in_shardings=(shardings, in_ids), out_shardings=out)
    with use(mesh, rules, capacity_factor=capacity_factor):  # traced under the strategy
      return cache[key](nnx.state(model), ids)

  return forward


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def jit_train_step(step: Callable, model, optimizer, mesh: Mesh, rules: str | Rules, *,
                   capacity_factor: float | None = None, donate: bool = True):
  """Wraps `step(model, optimizer, batch, *extra) -> metrics` as a jitted, sharded train step.

  `step` is plain NNX code that updates `model` and `optimizer` in place (not jitted itself), e.g.
  `functools.partial(train._train_step, tcfg=tcfg)`. In and out: parameters and optimizer state
  by the rule table (state donated), every batch leaf [B, ...] by the batch axes, `extra`
  arguments (scalars such as a loss weight) replicated; metrics come back replicated. The
  returned `run(model, optimizer, batch, *extra) -> metrics` writes the new state into `model`
  and `optimizer`.
  """
  rules = get_rules(rules)
  graphdef, state = nnx.split((model, optimizer))
  shardings = state_shardings(state, mesh, rules)
  compiled: dict = {}

  def fn(state, batch, *extra):
    model, optimizer = nnx.merge(graphdef, state)
    metrics = step(model, optimizer, batch, *extra)
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
    with use(mesh, rules, capacity_factor=capacity_factor):
      new_state, metrics = compiled[key](state, batch, *extra)
    nnx.update((model, optimizer), new_state)
    return metrics

  return run


def cache_shardings(cache, mesh: Mesh, rules: str | Rules):
  """Decode caches: every leaf is batch-major [B, ...]; B over the batch axes where it divides
  (a single sequence stays replicated), the rest replicated (one shared K=V head: nothing to split
  over `tensor`)."""
  table = get_rules(rules).activations

  def one(x):
    names = ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
    return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, table, strict=False))

  return jax.tree.map(one, cache)


def constrain_cache(cache):
  """Pins a decode cache to `cache_shardings` under the active `use(...)`; a no-op without it."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, ctx.mesh, ctx.rules))


def place_batch(x) -> jax.Array:
  """Puts a host [B, ...] array into its batch shards under the active `use(...)` (B over the
  batch axes where it divides, else replicated); without a context, a plain device array."""
  ctx = _CONTEXT.get()
  if ctx is None:
    return jnp.asarray(x)
  x = np.asarray(x)
  names = ("batch",) + (None,) * (x.ndim - 1)
  spec = logical_to_spec(names, x.shape, ctx.mesh, ctx.rules.activations, strict=False)
  return put_host_array(x, x.shape, x.dtype, NamedSharding(ctx.mesh, spec))


# ----- multi-host --------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """Starts JAX's multi-process runtime; returns whether it did. Call before any JAX work.

  * explicit: `coordinator_address="host0:1234", num_processes=N, process_id=i`;
  * under SLURM with more than one task (`srun`): JAX reads the coordinator, process count and
    id from the SLURM_* environment (no arguments needed);
  * otherwise (one process): does nothing.
  After it, `jax.devices()` lists every process's devices and `make_mesh` spans all hosts.
  """
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator_address={coordinator_address!r} needs num_processes "
                       f"and process_id (got {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return True
  return False
