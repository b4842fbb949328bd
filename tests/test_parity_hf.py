"""Parity against transformers' DeepseekV4ForCausalLM (the oracle) on tiny random models.

Logits relative error < F32_MODEL_REL at lengths covering every residue of T mod 4, lengths below,
at and above the first CSA window (4) and the first HCA window (16), and lengths where the CSA
entries outnumber index_topk (so the indexer really selects). Per-layer stream comparisons and
component comparisons point at the failing piece.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import deepseek_v4  # noqa: E402
from deepseek_v4.layers import mhc, rope  # noqa: E402
from tests.hf_oracle import hf_logits, hf_model, randomize_params  # noqa: E402
from tests.tolerances import BF16, F32_FUNCTION, F32_MODEL_REL, rel_err  # noqa: E402

pytestmark = pytest.mark.parity

# T mod 4 = 1,2,3,0 around the first CSA window; 15/16/17 around the first HCA window (ratio 16);
# 37 and 64 have 9 and 16 CSA entries against index_topk = 4.
LENGTHS = [1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 37, 64]


def _model(cfg, seed=0, options=deepseek_v4.Options()):
  return randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(seed), options=options), seed)


@pytest.fixture(scope="module")
def pair(tiny_cfg):
  model = _model(tiny_cfg)
  return model, hf_model(model)


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, ids: m(ids))


@pytest.fixture(scope="module")
def trunk():
  return nnx.jit(lambda m, ids: m.trunk(ids)[0])


@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_logits_match_transformers(pair, forward, T):
  model, ref = pair
  ids = np.random.default_rng(T).integers(0, model.cfg.vocab_size, (2, T)).astype(np.int32)
  ours = np.asarray(forward(model, jnp.asarray(ids)))
  theirs = hf_logits(ref, ids)
  assert ours.shape == theirs.shape == (2, T, model.cfg.vocab_size)
  assert rel_err(ours, theirs) < F32_MODEL_REL


def test_indexer_really_selects(pair):
  """At T=64 a CSA query sees up to 16 entries but keeps 4: the selection is not the identity."""
  model, _ = pair
  attn = model.layer(2).attn
  assert attn.kind == deepseek_v4.CSA()
  T = 64
  x = jax.random.normal(jax.random.key(0), (1, T, model.cfg.d_model))
  pos = jnp.arange(T)[None]
  cos, sin = rope.rope_angles(pos, attn.freqs)
  cq, _, _ = attn.project_qkv(x, cos, sin)
  keys, q, w = attn.indexer.encode(x, cq, cos, sin, attn.freqs)
  idx = attn.indexer.select(q, w, keys, pos)
  idx = np.asarray(idx)[0]
  assert idx.shape == (T, model.cfg.index_topk)
  last = idx[-1]
  assert (last >= 0).all() and len(set(last)) == 4 and set(last) != {0, 1, 2, 3}
  assert (idx[:3] == -1).all()  # t = 0, 1, 2 see no entry


@pytest.mark.parametrize("T", [9, pytest.param(40, marks=pytest.mark.slow)],
                         ids=lambda t: f"T{t}")
def test_every_layer_stream_matches(pair, trunk, T):
  """mHC streams after each block (transformers' hidden_states) agree layer by layer."""
  model, ref = pair
  ids = np.random.default_rng(100 + T).integers(0, model.cfg.vocab_size, (1, T)).astype(np.int32)
  _, hidden = hf_logits(ref, ids, output_hidden_states=True)
  # transformers records the input streams of each decoder layer, then the final normed hidden.
  L = model.cfg.num_layers
  assert len(hidden) == L + 1
  x = jnp.asarray(ids)
  e = model.embed_tokens(x)
  streams = jnp.broadcast_to(e[:, :, None], (1, T, model.cfg.hc_mult, model.cfg.d_model))
  pos = jnp.arange(T)[None]
  for i in range(L):
    assert rel_err(streams, hidden[i]) < F32_MODEL_REL, f"input of layer {i}"
    streams, _ = model.layer(i)(streams, x, pos)
  final = model.final_hidden(streams)
  assert rel_err(final, hidden[-1]) < F32_MODEL_REL


def test_moe_matches_transformers_module(pair):
  model, ref = pair
  for i in (0, 4):  # a hash-routed and a score-routed layer
    x = np.random.default_rng(i).standard_normal((2, 7, model.cfg.d_model)).astype(np.float32)
    ids = np.random.default_rng(i).integers(0, model.cfg.vocab_size, (2, 7))
    ours, _ = model.layer(i).ffn(jnp.asarray(x), jnp.asarray(ids, jnp.int32))
    with torch.no_grad():
      theirs = ref.model.layers[i].mlp(torch.as_tensor(x), input_ids=torch.as_tensor(ids))
    assert rel_err(ours, theirs.numpy()) < F32_FUNCTION, f"layer {i}"


def test_mhc_matches_transformers_module(pair):
  model, ref = pair
  layer = model.layer(3)
  x = np.random.default_rng(0).standard_normal((2, 5, 4, model.cfg.d_model)).astype(np.float32)
  pre, post, comb = layer._site(jnp.asarray(x), "attn")
  with torch.no_grad():
    t_post, t_comb, t_collapsed = ref.model.layers[3].attn_hc(torch.as_tensor(x))
  assert rel_err(post, t_post.numpy()) < F32_FUNCTION
  assert rel_err(comb, t_comb.numpy()) < F32_FUNCTION
  assert rel_err(mhc.hc_collapse(jnp.asarray(x), pre), t_collapsed.numpy()) < F32_FUNCTION


def test_rope_tables_match_transformers(pair):
  model, ref = pair
  rot = ref.model.rotary_emb
  for kind, compressed in (("main", False), ("compress", True)):
    theirs = getattr(rot, f"{kind}_inv_freq").numpy()
    ours = rope.inv_freq(model.cfg, compressed)
    np.testing.assert_allclose(ours, theirs, rtol=F32_FUNCTION)


def test_pro_like_layout_matches_transformers():
  """Pro's schedule (HCA first layers, no sliding-only trunk layer) with other random weights."""
  cfg = deepseek_v4.tiny(compress_ratios=(16, 16, 4, 16, 4, 16), route_scale=2.5)
  model = _model(cfg, seed=1)
  ref = hf_model(model)
  ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 50)).astype(np.int32)
  ours = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids)))
  assert rel_err(ours, hf_logits(ref, ids)) < F32_MODEL_REL


# A narrow model at the published configs' selection and compression scale: T = 4096,
# index_topk 512 of 1024 CSA entries, window 128, CSA 4, HCA 128. 16 indexer heads: with 2, a
# quarter of the entries score exactly 0 (every head's ReLU off), and at the top-k cut such ties are
# broken differently by jax.lax.top_k (lowest index first) and torch.topk (unspecified), which made
# logits differ from position 2056 on (the first query with more visible entries than k;
# docs/architecture.md#verification).
REAL_SCALE = dict(d_model=64, num_heads=4, head_dim=64, rope_dim=16, q_lora_rank=32, o_groups=2,
                  o_lora_rank=16, window=128, compress_ratios=(0, 4, 128, 4), index_heads=16,
                  index_head_dim=32, index_topk=512, num_experts=8, experts_per_token=2,
                  moe_inter_dim=32, num_hash_layers=1, num_mtp_layers=0, vocab_size=512,
                  max_position_embeddings=8192, hc_sinkhorn_iters=20)


def _hf_selections(ref) -> tuple[list, list]:
  """Hooks on transformers' indexers: per CSA layer, its selections [B, T, k] and scores."""
  picks, scores = [], []
  for layer in ref.model.layers:
    indexer = getattr(getattr(layer.self_attn, "compressor", None), "indexer", None)
    if indexer is not None:
      indexer.register_forward_hook(lambda m, i, out: picks.append(out.numpy()))
      indexer.scorer.register_forward_hook(lambda m, i, out: scores.append(out.numpy()))
  return picks, scores


@pytest.mark.slow
def test_logits_match_transformers_at_real_selection_scale():
  """At T = 4096 the indexer drops half the visible entries, so a score that ties (or nearly
  ties, within float32 rounding of two implementations) at the top-k cut can be picked by one
  side and not the other. Checked: every query whose selection differs is such a near tie in
  transformers' own scores, such queries are rare, and every other position's logits match."""
  from tests.recording import recorded_selections

  cfg = deepseek_v4.tiny(**REAL_SCALE)
  model = _model(cfg, seed=7, options=deepseek_v4.Options(scan_layers=False, attn_block=16))
  T = 4096
  ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
  with recorded_selections() as ours_picks:
    ours = np.asarray(model(jnp.asarray(ids)))  # eager, so the selections are concrete
  ref = hf_model(model)
  hf_picks, hf_scores = _hf_selections(ref)
  want = hf_logits(ref, ids)
  assert len(ours_picks) == len(hf_picks) == cfg.compress_ratios.count(4)
  flipped = set()
  for a, b, score in zip(ours_picks, hf_picks, hf_scores):
    a, b, score = a[0], b[0], score[0]
    for t in np.nonzero((np.sort(a, -1) != np.sort(b, -1)).any(-1))[0]:
      only_ours = sorted(set(a[t].tolist()) - set(b[t].tolist()))
      only_hf = sorted(set(b[t].tolist()) - set(a[t].tolist()))
      gap = score[t, only_hf].min() - score[t, only_ours].max()  # >= 0: transformers' top-k
      assert 0 <= gap <= F32_MODEL_REL * np.abs(score[t, :(t + 1) // 4]).max(), (t, gap)
      flipped.add(int(t))
  print(f"near-tie selection flips at {sorted(flipped)} of {T} positions")
  assert len(flipped) <= T // 1000
  per_token = np.abs(ours - want).max(-1)[0] / np.abs(want).max()
  keep = np.setdiff1d(np.arange(T), sorted(flipped))
  assert per_token[keep].max() < F32_MODEL_REL, (per_token[keep].argmax(), per_token[keep].max())
  # The bf16 forward (bf16 weights and compute; norms, softmax, router and mHC in float32). Its
  # largest errors come from discrete choices (an expert or an indexer pick flipping at a near
  # tie: about 5% of tokens at this random init), which rounding the weights alone also causes,
  # so the bound is per token: the median token stays within the bf16 tolerance, and within 2x of
  # what rounding only the weights to bf16 (float32 compute) already costs.
  from deepseek_v4.checkpoint.convert import from_hub_tensors, to_hub_tensors

  hub = to_hub_tensors(model)
  run = nnx.jit(lambda m, x: m(x))
  bf = from_hub_tensors(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), hub)
  rounded = from_hub_tensors(cfg, {k: v.astype(jnp.bfloat16).astype(v.dtype) if v.dtype ==
                                   np.float32 else v for k, v in hub.items()})
  per_token = lambda x: np.median(np.abs(x - ours).max(-1) / np.abs(ours).max())  # noqa: E731
  bf16_err = per_token(np.asarray(run(bf, jnp.asarray(ids)), np.float32))
  weights_err = per_token(np.asarray(run(rounded, jnp.asarray(ids))))
  print(f"bf16 median per-token error {bf16_err:.2e}; bf16 weights alone {weights_err:.2e}")
  assert bf16_err < BF16 and bf16_err < 2 * weights_err
