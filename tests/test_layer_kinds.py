"""Attention kinds (deepseek_v4/kinds.py): a kind defined and registered here, in the test file,
runs through every consumer without a library edit: config + config.json, summary, plan, the
forward, prefill + decode == forward, a training step and a checkpoint round trip. Plus the V4
kinds' cache byte answers against the arrays `init_cache` allocates.

The toy kind, StridedPool(stride=s): beside the sliding window each query attends one entry per
complete block of s tokens, entry j = pool(mean of the attention inputs x over positions
[j s, (j+1) s)), `pool` a learned Linear D -> head_dim owned by the layer. Its decode cache keeps
the entries and the inputs of the current incomplete block.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import decoding, kinds, layout, plan, summary, train
from deepseek_v4.checkpoint.io import Checkpointer, load_model
from deepseek_v4.layers.params import Linear
from deepseek_v4.optim import muon
from tests.hf_oracle import randomize_params
from tests.tolerances import F32_DECODE_REL, rel_err


@kinds.register
@dataclasses.dataclass(frozen=True)
class StridedPool(kinds.AttentionKind):
  name = "strided_pool"
  stride: int = 4

  @property
  def ratio(self) -> int:
    return self.stride

  def rotary_compressed(self) -> bool:
    return False

  def validate(self, cfg) -> None:
    if self.stride <= 0:
      raise ValueError(f"StridedPool(stride={self.stride}) must be positive")

  def param_names(self):
    return ("pool",)

  def build(self, cfg, lin, rngs):
    return {"pool": Linear(cfg.d_model, cfg.head_dim, axes=("head_dim", "embed"), **lin)}

  def _entries(self, attn, blocks):  # blocks [B, n, s, D] -> entries [B, n, H]
    return attn.pool(jnp.mean(blocks.astype(jnp.float32), axis=2).astype(blocks.dtype))

  def full_entries(self, attn, x, cq, cos, sin, freqs, row_pos, doc_pos, segments, stage, impl,
                   block):
    B, T, D = x.shape
    n = T // self.stride
    comp = self._entries(attn, x[:, : n * self.stride].reshape(B, n, self.stride, D))
    seg = None if segments is None else segments[:, : n * self.stride: self.stride]
    return kinds.EntrySources(comp=comp, comp_seg=seg)

  def extend_entries(self, attn, x, cq, positions, cos, sin, freqs, n_valid, cache, impl,
                     block):
    s, (B, T, D) = self.stride, x.shape
    start = positions[:, 0]
    base = start // s * s
    off = start - base  # real tokens already in the pending block
    L = s * ((s + T) // s + 1)
    k = jnp.arange(s)[None, :]
    pending = jnp.where((k < off[:, None])[..., None], cache.extra["pending"], 0.0)
    buf = jnp.zeros((B, L, D), jnp.float32).at[:, :s].set(pending)
    t = jnp.arange(T)[None, :]
    slot = jnp.where(t < n_valid[:, None], off[:, None] + t, L)  # L = dropped (padding)
    buf = buf.at[jnp.arange(B)[:, None], slot].set(x.astype(jnp.float32), mode="drop")
    blocks = buf.reshape(B, L // s, s, D)
    new = self._entries(attn, blocks.astype(x.dtype))  # [B, nb, H]
    j = jnp.arange(L // s)[None, :]
    done = base[:, None] + (j + 1) * s <= (start + n_valid)[:, None]
    C = cache.extra["entries"].shape[1]
    idx = jnp.where(done, base[:, None] // s + j, C)
    entries = cache.extra["entries"].at[jnp.arange(B)[:, None], idx].set(
      new.astype(cache.extra["entries"].dtype), mode="drop")
    open_block = (off + n_valid) // s
    pending = blocks[jnp.arange(B), open_block]
    return kinds.EntrySources(comp=entries), {"extra": {"pending": pending, "entries": entries}}

  def init_cache(self, cfg, batch, max_len, dtype):
    return {"extra": {"pending": jnp.zeros((batch, self.stride, cfg.d_model), jnp.float32),
                      "entries": jnp.zeros((batch, max_len // self.stride, cfg.head_dim), dtype)}}

  def cache_parts(self, cfg, max_len, item):
    # init_cache's order as jax flattens the dict: entries, pending
    return [("pooled entries", "kv", max_len // self.stride, cfg.head_dim, item, self.stride),
            ("pending block inputs", "state", self.stride, cfg.d_model, 4, 0)]

  def entry_keys(self, cfg, ctx):
    return ctx // self.stride, np.zeros_like(ctx)

  def entry_key_sums(self, cfg, context):
    q = context // self.stride  # sum_{c=1..context} floor(c / s)
    return self.stride * q * (q - 1) // 2 + q * (context - q * self.stride + 1), 0

  def block_entries(self, cfg, seq):
    return seq // self.stride


POOL = StridedPool(stride=4)
SCHEDULE = (0, POOL, 4, 16, POOL)  # sliding, toy, CSA, HCA(16), toy


def _cfg(**kw):
  return deepseek_v4.tiny(compress_ratios=SCHEDULE, num_hash_layers=1, **kw)


@pytest.fixture(scope="module")
def model():
  return randomize_params(deepseek_v4.Transformer(_cfg(), rngs=nnx.Rngs(0)), seed=1)


# ----- the registry and the config ----------------------------------------------------------------
def test_kinds_are_hashable_static_structure():
  cfg = _cfg()
  assert cfg.layer_kinds == (deepseek_v4.Sliding(), POOL, deepseek_v4.CSA(),
                             deepseek_v4.HCA(ratio=16), POOL)
  assert hash(cfg) == hash(_cfg()) and cfg == _cfg()
  # the V4 kinds are stored as their official ratios: one canonical form per schedule
  assert cfg.compress_ratios == (0, POOL, 4, 16, POOL)
  assert cfg == _cfg().replace(compress_ratios=(deepseek_v4.Sliding(), POOL, deepseek_v4.CSA(),
                                                deepseek_v4.HCA(ratio=16), POOL))
  assert cfg.layer_ratios == (0, 4, 4, 16, 4)
  # equal kinds group: the two toy layers are not one period, but each is its own block
  assert [g.kinds for g in layout.layer_groups(cfg)] == [(k,) for k in cfg.layer_kinds]
  assert "strided_pool" in kinds.registered()
  with pytest.raises(TypeError, match="frozen dataclass"):
    kinds.register(type("Loose", (kinds.AttentionKind,), {"name": "loose"}))


def test_config_json_round_trip_of_a_user_kind():
  cfg = _cfg()
  hf = json.loads(json.dumps(cfg.to_hf()))
  assert "layer_types" not in hf  # no official encoding for the toy
  assert hf["deepseek_v4_jax"]["layers"][1] == {"kind": "strided_pool", "stride": 4}
  assert deepseek_v4.ModelConfig.from_hf(hf) == cfg
  assert deepseek_v4.ModelConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
  # the V4 kinds keep the official encoding
  assert "layer_types" in deepseek_v4.tiny().to_hf()
  hf["deepseek_v4_jax"]["layers"][1] = {"kind": "no_such_kind"}
  with pytest.raises(ValueError, match=r"layers\[1\].*no_such_kind.*strided_pool"):
    deepseek_v4.ModelConfig.from_hf(hf)


def test_bad_kind_entries_are_named():
  with pytest.raises(ValueError, match=r"compress_ratios\[1\]='csa'"):
    deepseek_v4.tiny(compress_ratios=(0, "csa"))
  with pytest.raises(ValueError, match="stride=0"):
    _cfg().replace(compress_ratios=(0, StridedPool(stride=0)))
  with pytest.raises(ValueError, match="HCA.ratio=4"):
    deepseek_v4.tiny(compress_ratios=(deepseek_v4.HCA(ratio=4),))


# ----- summary and plan ---------------------------------------------------------------------------
def test_summary_counts_the_toy_kind():
  cfg = _cfg()
  s = summary.summarize(cfg, context=64)
  pool_params = 2 * cfg.head_dim * cfg.d_model  # two layers' `pool` weights
  sliding = s.params.total["attn_sliding"]  # one layer's shared projections
  assert s.params.total["attn_strided_pool"] == 2 * sliding + pool_params
  text = summary.format_summary(s)
  assert "1 sliding, 1 CSA, 1 HCA, 2 strided_pool" in text
  assert "attention projections (strided_pool)" in text
  # its keys: window + one entry per complete block, at the last position of the context
  per_key = 2 * 2 * cfg.num_heads * cfg.head_dim
  assert s.flops.attention["attn_core_strided_pool"] == 2 * (cfg.window + 64 // 4) * per_key
  mean = summary.attention_flops_prefill_mean(cfg, 64)["attn_core_strided_pool"]
  ctx = np.arange(1, 65)
  assert mean == pytest.approx(2 * per_key * np.mean(np.minimum(cfg.window, ctx) + ctx // 4))
  # the cache rows come from the kind's parts
  names = [r.name for r in s.kv.rows]
  assert "pooled entries" in names


def test_plan_reads_the_toy_kind():
  cfg = _cfg()
  p = plan.make_plan(cfg, dict(fsdp=4, expert=2), "fsdp_ep", plan.Settings(batch=8, seq=256))
  whole = cache_lib.cache_bytes(jax.eval_shape(lambda: cache_lib.init_cache(cfg, 8, 256)))
  (kv,) = [b for label, b, _ in p.lines if label.startswith("KV cache")]
  assert kv == whole / 8
  assert plan.format_plan(p)


def test_cache_byte_model_of_the_toy_kind():
  cfg = _cfg()
  for max_len, dtype in ((64, jnp.float32), (96, jnp.bfloat16)):
    c = cache_lib.init_cache(cfg, 2, max_len, dtype)
    assert cache_lib.model_bytes(cfg, 2, max_len, dtype) == cache_lib.cache_bytes(c)
    toy = sum(x.nbytes for i in (1, 4) for x in jax.tree.leaves(c.layer(i)))
    model = sum(2 * p.bytes for p in cache_lib.byte_model(cfg, max_len, dtype)
                if p.kind == "strided_pool")
    assert model == toy
  assert cache_lib.capacity_multiple(cfg) == 16


@pytest.mark.parametrize("name", ["tiny", "dense", "csa", "hca", "window"])
def test_v4_kind_cache_parts_equal_their_arrays(name):
  """Each V4 kind's `cache_parts` (+ the window ring) add up to exactly the bytes
  `init_layer_cache` allocates for it, and grow with the capacity as the arrays do."""
  cfg = deepseek_v4.tiny() if name == "tiny" else deepseek_v4.tiny(attention=name, hca_ratio=8)
  dtype = jnp.bfloat16
  item = jnp.dtype(dtype).itemsize
  for kind in dict.fromkeys(cfg.layer_kinds):
    for max_len in (48, 96):
      arrays = jax.tree.leaves(cache_lib.init_layer_cache(cfg, kind, 1, max_len, dtype))
      parts = cache_lib._layer_parts(cfg, kind, max_len, item)
      got = sum(a.nbytes for a in arrays)
      assert got == sum(slots * width * size for _, _, slots, width, size, _ in parts), kind
      if max_len == 48:
        fixed = got - 48 * sum(w * s / st for _, _, _, w, s, st in parts if st)
      else:  # per_token = the parts' width * itemsize / stride
        assert got == fixed + 96 * sum(w * s / st for _, _, _, w, s, st in parts if st), kind


# ----- the model ----------------------------------------------------------------------------------
def test_toy_layers_own_their_submodule(model):
  attn = model.layer(1).attn
  assert attn.kind == POOL and attn.pool.weight.shape == (model.cfg.head_dim, model.cfg.d_model)
  assert attn.compressor is None and attn.indexer is None
  assert model.layer(2).attn.indexer is not None


def test_toy_entries_change_the_output(model):
  """The pooled entries are really attended: zeroing the toy layers' `pool` changes the logits."""
  ids = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 32)))
  forward = nnx.jit(lambda m, x: m(x))
  full = np.asarray(forward(model, ids))
  assert np.isfinite(full).all()
  state = nnx.state(model)
  zeroed = jax.tree_util.tree_map_with_path(
    lambda p, x: jnp.zeros_like(x) if ".pool." in "." + layout.path_name(p) + "." else x, state)
  other = nnx.merge(nnx.graphdef(model), zeroed)
  assert rel_err(np.asarray(forward(other, ids)), full) > 1e-3


def test_prefill_and_decode_equal_the_forward(model):
  rng = np.random.default_rng(0)
  B, steps = 4, 9
  lengths = np.array([5, 8, 13, 16], np.int32)
  T = int(lengths.max())
  tokens = rng.integers(0, model.cfg.vocab_size, (B, T + steps)).astype(np.int32)
  full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(tokens)))
  cache = cache_lib.init_cache(model.cfg, B, T + steps)
  prompt = np.where(np.arange(T)[None] < lengths[:, None], tokens[:, :T], 0)
  logits, cache = decoding.prefill(model, cache, prompt, lengths, chunk_size=3)
  logits = np.asarray(logits)
  errs = [max(rel_err(logits[b, :lengths[b]], full[b, :lengths[b]]) for b in range(B))]
  rows = np.arange(B)
  for i in range(steps):
    step, cache = decoding.decode_step(model, cache, tokens[rows, lengths + i])
    step = np.asarray(step)
    errs.append(max(rel_err(step[b], full[b, lengths[b] + i]) for b in range(B)))
  assert max(errs) < F32_DECODE_REL, errs


def test_training_step_reaches_the_toy_parameters():
  # two layers (sliding, toy) keep the compile short; the mixed model is the fixture's
  cfg = deepseek_v4.tiny(compress_ratios=(0, POOL), num_hash_layers=1, num_mtp_layers=0,
                         hc_sinkhorn_iters=3)
  tcfg = train.TrainConfig(seq_len=32, batch_size=2, steps=4, learning_rate=1e-2, warmup_steps=1,
                           decay_fraction=0.0)
  model, opt = train.build(cfg, tcfg)
  toks = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 33))
  batch = train.as_batch(toks[:, :-1], toks[:, 1:])
  grads = nnx.jit(nnx.grad(lambda m: train.loss_fn(m, batch, tcfg)[0]))(model)
  g = np.asarray(grads["groups"][1]["blocks"][0]["attn"]["pool"]["weight"][...])
  assert np.isfinite(g).all() and np.abs(g).max() > 0
  # the toy's weight is a Muon matrix of one block (its kind answers no split)
  blocks = muon.matrix_blocks(cfg)("groups.1.blocks.0.attn.pool.weight", g.shape)
  assert blocks == muon.MatrixBlocks()
  before = np.asarray(model.layer(1).attn.pool.weight[...])
  hist = [float(train.train_step(model, opt, batch, 0.0, tcfg=tcfg)["lm_loss"])
          for _ in range(tcfg.steps)]
  assert hist[-1] < hist[0] and all(math.isfinite(h) for h in hist)
  assert not np.array_equal(before, np.asarray(model.layer(1).attn.pool.weight[...]))


def test_checkpoint_round_trip(tmp_path, model):
  tcfg = train.TrainConfig(seq_len=16, batch_size=2)
  ck = Checkpointer(tmp_path, keep=1)
  ck.save(1, model, train_config=tcfg)
  loaded = load_model(tmp_path, step=1)
  assert loaded.cfg == model.cfg and loaded.layer(4).attn.kind == POOL
  want, got = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded))
  assert [p for p, _ in want] == [p for p, _ in got]  # the toy's `pool` paths included
  for (_, a), (_, b) in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
