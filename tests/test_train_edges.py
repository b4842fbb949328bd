"""Training's rough edges: a freeze pattern that matches no parameter is refused
(a typo would train everything), and a one-step run reports the throughput of its step instead of
0 tokens/s."""

from __future__ import annotations

import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import data as data_lib
from deepseek_v4 import train, trainer

# One CSA layer with learned routing, no MTP: a fast compile.
ONE_LAYER = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, num_mtp_layers=0)


def test_fit_refuses_a_freeze_pattern_matching_nothing():
  rows = data_lib.load_rows(None, data_lib.byte_tokenizer(), 32)
  cfg = ONE_LAYER
  tcfg = train.TrainConfig(seq_len=32, batch_size=2, steps=1, freeze=(r"layer\.0\.",))
  with pytest.raises(ValueError, match=r"--freeze 'layer\\.0\\.' matches no parameter"):
    trainer.fit(cfg, tcfg, rows, None, progress=False, log=lambda s: None)
  model = nnx.eval_shape(lambda: deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)))
  trainer.check_freeze(model, train.TrainConfig(freeze=(r"layers\.0\.", r"^embed\.")))  # match


def test_one_step_run_reports_its_throughput():
  tok = data_lib.byte_tokenizer()
  rows = data_lib.load_rows(None, tok, 32)
  tcfg = train.TrainConfig(seq_len=32, batch_size=2, steps=1, warmup_steps=1)
  result = trainer.fit(ONE_LAYER, tcfg, rows, None, progress=False, log=lambda s: None)
  assert result.steps == 1 and result.tokens_per_s > 0 and result.throughput_includes_compile
  # The step (64 tokens) lies inside the run's wall time, so its rate is at least 64 / wall_s.
  assert result.tokens_per_s >= 64 / result.wall_s
  text = trainer.summary(result)
  assert " 0 tokens/s" not in text and "compilation included" in text
