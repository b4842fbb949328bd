"""Orbax training checkpoints: round trip of model + optimizer + meta, keep-last-N, atomicity, and
refusal to load a checkpoint of another configuration."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import train
from deepseek_v4.checkpoint.io import Checkpointer, CheckpointMismatch, load_model

CFG = deepseek_v4.tiny(compress_ratios=(0, 4), num_hash_layers=1, num_mtp_layers=0)
TCFG = train.TrainConfig(seq_len=16, batch_size=2)


def _leaves(x):
  return [np.asarray(v) for v in jax.tree.leaves(nnx.state(x))]


def _perturbed():
  model, opt = train.build(CFG, TCFG)
  # Make every leaf non-trivial (biases, optimizer moments, step) so a restore must really write.
  nnx.update(model, jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 nnx.state(model)))
  nnx.update(opt, jax.tree.map(lambda x: x + 3, nnx.state(opt)))
  return model, opt


def test_round_trip_and_keep_last_n(tmp_path):
  model, opt = _perturbed()
  ck = Checkpointer(tmp_path, keep=2)
  rng = jax.random.key(7)
  for step in (1, 2, 3):
    ck.save(step, model, opt, data_state={"epoch": 1, "index": step}, rng=rng, train_config=TCFG)
  assert ck.all_steps() == [2, 3]
  # Atomic saves leave only finished step folders (no temporaries).
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]
  fresh, fresh_opt = train.build(CFG, TCFG)
  meta = ck.restore(fresh, fresh_opt, train_config=TCFG)
  assert meta["step"] == 3 and meta["data_state"] == {"epoch": 1, "index": 3}
  np.testing.assert_array_equal(jax.random.key_data(meta["rng"]), jax.random.key_data(rng))
  for a, b in zip(_leaves(model), _leaves(fresh)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves(opt), _leaves(fresh_opt)):
    np.testing.assert_array_equal(a, b)
  loaded = load_model(tmp_path, step=2)
  for a, b in zip(_leaves(model), _leaves(loaded)):
    np.testing.assert_array_equal(a, b)


def test_other_config_is_refused_with_fields_named(tmp_path):
  model, opt = train.build(CFG, TCFG)
  ck = Checkpointer(tmp_path)
  ck.save(5, model, opt, train_config=TCFG)
  other_cfg = CFG.replace(d_model=32, num_experts=4)
  other, other_opt = train.build(other_cfg, TCFG)
  with pytest.raises(CheckpointMismatch) as e:
    ck.restore(other, other_opt, train_config=TCFG)
  msg = str(e.value)
  assert "d_model: checkpoint 64, current 32" in msg
  assert "num_experts: checkpoint 8, current 4" in msg
  assert "vocab_size" not in msg  # only the fields that differ
  lora = TCFG.replace(lora_rank=4)
  m2, o2 = train.build(CFG, lora)
  with pytest.raises(CheckpointMismatch, match="lora_rank: checkpoint 0, current 4"):
    ck.restore(m2, o2, train_config=lora)


def test_missing_checkpoint(tmp_path):
  model, opt = train.build(CFG, TCFG)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    Checkpointer(tmp_path).restore(model, opt)
