"""Context parallelism (docs/context_parallel.md) on 8 simulated CPU devices: the sequence split
over a `context` mesh axis gives the one-device numbers.

Oracles: the one-device forward (logits, f32, within F32_CONTEXT_PARALLEL_REL), its gradients
(F32_CONTEXT_PARALLEL_GRAD_REL), plain (chunked) prefill + greedy decoding (token for token, and
the cache array by array), and packed documents run one by one. Lengths are not multiples of 128,
and 203 not of the device count either, so every layer pads its slices (to a multiple of devices
x its ratio).

The default run uses the one-CSA-layer model of the sharding tests at context=8 and context=4 x
expert=2 (forward, chunked prefill + decode); the 3-layer model (one layer of each kind), the
tiny preset, gradients, the train step and whole-prompt prefill + decode are `slow` (each
compiles a whole context-parallel program: 40-150 s on 2 shared cores).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import decoding, parallel, sharding
from deepseek_v4.layers import context_parallel
from tests import sharded_steps as steps
from tests.hf_oracle import randomize_params
from tests.tolerances import F32_CONTEXT_PARALLEL_GRAD_REL, F32_CONTEXT_PARALLEL_REL, rel_err

MESHES = {"context8": (dict(context=8), "fsdp"), "context4_ep2": (dict(context=4, expert=2),
                                                                   "fsdp_ep")}


def _model(cfg, seed: int = 1):
  return randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)), seed=seed)


def _ids(cfg, B: int, T: int, seed: int = 2) -> np.ndarray:
  return np.asarray(jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size), np.int32)


def _assert_topk_selects(cfg, T: int):
  """The CSA layers' top-k really chooses: late queries see more entries than k_I."""
  assert any(k.name == "csa" for k in cfg.layer_kinds)
  assert cfg.index_topk < T // 4, (cfg.index_topk, T)


def _forward_matches(cfg, mesh_name: str, B: int, T: int):
  sizes, rules = MESHES[mesh_name]
  model = _model(cfg)
  ids = _ids(cfg, B, T)
  ref = np.asarray(model(jnp.asarray(ids)))
  mesh = sharding.make_mesh(**sizes)
  out = parallel.jit_forward(model, mesh, rules)(model, jnp.asarray(ids))
  err = rel_err(out, ref)
  print(f"\n{mesh_name} T={T}: logits rel err {err:.1e}, logits sharding {out.sharding.spec}")
  assert err < F32_CONTEXT_PARALLEL_REL
  return out


def test_layout_from_mesh_and_rules():
  mesh = sharding.make_mesh(context=4, expert=2)
  cp = context_parallel.context_parallel_layout(mesh, "fsdp_ep")
  assert (cp.axis, cp.size, cp.batch_axes) == ("context", 4, ("data", "fsdp", "expert"))
  assert parallel.options(mesh, "fsdp_ep").context == cp
  # the MoE's tokens [B*T] are split over the batch axes, then the sequence's
  assert parallel.moe_impl(mesh, "fsdp_ep").expert_parallel.token_axes == (
    "data", "fsdp", "expert", "context")
  assert context_parallel.context_parallel_layout(sharding.make_mesh(fsdp=8), "fsdp") is None


def test_forward_context8_equals_one_device():
  """T = 200 (not a multiple of 128): padded to 256 inside the layer; the logits come back split
  along `context`. The one-CSA-layer model (window, overlapping compressors, indexer top-k)."""
  cfg = steps.CFG_SMALL
  _assert_topk_selects(cfg, 200)
  out = _forward_matches(cfg, "context8", 2, 200)
  assert out.sharding.spec[1] == "context"


def test_query_blocks():
  """A slice's queries run in the fewest equal blocks of at most `query_block` tokens."""
  assert context_parallel.query_blocks(131072, 8192) == 16
  assert context_parallel.query_blocks(100, 8192) == 1
  assert context_parallel.query_blocks(96, 40) == 3  # blocks of 32
  assert context_parallel.query_blocks(97, 40) == 1  # a prime: no divisor fits, one block
  with pytest.raises(ValueError, match="query_block must be >= 1, got 0"):
    context_parallel.ContextParallel(sharding.make_mesh(context=8), "context", query_block=0)


def test_query_blocked_forward_equals_unblocked():
  """The slices' queries in blocks (T = 200 padded to 224 over 8 devices: 4 blocks of 7 per
  28-token slice, each with the halo before it) give the one-device logits."""
  import dataclasses

  cfg = steps.CFG_SMALL
  sizes, rules = MESHES["context8"]
  mesh = sharding.make_mesh(**sizes)
  model = _model(cfg)
  ids = jnp.asarray(_ids(cfg, 2, 200))
  ref = np.asarray(model(ids))
  opts = parallel.options(mesh, rules)
  assert steps.CFG_SMALL.compress_ratios == (4,)
  assert context_parallel.query_blocks((200 + 24) // 8, 8) == 4
  blocked = opts.replace(context=dataclasses.replace(opts.context, query_block=8))
  out = parallel.jit_forward(model, mesh, rules, options=blocked)(model, ids)
  err = rel_err(out, ref)
  print(f"\nquery blocks of 8: logits rel err {err:.1e}")
  assert err < F32_CONTEXT_PARALLEL_REL


@pytest.mark.parametrize("cfg", [pytest.param(steps.CFG_SMALL, id="csa"),
                                 pytest.param(steps.CFG, id="3_kinds", marks=pytest.mark.slow)])
def test_packed_documents_isolated_context4_expert2(cfg):
  """Aligned packing (documents start at multiples of 16) over context=4 x expert=2 at T = 203
  (not a multiple of 128 or of 8): slice boundaries (every 64 tokens with the HCA layer's
  padding to 256, every 52 otherwise) fall inside documents; every document's logits equal its
  own one-device forward."""
  sizes, rules = MESHES["context4_ep2"]
  model = _model(cfg)
  lengths = (48, 48, 48, 48, 11)
  T = sum(lengths)
  ids = _ids(cfg, 1, T)
  seg = np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int32)
  mesh = sharding.make_mesh(**sizes)
  opts = parallel.options(mesh, rules)

  def packed(model, ids, seg):
    x, _, _ = model.trunk(ids, segments=seg, options=opts)
    return model.logits(model.final_hidden(x))

  with sharding.use(mesh, rules):
    out = np.asarray(nnx.jit(packed)(model, jnp.asarray(ids), jnp.asarray(seg)))
  starts = np.cumsum((0,) + lengths)
  alone = np.asarray(model(jnp.asarray(ids[0, :192].reshape(4, 48))))  # the four 48-token docs
  last = np.asarray(model(jnp.asarray(ids[:, 192:])))
  for d in range(4):
    err = rel_err(out[0, starts[d]:starts[d + 1]], alone[d])
    assert err < F32_CONTEXT_PARALLEL_REL, (d, err)
  assert rel_err(out[0, 192:], last[0]) < F32_CONTEXT_PARALLEL_REL


def test_clear_errors():
  mesh = sharding.make_mesh(context=8)
  opts = parallel.options(mesh, "fsdp")
  cfg = steps.CFG_SMALL
  model = _model(cfg)
  with pytest.raises(ValueError, match="needs the last 7 tokens of the previous slice"):
    model(jnp.zeros((1, 8), jnp.int32), options=opts)  # one token per device, W - 1 = 7
  dense = _model(deepseek_v4.tiny(attention="dense", compress_ratios=(0,), num_mtp_layers=0,
                                  num_hash_layers=0))
  with pytest.raises(ValueError, match="layer kind 'dense' has no context-parallel path"):
    dense(jnp.zeros((1, 256), jnp.int32), options=opts)  # its window is all of T
  cache = cache_lib.init_cache(cfg, 1, 64)
  with pytest.raises(ValueError, match="chunk_size=18 with a context-parallel options.context "
                                       r"must be a multiple of 4 \(the lcm"):
    decoding.prefill(model, cache, np.zeros((1, 40), np.int32), chunk_size=18, options=opts)
  _, cache = decoding.prefill(model, cache, np.zeros((1, 6), np.int32))  # plain: P = 6
  with pytest.raises(ValueError, match="continues row 0 at position P=6, which must be a "
                                       "multiple of 4"):
    decoding.prefill(model, cache, np.zeros((1, 40), np.int32), options=opts)


def _assert_caches_match(got, ref):
  """Every cache array (window ring, entries, indexer keys, compressor tails, lengths) within
  F32_CONTEXT_PARALLEL_REL, the empty slots (-inf logits, negative positions) in the same places."""
  for (path, r), g in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
    r, g = np.asarray(r), np.asarray(g)
    name = jax.tree_util.keystr(path)
    if not np.issubdtype(r.dtype, np.floating):
      np.testing.assert_array_equal(g, r, err_msg=name)
      continue
    finite = np.isfinite(r)
    np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=name)
    np.testing.assert_array_equal(g[~finite], r[~finite], err_msg=name)
    err = rel_err(np.where(finite, g, 0), np.where(finite, r, 0)) if finite.any() else 0.0
    assert err < F32_CONTEXT_PARALLEL_REL, (name, err)


def _chunked_prefill_matches(cfg, mesh_name: str, chunk: int, lengths, decode_steps: int = 4,
                             query_block: int = 8192):
  """A prompt batch prefilled in chunks of `chunk` with each chunk split along `context`, then
  greedy decoding, against the plain one-device chunked prefill + decode: the logits of every
  chunk and decoded token, the tokens, and the cache after the prefill."""
  import dataclasses

  sizes, rules = MESHES[mesh_name]
  model = _model(cfg)
  lengths = np.asarray(lengths, np.int32)
  T = int(lengths.max())
  ids = _ids(cfg, len(lengths), T)
  mesh = sharding.make_mesh(**sizes)
  opts = parallel.options(mesh, rules)
  opts = opts.replace(context=dataclasses.replace(opts.context, query_block=query_block))

  def run(options):
    cache = cache_lib.init_cache(cfg, len(lengths), T + decode_steps)
    logits, cache = decoding.prefill(model, cache, ids, lengths, chunk_size=chunk,
                                     options=options)
    prefilled = jax.tree.map(np.asarray, cache)
    out = [np.asarray(logits)]
    tok = jnp.argmax(logits[np.arange(len(lengths)), lengths - 1], -1)
    toks = []
    for _ in range(decode_steps):
      toks.append(np.asarray(tok))
      logits, cache = decoding.decode_step(model, cache, tok, options=options)
      out.append(np.asarray(logits))
      tok = jnp.argmax(logits, -1)
    return out, np.stack(toks, 1), prefilled

  ref, ref_toks, ref_cache = run(None)
  with sharding.use(mesh, rules):
    got, toks, cache = run(opts)
  real = np.arange(T)[None, :] < lengths[:, None]  # the prefill logits of real tokens
  errs = [rel_err(got[0][real], ref[0][real])] + [rel_err(g, r) for g, r in zip(got[1:], ref[1:])]
  print(f"\n{mesh_name} chunks of {chunk}, lengths {lengths.tolist()}: prefill rel err "
        f"{errs[0]:.1e}, decode max {max(errs[1:]):.1e}")
  assert max(errs) < F32_CONTEXT_PARALLEL_REL
  np.testing.assert_array_equal(toks, ref_toks)
  _assert_caches_match(cache, ref_cache)


@pytest.mark.parametrize("mesh_name,query_block", [("context8", 4), ("context4_ep2", 8192)])
def test_chunked_prefill_then_decode_equals_plain(mesh_name, query_block):
  """Prompts of 130 and 100 tokens in context-parallel chunks of 64 (the one-CSA-layer model,
  ratio 4): row 0 in 64 + 64 + 2 (the last chunk ragged, padded to 64 and, inside the layer, to
  a multiple of devices x 4), row 1 in 64 + 36, then riding along in the third chunk at the
  unaligned position 100 with no real token. Later chunks take their earlier keys from the
  cache's window ring, their entries from its buffer, the first slice's CSA overlap from its
  compressor state; row 0's last chunk (2 tokens, under one window) continues the compressor
  tails instead of recomputing them. At context=8 each 8-token slice runs its queries in 2
  blocks of 4, shorter than the halo (7): the second block's halo holds the first's missing
  halo rows too."""
  cfg = steps.CFG_SMALL
  _assert_topk_selects(cfg, 130)
  assert context_parallel.query_blocks(64 // 8, 4) == 2
  _chunked_prefill_matches(cfg, mesh_name, 64, [130, 100], query_block=query_block)


def test_generate_on_a_context_mesh_equals_plain(monkeypatch):
  """`generate(..., mesh=make_mesh(context=8))` prefills context-parallel (in chunks of 64 here:
  130 and 100 tokens, ragged) and decodes on the gathered cache: the same tokens and logits as
  `generate` on one device. A chunk size off the compression-window grid is refused."""
  cfg = steps.CFG_SMALL
  model = _model(cfg)
  ids = _ids(cfg, 2, 130)
  lengths = np.asarray([130, 100])
  kw = dict(lengths=lengths, prefill_chunk=64, return_logits=True)
  ref, ref_logits = decoding.generate(model, ids, 4, **kw)
  calls = []
  original = context_parallel.prefill_attention
  monkeypatch.setattr(context_parallel, "prefill_attention",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  mesh = sharding.make_mesh(context=8)
  got, logits = decoding.generate(model, ids, 4, mesh=mesh, rules="fsdp", **kw)
  assert calls  # the prefill ran context-parallel
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert rel_err(logits, ref_logits) < F32_CONTEXT_PARALLEL_REL
  with pytest.raises(ValueError, match="prefill_chunk=18 with a context-parallel mesh must be a "
                                       "multiple of 4"):
    decoding.generate(model, ids, 2, lengths=lengths, prefill_chunk=18, mesh=mesh, rules="fsdp")


def test_one_sequence_over_context_x_expert_gathers_nothing_along_the_sequence():
  """One row (B = 1) on context=4 x expert=2: the row does not divide over the batch axes, so
  the activations are split along the sequence only, and the MoE's flattened tokens are split
  sequence-major (`ExpertParallel.for_rows`): each device's MoE tokens are half of its own slice.
  The compiled program then gathers nothing over the context axis outside the attention's
  exchange (batch-major tokens made GSPMD gather a whole slice of the layer input along it)."""
  from deepseek_v4.aot import collectives, long_context
  from deepseek_v4.layers import moe_ep

  cfg = steps.CFG_SMALL
  mesh = sharding.make_mesh(context=4, expert=2)
  ep = moe_ep.expert_parallel_layout(mesh, "fsdp_ep")
  assert ep.for_rows(2) is ep and ep.token_axes[-1] == "context"
  assert ep.for_rows(1).token_axes[0] == "context"
  model = parallel.init_model(cfg, mesh, "fsdp_ep")
  graphdef, state = nnx.split(model)
  T = 1024
  fn = long_context.prefill_program(graphdef, jax.tree.map(lambda a: a.sharding, state), mesh,
                                    "fsdp_ep", (1, T), options=parallel.options(mesh, "fsdp_ep"))
  with sharding.use(mesh, "fsdp_ep"):
    text = fn.lower(state, np.zeros((1, T), np.int32)).compile().as_text()
  found = collectives.collectives(text)
  outside = [c for c in found if c.op == "all-gather" and c.group == 4
             and "attention_csa/shard_map" not in c.source]
  assert not outside, outside
  assert any(c.op == "all-gather" and "attention_csa/shard_map" in c.source for c in found)


# ----- slow: the tiny preset, gradients, the train step, prefill + decode ------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_chunked_prefill_tiny_preset(mesh_name):
  """The tiny preset (sliding, CSA and HCA layers; the lcm of the ratios is 16) in chunks of 80:
  203 = 80 + 80 + 43 tokens (not multiples of 128 or of 8) and 150 = 80 + 70."""
  cfg = deepseek_v4.tiny()
  _assert_topk_selects(cfg, 203)
  _chunked_prefill_matches(cfg, mesh_name, 80, [203, 150], decode_steps=8)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("T", [203, 200])
def test_forward_tiny_preset(mesh_name, T):
  cfg = deepseek_v4.tiny()
  _assert_topk_selects(cfg, T)
  _forward_matches(cfg, mesh_name, 2, T)


def _flat(tree) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(tree)}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_gradients_equal_one_device(mesh_name):
  """d(sum(logits * w)) / d(params) on the tiny preset at T = 203, every parameter within
  F32_CONTEXT_PARALLEL_GRAD_REL of its one-device gradient (relative to its largest entry)."""
  cfg = deepseek_v4.tiny()
  sizes, rules = MESHES[mesh_name]
  model = _model(cfg)
  T = 203
  ids = jnp.asarray(_ids(cfg, 1, T))
  w = jax.random.normal(jax.random.key(3), (1, T, cfg.vocab_size))

  def loss(model, ids, options=None):
    return jnp.sum(model(ids, options=options) * w)

  ref = _flat(nnx.jit(nnx.grad(loss))(model, ids))
  mesh = sharding.make_mesh(**sizes)
  opts = parallel.options(mesh, rules)
  with sharding.use(mesh, rules):
    got = _flat(nnx.jit(nnx.grad(lambda m, i: loss(m, i, opts)))(model, ids))
  errs = {k: rel_err(got[k], v) for k, v in ref.items() if np.any(v)}
  worst = max(errs, key=errs.get)
  print(f"\n{mesh_name}: worst gradient {worst} {errs[worst]:.1e}")
  assert errs[worst] < F32_CONTEXT_PARALLEL_GRAD_REL


@pytest.mark.slow
def test_train_step_context8_equals_one_device():
  """`parallel.jit_train_step` with the batch split along the sequence: loss, gradients and the
  updated parameters equal the one-device step (the 3-layer model, T = 192)."""
  cfg = steps.CFG
  b = steps.batch(cfg, B=2, T=192)
  ref_model = _model(cfg)
  ref_opt = steps.optimizer(ref_model)
  ref_loss = float(nnx.jit(steps.lm_step)(ref_model, ref_opt, b)["loss"])
  mesh = sharding.make_mesh(context=8)
  model = parallel.init_model(cfg, mesh, "fsdp")
  nnx.update(model, nnx.state(_model(cfg)))
  opt = steps.optimizer(model)
  step = parallel.jit_train_step(steps.lm_step, model, opt, mesh, "fsdp", donate=False)
  loss = float(step(model, opt, b)["loss"])
  assert abs(loss - ref_loss) / abs(ref_loss) < F32_CONTEXT_PARALLEL_REL
  grads, ref_grads = steps.flat_gradients(opt), steps.flat_gradients(ref_opt)
  worst = max(rel_err(grads[k], v) for k, v in ref_grads.items() if np.any(v))
  assert worst < F32_CONTEXT_PARALLEL_GRAD_REL
  params, ref_params = steps.flat_params(model), steps.flat_params(ref_model)
  assert max(rel_err(params[k], v) for k, v in ref_params.items()) < F32_CONTEXT_PARALLEL_REL


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name,query_block", [(m, 8192) for m in MESHES]
                         + [("context8", 8)])
def test_prefill_then_decode_equals_plain_decoding(mesh_name, query_block):
  """A context-parallel prefill of prompts of 203 and 150 real tokens (right-padded) leaves the
  cache of a plain prefill: the prefill logits agree, and 20 greedy decode steps from each cache
  pick the same tokens with the same logits. `query_block` 8: every layer's slice runs its
  queries in blocks (4 of 8 for HCA's 32-token slices, 4 of 7 for CSA's, 13 of 2 for the
  sliding layers')."""
  import dataclasses

  cfg = deepseek_v4.tiny()
  sizes, rules = MESHES[mesh_name]
  model = _model(cfg)
  T, steps_n = 203, 20
  lengths = np.array([203, 150], np.int32)
  ids = _ids(cfg, 2, T)
  mesh = sharding.make_mesh(**sizes)
  opts = parallel.options(mesh, rules)
  opts = opts.replace(context=dataclasses.replace(opts.context, query_block=query_block))

  def run(options):
    cache = cache_lib.init_cache(cfg, 2, T + steps_n)
    logits, cache = decoding.prefill(model, cache, ids, lengths, logits="last", options=options)
    toks, all_logits = [], [np.asarray(logits)]
    tok = jnp.argmax(logits, -1)
    for _ in range(steps_n):
      toks.append(np.asarray(tok))
      logits, cache = decoding.decode_step(model, cache, tok, options=options)
      all_logits.append(np.asarray(logits))
      tok = jnp.argmax(logits, -1)
    return np.stack(toks, 1), np.stack(all_logits, 1), cache

  ref_toks, ref_logits, ref_cache = run(None)
  with sharding.use(mesh, rules):
    toks, logits, cache = run(opts)
  np.testing.assert_array_equal(toks, ref_toks)
  assert rel_err(logits, ref_logits) < F32_CONTEXT_PARALLEL_REL
