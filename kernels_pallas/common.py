"""Shared helpers for the kernel references: query blocking for linear-memory scans."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Position given to padding slots: far outside every window, so every mask rejects it.
PAD_POSITION = -(2**30)


def pad_to_blocks(x: jax.Array, block: int, axis: int, value) -> tuple[jax.Array, int]:
  """Pads `axis` of x up to a multiple of `block`; returns (padded, number of blocks)."""
  n = x.shape[axis]
  nb = -(-n // block)
  pad = nb * block - n
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths, constant_values=value)
  return x, nb


def to_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, nb*block, ...] -> [nb, B, block, ...] (the scanned axis first)."""
  B, T = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, T // block, block, *x.shape[2:]), 1, 0)


def from_blocks(x: jax.Array) -> jax.Array:
  """[nb, B, block, ...] -> [B, nb*block, ...]."""
  nb, B, block = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, nb * block, *x.shape[3:])
