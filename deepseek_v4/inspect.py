"""Data for the architecture tour (notebooks/02_architecture_tour): router load per expert across
layers, KV-cache bytes vs context for V4 against dense attention, and Sinkhorn-normalized mixing
matrices (mHC, spec §2). The notebook only plots what these return."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_v4 import summary, train
from deepseek_v4.config import ModelConfig
from deepseek_v4.layers import mhc


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
