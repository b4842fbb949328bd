"""Training of DeepSeek-V4 (docs/architecture.md#training): run settings, optimizer, losses, the
gradient step and the router-bias update. One concept per module, imported one way
(config <- optimizer, loss <- step):

  config.py     `TrainConfig` (run settings, separate from the architecture's ModelConfig), the
                warmup-stable-decay schedule `wsd_schedule`, `mtp_weight_at`,
                `training_model_config`, `lora_spec` and the trunk options of a step
                `step_options`;
  optimizer.py  which parameters train (`freeze_patterns`, `trainable_filter`, `freeze_mask`) and
                the Muon/AdamW optimizer over them (`gradient_transform`, `make_optimizer`);
  loss.py       `loss_fn` = L_LM + lambda_MTP L_MTP + sum_layers L_bal + w_idx L_indexer, and
                `mtp_targets`;
  step.py       `build` (model and optimizer), `train_step` (one jitted optimizer step, then the
                router-bias update `update_router_biases`), `train_step_fn` (the same step
                unjitted, for callers with their own jit) and `as_batch`.

The public names of all four are re-exported here: `from deepseek_v4 import train;
train.TrainConfig(...)`, `train.build`, `train.train_step`, `train.loss_fn`, ...
"""

from deepseek_v4.train.config import (IndexerStage, RematPolicy, TrainConfig, lora_spec,
                                      mtp_weight_at, step_options, training_model_config,
                                      wsd_schedule)
from deepseek_v4.train.optimizer import (freeze_mask, freeze_patterns, gradient_transform,
                                         make_optimizer, trainable_filter)
from deepseek_v4.train.loss import loss_fn, mtp_targets
from deepseek_v4.train.step import (as_batch, build, build_model, train_step, train_step_fn,
                                    update_router_biases)

__all__ = [
  "IndexerStage", "RematPolicy", "TrainConfig", "as_batch", "build", "build_model", "freeze_mask",
  "freeze_patterns", "gradient_transform", "lora_spec", "loss_fn", "make_optimizer", "mtp_targets",
  "mtp_weight_at", "step_options", "train_step", "train_step_fn", "trainable_filter",
  "training_model_config", "update_router_biases", "wsd_schedule",
]
