"""Placing arrays by the rule tables: abstract states with shardings, host arrays into their
shards (each device receives only its block), input batches and decode caches."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_v4.sharding.rules import Rules, get_rules, logical_to_spec, state_shardings


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


def activation_sharding(mesh: Mesh, rules: str | Rules, names: Sequence[str | None],
                        shape: Sequence[int], *, what: str = "input") -> NamedSharding:
  """NamedSharding of an activation-like array (strict: a non-dividing batch is an error)."""
  spec = logical_to_spec(names, shape, mesh, get_rules(rules).activations, what=what)
  return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, rules: str | Rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [B, ...] input batch: B over the batch axes, the rest replicated."""
  names = ("batch",) + (None,) * (len(shape) - 1)
  return activation_sharding(mesh, rules, names, shape, what="input batch")


def token_sharding(mesh: Mesh, rules: str | Rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a [B, T, ...] token batch: B over the batch axes (strict), T over the
  sequence's axes (`seq`: the context axis) where they divide it, the rest replicated."""
  batch = batch_sharding(mesh, rules, shape).spec
  if len(shape) < 2:
    return NamedSharding(mesh, batch)
  names = ("batch", "seq") + (None,) * (len(shape) - 2)
  seq = logical_to_spec(names, shape, mesh, get_rules(rules).activations, strict=False)
  return NamedSharding(mesh, P(batch[0], *seq[1:]))


def shard_batch(x: np.ndarray | jax.Array, mesh: Mesh, rules: str | Rules) -> jax.Array:
  """Places a global [B, ...] batch (held whole by every process) into its batch shards."""
  x = np.asarray(x)
  return put_host_array(x, x.shape, x.dtype, batch_sharding(mesh, rules, x.shape))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def cache_shardings(cache, mesh: Mesh, rules: str | Rules):
  """Decode caches (`deepseek_v4.cache.Cache`): every leaf is batch-major [B, ...] (after the
  leading [count] axis of a scanned group's stack); B over the batch axes where it divides (a
  single sequence stays replicated), the rest replicated (one shared K=V head: nothing to split
  over `tensor`)."""
  table = get_rules(rules).activations

  def one(x, lead: int = 0):
    names = (None,) * lead + ("batch",) + (None,) * (x.ndim - 1 - lead) if x.ndim else ()
    return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, table, strict=False))

  groups = tuple(jax.tree.map(lambda x, n=int(g.scanned): one(x, n), slots)
                 for g, slots in zip(cache.layer_groups, cache.groups))
  return cache.replace(groups=groups, lengths=one(cache.lengths))
