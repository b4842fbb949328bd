"""Test helper: what the model's lightning indexers select inside a real (eager) forward."""

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
