"""Every GPU kernel lowers for CUDA on this CPU machine at the real Flash and Pro shapes (64 / 128
query heads, head dim 512, window 128, top-k 512 / 1024, indexer 64 x 128).

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs Pallas' Triton lowering: block
shapes, dtypes, supported primitives and index forms are checked, and the kernels are emitted as
Triton custom calls. Triton's own compilation to PTX (register and shared-memory budgets) happens
only when XLA compiles on a GPU: the device check covers that.
"""

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.indexer_topk import kernel as idx_kernel
from kernels_pallas.sparse_attention import kernel

PRESETS = {"flash": dict(N=64, P=512), "pro": dict(N=128, P=1024)}
H, W, T, I, J = 512, 128, 256, 64, 128
bf16, i32 = jnp.bfloat16, jnp.int32
sd = jax.ShapeDtypeStruct


def _lower(f, *args) -> str:
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _attention(kind, N, P, Tq=T):
  """(fwd+lse, grad) functions and their abstract args for one layer kind."""
  C = {"csa": T // 4, "hca": T // 128, "window": 0}[kind]
  args = [sd((1, Tq, N, H), bf16), sd((1, Tq), i32), sd((1, Tq, H), bf16), sd((N,), jnp.float32)]
  extra = {}
  if kind != "window":
    args.append(sd((1, C, H), bf16))
  if kind == "csa":
    args.append(sd((1, Tq, P), i32))

  def fwd(q, pos, kv, sink, comp=None, idx=None):
    return kernel.sparse_attention(q, pos, kv, sink, scale=H**-0.5, window=W, block=64, comp=comp,
                                   comp_idx=idx, comp_ratio=4 if kind == "csa" else 128,
                                   return_lse=True, **extra)

  def grad(q, pos, kv, sink, *rest):
    loss = lambda q, kv, sink: jnp.sum(fwd(q, pos, kv, sink, *rest)[0].astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, kv, sink)

  return fwd, grad, args


@pytest.mark.parametrize("preset", ["flash", "pro"])
@pytest.mark.parametrize("kind", ["csa", "hca", "window"])
def test_sparse_attention_lowers(preset, kind):
  fwd, grad, args = _attention(kind, **PRESETS[preset])
  assert _lower(fwd, *args).count("xla.gpu.triton") == 1  # the forward kernel
  # backward: forward + dQ + the transposed dKV passes (band; HCA entries too)
  assert _lower(grad, *args).count("xla.gpu.triton") == (4 if kind == "hca" else 3)


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_decode_lowers(preset):
  N, P = PRESETS[preset]["N"], PRESETS[preset]["P"]
  C = 32768 // 4  # 32K context of compressed CSA entries

  def step(q, pos, kv, sink, ring, ring_pos, comp, idx):
    return kernel.sparse_attention(q, pos, kv, sink, scale=H**-0.5, window=W, block=1,
                                   prefix_kv=ring, prefix_pos=ring_pos, comp=comp, comp_idx=idx,
                                   comp_ratio=4)

  args = [sd((32, 1, N, H), bf16), sd((32, 1), i32), sd((32, 1, H), bf16), sd((N,), jnp.float32),
          sd((32, W, H), bf16), sd((32, W), i32), sd((32, C, H), bf16), sd((32, 1, P), i32)]
  assert _lower(step, *args).count("xla.gpu.triton") == 1


def test_indexer_lowers():
  C = T // 4

  def scores(q, w, k, pos):
    return idx_kernel.indexer_topk(q, w, k, pos, ratio=4, topk=512, block=128)

  args = [sd((1, T, I, J), bf16), sd((1, T, I), bf16), sd((1, C, J), bf16), sd((1, T), i32)]
  assert _lower(scores, *args).count("xla.gpu.triton") == 1
