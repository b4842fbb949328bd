"""The training loss (docs/architecture.md#training). `loss_fn(model, batch)` runs the trunk with
the chosen lightning-indexer stage (docs/architecture.md#indexer-training) and returns
`(loss, aux)`:

  loss = L_LM + lambda_MTP L_MTP + sum_layers L_bal + w_idx L_indexer

Choices the spec leaves open (UNVERIFIED), made here and documented:
  * balance loss and bias update apply to learned-routing layers only (and the MTP block), not to
    hash layers, whose selection is not learned; the per-layer losses are summed;
  * the load of an expert is the number of (token, slot) assignments in the whole step (all
    micro-batches), padding excluded;
  * indexer loss: KL over the CSA compressed entries, with the target taken from the main
    attention's one joint softmax (window + entries + sink), summed over heads and L1-normalized;
    averaged over queries and over CSA layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_v4 import losses
from deepseek_v4.model import Transformer, default_positions
from deepseek_v4.options import Options
from deepseek_v4.train.config import TrainConfig, step_options


def mtp_targets(targets: jax.Array, segments: jax.Array | None = None) -> jax.Array:
  """Targets of the MTP positions i < T-1 (token i+2 = targets[i+1]); with packed documents,
  -1 where input i+1 belongs to another segment than input i (a cross-document prediction)."""
  t = targets[:, 1:]
  if segments is None:
    return t
  return jnp.where(segments[:, 1:] == segments[:, :-1], t, -1)


def loss_fn(model: Transformer, batch: dict, tcfg: TrainConfig = TrainConfig(),
            mtp_weight: float | jax.Array | None = None, options: Options | None = None
            ) -> tuple[jax.Array, dict]:
  """Total training loss and its parts.

  Args:
    model: the Transformer.
    batch: {"inputs": int [B, T], "targets": int [B, T] (next tokens, -1 = not scored),
      optional "input_mask": [B, T] (1 = a real token; routing statistics skip padding),
      optional "segments" / "positions": int [B, T] (packed documents, `data.pack(...,
      "aligned")`: document id per token and position inside the document; attention stays
      inside a document and MTP targets across a document boundary are ignored)}.
    tcfg: run settings (loss weights, indexer stage, remat, CE chunk).
    options: the run's `Options` (default `model.options`); the indexer stage and remat come
      from `tcfg` (see `step_options`).
    mtp_weight: lambda of the MTP loss (default tcfg.mtp_weight).
  Returns:
    (loss, aux) with aux = {lm_loss, mtp_loss, balance_loss, indexer_loss, loads [L, E],
    tokens}.
  """
  cfg = model.cfg
  ids, targets = batch["inputs"], batch["targets"]
  B, T = ids.shape
  mask = batch.get("input_mask")
  mask = jnp.ones((B, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
  segments = batch.get("segments")
  positions = batch.get("positions")
  if segments is not None:
    segments = segments.astype(jnp.int32)
  positions = default_positions(ids, None if positions is None else positions.astype(jnp.int32),
                                segments)
  opts = step_options(tcfg, model.options if options is None else options)
  streams, outs, _ = model.trunk(ids, positions, segments=segments, options=opts)
  head = model.head.weight[...]
  lm_sum, ntok = losses.chunked_cross_entropy(model.final_hidden(streams), head, targets,
                                              tcfg.ce_chunk)
  lm = lm_sum / jnp.maximum(ntok, 1)
  # Indexer KL: per indexer layer (CSA) the mean over its queries, then the mean over those layers.
  csa = [o.indexer_kl for o, k in zip(outs, cfg.layer_kinds) if k.trains_indexer]
  indexer = (sum(k[0] / jnp.maximum(k[1], 1.0) for k in csa) / len(csa)) if csa else jnp.zeros(())
  learned = [o.moe for i, o in enumerate(outs) if not cfg.is_hash_layer(i)]
  masks = [mask] * len(learned)
  mtp = jnp.zeros(())
  if cfg.num_mtp_layers and T > 1:
    # All T positions (the last one masked): the sequence keeps its length and its split.
    h, mtp_out = model.mtp_hidden(streams, ids, positions, segments, opts, full=True)
    last = jnp.full((B, 1), -1, targets.dtype)
    mtp_t = jnp.concatenate([mtp_targets(targets, segments), last], axis=1)
    mtp = losses.mean_cross_entropy(h, head, mtp_t, tcfg.ce_chunk)
    learned.append(mtp_out.moe)
    masks.append(jnp.concatenate([mask[:, 1:], jnp.zeros((B, 1), mask.dtype)], axis=1))
  bal = sum((losses.balance_loss(s["scores"], s["experts"], m, tcfg.balance_alpha)
             for s, m in zip(learned, masks)), jnp.zeros(()))
  loads = jnp.stack([losses.expert_loads(s["experts"], m, cfg.num_experts)
                     for s, m in zip(learned, masks)]) if learned else jnp.zeros((0,))
  w_mtp = tcfg.mtp_weight if mtp_weight is None else mtp_weight
  loss = lm + w_mtp * mtp + bal + tcfg.indexer_loss_weight * indexer
  aux = dict(lm_loss=lm, mtp_loss=mtp, balance_loss=bal, indexer_loss=indexer, loads=loads,
             tokens=ntok)
  return loss, aux
