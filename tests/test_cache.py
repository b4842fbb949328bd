"""Cache pytrees (docs/architecture.md#cache-kinds): shapes per layer kind, and bytes per token =
the summary's cache bytes (docs/architecture.md#cache-bytes)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import summary


def _nbytes(cfg, n, dtype):
  shapes = jax.eval_shape(lambda: cache_lib.init_cache(cfg, 1, n, dtype))
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def test_layer_shapes(tiny_cfg):
  c = cache_lib.init_cache(tiny_cfg, 2, 64)
  H, W, J = tiny_cfg.head_dim, tiny_cfg.window, tiny_cfg.index_head_dim
  assert c.max_len == 64 and c.lengths.shape == (2,)
  for i, r in enumerate(tiny_cfg.compress_ratios):
    lc = c.layer(i)
    assert lc.window.kv.shape == (2, W, H) and (np.asarray(lc.window.pos) < 0).all()
    if r == 0:
      assert lc.compressor is None and lc.entries is None and lc.index_keys is None
      continue
    assert lc.entries.shape == (2, 64 // r, H)
    k = 2 * H if r == 4 else H
    assert lc.compressor.pending_z.shape == (2, r, k)
    assert np.isneginf(np.asarray(lc.compressor.pending_z)).all()  # empty slots
    if r == 4:
      assert lc.compressor.prev_c.shape == (2, 4, H)
      assert lc.index_keys.shape == (2, 16, J) and lc.indexer.pending_c.shape == (2, 4, 2 * J)
    else:
      assert lc.compressor.prev_c is None and lc.indexer is None


def test_is_a_pytree(tiny_cfg):
  c = cache_lib.init_cache(tiny_cfg, 1, 32)
  d = jax.tree.map(lambda x: x + 0, c)
  assert isinstance(d, cache_lib.Cache) and d.max_len == 32
  assert len(jax.tree.leaves(c)) == len(jax.tree.leaves(d))


@pytest.mark.parametrize("preset", ["tiny", "flash", "pro"])
def test_bytes_per_token_equal_summary(preset):
  cfg = deepseek_v4.PRESETS[preset]()
  lcm = cache_lib.capacity_multiple(cfg)
  lo, hi = 4 * lcm, 12 * lcm
  measured = (_nbytes(cfg, hi, jnp.bfloat16) - _nbytes(cfg, lo, jnp.bfloat16)) / (hi - lo)
  assert measured == summary.kv_cache(cfg, hi).per_token_bf16
  assert measured == cache_lib.bytes_per_token(cfg, jnp.bfloat16)
  # What does not grow: the window rings (+ positions) and the float32 compressor tails.
  assert _nbytes(cfg, hi, jnp.bfloat16) == hi * measured + cache_lib.fixed_bytes(cfg, jnp.bfloat16)
  rings = cfg.num_layers * cfg.window * (2 * cfg.head_dim + 4)  # bf16 K=V + int32 positions
  tails = cache_lib.fixed_bytes(cfg, jnp.bfloat16) - rings - 4  # - the row's length counter
  assert tails == summary.kv_cache(cfg, hi).state_bytes


def test_bad_sizes(tiny_cfg):
  with pytest.raises(ValueError, match="max_len=0"):
    cache_lib.init_cache(tiny_cfg, 1, 0)
  with pytest.raises(ValueError, match="batch=0"):
    cache_lib.init_cache(tiny_cfg, 0, 8)


def test_layer_is_layout_locate(tiny_cfg):
  """`Cache.layer` finds a layer through `layout.locate`, the model's own table: official layer i's
  cache is the slot and repeat `locate` names, also for a scanned period of two kinds."""
  from deepseek_v4 import layout

  cfg = tiny_cfg.replace(compress_ratios=(0, 0, 4, 16, 4, 16, 4))
  c = cache_lib.init_cache(cfg, 1, 32)
  for i, r in enumerate(cfg.layer_ratios):
    g, rep, s = layout.locate(cfg, i)
    assert layout.locate(c.layer_groups, i) == (g, rep, s)
    lc = c.layer(i)
    assert lc.window.kv.shape == (1, cfg.window, cfg.head_dim)
    assert (lc.entries is None) == (r == 0) and (lc.index_keys is None) == (r != 4)
  with pytest.raises(ValueError, match=r"layer 7 is outside \[0, 7\)"):
    c.layer(7)
