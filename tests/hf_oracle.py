"""The independent oracle: transformers' DeepseekV4ForCausalLM (5.23.0, PyTorch, CPU) holding
exactly our model's weights. Loaded through `from_pretrained` from a hub-named safetensors file, so
the hub -> transformers renaming is exercised too."""

from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4.checkpoint import save_hf_checkpoint
from deepseek_v4.layers.params import HashTable, RouterBias


def randomize_params(model, seed: int = 0):
  """Every parameter set to non-trivial random values (spec Appendix B): matrices ~ N(0, 1/fan_in),
  norms ~ 1 + 0.1 N, mHC bases / ape / sinks / router bias non-zero, gating scales ~ 1."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    name = ".".join(map(str, path))
    if isinstance(var, HashTable):
      continue
    shape = var.shape
    if isinstance(var, RouterBias):
      v = 0.1 * rng.standard_normal(shape)
    elif name.endswith("norm.weight"):
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("_scale"):
      v = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith("_base") or name.endswith(".ape") or name.endswith("attn_sink"):
      v = 0.5 * rng.standard_normal(shape)
    else:
      v = rng.standard_normal(shape) / np.sqrt(shape[-1])
    var.set_value(jnp.asarray(v, var.dtype))
  return model


def hf_model(model, folder: str | None = None):
  """transformers DeepseekV4ForCausalLM (float32, eager attention) with `model`'s weights."""
  import torch
  from transformers import DeepseekV4ForCausalLM

  own = folder is None
  folder = folder or tempfile.mkdtemp(prefix="dsv4_hf_")
  save_hf_checkpoint(model, folder)
  ref, info = DeepseekV4ForCausalLM.from_pretrained(
    folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  problems = {k: v for k, v in info.items() if v and k != "mismatched_keys" or
              (k == "mismatched_keys" and v)}
  # transformers has no MTP: only mtp.* may be left unused.
  unexpected = [k for k in problems.pop("unexpected_keys", []) if not k.startswith("mtp.")]
  problems = {k: v for k, v in problems.items() if v}
  if unexpected or problems:
    raise AssertionError(f"transformers did not load every tensor: {unexpected} {problems}")
  ref.eval()
  if own:
    for f in os.listdir(folder):
      os.remove(os.path.join(folder, f))
    os.rmdir(folder)
  return ref


def hf_logits(ref, ids: np.ndarray, output_hidden_states: bool = False):
  import torch

  with torch.no_grad():
    out = ref(torch.as_tensor(np.asarray(ids), dtype=torch.long),
              output_hidden_states=output_hidden_states)
  if output_hidden_states:
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]
  return out.logits.numpy()
