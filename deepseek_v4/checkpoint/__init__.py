"""Checkpoint formats: official / transformers safetensors (convert.py) and Orbax (io.py)."""

from deepseek_v4.checkpoint.convert import (
  CheckpointError,
  from_hub_tensors,
  load_hf_checkpoint,
  read_safetensors,
  save_hf_checkpoint,
  to_hub_tensors,
)

from deepseek_v4.checkpoint.io import Checkpointer, CheckpointMismatch, load_model

__all__ = ["Checkpointer", "CheckpointMismatch", "load_model", "CheckpointError", "from_hub_tensors", "load_hf_checkpoint", "read_safetensors",
           "save_hf_checkpoint", "to_hub_tensors"]
