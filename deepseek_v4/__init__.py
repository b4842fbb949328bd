"""deepseek_v4: a pure-JAX / Flax NNX reimplementation of DeepSeek-V4 (Flash, Pro)."""

from deepseek_v4.config import PRESETS, ModelConfig, flash, pro, tiny
from deepseek_v4.kinds import AttentionKind, register
from deepseek_v4.layers.attention_kinds import CSA, HCA, Dense, Sliding  # registers the V4 kinds
from deepseek_v4.model import Transformer
from deepseek_v4.options import Options
from deepseek_v4.checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from deepseek_v4.cache import Cache, init_cache
from deepseek_v4.decoding import Sampler, decode_step, generate, prefill
from deepseek_v4.train import TrainConfig

__all__ = ["AttentionKind", "CSA", "Dense", "HCA", "Sliding", "register",
           "CheckpointError", "ModelConfig", "PRESETS", "Transformer", "flash",
           "load_hf_checkpoint", "pro", "save_hf_checkpoint", "tiny",
           "Cache", "Sampler", "TrainConfig", "decode_step", "generate", "init_cache",
           "prefill"]
