"""deepseek_v4.inspect's indexer and compressor pictures (notebooks/02_architecture_tour): the
selections are the ones the forward makes and respect causality (docs/architecture.md#causality,
#indexer); the pooling weights are a softmax over each window's slots
(docs/architecture.md#compressor)."""

import numpy as np
import pytest
from flax import nnx

import deepseek_v4 as dsv4
from deepseek_v4 import inspect as tour
from tests.recording import recorded_selections

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
