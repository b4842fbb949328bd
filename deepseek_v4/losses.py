"""Training objectives of DeepSeek-V4 (docs/architecture.md#load-balancing, #indexer-training,
#mtp-loss): next-token and MTP cross-entropy, the sequence-wise balance loss, expert loads for the
aux-loss-free bias, and the lightning-indexer KL loss (V3.2 recipe,
docs/architecture.md#indexer-training).

Every function here is pure JAX; `deepseek_v4.train` wires them to the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.common import PAD_POSITION, pad_to_blocks, to_blocks
from kernels_pallas.sparse_attention import sources


# ----- cross-entropy ------------------------------------------------------------------------------
def chunked_cross_entropy(h: Float[Array, "B T D"], head: Float[Array, "V D"],
                          targets: Int[Array, "B T"], chunk: int = 1024) -> tuple[Array, Array]:
  """Sum of next-token losses and the number of scored tokens (targets < 0 are ignored).

  The float32 logits exist for `chunk` tokens at a time, never as [B, T, V]: the chunk function
  is rematerialized, so the backward pass recomputes each chunk's logits instead of storing them.
  The head matmul runs in float32, as the model's `logits` does (docs/architecture.md#lm-head).
  """
  B, T, D = h.shape
  n = B * T
  chunk = min(chunk, n)
  flat_h, _ = pad_to_blocks(h.reshape(1, n, D), chunk, 1, 0)
  flat_t, _ = pad_to_blocks(targets.reshape(1, n), chunk, 1, -1)
  w = head.astype(jnp.float32)

  @jax.checkpoint
  def one(args):
    hc, tc = args  # [1, chunk, D], [1, chunk]
    logits = jnp.einsum("BTD,VD->BTV", hc.astype(jnp.float32), w)  # [1, chunk, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(tc, 0)[..., None], axis=-1)[..., 0]
    valid = tc >= 0
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), jnp.sum(valid)

  sums, counts = jax.lax.map(one, (to_blocks(flat_h, chunk), to_blocks(flat_t, chunk)))
  return jnp.sum(sums), jnp.sum(counts)


def mean_cross_entropy(h, head, targets, chunk: int = 1024) -> Array:
  """Mean next-token loss over the scored tokens (0 if there are none)."""
  total, count = chunked_cross_entropy(h, head, targets, chunk)
  return total / jnp.maximum(count, 1)


# ----- MoE balance --------------------------------------------------------------------------------
def expert_loads(experts: Int[Array, "B T X"], mask: Array, num_experts: int) -> Array:
  """Tokens routed to each expert, [E] float32 (padding tokens excluded)."""
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [B, T, X, E]
  return jnp.einsum("BTXE,BT->E", onehot, mask.astype(jnp.float32))


def balance_loss(scores: Float[Array, "B T E"], experts: Int[Array, "B T X"], mask: Array,
                 alpha: float) -> Array:
  """Sequence-wise balance loss (DeepSeek-V3 form, docs/architecture.md#load-balancing), averaged
  over sequences.

  Per sequence of T tokens: `f_e = E / (K T) sum_t 1[e in TopK(t)]` (a constant),
  `P_e = 1/T sum_t s_{e,t} / sum_e' s_{e',t}`, `L = alpha sum_e f_e P_e`. Padding is excluded
  from T.
  """
  B, T, E = scores.shape
  K = experts.shape[-1]
  m = mask.astype(jnp.float32)
  ntok = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B]
  counts = jnp.einsum("BTXE,BT->BE", jax.nn.one_hot(experts, E, dtype=jnp.float32), m)
  f = jax.lax.stop_gradient(counts * E / (K * ntok[:, None]))  # [B, E]
  s = scores / jnp.maximum(jnp.sum(scores, axis=-1, keepdims=True), 1e-20)
  p = jnp.einsum("BTE,BT->BE", s, m) / ntok[:, None]
  return alpha * jnp.mean(jnp.sum(f * p, axis=-1))


def router_bias_update(bias: Float[Array, "E"], load: Float[Array, "E"], speed: float) -> Array:
  """Aux-loss-free balancing (docs/architecture.md#load-balancing):
  `b_e += speed * sign(mean_load - load_e)`."""
  return bias + speed * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)


def load_imbalance(load: Float[Array, "E"]) -> Array:
  """max load / mean load (1 = perfectly balanced)."""
  return jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9)


# ----- lightning-indexer loss ---------------------------------------------------------------------
def indexer_kl(target: Float[Array, "... P"], logits: Float[Array, "... P"],
               valid: Array) -> tuple[Array, Array]:
  """Sum over queries of `KL(p || softmax(I))` restricted to the valid entries, and the number of
  queries with at least one valid entry.

  `target` is any non-negative weight over entries (it is L1-normalized here over the valid
  ones); `logits` are the indexer scores I. A query without valid entries contributes 0.
  """
  p = jnp.where(valid, target, 0.0)
  has = jnp.any(valid, axis=-1)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  logq = jax.nn.log_softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
  logp = jnp.log(jnp.where(p > 0, p, 1.0))
  kl = jnp.sum(jnp.where(valid & (p > 0), p * (logp - logq), 0.0), axis=-1)
  return jnp.sum(jnp.where(has, kl, 0.0)), jnp.sum(has)


def indexer_kl_from_attention(
  q: Float[Array, "B T N H"], lse: Float[Array, "B T N"],
  entries: sources.VisibleEntries | sources.PickedEntries, iq: Float[Array, "B T I J"],
  iw: Float[Array, "B T I"], ikeys: Float[Array, "B C J"], positions: Int[Array, "B T"], *,
  scale: float, block: int, segments: Int[Array, "B T"] | None = None,
) -> Array:
  """KL of the indexer toward the main attention of one CSA layer
  (docs/architecture.md#indexer-training): [sum over queries, number of queries with an entry].

  The target for query t is the main attention's probability mass on each compressed entry, from
  the ONE joint softmax over window keys + entries + sink (docs/architecture.md#core-attention):
  `exp(scale q.c - lse)` with the attention's own log-normalizer `lse` (so nothing of the window
  side is recomputed), summed over heads and L1-normalized over the entries. The indexer
  distribution is `softmax_s(I_{t,s})` with `I = sum_h w_h ReLU(q^I_h . k^I_s)`.

  Args:
    q, lse: the attention's roped queries and log-normalizer (the target side; the caller stops
      their gradient).
    entries: the attention's compressed key source (its `KeySources.entries`; the caller stops
      its gradient): `VisibleEntries` = the dense warm-up stage (every visible entry,
      `s < floor((p_t + 1) / m)`); `PickedEntries` = the sparse stage's picks [B, T, P]
      (-1 = none), and both distributions are restricted to them. Their `segments` (packed
      documents): entries of another document are invalid.
    iq, iw, ikeys: indexer queries, head weights (scaled) and keys (the trained side).
    positions: row positions of the queries.
    segments: packed documents: each query's document id.
  """
  comp, comp_seg = entries.kv, entries.segments
  idx = entries.picks if isinstance(entries, sources.PickedEntries) else None
  B, T, N, H = q.shape
  C = comp.shape[1]
  block = min(block, T)
  f32 = jnp.float32
  pad = lambda a, v: to_blocks(pad_to_blocks(a, block, 1, v)[0], block)  # noqa: E731
  xs = {"q": pad(q, 0), "lse": pad(lse, 0), "pos": pad(positions, PAD_POSITION),
        "iq": pad(iq, 0), "iw": pad(iw, 0)}
  if idx is not None:
    xs["idx"] = pad(idx, -1)
  if segments is not None:
    xs["seg"] = pad(segments, -1)
  comp32, ikeys32 = comp.astype(f32), ikeys.astype(f32)

  @jax.checkpoint
  def one_block(x):
    qb = x["q"].astype(f32) * scale  # [B, Q, N, H]
    if idx is None:  # dense warm-up: every visible entry
      nvis = (x["pos"] + 1) // entries.ratio  # [B, Q]
      valid = jnp.arange(C)[None, None, :] < nvis[..., None]  # [B, Q, C]
      cl = jnp.einsum("BQNH,BCH->BQNC", qb, comp32)
      qk = jnp.einsum("BQIJ,BCJ->BQIC", x["iq"].astype(f32), ikeys32)
      own = None if segments is None else jnp.broadcast_to(comp_seg[:, None, :], valid.shape)
    else:  # sparse stage: the selected set S_t
      sel = x["idx"]
      valid = sel >= 0  # [B, Q, P]
      gather = jax.vmap(lambda c, i: c[jnp.maximum(i, 0)])
      cl = jnp.einsum("BQNH,BQPH->BQNP", qb, gather(comp32, sel))
      qk = jnp.einsum("BQIJ,BQPJ->BQIP", x["iq"].astype(f32), gather(ikeys32, sel))
      own = None if segments is None else gather(comp_seg, sel)
    if own is not None:
      valid = valid & (own == x["seg"][:, :, None])
    mass = jnp.sum(jnp.exp(jnp.minimum(cl - x["lse"][..., None], 0.0)), axis=2)  # [B, Q, P]
    target = jax.lax.stop_gradient(mass)
    logits = jnp.einsum("BQIP,BQI->BQP", jax.nn.relu(qk), x["iw"].astype(f32))
    return indexer_kl(target, logits, valid)

  sums, counts = jax.lax.map(one_block, xs)
  return jnp.stack([jnp.sum(sums), jnp.sum(counts).astype(f32)])
