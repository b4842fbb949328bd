"""deepseek_v4.inspect's indexer and compressor pictures (notebooks/02_architecture_tour): the
attention inputs are the ones the forward feeds its attention layers, scanned or not; the
selections are the ones the forward makes and respect causality (docs/architecture.md#causality,
#indexer); the pooling weights are a softmax over each window's slots
(docs/architecture.md#compressor)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4 as dsv4
from deepseek_v4 import inspect as tour
from deepseek_v4 import layout
from deepseek_v4.checkpoint.convert import from_hub_tensors, to_hub_tensors
from tests.recording import recorded_attention_inputs, recorded_selections
from tests.tolerances import F32_FUNCTION, rel_err

T = 64  # 16 CSA entries > top-k 4 of tiny: later queries must choose


@pytest.fixture(scope="module")
def model():
  return dsv4.Transformer(dsv4.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(0).integers(0, 512, (2, T))


def _csa_layers(cfg):
  return [i for i, r in enumerate(cfg.layer_ratios) if r == 4]


def test_indexer_selections_are_the_forwards(model, ids):
  with recorded_selections() as recorded:
    model.trunk(np.asarray(ids, np.int32))  # eager: CSA layers in official order
  layers = _csa_layers(model.cfg)
  assert len(recorded) == len(layers) >= 1
  for layer, got in zip(layers, recorded):
    np.testing.assert_array_equal(tour.indexer_selections(model, ids, layer), got)


def test_indexer_selections_are_causal(model, ids):
  k = model.cfg.index_topk
  layer = _csa_layers(model.cfg)[0]
  sel = tour.indexer_selections(model, ids, layer)
  assert sel.shape == (2, T, k)
  visible = (np.arange(T) + 1) // 4  # entries s < floor((t+1)/4)
  assert np.all(sel < visible[None, :, None])
  assert np.all((sel >= 0).sum(-1) == np.minimum(visible, k)[None])  # all visible up to k
  assert (visible > k).any()
  for row in sel:  # no entry twice
    assert all(len(set(r[r >= 0])) == (r >= 0).sum() for r in row)
  img = tour.selection_map(sel[0])
  assert img.shape == (T, T // 4)
  np.testing.assert_array_equal((img == tour.SELECTED).sum(1), np.minimum(visible, k))
  np.testing.assert_array_equal((img != tour.INVISIBLE).sum(1), visible)
  with pytest.raises(ValueError, match="not CSA"):
    tour.indexer_selections(model, ids, 0)


def _np_softmax_slots(z, m, overlap):
  """Per window, the softmax over its slots of the biased gate logits z [B, S, K] (NumPy)."""
  z = np.asarray(z, np.float64)
  B, S, K = z.shape
  n = S // m
  z = z.reshape(B, n, m, K)
  if overlap:
    w = K // 2
    prev = np.concatenate([np.full((B, 1, m, w), -np.inf), z[:, :-1, :, :w]], axis=1)
    z = np.concatenate([prev, z[..., w:]], axis=2)  # previous window's A, then own B
  e = np.exp(z - z.max(axis=2, keepdims=True))
  return e / e.sum(axis=2, keepdims=True)


@pytest.mark.parametrize("ratio,which", [(4, "main"), (16, "main"), (4, "indexer")])
def test_compressor_weights_softmax_over_slots(model, ids, ratio, which):
  layer = list(model.cfg.layer_ratios).index(ratio)
  got = tour.compressor_weights(model, ids, layer, which)
  attn = model.layer(layer).attn
  comp = attn.compressor if which == "main" else attn.indexer.compressor
  slots = (1 + comp.overlap) * ratio
  assert got.shape[:3] == (2, T // ratio, slots)
  np.testing.assert_allclose(got.sum(axis=2), 1.0, rtol=1e-5)
  u, _ = tour.attention_input(model, ids, layer)
  _, z = comp.project(u)
  np.testing.assert_allclose(got, _np_softmax_slots(z, ratio, comp.overlap), rtol=1e-5,
                             atol=1e-7)
  if comp.overlap:  # the first entry has no previous window
    np.testing.assert_array_equal(got[:, 0, :ratio], 0.0)
  with pytest.raises(ValueError, match="no main compressor"):
    tour.compressor_weights(model, ids, 0)


def test_attention_input_of_a_scanned_layer_is_the_forwards():
  """Groups [SWA·h] x2, [CSA·h], [HCA, CSA] x2: layers 1, 5 and 6 sit in a later repeat of a
  scanned stack (5 and 6 in its two slots). Each one's captured input equals the unscanned model
  (same weights) and what its attention layer received in an unscanned forward."""
  cfg = dsv4.tiny(compress_ratios=(0, 0, 4, 16, 4, 16, 4), hc_sinkhorn_iters=3)
  scanned = dsv4.Transformer(cfg, rngs=nnx.Rngs(0))
  unrolled = from_hub_tensors(cfg, to_hub_tensors(scanned),
                              options=dsv4.Options(scan_layers=False))
  groups = layout.layer_groups(cfg)
  where = [layout.locate(cfg, i) for i in range(cfg.num_layers)]
  assert {(r, s) for g, r, s in where if groups[g].scanned} == {(0, 0), (1, 0), (0, 1), (1, 1)}
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 32))

  @jax.jit
  def received_by_attention(ids):  # unscanned: the layers run in official order
    with recorded_attention_inputs() as received:
      unrolled.trunk(ids)
    return received

  received = received_by_attention(jnp.asarray(ids, jnp.int32))
  assert len(received) == cfg.num_layers
  for layer in range(cfg.num_layers):
    got, positions = tour.attention_input(scanned, ids, layer)
    flat, _ = tour.attention_input(unrolled, ids, layer)
    assert got.shape == (2, 32, cfg.d_model)
    assert rel_err(got, flat) < F32_FUNCTION, layer
    assert rel_err(got, received[layer]) < F32_FUNCTION, layer
    # a neighbour's slice would not pass: every layer's input is its own
    others = [received[i] for i in range(cfg.num_layers) if i != layer]
    assert all(rel_err(got, o) > 1e-2 for o in others), layer
  np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(32), (2, 32)))
  with pytest.raises(ValueError, match="layer 7"):
    tour.attention_input(scanned, ids, 7)


def test_capture_costs_nothing_unless_asked(model, ids):
  """The ordinary trunk (default Options, as the forward and the training step build them)
  returns no attention inputs; Options(capture=True) adds exactly one [B, T, D] per layer."""
  ids = jnp.asarray(ids[:, :16], jnp.int32)

  def outputs(**kw):
    return jax.tree.leaves(jax.eval_shape(lambda i: model.trunk(i, **kw), ids))

  plain = outputs()
  off = outputs(options=model.options.replace(capture=False))
  on = outputs(options=model.options.replace(capture=True))
  assert len(plain) == len(off)
  extra = len(on) - len(off)
  assert extra == model.cfg.num_layers
  assert sum(x.shape == (2, 16, model.cfg.d_model) for x in on) - sum(
    x.shape == (2, 16, model.cfg.d_model) for x in off) == extra
