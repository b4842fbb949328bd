"""Incremental compression (docs/architecture.md#decode-update): feeding a sequence in chunks of
any size, with every row at its own position, stores exactly the entries of the full-sequence
pooling."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_v4.cache import empty_compressor_state
from deepseek_v4.layers.compressor import extend_windows, pool_windows, store_entries


@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False)], ids=["csa", "hca16"])
def test_chunks_equal_full_pooling(ratio, overlap):
  rng = np.random.default_rng(ratio)
  B, S, w = 3, 70, 5
  K = (2 if overlap else 1) * w
  c = rng.standard_normal((B, S, K)).astype(np.float32)
  z = rng.standard_normal((B, S, K)).astype(np.float32)
  n = S // ratio
  want = np.asarray(pool_windows(jnp.asarray(c[:, :n * ratio]), jnp.asarray(z[:, :n * ratio]),
                                 ratio, overlap))  # [B, n, w]
  # Row b is fed in its own random chunk sizes; a step feeds T = 6 slots, n_valid[b] of them real.
  T = 6
  state = empty_compressor_state(B, ratio, w, overlap)
  entries = jnp.zeros((B, n, w), jnp.float32)
  start = np.zeros(B, np.int32)
  while (start < S).any():
    n_valid = np.minimum(rng.integers(0, T + 1, B), S - start).astype(np.int32)
    idx = np.minimum(start[:, None] + np.arange(T), S - 1)
    cc = np.take_along_axis(c, idx[..., None], 1)
    zz = np.take_along_axis(z, idx[..., None], 1)
    pooled, entry, closed, state = extend_windows(jnp.asarray(cc), jnp.asarray(zz),
                                                  jnp.asarray(start), jnp.asarray(n_valid),
                                                  state, ratio, overlap)
    entries = store_entries(entries, pooled, entry, closed)
    start = start + n_valid
  np.testing.assert_allclose(np.asarray(entries), want, rtol=1e-6, atol=1e-6)
  # The tail holds exactly the S mod m last tokens of the open window.
  filled = np.isfinite(np.asarray(state.pending_z)).all(-1).sum(-1)
  np.testing.assert_array_equal(filled, np.full(B, S % ratio))
  np.testing.assert_array_equal(np.asarray(state.pending_c)[:, :S % ratio],
                                c[:, n * ratio:])


def test_nothing_valid_changes_nothing():
  state = empty_compressor_state(2, 4, 3, True)
  x = jnp.ones((2, 5, 6))
  _, _, closed, new = extend_windows(x, x, jnp.array([0, 9]), jnp.array([0, 0]), state, 4, True)
  assert not np.asarray(closed).any()
  for a, b in zip((state.pending_c, state.pending_z, state.prev_c, state.prev_z),
                  (new.pending_c, new.pending_z, new.prev_c, new.prev_z)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
