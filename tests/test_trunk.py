"""The one trunk: layer grouping, scanned == unrolled (forward, decode, loss and
gradients), official names at the boundary, freezing one layer of a stack, packed documents in
the indexer training stages, and no import cycles."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import data as data_lib
from deepseek_v4 import layout, train
from deepseek_v4.checkpoint.convert import from_hub_tensors, to_hub_tensors
from tests.tolerances import F32_FUNCTION, F32_MODEL_REL, rel_err

# Every layer kind and a repeating (HCA, CSA) period: groups [SWA·h] x2, [CSA·h], [HCA, CSA] x2.
CFG = deepseek_v4.tiny(compress_ratios=(0, 0, 4, 16, 4, 16, 4), hc_sinkhorn_iters=3)


def test_groups_of_the_presets():
  flash = layout.layer_groups(deepseek_v4.flash())
  assert [(g.ratios, g.hashed, g.count) for g in flash] == [
    ((0,), (True,), 2), ((4,), (True,), 1), ((128, 4), (False, False), 20)]
  pro = layout.layer_groups(deepseek_v4.pro())
  assert [(g.ratios, g.count) for g in pro] == [((128,), 2), ((4,), 1), ((128, 4), 29)]
  assert [g.count for g in layout.layer_groups(CFG)] == [2, 1, 2]
  flat = layout.layer_groups(CFG, scan_layers=False)
  assert [g.count for g in flat] == [1] * CFG.num_layers


def test_official_names_round_trip():
  for i in range(CFG.num_layers):
    path, r = layout.model_path(CFG, f"layers.{i}.attn.wq_a.weight")
    names = layout.official_names(CFG, path)
    assert names[r or 0][0] == f"layers.{i}.attn.wq_a.weight"
  assert layout.official_names(CFG, "embed.weight") == [("embed.weight", None)]
  with pytest.raises(ValueError, match="layer 7"):
    layout.locate(CFG, 7)


def test_every_key_path_form_names_the_same_official_tensors():
  """`layout.official` is the one key path -> official name map: nnx paths, jax tree key paths
  (an nnx.Variable's `value` dropped) and dotted strings agree; groups 2 = [HCA, CSA] x 2."""
  want = [("layers.4.attn.wq_a.weight", 0), ("layers.6.attn.wq_a.weight", 1)]
  nnx_path = ("groups", 2, "blocks", 1, "attn", "wq_a", "weight")
  K = jax.tree_util
  jax_path = (K.DictKey("groups"), K.SequenceKey(2), K.DictKey("blocks"), K.SequenceKey(1),
              K.DictKey("attn"), K.DictKey("wq_a"), K.DictKey("weight"), K.GetAttrKey("value"))
  for path in (nnx_path, jax_path, "groups.2.blocks.1.attn.wq_a.weight"):
    assert layout.official(CFG, path) == want
  assert layout.official(None, nnx_path) == [("groups.2.blocks.1.attn.wq_a.weight", None)]
  model = deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(0))
  flat = [(layout.path_name(p), layout.official(CFG, p))
          for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  tree = [(layout.path_name(p), layout.official(CFG, p)) for p, _ in
          jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param),
                                               is_leaf=lambda v: isinstance(v, nnx.Variable))[0]]
  assert sorted(flat) == sorted(tree)


def _pair():
  """The scanned model and an unrolled one holding the same weights (through hub names)."""
  scanned = deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(0))
  unrolled = from_hub_tensors(CFG, to_hub_tensors(scanned),
                              options=deepseek_v4.Options(scan_layers=False))
  return scanned, unrolled


def _ids(B=2, T=37, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


def test_scanned_equals_unrolled_forward():
  scanned, unrolled = _pair()
  assert any(g.spec.scanned for g in scanned.groups)
  assert not any(g.spec.scanned for g in unrolled.groups)
  ids = _ids()
  a, b = scanned(ids), unrolled(ids)
  assert rel_err(a, b) < F32_FUNCTION


@pytest.mark.slow  # ~45 s; tests/test_decoding.py decodes the (scanned) tiny preset by default
def test_scanned_and_unrolled_decode_equal_the_forward():
  scanned, unrolled = _pair()
  ids = _ids()
  a = scanned(ids)
  for model in (scanned, unrolled):  # decode through the same trunk, cache scanned alongside
    cache = deepseek_v4.init_cache(model, 2, 48)
    pre, cache = deepseek_v4.prefill(model, cache, ids[:, :30], chunk_size=7)
    assert rel_err(pre, a[:, :30]) < F32_MODEL_REL
    for t in range(30, 37):
      logits, cache = deepseek_v4.decode_step(model, cache, ids[:, t])
      assert rel_err(logits, a[:, t]) < F32_MODEL_REL


def test_layer_view_reads_the_stack():
  scanned, unrolled = _pair()
  for i in range(CFG.num_layers):
    np.testing.assert_array_equal(scanned.layer(i).attn.wq_a.weight[...],
                                  unrolled.layer(i).attn.wq_a.weight[...])


@pytest.mark.slow  # 50 s (two backward compiles); scanned gradients are checked against
# transformers by default (test_train.py::test_loss_and_gradients_match_transformers)
def test_scanned_equals_unrolled_loss_and_gradients():
  scanned, unrolled = _pair()
  ids = np.asarray(_ids(T=33))
  batch = train.as_batch(ids[:, :-1], ids[:, 1:])
  tcfg = train.TrainConfig(seq_len=32, batch_size=2, remat="full")

  def grads(model):
    g = nnx.jit(nnx.grad(lambda m: train.loss_fn(m, batch, tcfg)[0]))(model)
    return to_hub_tensors_like(model, g)

  ga, gb = grads(scanned), grads(unrolled)
  assert set(ga) == set(gb)
  flat = lambda g: np.concatenate([np.ravel(g[k]) for k in sorted(g)])  # noqa: E731
  assert rel_err(flat(ga), flat(gb)) < F32_MODEL_REL


def to_hub_tensors_like(model, grads_state):
  """Gradients under hub names (the model's layout mapping applied to a gradient state)."""
  shadow = nnx.merge(nnx.graphdef(model), nnx.state(model))
  nnx.update(shadow, grads_state)
  return {k: v for k, v in to_hub_tensors(shadow).items() if np.issubdtype(v.dtype, np.floating)}


def test_freezing_one_layer_of_a_stack_holds_only_its_slice():
  tcfg = train.TrainConfig(seq_len=32, batch_size=2, warmup_steps=1, learning_rate=1e-2,
                           freeze=(r"^layers\.3\.",))
  model, opt = train.build(CFG, tcfg)
  before = to_hub_tensors(model)
  ids = np.asarray(_ids(T=33))
  train.train_step(model, opt, train.as_batch(ids[:, :-1], ids[:, 1:]), 0.3, tcfg=tcfg)
  after = to_hub_tensors(model)
  for name in ("layers.3.attn.wq_a.weight", "layers.3.hc_attn_fn", "layers.3.ffn.gate.weight"):
    np.testing.assert_array_equal(after[name], before[name])  # frozen (weight decay included)
  for name in ("layers.5.attn.wq_a.weight", "layers.4.attn.wq_a.weight"):
    assert not np.array_equal(after[name], before[name])  # its stack-mates train


@pytest.mark.slow  # 40 s per stage; by default test_train.py checks packed-document isolation
# (test_aligned_packed_loss_equals_documents_alone) and the sparse stage's gradient split
@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_indexer_stages_on_aligned_packed_rows_equal_each_document(stage):
  """The indexer KL of a packed row is the sum of its documents' KLs, each alone
  (docs/architecture.md#indexer-training)."""
  cfg = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, num_mtp_layers=0,
                         index_topk=2)
  model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(3))
  align = data_lib.packing_align(cfg)
  rng = np.random.default_rng(5)
  lengths = (3 * align, 2 * align + 1, align - 1)
  # Aligned packing: each document is padded to the next aligned start, the padding belonging
  # to its document's segment (as data.pack(..., "aligned") does).
  pieces = []
  for n in lengths:
    piece = np.zeros(-(-n // align) * align, np.int32)
    piece[:n] = rng.integers(0, cfg.vocab_size, n)
    pieces.append(piece)
  ids = np.concatenate(pieces)[None]
  seg = np.concatenate([np.full(len(p), d, np.int32) for d, p in enumerate(pieces)])[None]

  def kl(ids, segments=None):
    x, outs, _ = model.trunk(jnp.asarray(ids), segments=None if segments is None else
                             jnp.asarray(segments),
                             options=deepseek_v4.Options(indexer_stage=stage))
    return np.asarray(outs[0].indexer_kl, np.float64)

  packed = kl(ids, seg)
  alone = sum(kl(piece[None]) for piece in pieces)
  assert packed[1] == alone[1] and packed[1] > 0
  assert rel_err(packed[0], alone[0]) < F32_MODEL_REL


def test_every_module_imports_alone():
  """No import cycles: each module of the package imports first in a fresh interpreter."""
  import deepseek_v4 as pkg
  import kernels_pallas

  names = [m.name for p in (pkg, kernels_pallas)
           for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
  code = ("import importlib, sys\n"
          "for n in sys.argv[1:]:\n"
          "  for k in [k for k in sys.modules if k.startswith(('deepseek_v4', 'kernels_pallas'))]:\n"
          "    del sys.modules[k]\n"
          "  importlib.import_module(n)\n")
  out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert importlib.import_module("deepseek_v4.parallel")


def test_one_loop_over_layers():
  """`Transformer.trunk` is the only loop over the model's layer groups."""
  import pathlib
  import re

  root = pathlib.Path(deepseek_v4.__file__).parent
  hits = [(str(p.relative_to(root)), line.strip()) for p in root.rglob("*.py")
          for line in p.read_text().splitlines()
          if re.match(r"\s*for .* in .*(\.groups\b|\.layers\b|layer_groups\()", line)]
  # speculative.py's commit walks the groups to run only each attention's cache-writing half
  # (docs/speculative.md#rollback), never a block's forward.
  allowed = {"model.py", "layout.py", "cache.py", "train/step.py",
             "sharding/placement.py", "speculative.py"}
  assert {p for p, _ in hits} <= allowed, hits
  assert [line for p, line in hits if p == "model.py"] == [
    "for group, gcache in zip(self.groups, caches):"]
