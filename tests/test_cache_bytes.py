"""The cache byte model (`cache.byte_model`, docs/architecture.md#cache-bytes) against the bytes
`init_cache` really allocates: per layer kind and in total, with and without the MTP block (which
caches nothing), and what `summary.kv_cache` reports from it (tests/test_plan.py checks plan's
line against the same arrays)."""

import jax
import jax.numpy as jnp
import pytest

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import summary


def _flash_shaped():
  """Flash's first 9 layers (SWA, SWA, CSA, then HCA(128)/CSA alternating) and its window and
  head widths, with tiny's narrow everything else."""
  flash = deepseek_v4.flash()
  return deepseek_v4.tiny(compress_ratios=flash.compress_ratios[:9], window=flash.window,
                          head_dim=flash.head_dim, index_head_dim=flash.index_head_dim)


CONFIGS = {
  "tiny": lambda: deepseek_v4.tiny(),
  "tiny_no_mtp": lambda: deepseek_v4.tiny(num_mtp_layers=0),
  "flash_shaped": _flash_shaped,
  "flash_shaped_no_mtp": lambda: _flash_shaped().replace(num_mtp_layers=0),
  "dense": lambda: deepseek_v4.tiny(attention="dense"),
  "csa_only": lambda: deepseek_v4.tiny(attention="csa"),
}


def _real_bytes_by_kind(cfg, batch, max_len, dtype):
  """nbytes of the arrays `init_cache` allocates, per layer kind's summary component ("" = the
  row lengths)."""
  c = cache_lib.init_cache(cfg, batch, max_len, dtype)
  out = {"": c.lengths.nbytes}
  for i, kind in enumerate(cfg.layer_kinds):
    name = kind.component  # a dense layer counts as sliding, like its parameters
    out[name] = out.get(name, 0) + sum(x.nbytes for x in jax.tree.leaves(c.layer(i)))
  return out, sum(x.nbytes for x in jax.tree.leaves(c))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("max_len,dtype", [(256, jnp.bfloat16), (300, jnp.float32)])
def test_byte_model_equals_allocated_arrays(name, max_len, dtype):
  cfg = CONFIGS[name]()
  batch = 3
  real, total = _real_bytes_by_kind(cfg, batch, max_len, dtype)
  model: dict[str, int] = {}
  for p in cache_lib.byte_model(cfg, max_len, dtype):
    model[p.kind] = model.get(p.kind, 0) + batch * p.bytes
  assert model == real
  assert cache_lib.model_bytes(cfg, batch, max_len, dtype) == total
  # the MTP block allocates no cache, and the model counts none
  other = cfg.replace(num_mtp_layers=1 - cfg.num_mtp_layers)
  assert cache_lib.model_bytes(other, batch, max_len, dtype) == total
  assert _real_bytes_by_kind(other, batch, max_len, dtype)[1] == total


@pytest.mark.parametrize("name", ["tiny", "flash_shaped", "dense"])
def test_summary_rows_add_up_to_the_allocated_cache(name):
  """The summary's BF16 column + the float32 tails = the cache `init_cache` builds in BF16."""
  cfg = CONFIGS[name]()
  max_len = 4 * cache_lib.capacity_multiple(cfg)
  kv = summary.kv_cache(cfg, max_len)
  real = cache_lib.cache_bytes(cache_lib.init_cache(cfg, 1, max_len, jnp.bfloat16))
  assert kv.total_bf16 + kv.state_bytes == real
  windows = [r for r in kv.rows if r.name.startswith(("sliding windows", "all keys"))]
  assert [r.layers for r in windows] == [cfg.num_layers]  # not num_layers + the MTP block


def test_per_token_and_fixed_bytes_from_two_capacities():
  cfg = _flash_shaped()
  lcm = cache_lib.capacity_multiple(cfg)
  lo, hi = lcm, 3 * lcm
  b = {n: cache_lib.cache_bytes(cache_lib.init_cache(cfg, 1, n, jnp.bfloat16)) for n in (lo, hi)}
  assert (b[hi] - b[lo]) / (hi - lo) == cache_lib.bytes_per_token(cfg, jnp.bfloat16)
  assert b[hi] == hi * cache_lib.bytes_per_token(cfg, jnp.bfloat16) + cache_lib.fixed_bytes(
    cfg, jnp.bfloat16)

