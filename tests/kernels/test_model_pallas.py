"""The whole tiny model with `Options(kernel_impl="pallas")` (interpreted on CPU) equals
`kernel_impl="reference"`: forward logits, loss gradients, prefill + decode.

Both models hold the same random non-trivial weights (`randomize_params`), copied with `nnx.update`;
only `Options.kernel_impl` differs, so the attention (`sparse_attention`) and the lightning indexer
(`indexer_topk`) run their Pallas bodies in one and their references in the other. A counter on the
kernel modules proves the Pallas path actually ran (a silent fall-back to the reference would pass
every comparison).

T = 37 is not a multiple of `Options.attn_block` (16 here) and longer than the window (8); it gives
9 CSA entries against index_topk = 4 (the selection is a real choice) and 2 HCA entries (ratio 16).
Compilation dominates the time on CPU, so each test compiles one program per implementation.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import decoding, train
from deepseek_v4.options import Options
from kernels_pallas.indexer_topk import kernel as indexer_kernel
from kernels_pallas.indexer_topk import ops as indexer_ops
from kernels_pallas.sparse_attention import kernel as attention_kernel
from tests.hf_oracle import randomize_params
from tests.tolerances import F32_DECODE_REL, F32_KERNEL_GRAD_REL, rel_err

T = 37
CSA, HCA = 4, 16  # tiny()'s compression ratios
DECODE_STEPS = 3
BLOCK = 16  # queries per attention/indexer block: T spans several blocks and a partial one


@pytest.fixture(scope="module")
def models():
  """(reference model, pallas model) with identical weights."""
  cfg = deepseek_v4.tiny()
  assert T % BLOCK and T > cfg.window and T >= HCA and T // CSA > cfg.index_topk
  assert set(cfg.compress_ratios) == {0, CSA, HCA}
  ref = randomize_params(deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0),
                                                 options=Options(attn_block=BLOCK)), seed=0)
  # Another init seed: the copy, not the init, makes the two equal.
  pal = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(1),
                                options=Options(kernel_impl="pallas", attn_block=BLOCK))
  nnx.update(pal, nnx.state(ref))
  return ref, pal


@pytest.fixture
def pallas_calls(monkeypatch):
  """Counts (at trace time) the calls into the two Pallas wrappers the model can reach."""
  calls = collections.Counter()

  def count(module, name, key):
    fn = getattr(module, name)

    def wrapped(*args, **kwargs):
      calls[key] += 1
      return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)

  count(attention_kernel, "sparse_attention", "attention")
  count(indexer_kernel, "indexer_topk", "indexer")
  return calls


def _tokens(seed, shape):
  return np.random.default_rng(seed).integers(0, deepseek_v4.tiny().vocab_size, shape,
                                              dtype=np.int32)


def _run_both(fn, models, pallas_calls, kernels=("attention", "indexer")):
  """fn(model) for the reference, then for the pallas model; asserts which kernels ran."""
  ref, pal = models
  a = fn(ref)
  assert not pallas_calls, f"the reference model reached a Pallas kernel: {dict(pallas_calls)}"
  b = fn(pal)
  assert all(pallas_calls[k] for k in kernels), dict(pallas_calls)
  return a, b


def test_forward_logits_pallas_equal_reference(models, pallas_calls):
  ids = jnp.asarray(_tokens(0, (2, T)))
  ref_logits, pal_logits = _run_both(lambda m: np.asarray(nnx.jit(lambda m, x: m(x))(m, ids)),
                                     models, pallas_calls)
  err = rel_err(pal_logits, ref_logits)
  print(f"\nforward logits rel err {err:.2e}")
  assert np.isfinite(pal_logits).all() and err < F32_DECODE_REL


# "sparse" runs everything "off" does (top-k attention through both kernels) plus the indexer KL,
# which reads the kernel's log-sum-exp; the other stages cost one more compile pair each.
@pytest.mark.slow  # ~70 s per stage (compiles the whole backward twice); kernel grads are default
@pytest.mark.parametrize("stage", ["sparse", pytest.param("off", marks=pytest.mark.slow),
                                   pytest.param("dense", marks=pytest.mark.slow)])
def test_loss_gradients_pallas_equal_reference(models, pallas_calls, stage):
  tok = _tokens(1, (1, T + 1))
  batch = {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:])}
  tcfg = train.TrainConfig(indexer_stage=stage)

  def grads(model):
    fn = nnx.value_and_grad(lambda m: train.loss_fn(m, batch, tcfg), has_aux=True)
    (loss, aux), g = nnx.jit(fn)(model)
    return jax.device_get((loss, aux, dict(nnx.to_flat_state(g))))

  kernels = ("attention",) if stage == "dense" else ("attention", "indexer")  # dense: no top-k
  (ref_loss, ref_aux, ref_g), (pal_loss, pal_aux, pal_g) = _run_both(grads, models, pallas_calls,
                                                                     kernels)
  for name in ("lm_loss", "mtp_loss", "indexer_loss"):
    assert rel_err(pal_aux[name], ref_aux[name]) < F32_DECODE_REL, name
  if stage != "off":
    assert ref_aux["indexer_loss"] > 0
  assert rel_err(pal_loss, ref_loss) < F32_DECODE_REL
  assert ref_g.keys() == pal_g.keys()
  ref_g = {".".join(map(str, k)): np.asarray(v[...]) for k, v in ref_g.items()}
  pal_g = {".".join(map(str, k)): np.asarray(v[...]) for k, v in pal_g.items()}
  for name, r in ref_g.items():
    if not np.any(r):  # no gradient by construction (e.g. the indexer with stage "off")
      assert not np.any(pal_g[name]), f"{name}: zero reference gradient, pallas gives " \
                                      f"{np.abs(pal_g[name]).max()}"
  # One relative error over the whole gradient, as tests/test_train.py does: a scalar whose
  # gradient is a sum with heavy cancellation has no meaningful relative error of its own (here
  # mtp.0.hc_head_scale, 4e-5 against ~1e-2 elsewhere, moves by 5e-5 relative when only the
  # reference's attn_block changes). The kernels' direct consumers, every `attn.` parameter (q/kv
  # projections, sink, compressors, indexer), are also held one by one: a backward-kernel bug
  # shows up there first.
  whole = rel_err(_flat(pal_g), _flat(ref_g))
  per_param = sorted(((rel_err(pal_g[k], r), k) for k, r in ref_g.items()
                      if ".attn." in k and np.any(r)), reverse=True)
  assert len(per_param) > 40  # every layer's attention, indexers and the MTP block's
  print(f"\nstage={stage}: loss {float(ref_loss):.4f}, gradient rel err {whole:.2e}, worst attn "
        f"parameter {per_param[0][0]:.2e} ({per_param[0][1]})")
  assert whole < F32_KERNEL_GRAD_REL
  assert per_param[0][0] < F32_KERNEL_GRAD_REL, per_param[:3]


def _flat(grads: dict) -> np.ndarray:
  return np.concatenate([grads[k].ravel() for k in sorted(grads)])


@pytest.mark.slow  # ~45 s
def test_prefill_and_decode_pallas_equal_reference(models, pallas_calls):
  """Ragged prompts (37 and 29 tokens) fed in chunks of 16 (so later chunks see a filled window
  ring), then DECODE_STEPS single-token steps; every real position's logits compared."""
  lengths = np.array([T, T - 8], np.int32)
  tokens = _tokens(2, (2, T + DECODE_STEPS))
  prompt = np.where(np.arange(T)[None] < lengths[:, None], tokens[:, :T], 0)

  def run(model):
    cache = cache_lib.init_cache(model.cfg, 2, T + DECODE_STEPS)
    logits, cache = decoding.prefill(model, cache, prompt, lengths, chunk_size=16)
    out = [np.asarray(logits)]
    for i in range(DECODE_STEPS):
      step, cache = decoding.decode_step(model, cache, tokens[[0, 1], lengths + i])
      out.append(np.asarray(step))
    return out

  ref, pal = _run_both(run, models, pallas_calls)
  errs = [max(rel_err(pal[0][b, :n], ref[0][b, :n]) for b, n in enumerate(lengths))]
  errs += [rel_err(p, r) for p, r in zip(pal[1:], ref[1:])]
  print(f"\nprefill rel err {errs[0]:.2e}, decode max rel err {max(errs[1:]):.2e}")
  assert max(errs) < F32_DECODE_REL, errs


def test_options_kernel_impl_reaches_attention_and_indexer(models, pallas_calls):
  """`Options(kernel_impl=...)` at the call overrides the model's own `options.kernel_impl` for
  both kernels (traced only)."""
  ref, pal = models
  ids = jnp.asarray(_tokens(3, (1, T)))

  def trace(model, impl):
    graphdef, state = nnx.split(model)
    options = Options(kernel_impl=impl, attn_block=BLOCK)
    jax.eval_shape(lambda s: nnx.merge(graphdef, s).trunk(ids, options=options)[0], state)

  trace(pal, "reference")
  assert not pallas_calls, dict(pallas_calls)
  trace(ref, "pallas")
  assert pallas_calls["attention"] and pallas_calls["indexer"], dict(pallas_calls)


def test_indexer_pallas_path_is_differentiable_to_zero():
  """The indices carry no gradient: a loss that reaches the indexer inputs both through the
  selection and directly differentiates through impl="pallas" as through the reference."""
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 9, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 9, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 5, 4)), jnp.float32)
  pos = jnp.arange(9, dtype=jnp.int32)[None]

  def loss(q, impl):
    idx = indexer_ops.indexer_topk(q, w, k, pos, ratio=2, topk=3, block=4, impl=impl)
    return jnp.sum(jnp.where(idx >= 0, idx, 0).astype(jnp.float32)) + jnp.sum(q ** 2)

  g_ref = jax.grad(loss)(q, "reference")
  g_pal = jax.grad(loss)(q, "pallas")
  np.testing.assert_array_equal(np.asarray(g_pal), np.asarray(g_ref))
