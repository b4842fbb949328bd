"""Expert-parallel routed experts (docs/architecture.md#moe-output computed across devices):
dispatch, compute, combine.

Each device holds T_l tokens (tokens are split over every batch axis, the expert axis included)
and E_l = E / P routed experts (P = size of the expert axis). Inside `jax.shard_map`:

  1. dispatch: every token-expert pair goes to the device holding its expert, with its local
     expert id; the routing weight stays home;
  2. compute: the received rows are sorted by local expert and run through the same grouped SwiGLU
     as the local MoE (layers/moe_ffn.py, any grouped-matmul implementation);
  3. combine: the outputs travel back to their senders, which add them per token, weighted, in
     float32.

Two all-to-all paths (`ExpertParallel.all_to_all` says which runs):

  "ragged" (GPU, TPU): the pairs are sorted by expert, hence by destination, and
    `jax.lax.ragged_all_to_all` sends each destination exactly its pairs; receivers pack what
    arrives from every source into one buffer of R rows. Dropless R = P * T_l * min(k, E_l) (every
    source could send all its pairs here); with a capacity factor c, R = min(that,
    ceil(c * T_l * k)), filled in source order, each source's pairs in (expert, token) order, and
    the pairs past R are dropped. The send side holds only T_l * k rows. XLA:CPU has no
    implementation of ragged-all-to-all, so CPU runs the next path.
  "buffer" (CPU): fixed [P, C, D] send and receive buffers (C slots per source and destination)
    and two `jax.lax.all_to_all`. Dropless C = T_l * min(k, E_l); with a factor c,
    C = min(that, ceil(c * T_l * k / P)), and per (source, destination) the first C pairs in
    token order (token-major, then the router's top-k order) are kept.

A dropped pair contributes zero: its token keeps its other experts, the shared expert and the
residual, and the combine weights are not renormalized. With `capacity_factor=None` (the default)
nothing is dropped and both paths equal the local MoE.

The layout comes from the rule tables (`expert_parallel_layout(mesh, rules)`) and is passed in
explicitly (`MoEImpl(expert_parallel=...)` in layers/moe.py); nothing is read from a context.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from deepseek_v4 import sharding
from deepseek_v4.layers import moe_ffn

AllToAll = Literal["ragged", "buffer"]
ALL_TO_ALL = ("ragged", "buffer")

# The collective of the ragged path, looked up at call time (tests substitute a CPU emulation).
ragged_all_to_all = jax.lax.ragged_all_to_all


# ----- layout ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """The expert-parallel layout the MoE uses inside `shard_map` (specs come from the rules).

  Attributes:
    mesh: the device mesh.
    token_axes: mesh axes the tokens are split over (the activation rule of "batch").
    expert_axis: the mesh axis the routed experts are split over (the param rule of "expert").
    capacity_factor: None = dropless; see the module docstring.
    all_to_all: "ragged" (`jax.lax.ragged_all_to_all`, GPU/TPU) or "buffer" (fixed buffers and
      `jax.lax.all_to_all`, every backend).
  """

  mesh: Mesh
  token_axes: tuple[str, ...]
  expert_axis: str
  capacity_factor: float | None = None
  all_to_all: AllToAll = "buffer"
  seq_axes: tuple[str, ...] = ()  # the token axes that split the sequence (context parallelism)

  def __post_init__(self):
    if self.all_to_all not in ALL_TO_ALL:
      raise ValueError(f"all_to_all={self.all_to_all!r} must be one of {ALL_TO_ALL}")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      raise ValueError(f"capacity_factor={self.capacity_factor} must be positive (or None: "
                       f"dropless)")

  @property
  def token_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.token_axes)

  @property
  def expert_shards(self) -> int:
    return self.mesh.shape[self.expert_axis]

  def for_rows(self, rows: int) -> "ExpertParallel":
    """The layout for tokens flattened from [rows, T]. Batch-major (the batch axes, then the
    sequence's) when the batch axes divide the rows, as the activation [rows, T] is split;
    otherwise the activation keeps its rows whole (`sharding.logical_to_spec`, non-strict) and
    only the sequence is split, so the sequence's axes lead: each device's tokens are then a
    part of its own slice, and nothing is gathered along the sequence to reach them."""
    batch = tuple(a for a in self.token_axes if a not in self.seq_axes)
    if not self.seq_axes or rows % math.prod(self.mesh.shape[a] for a in batch) == 0:
      return self
    return dataclasses.replace(self, token_axes=(*self.seq_axes, *batch))

  def token_spec(self, ndim: int) -> P:
    """Tokens on dimension 0 split over every token axis, the rest replicated."""
    return P(self.token_axes, *([None] * (ndim - 1)))

  def expert_spec(self, ndim: int) -> P:
    """Experts on dimension 0 split over the expert axis, the rest gathered."""
    return P(self.expert_axis, *([None] * (ndim - 1)))


def default_all_to_all(platform: str) -> AllToAll:
  """"ragged" where XLA implements ragged-all-to-all (GPU, TPU), "buffer" elsewhere (CPU)."""
  return "ragged" if platform in ("gpu", "cuda", "rocm", "tpu") else "buffer"


def expert_parallel_layout(mesh: Mesh, rules: str | sharding.Rules,
                           capacity_factor: float | None = None,
                           all_to_all: AllToAll | None = None) -> ExpertParallel | None:
  """The expert-parallel layout of `rules` on `mesh`, or None when the rules keep experts whole.

  Args:
    mesh: the device mesh the model runs on.
    rules: a rule table (or its name); its param rule for "expert" names the expert axis and its
      activation rule for "batch" the token axes, which must include the expert axis.
    capacity_factor: None = dropless; see the module docstring.
    all_to_all: the path to run; default: "ragged" when the mesh's devices are GPUs or TPUs,
      "buffer" on CPU.
  Raises:
    ValueError: an expert rule naming several axes, or token axes without the expert axis.
  """
  r = sharding.get_rules(rules)
  expert_axis = dict(r.params)["expert"]
  if expert_axis is None:
    return None
  if not isinstance(expert_axis, str):
    raise ValueError(f"rules {r.name}: 'expert' must map to one mesh axis for expert "
                     f"parallelism, got {expert_axis!r}")
  def axes(name):
    target = dict(r.activations)[name]
    return (target,) if isinstance(target, str) else tuple(target or ())

  # Tokens [B*T] flattened from [B, T]: batch-major, so the batch axes, then the sequence's
  # (context parallelism), are the token dimension's axes.
  batch = axes("batch")
  seq = tuple(a for a in axes("seq") if a in mesh.shape and mesh.shape[a] > 1)
  token_axes = batch + seq
  if expert_axis not in batch:
    raise ValueError(f"rules {r.name}: the activation 'batch' axes {batch} must include the "
                     f"expert axis {expert_axis!r} (tokens are exchanged along it)")
  if all_to_all is None:
    all_to_all = default_all_to_all(mesh.devices.flat[0].platform)
  return ExpertParallel(mesh, token_axes, expert_axis, capacity_factor, all_to_all, seq)


# ----- sizes -------------------------------------------------------------------------------------
def capacity(tokens: int, k: int, local_experts: int, shards: int,
             capacity_factor: float | None) -> int:
  """Slots C per (source, destination) device pair of the buffer path."""
  dropless = tokens * min(k, local_experts)
  if capacity_factor is None:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * tokens * k / shards)))


def ragged_rows(tokens: int, k: int, local_experts: int, shards: int,
                capacity_factor: float | None) -> int:
  """Rows R of the ragged path's receive buffer (per device)."""
  dropless = shards * tokens * min(k, local_experts)
  if capacity_factor is None:
    return dropless
  return max(1, min(dropless, math.ceil(capacity_factor * tokens * k)))


# ----- the per-device bodies ---------------------------------------------------------------------
def dispatch_slots(dest: Int[Array, "N"], shards: int, cap: int) -> tuple[Array, Array]:
  """Row of each pair in the [P * C] send buffer (P * C = dropped) and the keep mask.

  A pair's slot is its rank among earlier pairs with the same destination (a stable sort, no
  one-hot matrix).
  """
  _, _, slot = moe_ffn.sort_by(dest, shards)
  keep = slot < cap
  return jnp.where(keep, dest * cap + slot, shards * cap), keep


def local_experts(x: Float[Array, "R D"], le: Int[Array, "R"], w1: Array, w2: Array, w3: Array,
                  limit: float, gmm: str) -> Array:
  """Grouped SwiGLU experts over received rows in place; `le == E_l` marks an empty row (0)."""
  El = w1.shape[0]
  order, counts, _ = moe_ffn.sort_by(le, El + 1)  # rows grouped by local expert, empty rows last
  y = moe_ffn.expert_ffn(x[order], counts[:El], w1, w2, w3, limit, gmm)  # [R, D]
  return jnp.zeros_like(y).at[order].set(y, unique_indices=True)


def buffer_shard(x: Float[Array, "T D"], idx: Int[Array, "T X"], w: Float[Array, "T X"],
                 w1: Array, w2: Array, w3: Array, *, axis_name: str, shards: int, limit: float,
                 capacity_factor: float | None, gmm: str) -> Array:
  """Per-device body of the "buffer" path. Returns [T, D] float32."""
  T, D = x.shape
  X = idx.shape[1]
  El = w1.shape[0]
  cap = capacity(T, X, El, shards, capacity_factor)
  e = idx.reshape(-1)  # [T*X] global expert ids, token-major
  row, keep = dispatch_slots(e // El, shards, cap)
  n = shards * cap
  send_x = jnp.zeros((n, D), x.dtype).at[row].set(x[jnp.arange(T * X) // X], mode="drop")
  send_e = jnp.full((n,), El, jnp.int32).at[row].set((e % El).astype(jnp.int32), mode="drop")
  a2a = functools.partial(jax.lax.all_to_all, axis_name=axis_name, split_axis=0, concat_axis=0,
                          tiled=True)
  # Block s of the received buffers is what device s sent here.
  y = local_experts(a2a(send_x), a2a(send_e), w1, w2, w3, limit, gmm)  # [n, D]
  back = a2a(y)  # each output back in its sender's slot
  got = jnp.where(keep[:, None], back[jnp.minimum(row, n - 1)], 0)
  return moe_ffn.combine(got, w)


def ragged_shard(x: Float[Array, "T D"], idx: Int[Array, "T X"], w: Float[Array, "T X"],
                 w1: Array, w2: Array, w3: Array, *, axis_name: str, shards: int, limit: float,
                 capacity_factor: float | None, gmm: str) -> Array:
  """Per-device body of the "ragged" path. Returns [T, D] float32."""
  T, D = x.shape
  X = idx.shape[1]
  El = w1.shape[0]
  R = ragged_rows(T, X, El, shards, capacity_factor)
  e = idx.reshape(-1)  # [T*X] global expert ids, token-major
  order, counts, _ = moe_ffn.sort_by(e, El * shards)  # by expert, hence by destination
  send_x = x[order // X]  # [T*X, D]
  send_e = (e[order] % El).astype(jnp.int32)
  me = jax.lax.axis_index(axis_name)
  sent = jax.lax.all_gather(counts.reshape(shards, El).sum(1), axis_name)  # [P_src, P_dst]
  src_off = jnp.cumsum(sent, axis=1) - sent  # where each block starts in its sender's buffer
  dst_off = jnp.cumsum(sent, axis=0) - sent  # where it lands in its receiver's buffer
  kept = jnp.clip(R - dst_off, 0, sent)  # capacity: sources later in order lose the overflow
  go = functools.partial(ragged_all_to_all, input_offsets=src_off[me], send_sizes=kept[me],
                         output_offsets=dst_off[me], recv_sizes=kept[:, me], axis_name=axis_name)
  recv_x = go(send_x, jnp.zeros((R, D), x.dtype))
  recv_e = go(send_e, jnp.full((R,), El, jnp.int32))  # unfilled rows stay El: empty
  y = local_experts(recv_x, recv_e, w1, w2, w3, limit, gmm)  # [R, D]
  back = ragged_all_to_all(y, jnp.zeros((T * X, D), y.dtype), dst_off[:, me], kept[:, me],
                           src_off[:, me], kept[me], axis_name=axis_name)  # dropped pairs: 0
  got = jnp.zeros_like(back).at[order].set(back, unique_indices=True)  # token-major again
  return moe_ffn.combine(got, w)


# ----- entry -------------------------------------------------------------------------------------
def routed_experts_ep(x: Float[Array, "N D"], idx: Int[Array, "N X"], w: Float[Array, "N X"],
                      w1: Array, w2: Array, w3: Array, limit: float, ep: ExpertParallel,
                      gmm: str = "auto") -> Array:
  """`moe.routed_experts` across devices, on the layout `ep`; [N, D] float32.

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
  shard = ragged_shard if ep.all_to_all == "ragged" else buffer_shard
  body = functools.partial(shard, axis_name=ep.expert_axis, shards=ep.expert_shards,
                           limit=limit, capacity_factor=ep.capacity_factor, gmm=gmm)
  tok, exp = ep.token_spec(2), ep.expert_spec(3)
  y = jax.shard_map(body, mesh=ep.mesh, in_specs=(tok, tok, tok, exp, exp, exp),
                    out_specs=tok)(x, idx, w, w1, w2, w3)
  return y[:N]
