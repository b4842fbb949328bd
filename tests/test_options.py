"""`deepseek_v4.Options` (deepseek_v4/options.py): the one check of every run choice, `replace`,
and the build-time fields a model is built with and refuses to run without."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import init_cache
from deepseek_v4.options import Options
from tests.tolerances import F32_MODEL_REL, rel_err


@pytest.mark.parametrize("fields, needles", [
  (dict(kernel_impl="magic"), ("kernel_impl='magic'", "reference, pallas, auto")),
  (dict(attn_block=0), ("attn_block=0", "positive integer")),
  (dict(attn_block=16.5), ("attn_block=16.5",)),
  (dict(attn_block=True), ("attn_block=True",)),
  (dict(scan_layers="yes"), ("scan_layers='yes'", "True or False")),
  (dict(keep_quantized="fp4"), ("keep_quantized='fp4'", "None, 'experts'")),
  (dict(indexer_stage="warm"), ("indexer_stage='warm'", "off, dense or sparse")),
  (dict(remat="some"), ("remat='some'", "none, full, dots, dots_no_batch")),
  (dict(moe=[1]), ("moe=[1]", "hashable")),
], ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else None)
def test_bad_option_is_named(fields, needles):
  with pytest.raises(ValueError) as info:
    Options(**fields)
  for needle in needles:
    assert needle in str(info.value), (needle, str(info.value))
  with pytest.raises(ValueError) as again:  # replace runs the same check
    Options().replace(**fields)
  assert str(again.value) == str(info.value)


def test_options_are_hashable_static_and_replaceable():
  o = Options(kernel_impl="pallas", attn_block=16)
  assert hash(o) == hash(Options(kernel_impl="pallas", attn_block=16))
  assert o.replace(attn_block=32).attn_block == 32 and o.attn_block == 16
  with pytest.raises(ValueError, match=r"unknown Options field\(s\) \['attn_blok'\]"):
    o.replace(attn_blok=32)
  with pytest.raises(TypeError):
    Options("reference")  # keyword-only: later fields never shift a positional call


def test_train_config_checks_through_options():
  with pytest.raises(ValueError, match="remat='some'; expected one of none, full"):
    deepseek_v4.TrainConfig(remat="some")
  with pytest.raises(ValueError, match="indexer_stage='warm'; expected off, dense or sparse"):
    deepseek_v4.TrainConfig(indexer_stage="warm")


def test_model_refuses_other_build_time_options():
  cfg = deepseek_v4.tiny(num_mtp_layers=0)
  model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0), options=Options(scan_layers=False))
  assert model.options.scan_layers is False
  ids = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=r"options scan_layers=True but the model was built with "
                                       r"scan_layers=False"):
    model(ids, options=Options(scan_layers=True))
  with pytest.raises(ValueError, match=r"keep_quantized='experts' but the model was built with "
                                       r"keep_quantized=None"):
    model(ids, options=Options(scan_layers=False, keep_quantized="experts"))
  # The run-time fields may differ from the build's (query blocking changes no number beyond
  # summation order); the layout a cache needs comes from the model.
  a = model(ids)
  b = model(ids, options=model.options.replace(attn_block=4))
  assert rel_err(b, a) < F32_MODEL_REL
  assert init_cache(model, 1, 16).layer_groups == tuple(g.spec for g in model.groups)
  with pytest.raises(ValueError, match="the cache was made for another layer layout"):
    deepseek_v4.prefill(model, init_cache(cfg, 1, 16), ids)
