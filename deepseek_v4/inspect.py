"""Data for the architecture tour (notebooks/02_architecture_tour): router load per expert across
layers, KV-cache bytes vs context for V4 against dense attention, Sinkhorn-normalized mixing
matrices (mHC, docs/architecture.md#forward), the lightning indexer's selections
(docs/architecture.md#indexer) and the compressors' gate weights (docs/architecture.md#compressor).
The notebook only plots what these return."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import layout, summary, train
from deepseek_v4.config import ModelConfig
from deepseek_v4.layers import compressor, mhc
from deepseek_v4.layers.rope import rope_angles
from deepseek_v4.model import default_positions

SELECTED, VISIBLE, INVISIBLE = 2, 1, 0  # codes of `selection_map`


def kv_bytes_vs_context(cfg: ModelConfig, contexts: list[int]) -> dict[str, np.ndarray]:
  """{"context", "v4", "dense"}: serving KV-cache bytes per sequence of `cfg` and of the same
  model with attention="dense" (every key kept), from shapes only."""
  dense = cfg.replace(attention="dense")
  return {"context": np.asarray(contexts),
          "v4": np.asarray([summary.kv_cache(cfg, c).total_serving for c in contexts]),
          "dense": np.asarray([summary.kv_cache(dense, c).total_serving for c in contexts])}


def router_load(model, ids: np.ndarray) -> np.ndarray:
  """[learned layers (+ MTP), E] share of the (token, slot) assignments each expert receives on
  `ids` [B, T] (rows sum to 1; 1/E is perfect balance)."""
  ids = jnp.asarray(ids, jnp.int32)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:]}
  _, aux = train.loss_fn(model, batch)
  loads = np.asarray(jax.device_get(aux["loads"]), np.float64)
  return loads / np.maximum(loads.sum(axis=-1, keepdims=True), 1.0)


def sinkhorn_matrices(cfg: ModelConfig, seed: int = 0, count: int = 3) -> list[np.ndarray]:
  """`count` M x M residual mixing matrices as mHC makes them: random logits pushed through
  `mhc.sinkhorn` (the doubly stochastic projection; rows and columns sum to 1)."""
  logits = jax.random.normal(jax.random.key(seed), (count, cfg.hc_mult, cfg.hc_mult))
  return list(np.asarray(mhc.sinkhorn(logits, cfg.hc_sinkhorn_iters, cfg.hc_eps)))


def attention_input(model, ids: np.ndarray, layer: int) -> tuple[jax.Array, jax.Array]:
  """(u' [B, T, D], positions [B, T]): the normed attention input of official layer `layer` on
  `ids` [B, T] (full sequence from position 0), as the model's own compiled trunk computes it
  (`Options(capture=True)`, which the trunk hands back per official layer, scanned groups
  included)."""
  layout.locate(model.cfg, layer)  # a clear error for a layer outside the model
  ids = jnp.asarray(ids, jnp.int32)
  return _attention_inputs(model, ids)[layer], default_positions(ids, None, None)


@nnx.jit
def _attention_inputs(model, ids):
  """Every trunk layer's attention input, official order, from one compiled forward."""
  _, outs, _ = model.trunk(ids, options=model.options.replace(capture=True))
  return tuple(out.attn_input for out in outs)


def indexer_selections(model, ids: np.ndarray, layer: int) -> np.ndarray:
  """[B, T, min(k_I, T // 4)] compressed entries the lightning indexer of CSA layer `layer`
  selects for each query of `ids` [B, T] (-1 = none), through the layer's own `Indexer.encode`
  and `Indexer.select` as its attention calls them (docs/architecture.md#indexer)."""
  attn = model.layer(layer).attn
  if attn.indexer is None:
    raise ValueError(f"layer {layer} is {attn.kind.name}, not CSA: it has no indexer")
  u, positions = attention_input(model, ids, layer)
  cos, sin = rope_angles(positions, attn.freqs)
  cq, _, _ = attn.project_qkv(u, cos, sin)
  keys, q, w = attn.indexer.encode(u, cq, cos, sin, attn.freqs)
  return np.asarray(attn.indexer.select(q, w, keys, positions))


def selection_map(selected: np.ndarray, ratio: int = 4) -> np.ndarray:
  """[T, T // ratio] image of one row's selections [T, k]: SELECTED, VISIBLE (not selected) or
  INVISIBLE (entry s is visible to query t iff s < floor((t + 1) / ratio),
  docs/architecture.md#causality)."""
  T = selected.shape[0]
  t, s = np.arange(T)[:, None], np.arange(T // ratio)[None, :]
  out = np.where(s < (t + 1) // ratio, VISIBLE, INVISIBLE)
  rows, cols = np.nonzero(selected >= 0)
  out[rows, selected[rows, cols]] = SELECTED
  return out


def compressor_weights(model, ids: np.ndarray, layer: int, which: str = "main") -> np.ndarray:
  """[B, n, slots, width] softmax gate weights with which the compressor of CSA/HCA layer
  `layer` ("main", or "indexer" in a CSA layer) pools each of its n = T // m windows on `ids`
  [B, T]: slots = m tokens (HCA) or 2m (CSA: the previous window's m, then its own m). They sum
  to 1 over the slots of each entry and channel (docs/architecture.md#compressor)."""
  attn = model.layer(layer).attn
  if which not in ("main", "indexer"):
    raise ValueError(f"which={which!r}; expected main or indexer")
  comp = attn.compressor
  if which == "indexer":
    comp = None if attn.indexer is None else attn.indexer.compressor
  if comp is None:
    raise ValueError(f"layer {layer} ({attn.kind.name}) has no {which} compressor")
  u, _ = attention_input(model, ids, layer)
  n = u.shape[1] // comp.ratio
  c, z = comp.project(u[:, : n * comp.ratio])
  _, logits = compressor.window_slots(c, z, comp.ratio, comp.overlap)
  return np.asarray(jax.nn.softmax(logits, axis=2))
