"""Test helpers: what the model's lightning indexers select, and what its attention layers receive,
inside a real (eager) forward."""

from __future__ import annotations

import contextlib

import numpy as np

from deepseek_v4.layers.indexer import Indexer


@contextlib.contextmanager
def recorded_selections():
  """Within the block, every `Indexer.select` result is appended (as NumPy) to the yielded list,
  in call order (CSA layers in official order for one forward). Run the model eagerly, so the
  selections are concrete."""
  picks, select = [], Indexer.select

  def record(self, *args, **kwargs):
    out = select(self, *args, **kwargs)
    picks.append(np.asarray(out))
    return out

  Indexer.select = record
  try:
    yield picks
  finally:
    Indexer.select = select


@contextlib.contextmanager
def recorded_attention_inputs():
  """Within the block, the input `x` [B, T, D] every `Attention.__call__` receives is appended to
  the yielded list, in call order (official layer order, then MTP, for one forward of an
  unscanned model). Under a trace they are tracers: return them from the traced function."""
  from deepseek_v4.layers.attention import Attention

  inputs, call = [], Attention.__call__

  def record(self, x, *args, **kwargs):
    inputs.append(x)
    return call(self, x, *args, **kwargs)

  Attention.__call__ = record
  try:
    yield inputs
  finally:
    Attention.__call__ = call
