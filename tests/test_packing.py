"""Packed documents (docs/architecture.md#schedule, sample-level masking): with `segments`, each
document in a packed row gets exactly the logits it gets alone, for every layer kind (sliding, CSA
with the indexer, HCA) and for the MTP module."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4.data import packing_align as packing_alignment
from deepseek_v4.model import document_positions
from tests.hf_oracle import randomize_params
from tests.tolerances import F32_MODEL_REL, rel_err


@pytest.fixture(scope="module")
def model(tiny_cfg):
  return randomize_params(deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(5)), 5)


def _packed_row(docs, align, pad_id=1):
  """Documents at multiples of `align`; the gap after a document is padding of its segment."""
  ids, seg = [], []
  for d, doc in enumerate(docs):
    n = -(-len(doc) // align) * align if d < len(docs) - 1 else len(doc)
    ids += list(doc) + [pad_id] * (n - len(doc))
    seg += [d] * n
  return np.asarray(ids, np.int32)[None], np.asarray(seg, np.int32)[None]


def test_document_positions():
  seg = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(document_positions(seg), [[0, 1, 2, 0, 1, 0, 1, 2, 3]])


@pytest.mark.slow  # ~80 s; packed rows stay covered by test_train and test_trunk
def test_each_packed_document_equals_itself_alone(model):
  cfg = model.cfg
  align = packing_alignment(cfg)
  assert align == 16
  rng = np.random.default_rng(0)
  docs = [rng.integers(2, cfg.vocab_size, n) for n in (37, 21, 45)]  # every layer kind selects
  ids, seg = _packed_row(docs, align)
  packed_fn = nnx.jit(lambda m, i, s: m.logits(m.final_hidden(m.trunk(i, segments=s)[0])))
  mtp_packed = nnx.jit(lambda m, i, s: m.mtp_logits(m.trunk(i, segments=s)[0], i, segments=s))
  alone_fn = nnx.jit(lambda m, i: m(i))
  mtp_alone = nnx.jit(lambda m, i: m.mtp_logits(m.trunk(i)[0], i))
  packed = np.asarray(packed_fn(model, jnp.asarray(ids), jnp.asarray(seg)))[0]
  mtp = np.asarray(mtp_packed(model, jnp.asarray(ids), jnp.asarray(seg)))[0]
  start = 0
  for d, doc in enumerate(docs):
    x = jnp.asarray(doc[None], jnp.int32)
    alone = np.asarray(alone_fn(model, x))[0]
    assert rel_err(packed[start:start + len(doc)], alone) < F32_MODEL_REL, f"document {d}"
    m_alone = np.asarray(mtp_alone(model, x))[0]
    assert rel_err(mtp[start:start + len(doc) - 1], m_alone) < F32_MODEL_REL, f"MTP document {d}"
    start += -(-len(doc) // align) * align


def test_without_segments_documents_leak(model):
  """The control: the same row without segments changes the later documents' logits."""
  align = packing_alignment(model.cfg)
  rng = np.random.default_rng(1)
  docs = [rng.integers(2, model.cfg.vocab_size, n) for n in (30, 20)]
  ids, _ = _packed_row(docs, align)
  plain = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids)))[0]
  alone = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(docs[1][None], jnp.int32)))[0]
  assert rel_err(plain[32:52], alone) > F32_MODEL_REL


def test_segments_shape_is_checked(model):
  with pytest.raises(ValueError, match="segments shape"):
    model.trunk(jnp.zeros((1, 8), jnp.int32), segments=jnp.zeros((1, 7), jnp.int32))
