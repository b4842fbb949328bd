"""Losses and the train step (docs/architecture.md#load-balancing, #indexer-training, #mtp-loss):
chunked cross-entropy, balance loss, router-bias update, indexer KL, gradient accumulation, remat,
overfitting one batch, NaN handling and exact resume."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import data as data_lib
from deepseek_v4 import losses, train, trainer
from deepseek_v4 import model as model_lib
from deepseek_v4.layers import moe
from deepseek_v4.train.step import _grads  # the step's micro-batch accumulation, tested alone
from kernels_pallas.sparse_attention.reference import sparse_attention
from tests.attention_keys import keys
from tests.tolerances import F32_FUNCTION, F32_MODEL_REL, rel_err

# A 3-layer tiny (SWA+hash, CSA, HCA; MTP on): every layer kind, cheaper to compile.
SMALL = dict(compress_ratios=(0, 4, 16), num_hash_layers=1)


# One CSA layer with learned routing, no MTP: for checks that only need one block (fast compile).
ONE_LAYER = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, num_mtp_layers=0)


def _small_cfg(**kw):
  return deepseek_v4.tiny(**{**SMALL, **kw})


def _batch(cfg, B=4, T=32, seed=0):
  toks = np.random.default_rng(seed).integers(2, cfg.vocab_size, (B, T + 1))
  return train.as_batch(toks[:, :-1], toks[:, 1:])


# ----- pure losses --------------------------------------------------------------------------------
def test_chunked_cross_entropy_equals_dense():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((2, 13, 16)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((37, 16)), jnp.float32)
  t = rng.integers(0, 37, (2, 13))
  t[0, 3] = t[1, 7] = -1
  t = jnp.asarray(t)

  def dense(h, w):
    lp = jax.nn.log_softmax(jnp.einsum("BTD,VD->BTV", h, w), -1)
    nll = -jnp.take_along_axis(lp, jnp.maximum(t, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(t >= 0, nll, 0.0)) / jnp.sum(t >= 0)

  chunked = lambda h, w: losses.mean_cross_entropy(h, w, t, chunk=5)  # 26 tokens, ragged chunks
  assert rel_err(chunked(h, w), dense(h, w)) < F32_FUNCTION
  g1, g2 = jax.grad(chunked, (0, 1))(h, w), jax.grad(dense, (0, 1))(h, w)
  for a, b in zip(g1, g2):
    assert rel_err(a, b) < F32_FUNCTION


def test_balance_loss_formula():
  rng = np.random.default_rng(1)
  B, T, E, K, alpha = 2, 6, 4, 2, 1e-4
  s = rng.random((B, T, E)).astype(np.float32)
  idx = np.stack([rng.permutation(E)[:K] for _ in range(B * T)]).reshape(B, T, K)
  mask = np.ones((B, T), np.float32)
  mask[1, 4:] = 0
  ref = []
  for b in range(B):
    n = mask[b].sum()
    f = np.zeros(E)
    p = np.zeros(E)
    for t in range(T):
      if mask[b, t]:
        f[idx[b, t]] += E / (K * n)
        p += s[b, t] / s[b, t].sum() / n
    ref.append(alpha * np.sum(f * p))
  ours = losses.balance_loss(jnp.asarray(s), jnp.asarray(idx), jnp.asarray(mask), alpha)
  assert rel_err(ours, np.mean(ref)) < F32_FUNCTION


def test_router_bias_moves_toward_balance():
  load = jnp.asarray([10.0, 0.0, 5.0, 5.0])
  new = losses.router_bias_update(jnp.zeros(4), load, 0.001)
  np.testing.assert_allclose(new, [-0.001, 0.001, 0.0, 0.0])
  # Repeated updates against a router that prefers expert 0 bring the loads together.
  rng = np.random.default_rng(2)
  scores = jnp.asarray(rng.random((256, 8)) * 0.2 + np.array([0.5] + [0.0] * 7), jnp.float32)
  bias = jnp.zeros(8)
  imbalance = []
  for _ in range(300):
    idx = moe.route_topk(scores, bias, 2)
    load = losses.expert_loads(idx[None], jnp.ones((1, 256)), 8)
    imbalance.append(float(losses.load_imbalance(load)))
    bias = losses.router_bias_update(bias, load, 0.01)
  assert imbalance[0] > 3.0 and np.mean(imbalance[-20:]) < 1.5


def test_indexer_kl_is_zero_when_distributions_match():
  rng = np.random.default_rng(3)
  p = rng.random((5, 7)).astype(np.float32)
  valid = rng.random((5, 7)) > 0.3
  valid[0] = False  # a query without entries contributes nothing
  logits = np.log(p / p.sum(-1, keepdims=True)) + 3.0  # same distribution, shifted logits
  kl, n = losses.indexer_kl(jnp.asarray(p), jnp.asarray(logits), jnp.asarray(valid))
  assert abs(float(kl)) < 1e-6 and int(n) == 4
  kl2, _ = losses.indexer_kl(jnp.asarray(p), jnp.asarray(rng.standard_normal((5, 7))),
                             jnp.asarray(valid))
  assert float(kl2) > 1e-3


def _np_indexer_loss(q, pos, kv, sink, comp, iq, iw, ik, idx, scale, window, ratio):
  """Independent NumPy version of docs/architecture.md#indexer-training with the joint softmax of
  docs/architecture.md#core-attention."""
  B, T, N, _ = q.shape
  total, count = 0.0, 0
  for b in range(B):
    for t in range(T):
      win = [j for j in range(T) if 0 <= pos[b, t] - pos[b, j] < window]
      nvis = (pos[b, t] + 1) // ratio
      ents = list(range(min(nvis, comp.shape[1]))) if idx is None else \
        [int(s) for s in idx[b, t] if s >= 0]
      if not ents:
        continue
      target = np.zeros(len(ents))
      for h in range(N):
        z = [scale * q[b, t, h] @ kv[b, j] for j in win] + \
            [scale * q[b, t, h] @ comp[b, s] for s in ents]
        lse = np.log(np.sum(np.exp(z)) + np.exp(sink[h]))
        target += np.exp(np.asarray(z[len(win):]) - lse)
      target /= target.sum()
      scores = np.array([np.sum(iw[b, t] * np.maximum(iq[b, t] @ ik[b, s], 0)) for s in ents])
      logq = scores - np.log(np.sum(np.exp(scores - scores.max()))) - scores.max()
      total += np.sum(target * (np.log(target) - logq))
      count += 1
  return total, count


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_indexer_loss_matches_numpy(sparse):
  rng = np.random.default_rng(4)
  B, T, N, H, C, I, J, W = 2, 19, 3, 8, 4, 2, 6, 5
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  q, kv, comp, sink = f(B, T, N, H), f(B, T, H), f(B, C, H), f(N)
  iq, iw, ik = f(B, T, I, J), f(B, T, I), f(B, C, J)
  pos = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
  idx = None
  if sparse:  # two visible picks (or -1) per query
    idx = np.full((B, T, 2), -1, np.int32)
    for b in range(B):
      for t in range(T):
        vis = rng.permutation((t + 1) // 4)[:2]
        idx[b, t, :len(vis)] = vis
  # The attention's own log-normalizer (window + entries + sink) feeds the loss
  # (docs/architecture.md#indexer-training).
  jq, jpos, jcomp = jnp.asarray(q), jnp.asarray(pos), jnp.asarray(comp)
  jidx = None if idx is None else jnp.asarray(idx)
  k = keys(jnp.asarray(kv), W, comp=jcomp, comp_idx=jidx, comp_ratio=4)
  _, lse = sparse_attention(jq, jpos, jnp.asarray(sink), k, scale=0.3, block=8, return_lse=True)
  ours = losses.indexer_kl_from_attention(jq, lse, k.entries, jnp.asarray(iq), jnp.asarray(iw),
                                          jnp.asarray(ik), jpos, scale=0.3, block=8)
  ref = _np_indexer_loss(q, pos, kv, sink, comp, iq, iw, ik, idx, 0.3, W, 4)
  assert int(ours[1]) == ref[1]
  assert rel_err(ours[0], ref[0]) < F32_FUNCTION


def test_wsd_schedule_and_mtp_weight():
  tcfg = train.TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, decay_fraction=0.2,
                           final_lr_ratio=0.1)
  lr = train.wsd_schedule(tcfg)
  assert float(lr(0)) == pytest.approx(0.1, rel=1e-6) and float(lr(9)) == pytest.approx(1.0)
  assert float(lr(50)) == pytest.approx(1.0) and float(lr(80)) == pytest.approx(1.0)
  assert float(lr(90)) == pytest.approx(0.55, rel=1e-6)
  assert float(lr(100)) == pytest.approx(0.1, rel=1e-6)
  assert train.mtp_weight_at(tcfg, 79) == 0.3 and train.mtp_weight_at(tcfg, 80) == 0.1


# ----- the step on a model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overfit_run():
  """tiny(): 40 steps on one batch (shared by the tests below)."""
  cfg = deepseek_v4.tiny()
  tcfg = train.TrainConfig(seq_len=32, batch_size=4, steps=40, learning_rate=1e-2,
                           warmup_steps=5, decay_fraction=0.0, bias_update_speed=1e-2)
  model, opt = train.build(cfg, tcfg)
  bias0 = np.asarray(model.layer(3).ffn.gate.bias[...])
  batch = _batch(cfg)
  hist = [train.train_step(model, opt, batch, 0.3, tcfg=tcfg) for _ in range(tcfg.steps)]
  hist = [{k: float(v) for k, v in m.items()} for m in jax.device_get(hist)]
  return model, hist, bias0


def test_tiny_model_overfits_one_batch(overfit_run):
  _, hist, _ = overfit_run
  assert all(math.isfinite(m["loss"]) for m in hist)
  assert hist[0]["lm_loss"] > 5.5  # ~ln(512) at init
  assert hist[-1]["lm_loss"] < 0.5 * hist[0]["lm_loss"]
  assert hist[-1]["mtp_loss"] < hist[0]["mtp_loss"]


def test_router_bias_updates_during_training(overfit_run):
  model, hist, bias0 = overfit_run
  bias = np.asarray(model.layer(3).ffn.gate.bias[...])
  assert np.any(bias != bias0) and np.all(np.abs(bias) <= 40 * 1e-2 + 1e-6)
  # Hash layers have no bias; their table never moves.
  assert not hasattr(model.layer(0).ffn.gate, "bias")


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_grad_accumulation_equals_one_batch():
  cfg = ONE_LAYER
  batch = _batch(cfg)
  out = []
  for accum in (1, 2):
    tcfg = train.TrainConfig(seq_len=32, batch_size=4, grad_accum=accum, warmup_steps=1)
    model, _ = train.build(cfg, tcfg)
    graphdef, params, rest = nnx.split(model, train.trainable_filter(tcfg), ...)
    loss, aux, grads = jax.jit(lambda p, b: _grads(
      nnx.merge(graphdef, p, rest), train.trainable_filter(tcfg), b, tcfg, 0.3))(params, batch)
    out.append((loss, grads))
  assert rel_err(out[0][0], out[1][0]) < F32_FUNCTION
  # One relative error over the whole gradient: single tiny entries (e.g. a gating scalar's
  # 3e-6 gradient, a sum with heavy cancellation) have no meaningful relative error of their own.
  assert rel_err(_flat(out[0][1]), _flat(out[1][1])) < F32_MODEL_REL


def test_remat_does_not_change_gradients():
  cfg = ONE_LAYER
  batch = _batch(cfg, B=2, T=16)
  base = train.TrainConfig(seq_len=16, batch_size=2)
  model, _ = train.build(cfg, base)

  def grads(tcfg):
    f = lambda m: train.loss_fn(m, batch, tcfg)[0]
    return _flat(nnx.jit(nnx.grad(f))(model))

  g0 = grads(base)
  for policy in ("full", "dots"):
    assert rel_err(grads(base.replace(remat=policy)), g0) < F32_FUNCTION, policy


@pytest.mark.slow
def test_dense_warmup_trains_only_the_indexer():
  cfg = _small_cfg()
  tcfg = train.TrainConfig(seq_len=64, batch_size=2, indexer_stage="dense", warmup_steps=1,
                           learning_rate=1e-2)
  model, opt = train.build(cfg, tcfg)
  names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, opt.wrt))}
  assert names and all(".indexer." in n for n in names)
  batch = _batch(cfg, B=2, T=64)
  hist = [float(train.train_step(model, opt, batch, 0.3, tcfg=tcfg)["indexer_loss"])
          for _ in range(15)]
  assert hist[0] > 0 and hist[-1] < hist[0]


def test_sparse_stage_separates_the_gradients():
  """docs/architecture.md#indexer-training sparse stage: the indexer learns only from its KL (its
  inputs are detached), the rest of the model only from the LM loss (the KL target is a
  constant)."""
  cfg = ONE_LAYER
  tcfg = train.TrainConfig(seq_len=64, batch_size=2, indexer_stage="sparse")
  model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))
  batch = _batch(cfg, B=2, T=64)
  part = lambda name: (lambda m: train.loss_fn(m, batch, tcfg)[1][name])

  @nnx.jit
  def both(m):
    return nnx.grad(part("lm_loss"))(m), nnx.grad(part("indexer_loss"))(m)

  g_lm, g_ix = both(model)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g_lm), nnx.to_flat_state(g_ix)):
    name = ".".join(map(str, path))
    a, b = np.asarray(a[...]), np.asarray(b[...])
    if ".indexer." in name:
      assert not a.any(), name  # no LM gradient into the indexer
    else:
      assert not b.any(), name  # no indexer-loss gradient into the model
  ix = [np.abs(np.asarray(v[...])).max() for p, v in nnx.to_flat_state(g_ix)
        if ".indexer." in ".".join(map(str, p))]
  assert ix and max(ix) > 0


def test_indexer_frozen_when_stage_off():
  cfg = _small_cfg()
  model = nnx.eval_shape(lambda: deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)))
  names = [".".join(map(str, p))
           for p, _ in nnx.to_flat_state(nnx.state(model, train.trainable_filter(
             train.TrainConfig())))]
  assert names and not any(".indexer." in n for n in names)
  frozen = train.trainable_filter(train.TrainConfig(freeze=(r"^mtp\.", r"\.experts\.")))
  names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, frozen))]
  assert not any(n.startswith("mtp.") or ".experts." in n for n in names)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_master_weights():
  cfg = _small_cfg()
  tcfg = train.TrainConfig(seq_len=32, batch_size=2, compute_dtype="bfloat16", warmup_steps=1)
  model, opt = train.build(cfg, tcfg)
  assert model.cfg.dtype == "bfloat16" and model.cfg.param_dtype == "float32"
  batch = _batch(cfg, B=2)
  hist = [float(train.train_step(model, opt, batch, 0.3, tcfg=tcfg)["loss"]) for _ in range(5)]
  assert all(math.isfinite(x) for x in hist) and hist[-1] < hist[0]
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  for leaf in jax.tree.leaves(nnx.state(opt)):
    assert leaf.dtype in (jnp.float32, jnp.uint32, jnp.int32)


# ----- the loop: resume and NaN -------------------------------------------------------------------
def _rows(cfg, T=32, n=24, seed=0):
  toks = np.random.default_rng(seed).integers(2, cfg.vocab_size, n * T + 1).astype(np.int32)
  return data_lib.pack([(toks, np.ones(len(toks), bool))], T)


LOOP = dict(seq_len=32, batch_size=4, steps=4, learning_rate=5e-3, warmup_steps=1, save_every=2,
            log_every=1, decay_fraction=0.5)


@pytest.mark.slow  # ~100 s: three fits, each compiling its step
def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
  cfg = _small_cfg()
  tcfg = train.TrainConfig(**LOOP)
  rows = _rows(cfg)
  full = trainer.fit(cfg, tcfg, rows, str(tmp_path / "a"), progress=False)
  part = trainer.fit(cfg, tcfg, rows, str(tmp_path / "b"), stop_after=2, progress=False)
  assert part.steps == 2 and part.losses == full.losses[:2]
  rest = trainer.fit(cfg, tcfg, rows, str(tmp_path / "b"), resume=True, progress=False)
  assert rest.steps == 4
  assert rest.losses == full.losses[2:]  # exact float equality
  for a, b in zip(jax.tree.leaves(nnx.state(full.model)), jax.tree.leaves(nnx.state(rest.model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  import json

  logged = [json.loads(x)["step"] for x in open(tmp_path / "b" / "metrics.jsonl")]
  assert logged == [1, 2, 3, 4]
  assert (tmp_path / "b" / "loss.png").exists()
  with pytest.raises(ValueError, match="already holds checkpoints"):
    trainer.fit(cfg, tcfg, rows, str(tmp_path / "b"), progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = _small_cfg()
  tcfg = train.TrainConfig(**LOOP)
  rows = _rows(cfg)

  def poison(step, model):
    if step == 3:  # corrupt one weight before the 3rd step
      w = model.layer(1).attn.wq_a.weight
      w.set_value(w[...].at[0, 0].set(jnp.nan))

  with pytest.raises(trainer.TrainingDiverged, match=r"step 3.*last good checkpoint \(step 2\)"):
    trainer.fit(cfg, tcfg, rows, str(tmp_path), progress=False, callback=poison)
  from deepseek_v4.checkpoint.io import Checkpointer

  ck = Checkpointer(tmp_path / "checkpoints")
  assert ck.all_steps() == [2]
  model, opt = train.build(cfg, tcfg)
  ck.restore(model, opt)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


# ----- parity: the cross-entropy part vs transformers (float32) -----------------------------------
@pytest.mark.parity
def test_loss_and_gradients_match_transformers(tmp_path, tiny_cfg):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from safetensors.numpy import save_file

  from deepseek_v4.checkpoint import read_safetensors, to_hub_tensors
  from tests.hf_oracle import hf_model, randomize_params

  model = randomize_params(deepseek_v4.Transformer(tiny_cfg, rngs=nnx.Rngs(0)), 0)
  ref = hf_model(model)
  ids = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, (2, 40)).astype(np.int32)
  targets = np.concatenate([ids[:, 1:], np.full((2, 1), -1, np.int32)], axis=1)
  batch = train.as_batch(ids, targets)
  tcfg = train.TrainConfig(balance_alpha=0.0, ce_chunk=24)  # CE only (MTP weight 0 below)

  def lm(m):
    return train.loss_fn(m, batch, tcfg, mtp_weight=0.0)[0]

  ours_loss, grads = nnx.jit(nnx.value_and_grad(lm))(model)
  out = ref(input_ids=torch.as_tensor(ids, dtype=torch.long),
            labels=torch.as_tensor(ids, dtype=torch.long))
  out.loss.backward()
  assert rel_err(ours_loss, out.loss.item()) < F32_MODEL_REL

  theirs = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().numpy()
            for n, p in ref.named_parameters()}
  save_file(theirs, str(tmp_path / "grads.safetensors"))
  theirs = read_safetensors(str(tmp_path))  # transformers names -> hub names
  gmodel = nnx.clone(model)
  nnx.update(gmodel, grads)
  ours = {k: v for k, v in to_hub_tensors(gmodel).items()
          if not k.startswith("mtp.") and not k.endswith(("gate.bias", "gate.tid2eid"))}
  assert set(ours) == set(theirs) - {k for k in theirs if k.endswith("gate.bias")}
  flat_o = np.concatenate([ours[k].ravel() for k in sorted(ours)])
  flat_t = np.concatenate([theirs[k].ravel() for k in sorted(ours)])
  assert rel_err(flat_o, flat_t) < F32_MODEL_REL
  for k in sorted(ours):
    if np.max(np.abs(theirs[k])) > 1e-3 * np.max(np.abs(flat_t)):  # tensors with real gradient
      assert rel_err(ours[k], theirs[k]) < F32_MODEL_REL, k
    else:  # e.g. the indexer (no LM gradient in either) or near-zero tensors
      assert np.max(np.abs(ours[k] - theirs[k])) < F32_MODEL_REL * np.max(np.abs(flat_t)), k


# ----- the command line ---------------------------------------------------------------------------
def test_cli_rejects_bad_data_clearly(tmp_path, capsys):
  from deepseek_v4 import cli

  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "short.txt").write_text("abc")
  cases = [(tmp_path / "missing.txt", "data file not found"), (tmp_path / "empty.txt", "is empty"),
           (tmp_path / "short.txt", "one training sequence needs seq_len + 1 = 33")]
  for path, message in cases:
    rc = cli.main(["train", "--data", str(path), "--seq-len", "32", "--out", str(tmp_path / "o"),
                   "--no-progress"])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_resumes_and_refuses_other_configs(tmp_path, capsys):
  import json

  from deepseek_v4 import cli

  (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 40)
  common = ["train", "--preset", "tiny", "--set", "compress_ratios=0,4,16", "--set",
            "num_hash_layers=1", "--data", str(tmp_path / "corpus.txt"), "--seq-len", "32",
            "--batch-size", "2", "--log-every", "1", "--save-every", "2", "--no-progress",
            "--sample", "8", "--out", str(tmp_path / "run")]
  assert cli.main(common + ["--steps", "2"]) == 0
  rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2] and all("loss" in r for r in rows)
  assert (tmp_path / "run" / "loss.png").stat().st_size > 0
  assert cli.main(common + ["--steps", "4", "--resume"]) == 0
  assert [json.loads(x)["step"] for x in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
  capsys.readouterr()
  assert cli.main(common + ["--steps", "6", "--resume", "--set", "d_model=32"]) == 2
  assert "d_model: checkpoint 64, current 32" in capsys.readouterr().err


# ----- packed documents (aligned packing, sample-level masking) -----------------------------------
def test_mtp_targets_ignore_cross_segment_predictions():
  targets = jnp.asarray([[5, 6, 7, -1, 8, 9]])
  segments = jnp.asarray([[0, 0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(train.mtp_targets(targets), [[6, 7, -1, 8, 9]])
  np.testing.assert_array_equal(train.mtp_targets(targets, segments), [[6, 7, -1, -1, 9]])
  np.testing.assert_array_equal(model_lib.document_positions(segments), [[0, 1, 2, 3, 0, 1]])


def test_aligned_packed_loss_equals_documents_alone():
  """Two documents in one aligned row score exactly as each document alone in its own row."""
  # A larger init makes the outputs depend clearly on the context (a leak across documents moves
  # the loss ~2%, 200x the tolerance).
  cfg = deepseek_v4.tiny(init_std=0.1)
  align = data_lib.packing_align(cfg)
  assert align == 16
  rng = np.random.default_rng(0)
  docs = [rng.integers(2, cfg.vocab_size, n).astype(np.int32) for n in (37, 45)]
  rows = data_lib.pack([(d, np.ones(len(d), bool)) for d in docs], 96, "aligned", align=align)
  assert len(rows) == 1 and rows.segments[0, 48] == 1 and rows.segments[0, 47] == 0
  tcfg = train.TrainConfig(seq_len=96, batch_size=1)
  model, _ = train.build(cfg, tcfg)
  aux_fn = nnx.jit(lambda m, b: train.loss_fn(m, b, tcfg)[1])
  packed = aux_fn(model, train.as_batch(rows.inputs, rows.targets, rows.input_mask,
                                        rows.segments, rows.positions))
  lm = mtp = 0.0
  n_lm = n_mtp = 0
  for d in docs:  # each document alone, no segments (the model's ordinary path)
    aux = aux_fn(model, train.as_batch(d[None, :-1], d[None, 1:]))
    n = len(d) - 1
    lm += float(aux["lm_loss"]) * n
    mtp += float(aux["mtp_loss"]) * (n - 1)
    n_lm, n_mtp = n_lm + n, n_mtp + n - 1
  assert int(packed["tokens"]) == n_lm
  assert rel_err(packed["lm_loss"], lm / n_lm) < F32_MODEL_REL
  assert rel_err(packed["mtp_loss"], mtp / n_mtp) < F32_MODEL_REL


@pytest.mark.slow  # ~50 s; aligned rows stay covered by test_aligned_packed_loss_equals_documents_alone
def test_fit_trains_on_aligned_rows():
  cfg = _small_cfg()
  rng = np.random.default_rng(1)
  docs = [rng.integers(2, cfg.vocab_size, n).astype(np.int32) for n in (20, 50, 9, 33, 70)]
  rows = data_lib.pack([(d, np.ones(len(d), bool)) for d in docs], 32, "aligned",
                       align=data_lib.packing_align(cfg))
  tcfg = train.TrainConfig(seq_len=32, batch_size=2, grad_accum=2, steps=2, warmup_steps=1,
                           packing="aligned")
  result = trainer.fit(cfg, tcfg, rows, None, progress=False, log=lambda s: None)
  assert result.steps == 2 and math.isfinite(result.last_loss)
  # The indexer stages now run on aligned rows (their KL comes from the attention itself).
  assert train.TrainConfig(packing="aligned", indexer_stage="dense").indexer_stage == "dense"


def test_loss_mtp_over_all_positions_equals_the_shorter_sequence():
  """The loss runs the MTP block over all T positions (the last masked) so a sequence split over a
  mesh axis stays split; its MTP loss and routing loads equal the T-1 positions of
  `Transformer.mtp_logits`, scored directly (with documents and a masked target)."""
  cfg = _small_cfg()
  model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))
  batch = _batch(cfg, B=2, T=32)
  segments = np.zeros((2, 32), np.int32)
  segments[1, 16:] = 1  # row 1: two aligned documents
  targets = np.asarray(batch["targets"]).copy()
  targets[0, 5] = -1
  batch = {**batch, "segments": jnp.asarray(segments), "targets": jnp.asarray(targets)}
  tcfg = train.TrainConfig(seq_len=32, batch_size=2)
  _, aux = train.loss_fn(model, batch, tcfg)

  ids, seg = batch["inputs"], batch["segments"]
  positions = model_lib.document_positions(seg)
  streams, _, _ = model.trunk(ids, positions, segments=seg)
  logits = model.mtp_logits(streams, ids, positions, seg)  # [B, T-1, V]
  t = np.asarray(train.mtp_targets(batch["targets"], seg))
  lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
  nll = -np.take_along_axis(lp, np.maximum(t, 0)[..., None], -1)[..., 0]
  want = nll[t >= 0].mean()
  assert (t < 0).sum() == 2  # the masked target and the cross-document prediction
  assert rel_err(aux["mtp_loss"], want) < F32_FUNCTION

  _, out = model.mtp_hidden(streams, ids, positions, seg)
  loads = losses.expert_loads(out.moe["experts"], jnp.ones((2, 31)), cfg.num_experts)
  np.testing.assert_allclose(np.asarray(aux["loads"][-1]), np.asarray(loads))
