"""The indexer's training stages under context parallelism (docs/context_parallel.md#training):
each device scores its slice's queries against the gathered entries, and the KL toward the main
attention (docs/architecture.md#indexer-training) summed over the devices is the one-device
loss; its gradients (the indexer's queries and its compressor, through the all-gather) are the
one-device gradients.

Oracle: `train.loss_fn` on one device, f32, T = 203 (not a multiple of 128 or of the device
count: every slice is padded), a CSA top-k smaller than the late queries' visible entries, and
packed documents in one row.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import parallel, sharding, train
from tests.hf_oracle import randomize_params
from tests.tolerances import F32_CONTEXT_PARALLEL_GRAD_REL, F32_CONTEXT_PARALLEL_REL, rel_err

# One CSA layer (learned routing, no MTP): the indexer's loss is all that the stages add.
CFG = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, hc_sinkhorn_iters=2,
                       num_mtp_layers=0)
T = 203


def _batch():
  ids = np.asarray(jax.random.randint(jax.random.key(5), (2, T + 1), 0, CFG.vocab_size), np.int32)
  segments = np.zeros((2, T), np.int32)
  segments[1, 96:] = 1  # row 1: two documents, the second from an aligned offset
  return {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:]),
          "segments": jnp.asarray(segments)}


def _loss_and_grads(model, batch, tcfg, options=None):
  def loss(model):
    value, aux = train.loss_fn(model, batch, tcfg, options=options)
    return value, aux["indexer_loss"]

  (_, indexer), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  return float(indexer), flat


def _check(stage: str, sizes: dict, rules: str):
  assert CFG.index_topk < T // 4  # the top-k really selects
  model = randomize_params(deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(0)), seed=1)
  batch = _batch()
  tcfg = train.TrainConfig(seq_len=T, batch_size=2, indexer_stage=stage)
  want, ref = _loss_and_grads(model, batch, tcfg)
  mesh = sharding.make_mesh(**sizes)
  opts = parallel.options(mesh, rules)
  assert opts.context is not None
  with sharding.use(mesh, rules):
    got, grads = _loss_and_grads(model, batch, tcfg, opts)
  assert want > 0
  assert abs(got - want) / want < F32_CONTEXT_PARALLEL_REL, (got, want)
  indexer = [k for k in ref if ".indexer." in k and np.any(ref[k])]
  assert indexer  # the KL trains the indexer's queries and compressor
  errs = {k: rel_err(grads[k], v) for k, v in ref.items() if np.any(v)}
  worst = max(errs, key=errs.get)
  print(f"\n{stage} {sizes}: indexer loss {got:.6f} vs {want:.6f}; worst gradient {worst} "
        f"{errs[worst]:.1e}")
  assert errs[worst] < F32_CONTEXT_PARALLEL_GRAD_REL


def test_sparse_stage_context8_equals_one_device():
  _check("sparse", dict(context=8), "fsdp")


@pytest.mark.slow
def test_dense_stage_context8_equals_one_device():
  _check("dense", dict(context=8), "fsdp")


@pytest.mark.slow
def test_sparse_stage_context4_expert2_equals_one_device():
  _check("sparse", dict(context=4, expert=2), "fsdp_ep")
