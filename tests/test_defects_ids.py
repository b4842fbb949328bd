"""Token ids outside [0, vocab) inside a trace: the embedding gives a NaN row for a
negative id as it does for an id >= vocab, never the wrapped row `vocab + id` (`jnp.take` wraps
negative indices before its fill mode sees them). Checked through a user's `jit`, through
`parallel.jit_forward` on a mesh, through the MTP block's embedding of the next token, and
outside a trace, where the host-side check refuses the id by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import parallel, sharding
from deepseek_v4.model import Transformer

CFG = deepseek_v4.tiny(compress_ratios=(0, 4), num_hash_layers=1, d_model=32, num_experts=4)
V = CFG.vocab_size
IDS = np.array([[3, 7, 11, 5, 9, 2, 4, 8]], np.int32)


@pytest.fixture(scope="module")
def model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


def _with(pos: int, value: int) -> np.ndarray:
  ids = IDS.copy()
  ids[0, pos] = value
  return ids


def _forward(model, ids):
  return nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids))


@pytest.mark.parametrize("bad", [-1, -V, V, V + 5], ids=["minus1", "minus_vocab", "vocab",
                                                         "above"])
def test_out_of_range_id_under_jit_gives_nan(model, bad):
  # NaN spreads beyond the bad position (masked attention weights times a NaN value are NaN),
  # which is the point: no plausible logits come out of a tokenizer / model mismatch.
  pos = 4
  assert np.isfinite(np.asarray(_forward(model, IDS))).all()
  got = np.asarray(_forward(model, _with(pos, bad)))
  assert np.isnan(got[0, pos]).all()
  if bad < 0:  # never the logits of the wrapped id V + bad
    wrapped = np.asarray(_forward(model, _with(pos, V + bad)))
    assert np.isfinite(wrapped).all()
    assert not np.allclose(got[0, pos], wrapped[0, pos], equal_nan=False)


def test_embedding_rows_of_negative_ids_are_nan(model):
  e = np.asarray(jax.jit(model.embed_tokens)(jnp.array([[-1, 0, -V, V - 1, V]], jnp.int32)))
  w = np.asarray(model.embed.weight[...]).astype(e.dtype)
  assert np.isnan(e[0, [0, 2, 4]]).all()
  np.testing.assert_array_equal(e[0, 1], w[0])
  np.testing.assert_array_equal(e[0, 3], w[V - 1])


def test_mtp_embedding_of_a_negative_next_token_is_nan(model):
  # The MTP block embeds token i+1 for position i: a bad id at position 5 poisons MTP row 4. The
  # trunk is fed the clean ids, so only the MTP block's own embedding can bring the NaN in.
  def mtp(m, trunk_ids, mtp_ids):
    streams, _, _ = m.trunk(trunk_ids)
    return m.mtp_logits(streams, mtp_ids)

  fn = nnx.jit(mtp)
  clean = jnp.asarray(IDS)
  assert np.isfinite(np.asarray(fn(model, clean, clean))).all()
  got = np.asarray(fn(model, clean, jnp.asarray(_with(5, -1))))
  assert np.isnan(got[0, 4]).all()


def test_negative_id_through_parallel_jit_forward(model):
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  pmodel = parallel.init_model(CFG, mesh, "fsdp_ep")
  forward = parallel.jit_forward(pmodel, mesh, "fsdp_ep")
  ids = np.tile(IDS, (8, 1))  # the batch spans the 8 devices
  out = np.asarray(forward(pmodel, sharding.shard_batch(ids, mesh, "fsdp_ep")))
  assert np.isfinite(out).all()
  ids[1, 2] = -1
  out = np.asarray(forward(pmodel, sharding.shard_batch(ids, mesh, "fsdp_ep")))
  assert np.isnan(out[1, 2]).all()


def test_negative_id_outside_a_trace_is_refused_by_name(model):
  with pytest.raises(ValueError, match="-1"):
    model(jnp.asarray(_with(1, -1)))
