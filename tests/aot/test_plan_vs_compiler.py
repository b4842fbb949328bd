"""`plan` agrees with the compiler: a 2-layer Flash model sharded `expert=8` over 8
compile-only H200s compiles, and XLA's per-device memory is within 15% of plan's figure.

The exact part is checked exactly: XLA's argument bytes equal plan's exact lines (parameters,
router buffers, KV cache), since the program keeps every parameter. The estimated part (the
activations) is checked through the total. The training step of the same model takes minutes to
compile on 2 cores, so it is measured by scripts/bench_plan_vs_compiler.py, not here; its
Muon fix (each expert-sharded stack orthogonalized alone on GPU/TPU) is checked below on the
simulated CPU devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deepseek_v4
from deepseek_v4 import plan
from deepseek_v4.aot import memory, targets
from deepseek_v4.optim import muon
from tests.aot import backend
from kernels_pallas.common import target_platform
from tests.tolerances import F32_FUNCTION, PLAN_VS_COMPILER_REL, rel_err

pytestmark = pytest.mark.aot


def _need(target: str) -> None:
  backend.require(target)


def test_two_layer_flash_forward_on_8_h200_matches_plan():
  _need("h200")
  cfg = memory.truncated(deepseek_v4.flash(), 2)
  s = plan.Settings(batch=8, seq=4096, prefill_chunk=4096)
  m = memory.measure(cfg, dict(expert=8), s, "h200")
  p = plan.make_plan(cfg, dict(expert=8), None, s)
  assert m.plan == p.total
  exact = sum(b for _, b, kind in p.lines if kind == "exact")
  # arguments: every parameter shard, buffers, the cache (and the [8, 4096] ids: 16 KB per device)
  assert abs(m.arguments - exact) <= 1e6, (m.arguments, exact)
  assert abs(m.ratio - 1) <= PLAN_VS_COMPILER_REL, (m.to_dict(), plan.format_plan(p))
  assert m.total <= targets.target("h200").memory_bytes


def test_moe_runs_the_tiled_grouped_matmul_on_gpu():
  """XLA:GPU expands ragged_dot into an [R, local experts, K] operand (51.5 GB per MoE layer for
  Flash at 8 x 4096 on 8 H200s); "auto" must not pick it there."""
  from kernels_pallas.moe_gmm import ops

  for platform, want in (("gpu", "tiled"), ("cpu", "tiled"), ("tpu", "ragged_dot")):
    with target_platform(platform):
      assert ops.resolve_impl("auto") == want


def _muon_program(platform: str):
  mesh = jax.make_mesh((8,), ("expert",), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,))
  specs = (NamedSharding(mesh, P(None, "expert")), NamedSharding(mesh, P("expert")))
  a = jax.ShapeDtypeStruct((2, 64, 64, 128), jnp.float32, sharding=specs[0])  # [layers, E, n, m]
  b = jax.ShapeDtypeStruct((64, 128, 64), jnp.float32, sharding=specs[1])  # tall: same (n, m)

  def f(x, y):
    return tuple(muon.orthogonalize_many([x, y], rms_scale=0.18))

  with target_platform(platform):
    return jax.jit(f, out_shardings=specs).lower(a, b).compile(), specs


def test_muon_keeps_expert_sharded_stacks_sharded_on_gpu():
  """On GPU/TPU each stack is orthogonalized alone with its leading axes kept: no device holds
  another device's matrices. The CPU path concatenates (replicating here), the contrast."""
  if len(jax.devices()) < 8:
    pytest.skip("needs the 8 simulated CPU devices of tests/conftest.py")
  gpu, specs = _muon_program("gpu")
  cpu, _ = _muon_program("cpu")
  one_stack = 2 * 64 * 64 * 128 * 4  # the [2, 64, 64, 128] float32 stack, whole
  gpu_temp = gpu.memory_analysis().temp_size_in_bytes
  cpu_temp = cpu.memory_analysis().temp_size_in_bytes
  assert gpu_temp < one_stack / 2, (gpu_temp, one_stack)
  assert cpu_temp > one_stack, (cpu_temp, one_stack)
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.device_put(jax.random.normal(k1, (2, 64, 64, 128), jnp.float32), specs[0])
  y = jax.device_put(jax.random.normal(k2, (64, 128, 64), jnp.float32), specs[1])
  got, ref = gpu(x, y), cpu(x, y)
  for g, r in zip(got, ref):
    assert rel_err(g, r) <= F32_FUNCTION
  # the oracle: each matrix alone, unsharded
  alone = muon.orthogonalize_many([np.asarray(x)[1, 5]], rms_scale=0.18)[0]
  assert rel_err(np.asarray(got[0])[1, 5], alone) <= F32_FUNCTION


def test_truncated_keeps_the_layer_kinds_and_extrapolate_is_linear():
  flash = deepseek_v4.flash()
  cut = memory.truncated(flash, 7)
  assert cut.compress_ratios == flash.compress_ratios[:7] and cut.num_mtp_layers == 1
  assert [cut.is_hash_layer(i) for i in range(7)] == [flash.is_hash_layer(i) for i in range(7)]
  with pytest.raises(ValueError, match=r"num_layers=44 must be in \[1, 43\]"):
    memory.truncated(flash, 44)
  a = memory.Measurement(arguments=10, temporaries=100, output=4, aliased=2, plan=1, compile_s=1)
  b = memory.Measurement(arguments=30, temporaries=110, output=4, aliased=2, plan=1, compile_s=2)
  m = memory.extrapolate((7, a), (9, b), 43, plan=500.0)
  assert (m.arguments, m.temporaries, m.output, m.aliased) == (370, 280, 4, 2)
  assert m.total == 370 + 4 - 2 + 280 and m.ratio == m.total / 500.0
  with pytest.raises(ValueError, match="two different layer counts"):
    memory.extrapolate((7, a), (7, b), 43, plan=1.0)
