"""The TPU body of the sparse forward (scalar-prefetched indices, async row copies) under
interpret=True on CPU, vs the reference: out, lse, and gradients (reference backward)."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.sparse_attention import kernel_tpu, reference
from tests.tolerances import F32_FUNCTION, F32_KERNEL_GRAD_REL, rel_err


def test_tpu_body_window_csa():
  rng = np.random.default_rng(0)
  B, T, N, H, C, P = 2, 11, 4, 8, 4, 3
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
  sink = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  comp = jnp.asarray(rng.normal(size=(B, C, H)), jnp.float32)
  idx = np.asarray(rng.integers(-1, C, size=(B, T, P)), np.int32)
  idx[0, 3] = -1  # no entry at all
  idx[1, 4] = [2, 2, 0]  # a duplicated pick counts twice, as in the reference's gather
  kw = dict(scale=0.3, window=5, comp_idx=jnp.asarray(idx), comp_ratio=2, return_lse=True)
  ref = reference.sparse_attention(q, pos, kv, sink, block=4, comp=comp, **kw)
  ours = kernel_tpu.sparse_attention(q, pos, kv, sink, comp=comp, interpret=True, **kw)
  assert rel_err(ours[0], ref[0]) < F32_FUNCTION
  assert rel_err(ours[1], ref[1]) < F32_FUNCTION

  def loss(fn, q, kv, sink, comp, **more):
    o, lse = fn(q, pos, kv, sink, comp=comp, **kw, **more)
    return jnp.sum(jnp.sin(o)) + jnp.sum(lse)

  g_ref = jax.grad(lambda *a: loss(reference.sparse_attention, *a, block=4), argnums=range(4))(
    q, kv, sink, comp)
  g = jax.grad(lambda *a: loss(kernel_tpu.sparse_attention, *a, interpret=True),
               argnums=range(4))(q, kv, sink, comp)
  for a, b in zip(g, g_ref):
    assert rel_err(a, b) < F32_KERNEL_GRAD_REL
