"""deepseek_v4: a pure-JAX / Flax NNX reimplementation of DeepSeek-V4 (Flash, Pro)."""

from deepseek_v4.config import PRESETS, ModelConfig, flash, pro, tiny
from deepseek_v4.model import Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "flash", "pro", "tiny"]
