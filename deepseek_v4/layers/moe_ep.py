"""Expert-parallel routed experts (spec §4.5 computed across devices): dispatch, compute, combine.

Each device holds T_l tokens (tokens are split over every batch axis, the expert axis included)
and E_l = E / P routed experts (P = size of the expert axis). Inside `jax.shard_map`:

  1. dispatch: every token-expert pair goes to the device holding its expert. Pairs are packed
     into a send buffer [P, C, D] (C slots per destination) and exchanged with one
     `jax.lax.all_to_all` over the expert axis; the local expert id and routing weight travel
     with them;
  2. compute: the received pairs are sorted by local expert and run as grouped matmuls
     (`jax.lax.ragged_dot`), SwiGLU and the routing weight in between, as the local path does;
  3. combine: a second all_to_all returns each output to the slot it came from, and the pairs
     are summed per token in float32.

Dropped-token policy (capacity). With `capacity_factor=None` (the default) C = T_l * min(k, E_l),
the most pairs one device can ever send to another, so nothing is dropped and the result equals
the local MoE. With a factor c, C = min(that, ceil(c * T_l * k / P)): per (source, destination)
pair of devices the first C pairs in token order (token-major, then the router's top-k order)
are kept and the rest dropped. A dropped pair contributes zero; its token keeps its other
experts, the shared expert and the residual, and the combine weights are not renormalized.

The all-to-all is capacity-based (fixed shapes): `jax.lax.ragged_all_to_all` would avoid the
padding but has no XLA:CPU implementation, and the tests run on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from deepseek_v4.layers import moe  # (circular: moe imports this module; used at call time)


def capacity(tokens: int, k: int, local_experts: int, shards: int,
             capacity_factor: float | None) -> int:
  """Slots C per (source, destination) device pair; see the module docstring."""
  dropless = tokens * min(k, local_experts)
  if capacity_factor is None:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * tokens * k / shards)))


def dispatch_slots(dest: Int[Array, "N"], shards: int, cap: int) -> tuple[Array, Array]:
  """Row of each pair in the [P * C] send buffer (P * C = dropped) and the keep mask.

  A pair's slot is its rank among earlier pairs with the same destination.
  """
  onehot = (dest[:, None] == jnp.arange(shards)[None, :]).astype(jnp.int32)  # [N, P]
  slot = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1
  keep = slot < cap
  return jnp.where(keep, dest * cap + slot, shards * cap), keep


def local_experts(x: Float[Array, "R D"], le: Int[Array, "R"], w: Float[Array, "R"], w1: Array,
                  w2: Array, w3: Array, limit: float) -> Array:
  """Grouped SwiGLU experts over received rows; `le == E_l` marks an empty slot (output 0)."""
  E = w1.shape[0]
  dt = x.dtype
  order = jnp.argsort(le, stable=True)  # rows grouped by local expert, empty slots last
  sizes = jnp.bincount(le, length=E).astype(jnp.int32)
  xs = x[order]
  g = jax.lax.ragged_dot(xs, jnp.swapaxes(w1, 1, 2).astype(dt), sizes)  # [R, F]
  v = jax.lax.ragged_dot(xs, jnp.swapaxes(w3, 1, 2).astype(dt), sizes)
  h = moe.swiglu(g.astype(jnp.float32), v.astype(jnp.float32), limit)
  h = (h * w[order][:, None]).astype(dt)  # routing weight before w2, as the local path
  y = jax.lax.ragged_dot(h, jnp.swapaxes(w2, 1, 2).astype(dt), sizes)  # [R, D]
  y = jnp.where((le[order] < E)[:, None], y, jnp.zeros_like(y))
  return jnp.zeros_like(y).at[order].set(y)


def ep_shard(x: Float[Array, "T D"], idx: Int[Array, "T X"], w: Float[Array, "T X"], w1: Array,
             w2: Array, w3: Array, *, axis_name: str, shards: int, limit: float,
             capacity_factor: float | None) -> Array:
  """Per-device body: dispatch, local grouped experts, combine. Returns [T, D] float32."""
  T, D = x.shape
  X = idx.shape[1]
  El = w1.shape[0]
  cap = capacity(T, X, El, shards, capacity_factor)
  e = idx.reshape(-1)  # [T*X] global expert ids, token-major
  token = jnp.arange(T * X) // X
  row, keep = dispatch_slots(e // El, shards, cap)
  n = shards * cap
  send_x = jnp.zeros((n, D), x.dtype).at[row].set(x[token], mode="drop")
  send_e = jnp.full((n,), El, jnp.int32).at[row].set((e % El).astype(jnp.int32), mode="drop")
  send_w = jnp.zeros((n,), w.dtype).at[row].set(w.reshape(-1), mode="drop")
  a2a = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0,
                          tiled=True)
  # Block s of the received buffers is what device s sent here.
  y = local_experts(a2a(send_x), a2a(send_e), a2a(send_w), w1, w2, w3, limit)  # [n, D]
  back = a2a(y)  # each output back in its sender's slot
  got = back[jnp.minimum(row, n - 1)].astype(jnp.float32)
  got = jnp.where(keep[:, None], got, 0.0)
  return jnp.zeros((T, D), jnp.float32).at[token].add(got)


def routed_experts_ep(x: Float[Array, "N D"], idx: Int[Array, "N X"], w: Float[Array, "N X"],
                      w1: Array, w2: Array, w3: Array, limit: float, ep) -> Array:
  """`routed_experts` across devices; `ep` is a `sharding.ExpertParallel` (specs, axes).

  Tokens are padded to a multiple of the token shards (padding rows carry weight 0) and the
  result is sliced back, so any token count works (e.g. decoding one sequence).
  """
  N, D = x.shape
  E = w1.shape[0]
  if E % ep.expert_shards:
    raise ValueError(f"num_experts={E} is not divisible by the expert mesh axis "
                     f"{ep.expert_axis!r} of size {ep.expert_shards}")
  pad = -N % ep.token_shards
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    idx = jnp.pad(idx, ((0, pad), (0, 0)))
    w = jnp.pad(w, ((0, pad), (0, 0)))
  body = functools.partial(ep_shard, axis_name=ep.expert_axis, shards=ep.expert_shards,
                           limit=limit, capacity_factor=ep.capacity_factor)
  tok, exp = ep.token_spec(2), ep.expert_spec(3)
  y = jax.shard_map(body, mesh=ep.mesh, in_specs=(tok, tok, tok, exp, exp, exp),
                    out_specs=tok)(x, idx, w, w1, w2, w3)
  return y[:N]
