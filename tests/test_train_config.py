"""TrainConfig.__post_init__ refuses run settings out of range: negative
warm-up or weight decay, clip_norm <= 0, NaN, bools and strings; the error names field and value."""

from __future__ import annotations

import pytest

from deepseek_v4 import train

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("overrides,needles", [
  (dict(warmup_steps=-5), ("warmup_steps", "-5")),
  (dict(warmup_steps=2.5), ("warmup_steps", "2.5")),
  (dict(weight_decay=-1), ("weight_decay", "-1")),
  (dict(weight_decay=NAN), ("weight_decay", "nan")),
  (dict(adam_weight_decay=-0.1), ("adam_weight_decay", "-0.1")),
  (dict(clip_norm=0.0), ("clip_norm", "0.0")),
  (dict(clip_norm=-1.0), ("clip_norm", "-1.0")),
  (dict(clip_norm=INF), ("clip_norm", "inf")),
  (dict(learning_rate=True), ("learning_rate", "True")),
  (dict(learning_rate="3e-3"), ("learning_rate", "'3e-3'")),
  (dict(decay_fraction=NAN), ("decay_fraction", "nan")),
  (dict(final_lr_ratio=-0.5), ("final_lr_ratio", "-0.5")),
  (dict(final_lr_ratio=2.0), ("final_lr_ratio", "2.0")),
  (dict(muon_momentum=1.0), ("muon_momentum", "1.0")),
  (dict(muon_rms_scale=0.0), ("muon_rms_scale", "0.0")),
  (dict(adam_b1=-0.1), ("adam_b1", "-0.1")),
  (dict(adam_b2=1.5), ("adam_b2", "1.5")),
  (dict(adam_eps=0.0), ("adam_eps", "0.0")),
  (dict(mtp_weight=-0.3), ("mtp_weight", "-0.3")),
  (dict(mtp_weight_decay_phase=NAN), ("mtp_weight_decay_phase", "nan")),
  (dict(balance_alpha=-1e-4), ("balance_alpha", "-0.0001")),
  (dict(bias_update_speed=INF), ("bias_update_speed", "inf")),
  (dict(indexer_loss_weight=-1.0), ("indexer_loss_weight", "-1.0")),
  (dict(lora_rank=-4), ("lora_rank", "-4")),
  (dict(lora_alpha=0.0), ("lora_alpha", "0.0")),
  (dict(seed=-1), ("seed", "-1")),
  (dict(seed=1.5), ("seed", "1.5")),
  (dict(compute_dtype="float16"), ("compute_dtype", "float16")),
  (dict(freeze=("[",)), ("freeze", "'['", "regular expression")),
  (dict(freeze="mtp"), ("freeze", "'mtp'", "tuple")),
  (dict(lora_targets=("wq_a", 3)), ("lora_targets",)),
], ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()) if isinstance(v, dict) else None)
def test_bad_run_setting_is_named(overrides, needles):
  with pytest.raises(ValueError) as info:
    train.TrainConfig(**overrides)
  for needle in needles:
    assert needle in str(info.value), (needle, str(info.value))


def test_boundary_values_are_accepted():
  tcfg = train.TrainConfig(warmup_steps=0, weight_decay=0.0, adam_weight_decay=0, clip_norm=None,
                           mtp_weight=0.0, balance_alpha=0.0, final_lr_ratio=1.0,
                           decay_fraction=0.0, muon_momentum=0.0, lora_rank=0, seed=0,
                           compute_dtype="bfloat16", freeze=[r"^mtp\."])
  assert tcfg.clip_norm is None and tcfg.freeze == (r"^mtp\.",)
  assert train.TrainConfig() == train.TrainConfig()
