"""The tiny model's programs compile for real for an H100 and a TPU v5p on this CPU host, with the
Pallas kernels selected (`kernel_impl="pallas"`), through `deepseek_v4.aot.compile`.

What is checked against an independent figure: XLA's per-device argument bytes equal the bytes of
each argument's shard, summed from the shapes and the rule table's shardings (parameters,
optimizer state, cache, inputs): the compiled program holds every parameter (also the ones it
never reads) in the layout a real run uses. (On TPU, which pads arrays to its memory tiles, the
sum is a lower bound.) On the GPU, the Pallas kernels the program calls are the ones compiled
(their names in the PTX), each within the H100's shared memory per block.
"""

import math
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cache as cache_lib
from deepseek_v4 import parallel, sharding, train
from deepseek_v4.aot import targets
from tests.aot import backend

pytestmark = pytest.mark.aot

backend.require("h100", "tpu-v5p", module=True)

from deepseek_v4.aot import compile as aot  # noqa: E402

# Both compressed kinds (CSA with the indexer, HCA; each also attends its sliding window), hash and
# learned routing, and an MTP block (which the forward never reads but a run holds): compile time
# on two cores grows with depth, the checks do not. The training and sharded cases drop the MTP.
CFG = deepseek_v4.tiny(compress_ratios=(4, 16), num_hash_layers=1, hc_sinkhorn_iters=2,
                       num_mtp_layers=1)
# The Pallas kernels, at the query block tiny() used to carry.
PALLAS = deepseek_v4.Options(kernel_impl="pallas", attn_block=16)
CFG_NO_MTP = CFG.replace(num_mtp_layers=0)
# The H100 training step, the slowest compile here (XLA:GPU codegen for every fusion of the forward,
# backward and optimizer): one CSA layer, which runs the forward, dQ and band-dKV kernels
# (tests/aot/test_gpu_kernels.py compiles every kernel at the real shapes).
CFG_CSA = CFG_NO_MTP.replace(compress_ratios=(4,), num_hash_layers=0)
B, T = 4, 32
FWD, IDX = "v4_sparse_attention_fwd", "v4_indexer_scores"


def _h100_shared_limit() -> int:
  spec = Path(targets.__file__).parent / "gpu_targets" / targets.TARGETS["h100"].spec
  return int(re.search(r"shared_memory_per_block_optin:\s*(\d+)", spec.read_text())[1])


def _shard_bytes(tree) -> int:
  """Per-device bytes of a tree of ShapeDtypeStructs with shardings (device 0's shard)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _mesh(target: str, sizes: dict[str, int]):
  return sharding.make_mesh(**sizes, devices=targets.devices(target, math.prod(sizes.values())))


def _with(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def _expected_forward_args(target, sizes, rules) -> int:
  mesh = _mesh(target, sizes)
  _, state = parallel.abstract_model(CFG, mesh, rules)
  ids = jax.ShapeDtypeStruct((B, T), np.int32,
                             sharding=sharding.batch_sharding(mesh, rules, (B, T)))
  return _shard_bytes(state) + _shard_bytes(ids)


def _expected_train_args(target, sizes, rules, tcfg, cfg) -> int:
  mesh = _mesh(target, sizes)
  cfg = train.training_model_config(cfg, tcfg)
  model, optimizer = nnx.eval_shape(lambda: train.build(cfg, tcfg))
  state = nnx.state((model, optimizer))
  state = _with(state, sharding.state_shardings(state, mesh, rules))
  batch = jax.ShapeDtypeStruct((B, T), np.int32,
                               sharding=sharding.batch_sharding(mesh, rules, (B, T)))
  return _shard_bytes(state) + 2 * _shard_bytes(batch) + 4  # inputs, targets, the MTP weight


def _check_gpu_kernels(r, must_include):
  names = {k.name for k in r.kernels}
  assert must_include <= names, names
  for k in r.kernels:
    assert 0 < k.shared_memory_bytes <= _h100_shared_limit(), k
    assert k.registers > 0 and k.arch.startswith("sm_90"), k
    assert k.launches >= 1, k


def test_forward_compiles_for_h100_with_the_pallas_kernels():
  r = aot.compile_program(CFG, target="h100", program="forward", batch=B, seq=T, options=PALLAS)
  assert r.error is None
  assert r.argument_bytes == _expected_forward_args("h100", {}, "fsdp")
  assert r.temp_bytes > 0 and r.output_bytes == B * T * CFG.vocab_size * 4  # float32 logits
  assert r.total_bytes == r.argument_bytes + r.temp_bytes + r.output_bytes - r.alias_bytes
  assert r.verdict == "FITS" and r.plan_bytes > 0
  _check_gpu_kernels(r, {FWD, IDX})


def test_train_step_compiles_for_h100_with_the_pallas_kernels():
  tcfg = train.TrainConfig(seq_len=T, batch_size=B, optimizer="muon_v4")
  r = aot.compile_program(CFG_CSA, target="h100", program="train", batch=B, seq=T, tcfg=tcfg, options=PALLAS)
  assert r.error is None, r.error
  assert r.argument_bytes == _expected_train_args("h100", {}, "fsdp", tcfg, CFG_CSA)
  assert r.alias_bytes > 0  # parameters and optimizer state are donated and updated in place
  # The backward runs the forward kernel again plus the dQ and dKV kernels.
  _check_gpu_kernels(r, {FWD})
  assert any("dq" in k.name for k in r.kernels) and any("dkv" in k.name for k in r.kernels)


def test_decode_step_compiles_expert_parallel_over_2_h100s():
  sizes = dict(expert=2)
  r = aot.compile_program(CFG_NO_MTP, target="h100", program="decode", devices=2,
                          mesh="expert=2", rules="fsdp_ep", batch=B * 2, seq=64, kernels=False,
                          options=PALLAS)
  assert r.error is None, r.error
  assert r.mesh == sharding.mesh_shape(**sizes, num_devices=2)
  mesh = _mesh("h100", sizes)
  _, state = parallel.abstract_model(CFG_NO_MTP, mesh, "fsdp_ep")
  cache = jax.eval_shape(lambda: cache_lib.init_cache(CFG_NO_MTP, B * 2, 64))
  rows = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
    ("batch", None), (B * 2, 1), mesh, sharding.get_rules("fsdp_ep").activations, strict=False))
  ids = jax.ShapeDtypeStruct((B * 2, 1), np.int32, sharding=rows)
  n = jax.ShapeDtypeStruct((B * 2,), np.int32, sharding=jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(*rows.spec[:1])))
  expected = (_shard_bytes(state) + _shard_bytes(ids) + _shard_bytes(n)
              + _shard_bytes(_with(cache, sharding.cache_shardings(cache, mesh, "fsdp_ep"))))
  assert r.argument_bytes == expected
  # Each device holds half of the routed experts, not the whole parameter set.
  whole = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
  assert _shard_bytes(state) < whole
  assert r.alias_bytes > 0  # the cache is donated


def test_forward_compiles_for_tpu_v5p_with_the_pallas_kernels():
  r = aot.compile_program(CFG, target="tpu-v5p", program="forward", batch=B, seq=T, options=PALLAS)
  assert r.error is None, r.error
  # The TPU pads arrays to its memory tiles ((8, 128) for 32-bit), so only bounds hold there; a
  # dropped parameter (the MTP block) would take it below the unpadded sum.
  expected = _expected_forward_args("tpu-v5p", {}, "fsdp")
  assert expected <= r.argument_bytes < 2 * expected
  assert r.kernels == [] and r.verdict == "FITS"


def test_train_step_compiles_for_tpu_v5p_with_the_pallas_kernels():
  tcfg = train.TrainConfig(seq_len=T, batch_size=B, optimizer="adamw", lora_rank=4)
  r = aot.compile_program(CFG_NO_MTP, target="tpu-v5p", program="train", batch=B, seq=T,
                          tcfg=tcfg, options=PALLAS)
  assert r.error is None, r.error
  expected = _expected_train_args("tpu-v5p", {}, "fsdp", tcfg, CFG_NO_MTP)
  assert expected <= r.argument_bytes < 2 * expected  # TPU tile padding, as above
  assert r.alias_bytes > 0


def test_bad_requests_are_named():
  with pytest.raises(ValueError, match="unknown compile target 'h300'"):
    aot.compile_program(CFG, target="h300")
  with pytest.raises(ValueError, match="unknown program 'backward'"):
    aot.compile_program(CFG, target="h100", program="backward")
  with pytest.raises(ValueError, match="expected AXIS=SIZE"):
    aot.compile_program(CFG, target="h100", devices=8, mesh="experts=8")
  with pytest.raises(ValueError, match="has 4 devices, but 8 devices"):
    aot.compile_program(CFG, target="h100", devices=8, mesh="expert=4")
  with pytest.raises(ValueError, match="chunk=64 must be in"):
    aot.compile_program(CFG, target="h100", program="prefill", seq=32, chunk=64)


def test_impl_choice_follows_the_target_and_is_logged_at_info(caplog):
  """Under `compiling_for`, impl="auto" picks what the target runs, logged once at INFO (which path
  runs is information, not a warning); impl="pallas" on the CPU says once that it interprets."""
  import logging

  from kernels_pallas import common

  common._logged.clear()
  with caplog.at_level(logging.INFO, logger="kernels_pallas"):
    with targets.compiling_for("h100"):
      assert common.resolve_impl("aot_test_op", "auto") == "pallas"
      assert common.pallas_backend(False, "aot_test_op") == ("gpu", False)
    with targets.compiling_for("tpu-v5p"):
      assert common.resolve_impl("aot_test_op", "auto") == "pallas"
      assert common.pallas_backend(False, "aot_test_op") == ("tpu", False)
    assert common.resolve_impl("aot_test_op", "auto") == "reference"  # the CPU host again
    for _ in range(2):
      assert common.pallas_backend(False, "aot_test_op") == ("gpu", True)
  got = [(r.levelno, r.getMessage()) for r in caplog.records if "aot_test_op" in r.getMessage()]
  assert got == [(logging.INFO, "aot_test_op: impl='auto' runs pallas on gpu"),
                 (logging.INFO, "aot_test_op: impl='auto' runs pallas on tpu"),
                 (logging.INFO, "aot_test_op: impl='auto' runs reference on cpu"),
                 (logging.INFO, "aot_test_op: impl='pallas' on cpu interprets the GPU kernel "
                                "body (no compiled kernel)")]


_PTX = """\
.version 8.0
.target sm_90a
.address_size 64

.visible .entry my_pallas_kernel(.param .u64 out)
{
  .reg .b64 %rd<2>;
  .reg .b32 %r<2>;
  ld.param.u64 %rd1, [out];
  mov.u32 %r1, 7;
  st.global.u32 [%rd1], %r1;
  ret;
}

.visible .entry loop_fusion(.param .u64 out)
{
  .reg .b64 %rd<2>;
  ld.param.u64 %rd1, [out];
  st.global.u64 [%rd1], %rd1;
  ret;
}
"""

_THUNKS = """\
001: kCustomKernel [source | next=002 (1)] loop_fusion grid: [1, 1, 1] threads: [64, 1, 1]  shared_memory: 0 bytes
002: kWhile [prev=001 (1) | sink]
  002.001: kCustomKernel [source | sink] my_pallas_kernel grid: [4, 2, 1] threads: [128, 1, 1]  shared_memory: 1024 bytes
  002.002: kCustomKernel [source | sink] my_pallas_kernel grid: [8, 1, 1] threads: [256, 1, 1]  shared_memory: 4096 bytes
"""


def test_kernel_resources_read_from_a_dump(tmp_path):
  """The dump reader on a hand-written dump: launches inside a loop found, the largest one's
  shared memory and launch kept, registers from ptxas, and only the named (Pallas) kernels."""
  (tmp_path / "module_0001.jit_f.thunk_sequence.txt").write_text(_THUNKS)
  (tmp_path / "module_0001.jit_f.1.ptx").write_text(_PTX)
  (tmp_path / "module_0001.jit_f.2.ptx").write_text("")  # XLA writes empty ones too
  [k] = aot.kernel_resources_from_dump(tmp_path, {"my_pallas_kernel"})
  assert (k.name, k.arch, k.shared_memory_bytes, k.grid, k.threads, k.launches) == (
    "my_pallas_kernel", "sm_90a", 4096, (8, 1, 1), (256, 1, 1), 2)
  assert 0 < k.registers < 32 and k.spill_bytes == 0 and k.stack_bytes == 0
  both = aot.kernel_resources_from_dump(tmp_path, None)
  assert [x.name for x in both] == ["loop_fusion", "my_pallas_kernel"]
  line = ('%2:2 = stablehlo.custom_call @__gpu$xla.gpu.triton(%arg0) {backend_config = "", '
          'mhlo.backend_config = {grid_x = 1 : i32, ir = "ML\\EFR", name = "v4_dq", '
          'num_stages = 3 : i32}} : (tensor<1xf32>) -> tensor<1xf32>')
  assert aot.triton_kernel_names(f"x = 1\n{line}\n") == {"v4_dq"}


def test_native_mode_needs_a_gpu_host(monkeypatch):
  """DSV4_AOT_NATIVE=1 (scripts/device_check.sh) compiles for the host's own GPUs: on this CPU
  host it is refused by name, and TPU targets stay compile-only."""
  monkeypatch.setenv("DSV4_AOT_NATIVE", "1")
  assert "JAX's backend here is 'cpu'" in targets.missing_backend(targets.target("h200"))
  assert targets.missing_backend(targets.target("tpu-v5p")) is None


@pytest.mark.slow  # three programs for 8 devices: about 1.5 min on 2 idle cores
def test_programs_on_a_context_mesh_compile_context_parallel(monkeypatch):
  """`compile --mesh context=8`: the forward, a prefill chunk into the cache and the training step
  trace the context-parallel attention (docs/context_parallel.md) and compile for 8 H100s."""
  from deepseek_v4.layers import context_parallel

  calls = []
  for name in ("full_attention", "prefill_attention"):
    original = getattr(context_parallel, name)
    monkeypatch.setattr(context_parallel, name,
                        lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
  kw = dict(target="h100", devices=8, mesh="context=8", rules="fsdp", batch=1, seq=256,
            kernels=False)
  for program, extra, want in (
      ("forward", {}, "full_attention"), ("prefill", dict(chunk=128), "prefill_attention"),
      ("train", dict(tcfg=train.TrainConfig(seq_len=256, batch_size=1)), "full_attention")):
    calls.clear()
    r = aot.compile_program(CFG_NO_MTP, program=program, **kw, **extra)
    assert want in calls, (program, calls)
    assert 0 < r.total_bytes < targets.target("h100").memory_bytes
