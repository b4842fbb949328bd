"""The TPU body of the sparse attention (kernel_tpu) compiles with Mosaic for TPU v5e, v5p and v6e
at V4-Flash and V4-Pro shapes, each layer kind (sliding window, CSA, HCA), up to T = 8192, forward
and backward (the reference's VJP under the Pallas forward), and its `why_unsupported` predicate
agrees with the compiler at the edge of its VMEM budget.

The real compiler runs on this CPU host (deepseek_v4.aot.targets: compile-only TPU devices from
libtpu). Every case also checks that the compiled program holds the Pallas kernel, so a call the
predicate sends to the reference cannot pass as a compiled kernel. The small-T cases are those
where the previous body's whole-array index prefetch overflowed SMEM (Flash T=1024, Pro T=256).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deepseek_v4.aot import targets
from tests.aot import backend

pytestmark = pytest.mark.aot

backend.require("tpu-v5e", "tpu-v5p", "tpu-v6e", module=True)

from kernels_pallas.sparse_attention import kernel_tpu, ops, sources  # noqa: E402

# config.flash() / config.pro(): query heads and indexer top-k; both: head dim 512, window 128,
# CSA ratio 4, HCA ratio 128.
PRESETS = {"flash": dict(N=64, P=512), "pro": dict(N=128, P=1024)}
H, W = 512, 128
RATIOS = {"csa": 4, "hca": 128, "sliding": 0}
KERNEL = "v4_sparse_attention_fwd_tpu"
bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32


def _args(target, kind, N, P, T, B=1):
  mesh = Mesh(targets.devices(target, 1), ("d",))
  sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                 sharding=NamedSharding(mesh, PartitionSpec()))
  args = [sd((B, T, N, H), bf16), sd((B, T), i32), sd((B, T, H), bf16), sd((N,), f32)]
  if kind != "sliding":
    args.append(sd((B, T // RATIOS[kind], H), bf16))
  if kind == "csa":
    args.append(sd((B, T, P), i32))
  return mesh, args


def _attend(kind, window=W):
  def attend(q, pos, kv, sink, *rest):
    entries = None
    if kind == "hca":
      entries = sources.VisibleEntries(rest[0], RATIOS[kind])
    elif kind == "csa":
      entries = sources.PickedEntries(rest[0], rest[1])
    keys = sources.KeySources(sources.Band(kv, window), entries=entries)
    return kernel_tpu.sparse_attention(q, pos, sink, keys, scale=H**-0.5, return_lse=True)

  return attend


def _compile(target, fn, mesh, args):
  with targets.compiling_for(target, mesh):
    return jax.jit(fn).lower(*args).compile()


def _loss_grad(attend):
  """Gradient of a loss of both outputs with respect to every float input."""
  def grad(q, pos, kv, sink, *rest):
    def loss(q, kv, sink, *comp):
      o, lse = attend(q, pos, kv, sink, *comp, *rest[len(comp):])
      return jnp.sum(o.astype(f32) ** 2) + jnp.sum(lse)

    return jax.grad(loss, argnums=tuple(range(3 + min(len(rest), 1))))(q, kv, sink, *rest[:1])

  return grad


FORWARD = ([("tpu-v5e", p, T) for p, Ts in (("flash", (1024, 8192)), ("pro", (256, 8192)))
            for T in Ts]
           + [(t, p, 8192) for t in ("tpu-v5p", "tpu-v6e") for p in PRESETS])


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("target,preset,T", FORWARD)
def test_forward_compiles(target, preset, T, kind):
  mesh, args = _args(target, kind, T=T, **PRESETS[preset])
  compiled = _compile(target, _attend(kind), mesh, args)
  assert KERNEL in compiled.as_text()
  out_bytes = compiled.memory_analysis().output_size_in_bytes
  B, N = 1, PRESETS[preset]["N"]
  assert out_bytes >= B * T * N * (H * 2 + 4)  # o (bf16) and lse (float32)


# XLA takes 30-85 CPU seconds per backward here (the reference's VJP, not the kernel; T=2048 was
# no cheaper than 8192), so the default suite compiles CSA, the layer with the gather, on both
# generations; sliding and HCA run with -m slow (the tiny model's TPU training step in
# test_compile_model.py also compiles the CSA and HCA backwards by default).
_SLOW = pytest.mark.slow
BACKWARD = ([("tpu-v5e", "flash", "csa", 8192), ("tpu-v5p", "pro", "csa", 8192)]
            + [pytest.param(t, p, k, 8192, marks=_SLOW)
               for t, p in (("tpu-v5e", "flash"), ("tpu-v5p", "pro")) for k in ("sliding", "hca")])


@pytest.mark.parametrize("target,preset,kind,T", BACKWARD)
def test_backward_compiles(target, preset, kind, T):
  """The reference's VJP under the Pallas forward."""
  mesh, args = _args(target, kind, T=T, **PRESETS[preset])
  compiled = _compile(target, _loss_grad(_attend(kind)), mesh, args)
  assert KERNEL in compiled.as_text()


def test_through_ops_impl_pallas():
  """ops.sparse_attention(impl="pallas") reaches the TPU body when compiling for a TPU."""
  mesh, args = _args("tpu-v5p", "csa", T=1024, **PRESETS["flash"])

  def attend(q, pos, kv, sink, comp, idx):
    keys = sources.KeySources(sources.Band(kv, W), entries=sources.PickedEntries(comp, idx))
    return ops.sparse_attention(q, pos, sink, keys, scale=H**-0.5, block=64, impl="pallas")

  assert KERNEL in _compile("tpu-v5p", attend, mesh, args).as_text()


@pytest.mark.parametrize("preset", ["flash", "pro"])
def test_widest_accepted_window_compiles(preset):
  """The predicate's edge (attention="dense" puts the whole sequence in the window): the widest
  window it accepts at T=8192 compiles on v5p, the generation with the least VMEM (64 MiB)."""
  N = PRESETS[preset]["N"]
  widest = max(w for w in range(16, 32768, 16)
               if kernel_tpu.supported((1, 8192, N, H), bf16, window=w, kind="sliding"))
  assert widest >= 4 * W  # far beyond the model's window: the budget is not too tight
  mesh, args = _args("tpu-v5p", "sliding", N=N, P=0, T=8192)
  assert KERNEL in _compile("tpu-v5p", _attend("sliding", widest), mesh, args).as_text()


@pytest.mark.parametrize("picks,fits", [(6144, True), (8192, False)])
def test_index_smem_edge(picks, fits):
  """The block's CSA indices in SMEM: the most picks the predicate accepts (few narrow heads, so
  VMEM does not bind first) compile on v5p; the next size it refuses overflows SMEM."""
  B, T, N, Hs = 1, 2048, 8, 128
  assert kernel_tpu.supported((B, T, N, Hs), bf16, window=W, kind="csa", num_picks=picks,
                              num_entries=T // 4) == fits
  mesh = Mesh(targets.devices("tpu-v5p", 1), ("d",))
  sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                 sharding=NamedSharding(mesh, PartitionSpec()))
  args = [sd((B, T, N, Hs), bf16), sd((B, T), i32), sd((B, T, Hs), bf16), sd((N,), f32),
          sd((B, T // 4, Hs), bf16), sd((B, T, picks), i32)]

  def forward(q, pos, kv, sink, comp, idx):  # the Pallas call itself, past the predicate
    return kernel_tpu._forward(q, pos, kv, sink, comp, idx, kind="csa", scale=Hs**-0.5, window=W,
                               ratio=4, interpret=False)

  if fits:
    assert KERNEL in _compile("tpu-v5p", forward, mesh, args).as_text()
  else:
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
      _compile("tpu-v5p", forward, mesh, args)


def test_refused_window_does_not_fit():
  """A window the predicate refuses (Flash, W=12288) does overflow VMEM in Mosaic."""
  assert not kernel_tpu.supported((1, 12288, 64, H), bf16, window=12288, kind="sliding")
  mesh, args = _args("tpu-v5p", "sliding", N=64, P=0, T=12288)

  def forward(q, pos, kv, sink):  # the Pallas call itself, past the predicate
    return kernel_tpu._forward(q, pos, kv, sink, None, None, kind="sliding", scale=H**-0.5,
                               window=12288, ratio=0, interpret=False)

  with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
    _compile("tpu-v5p", forward, mesh, args)
