"""The one abstract model (deepseek_v4/abstract.py) equals what `nnx.eval_shape` over the real
constructors gives (the oracle: `nnx.Rngs` streams, no stand-in): the same graph, and every
variable with the same path, shape, dtype and logical axes. Its keys are never drawn, so a
stand-in that changed a shape, a dtype, a sharding name or the module tree would show here."""

import jax
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import abstract, lora, train
from deepseek_v4.model import Transformer


def _leaves(tree):
  """path -> (shape, dtype, logical axes) of every variable of an nnx object."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(tree)):
    value = var.get_value()
    out[path] = (tuple(value.shape), value.dtype, var.get_metadata().get("out_sharding"))
  return out


def _assert_same(got, want):
  g, w = _leaves(got), _leaves(want)
  assert g.keys() == w.keys(), sorted(set(g) ^ set(w))[:5]
  bad = {p: (g[p], w[p]) for p in g if g[p] != w[p]}
  assert not bad, list(bad.items())[:3]
  assert nnx.graphdef(got) == nnx.graphdef(want)
  for var in jax.tree.leaves(nnx.state(got)):
    assert isinstance(var, jax.ShapeDtypeStruct), type(var)  # nothing allocated


def test_model_equals_eval_shape_of_the_constructor():
  cfg = deepseek_v4.tiny()
  _assert_same(abstract.model(cfg),
               nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def test_lora_model_equals_eval_shape_of_apply_lora():
  cfg = deepseek_v4.tiny()
  targets, rank, alpha = ("wq_a", "wo_b"), 4, 8.0

  def build():
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    lora.apply_lora(m, targets, rank=rank, alpha=alpha, rngs=nnx.Rngs(1))
    return m

  got = abstract.model(cfg, lora=(targets, rank, alpha))
  _assert_same(got, nnx.eval_shape(build))
  assert any("lora_a" in ".".join(map(str, p)) for p in _leaves(got))


@pytest.mark.parametrize("tcfg", [
  train.TrainConfig(seq_len=32, batch_size=2),
  train.TrainConfig(seq_len=32, batch_size=2, lora_rank=4, optimizer="adamw"),
], ids=["muon", "lora-adamw"])
def test_train_state_equals_eval_shape_of_train_build(tcfg):
  cfg = deepseek_v4.tiny()
  _assert_same(abstract.train_state(cfg, tcfg), nnx.eval_shape(lambda: train.build(cfg, tcfg)))


def test_bad_config_is_named():
  with pytest.raises(TypeError, match="cfg must be a ModelConfig; got dict"):
    abstract.model({"num_layers": 2})
