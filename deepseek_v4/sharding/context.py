"""The activation-layout context: `use(mesh, rules)` while tracing pins activations at block
boundaries (`constrain`), decode caches and input batches to the rule table's layout.

It only chooses layouts (as flax's `logical_axis_rules` does); it never changes what is computed.
Implementation choices (such as the expert-parallel MoE) are explicit arguments
(`deepseek_v4.parallel.options`), never read from here.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from deepseek_v4.sharding.placement import cache_shardings, put_host_array
from deepseek_v4.sharding.rules import Rules, get_rules, logical_to_spec


@dataclasses.dataclass(frozen=True)
class _Context:
  mesh: Mesh
  rules: Rules


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("dsv4_sharding",
                                                                           default=None)


@contextlib.contextmanager
def use(mesh: Mesh, rules: str | Rules):
  """Activates `mesh` and `rules` for `constrain` while tracing (enter it outside `jax.jit`,
  around the call that traces; it also enters `jax.set_mesh`)."""
  token = _CONTEXT.set(_Context(mesh, get_rules(rules)))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _CONTEXT.reset(token)


@contextlib.contextmanager
def suspended():
  """No activation layouts while tracing inside it: for per-device code under a fully manual
  `jax.shard_map` (layers/context_parallel.py), where a whole-mesh constraint has no meaning."""
  token = _CONTEXT.set(None)
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def current() -> _Context | None:
  """The active `use(mesh, rules)` context (mesh and rules), or None: what a trace will read."""
  return _CONTEXT.get()


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
