"""Logical-axis rule tables and their resolution to PartitionSpecs (STYLE §5).

This package is the only place that names physical mesh axes: `("data", "fsdp", "context",
"expert", "tensor")`.

  * data:   pure data parallelism; parameters are replicated along it (across hosts, typically).
  * fsdp:   data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3).
  * context: context (sequence) parallelism: each device holds a contiguous slice of the sequence
            (activation rule `seq`); attention exchanges boundary tokens and compressed entries
            (layers/context_parallel.py, docs/context_parallel.md). Parameters are replicated
            along it.
  * expert: expert parallelism; each device holds E / expert routed experts and tokens move to
            them with an all-to-all (layers/moe_ep.py). The axis also carries batch.
  * tensor: Megatron-style tensor parallelism over heads, FFN width and vocabulary.

Layers tag every parameter with logical names (`layers/params.py`: `("expert", "mlp", "embed")`);
a `Rules` table maps each name to mesh axes, one table for parameters and one for activations
(under FSDP the weights' `embed` and the activations' `batch` share the `fsdp` axis, which one
table cannot express). Resolution is strict: every logical name must be in the table, and a mesh
axis whose size does not divide the dimension raises an error naming both numbers. A mesh axis is
used at most once per array: when two dimensions of one parameter map to the same axis, the first
(leftmost) keeps it. The stacked axis of scanned layers (`layers`) stays unsharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_v4 import layout

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")

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
                "hc_embed", "layers")
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
  activations=_table(_ACT_NAMES, batch=("data", "fsdp"), seq="context"),
)

# FSDP + tensor parallelism: heads, FFN width, output groups and vocabulary split over `tensor`
# (column-parallel in, row-parallel out), the rest as in FSDP.
RULES_fsdp_tp = Rules(
  name="fsdp_tp",
  params=_table(_PARAM_NAMES, embed="fsdp", q_lora="fsdp", hc_embed="fsdp", o_group_in="fsdp",
                q_heads="tensor", heads="tensor", index_heads="tensor", o_lora="tensor",
                mlp="tensor", vocab="tensor"),
  activations=_table(_ACT_NAMES, batch=("data", "fsdp"), seq="context", heads="tensor",
                     mlp="tensor", vocab="tensor"),
)

# FSDP + expert parallelism: routed experts split over `expert`, tokens over (data, fsdp, expert);
# the dense parameters are ZeRO-sharded over (fsdp, expert) so no device holds a full copy.
RULES_fsdp_ep = Rules(
  name="fsdp_ep",
  params=_table(_PARAM_NAMES, expert="expert", embed=("fsdp", "expert"),
                q_lora=("fsdp", "expert"), o_lora=("fsdp", "expert"),
                hc_embed=("fsdp", "expert")),
  activations=_table(_ACT_NAMES, batch=("data", "fsdp", "expert"), seq="context",
                     expert="expert"),
)

RULES: dict[str, Rules] = {r.name: r for r in (RULES_fsdp, RULES_fsdp_tp, RULES_fsdp_ep)}


def get_rules(rules: str | Rules) -> Rules:
  """A `Rules` table from its name (or itself)."""
  if isinstance(rules, Rules):
    return rules
  if rules not in RULES:
    raise ValueError(f"unknown sharding rules {rules!r}; known: {sorted(RULES)}")
  return RULES[rules]



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
    return var.replace(logical_to_spec(variable_names(var), var.shape, mesh, table,
                                       what=layout.path_name(path)))

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

