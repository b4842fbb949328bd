"""ModelConfig.__post_init__ validates every numeric field: finite, positive
where it must be, an integer where it must be, a bool where it must be; the error names the field
and the value. Values that used to give NaN logits or fail deep inside rope.py are refused here."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import deepseek_v4
from deepseek_v4.config import ModelConfig

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("overrides,needles", [
  # Issue 11 item 7: each of these was accepted (or failed inside rope.py).
  (dict(rope_factor=NAN), ("rope_factor", "nan")),
  (dict(rope_original_max_position=0), ("rope_original_max_position", "0")),
  (dict(rope_original_max_position=-16), ("rope_original_max_position", "-16")),
  (dict(rope_beta_fast=NAN), ("rope_beta_fast", "nan")),
  (dict(rope_beta_slow=INF), ("rope_beta_slow", "inf")),
  (dict(rope_beta_slow=0.0), ("rope_beta_slow", "0.0")),
  (dict(rope_beta_fast=0.5), ("rope_beta_fast=0.5", "rope_beta_slow=1.0")),
  (dict(norm_topk_prob="no"), ("norm_topk_prob", "'no'")),
  (dict(norm_topk_prob=1), ("norm_topk_prob", "1")),
  (dict(d_model=64.7), ("d_model", "64.7")),
  (dict(d_model=64.0), ("d_model", "64.0")),
  (dict(d_model=True), ("d_model", "True")),
  (dict(num_hash_layers=1.5), ("num_hash_layers", "1.5")),
  (dict(num_shared_experts=True), ("num_shared_experts", "True")),
  (dict(num_mtp_layers=0.0), ("num_mtp_layers", "0.0")),
  (dict(index_topk=-1), ("index_topk", "-1")),
  (dict(index_topk="4"), ("index_topk", "'4'")),
  (dict(bos_token_id=0.0), ("bos_token_id", "0.0")),
  (dict(eos_token_id=None), ("eos_token_id", "None")),
  (dict(compress_ratios=(0, True)), ("compress_ratios[1]", "True")),
  (dict(compress_ratios=(0, 4.0)), ("compress_ratios[1]", "4.0")),
  (dict(route_scale=NAN), ("route_scale", "nan")),
  (dict(swiglu_limit=-1.0), ("swiglu_limit", "-1.0")),
  (dict(hc_eps="1e-6"), ("hc_eps", "'1e-6'")),
  (dict(rms_eps=0.0), ("rms_eps", "0.0")),
  (dict(init_std=INF), ("init_std", "inf")),
  (dict(rope_theta=1.0), ("rope_theta", "1.0", "> 1")),
  (dict(compress_rope_theta=0.5), ("compress_rope_theta", "0.5")),
  (dict(rope_factor=0.5), ("rope_factor", "0.5")),
  (dict(max_position_embeddings=-1), ("max_position_embeddings", "-1")),
  (dict(score_func=True), ("score_func", "True")),
  (dict(dtype="float64"), ("dtype", "float64")),
], ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else None)
def test_bad_field_is_named(overrides, needles):
  with pytest.raises(ValueError) as info:
    deepseek_v4.tiny(**overrides)
  for needle in needles:
    assert needle in str(info.value), (needle, str(info.value))


def test_every_numeric_field_refuses_nan_and_strings():
  """No numeric field (int, float or bool annotated) takes NaN, a string or None."""
  cfg = deepseek_v4.tiny()
  numeric = [f.name for f in dataclasses.fields(ModelConfig)
             if isinstance(getattr(cfg, f.name), (int, float))]
  assert len(numeric) > 30
  for name in numeric:
    for bad in (NAN, "3", None):
      with pytest.raises(ValueError, match=name):
        cfg.replace(**{name: bad})


def test_good_values_still_accepted():
  cfg = deepseek_v4.tiny(rope_factor=1, rope_theta=10000, rope_beta_fast=1.0, rope_beta_slow=1.0)
  assert not cfg.yarn
  # Without YaRN the beta order does not matter (they are unused).
  assert deepseek_v4.tiny(rope_factor=1.0, rope_beta_fast=0.5).rope_beta_fast == 0.5
  assert deepseek_v4.tiny(index_heads=0, index_head_dim=0, index_topk=0,
                          compress_ratios=(0, 0, 16)).index_topk == 0


def test_numpy_scalars_become_python_scalars():
  cfg = deepseek_v4.tiny(d_model=np.int64(64), rope_factor=np.float32(4.0))
  assert type(cfg.d_model) is int and type(cfg.rope_factor) is float
  assert cfg == deepseek_v4.tiny() and hash(cfg) == hash(deepseek_v4.tiny())


def test_rope_frequencies_stay_finite_on_accepted_yarn():
  from deepseek_v4.layers import rope

  cfg = deepseek_v4.tiny(rope_beta_fast=1.0, rope_beta_slow=1.0)
  w = rope._inv_freq(cfg.rope_dim, cfg.compress_rope_theta, cfg.rope_factor,
                     cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow)
  assert all(math.isfinite(float(x)) for x in w)
