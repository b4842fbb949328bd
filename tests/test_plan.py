"""`plan`: per-device memory from shapes and shardings (deepseek_v4/plan.py), checked against the
shard shapes JAX itself assigns, the cache pytree and the optimizer's state, without allocating."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cli, parallel, plan, sharding

MESH = dict(data=1, fsdp=2, expert=2, tensor=2)


def _line(p: plan.Plan, prefix: str) -> float:
  (b,) = [b for label, b, _ in p.lines if label.startswith(prefix)]
  return b


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp", "fsdp_ep"])
def test_parameter_bytes_equal_jax_shard_shapes(rules):
  cfg = deepseek_v4.tiny()
  mesh = sharding.make_mesh(**MESH)
  _, abstract = parallel.abstract_model(cfg, mesh, rules)  # ShapeDtypeStructs with shardings
  params = buffers = 0
  for _, var in nnx.to_flat_state(abstract):
    a = var.get_value()
    local = math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
    if isinstance(var, nnx.Param):
      params += local
    else:
      buffers += local
  p = plan.make_plan(cfg, MESH, rules, plan.Settings(seq=256))
  assert _line(p, "parameters") == params
  assert _line(p, "router bias") == buffers


def test_cache_bytes_equal_the_cache_pytree():
  from deepseek_v4 import cache

  cfg = deepseek_v4.tiny()
  p = plan.make_plan(cfg, dict(fsdp=4, expert=2), "fsdp_ep",
                     plan.Settings(batch=8, seq=256))
  whole = cache.cache_bytes(jax.eval_shape(lambda: cache.init_cache(cfg, 8, 256)))
  assert _line(p, "KV cache") == whole / 8  # batch over the 8 batch shards
  # a single sequence cannot be split: replicated
  p1 = plan.make_plan(cfg, dict(fsdp=4, expert=2), "fsdp_ep", plan.Settings(batch=1, seq=256))
  assert _line(p1, "KV cache") == cache.cache_bytes(
    jax.eval_shape(lambda: cache.init_cache(cfg, 1, 256)))


def test_training_state_bytes():
  cfg = deepseek_v4.tiny()
  sizes = dict(fsdp=8)
  s = plan.Settings(train=True, batch=8, seq=32, optimizer="adamw")
  p = plan.make_plan(cfg, sizes, "fsdp", s)
  params = _line(p, "parameters")
  assert _line(p, "gradients") == params  # every parameter trained, same dtype (float32)
  assert _line(p, "optimizer state") == 2 * params  # AdamW: two float32 moments
  frozen = plan.make_plan(cfg, sizes, "fsdp", plan.Settings(
    train=True, batch=8, seq=32, optimizer="adamw", freeze=(r"ffn\.experts\.",)))
  # routed experts: w1, w2, w3 of E x F x D float32 in 6 layers + MTP, split 8 ways over fsdp
  experts = 3 * cfg.num_experts * cfg.moe_inter_dim * cfg.d_model * 4 * 7 / 8
  assert _line(frozen, "gradients") == params - experts


def test_flash_inference_on_8_h200_fits_and_training_does_not():
  flash = deepseek_v4.flash()
  mesh = plan.default_mesh(flash, 8)
  assert mesh == dict(data=1, fsdp=1, expert=8, tensor=1)
  p = plan.make_plan(flash, mesh, device_memory=plan.parse_bytes("141GB"))
  assert p.rules == "fsdp_ep" and p.fits
  assert 72e9 < _line(p, "parameters") < 73e9  # 290.9B bf16 parameters / 8
  t = plan.make_plan(flash, mesh, settings=plan.Settings(train=True, batch=8, seq=4096),
                     device_memory=plan.parse_bytes("141GB"))
  assert not t.fits


def test_default_mesh():
  flash = deepseek_v4.flash()
  assert plan.default_mesh(flash, 16, train=True) == dict(data=1, fsdp=1, expert=16, tensor=1)
  assert plan.default_mesh(flash, 16) == dict(data=2, fsdp=1, expert=8, tensor=1)
  tiny = deepseek_v4.tiny()  # 8 experts: the rest of the devices go to fsdp
  assert plan.default_mesh(tiny, 32, train=True) == dict(data=1, fsdp=4, expert=8, tensor=1)


def test_bad_mesh_names_both_numbers():
  flash = deepseek_v4.flash()
  with pytest.raises(ValueError, match=r"attn_sink: dimension 0 \('heads'\) has size 64, which "
                                       r"is not divisible by the mesh axis 'tensor' of size 128"):
    plan.make_plan(flash, dict(tensor=128), "fsdp_tp")
  with pytest.raises(ValueError, match=r"batch: dimension 0 \('batch'\) has size 4, which is "
                                       r"not divisible by the mesh axes data x fsdp x expert of "
                                       r"total size 8"):
    plan.make_plan(flash, dict(expert=8), "fsdp_ep", plan.Settings(train=True, batch=4))


def test_parse_bytes():
  assert plan.parse_bytes("141GB") == 141 * 10**9
  assert plan.parse_bytes("80GiB") == 80 * 2**30
  assert plan.parse_bytes("8e9") == 8 * 10**9
  with pytest.raises(ValueError, match="141 gigs"):
    plan.parse_bytes("141 gigs")


def test_cli(capsys):
  rc = cli.main(["plan", "--preset", "flash", "--mesh", "fsdp=8,expert=8", "--train", "--batch",
                 "64", "--seq", "4096", "--device-memory", "141GB"])
  out = capsys.readouterr().out
  assert rc == 0
  assert ("plan: flash fine-tuning on 64 devices, mesh data=1,fsdp=8,expert=8,tensor=1"
          in out)
  assert "optimizer state (muon, float32 moments)" in out
  assert "FITS" in out
  rc = cli.main(["plan", "--preset", "flash", "--mesh", "fsdp=3"])
  err = capsys.readouterr().err
  assert rc == cli.USAGE_ERROR
  assert "which is not divisible by the mesh axis 'fsdp' of size 3" in err


def test_flash_inference_on_64_h200_fits():
  """fsdp=8 x expert=8: the MoE's tokens are split over all 64 devices inside its shard_map (a
  batch of 8 is replicated outside it), and the ragged path sends only the real pairs."""
  flash = deepseek_v4.flash()
  p = plan.make_plan(flash, dict(fsdp=8, expert=8), device_memory=plan.parse_bytes("141GB"))
  assert p.rules == "fsdp_ep" and p.fits
  assert "MoE all-to-all (ragged, tiled gmm, dropless)" in "\n".join(p.notes)
  from deepseek_v4.layers import moe_ep

  T_l = 8 * 4096 // 64  # the chunk's tokens over all 64 devices
  moe = plan.ep_buffer_bytes(flash, T_l, 8, None, 1, "ragged", "tiled")
  assert moe < 2e9
  D, act = flash.d_model, 2
  assert moe == T_l * 6 * (3 * D * act + 8) + moe_ep.ragged_rows(T_l, 6, 32, 8, None) * (
    3 * D * act + 8)


@pytest.mark.parametrize("path", ["ragged", "buffer"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_ep_buffers_follow_the_path_that_runs(path, train):
  from deepseek_v4.layers import moe_ep

  cfg = deepseek_v4.tiny()
  sizes = dict(fsdp=4, expert=2)  # 8 token shards, 2 expert shards
  s = plan.Settings(train=train, batch=8, seq=256, all_to_all=path, prefill_chunk=128,
                    gmm="ragged_dot")
  p = plan.make_plan(cfg, sizes, "fsdp_ep", s)
  T_l = 8 * (256 if train else 128) // 8  # the step's (or chunk's) tokens over 8 token shards
  P, X, El = 2, cfg.experts_per_token, cfg.num_experts // 2
  D, F, act = cfg.d_model, cfg.moe_inter_dim, np.dtype(cfg.dtype).itemsize
  per_row = 4 * D * act + 3 * F * 4 + F * act
  if path == "buffer":
    want = P * moe_ep.capacity(T_l, X, El, P, None) * (per_row + 12)
  else:
    want = T_l * X * (3 * D * act + 8) + moe_ep.ragged_rows(T_l, X, El, P, None) * (per_row + 8)
  got = plan.ep_buffer_bytes(cfg, T_l, P, None, 1, path, "ragged_dot")
  assert got == want
  want *= 2 if train else 1  # forward and backward buffers
  assert f"({path}, ragged_dot gmm, dropless) {plan.gb(want)}" in p.notes[1]
  assert _line(p, "one block") >= want  # the larger of the attention and the MoE
  with pytest.raises(ValueError, match="all_to_all='nccl'"):
    plan.make_plan(cfg, sizes, "fsdp_ep", plan.Settings(all_to_all="nccl"))


def test_ragged_capacity_bounds_the_receive_buffer():
  from deepseek_v4.layers import moe_ep

  assert moe_ep.ragged_rows(10, 6, 32, 8, None) == 8 * 60  # every source sends all pairs here
  assert moe_ep.ragged_rows(10, 6, 2, 8, None) == 8 * 20  # at most E_l pairs per token
  assert moe_ep.ragged_rows(10, 6, 32, 8, 1.25) == 75  # ceil(1.25 * 60): mean load x factor
  assert moe_ep.ragged_rows(10, 6, 32, 8, 100.0) == 480  # never above dropless


# ----- refused input: each a clear error naming the bad value ---------------------------
def _plan_cli_error(capsys, *args) -> str:
  with pytest.raises(SystemExit) as e:  # argparse: usage error, exit code 2
    cli.main(["plan", "--preset", "tiny", *args])
  assert e.value.code == 2
  return capsys.readouterr().err


def test_duplicated_mesh_axis_is_refused(capsys):
  with pytest.raises(ValueError, match="names the axis 'expert' more than once"):
    plan.parse_mesh("expert=8,fsdp=2,expert=4")
  assert plan.parse_mesh("fsdp=2,expert=4") == dict(data=1, fsdp=2, context=1, expert=4,
                                                     tensor=1)
  rc = cli.main(["plan", "--preset", "tiny", "--mesh", "expert=8,expert=4"])
  assert rc == cli.USAGE_ERROR and "'expert' more than once" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "nan", "-1", "inf"])
def test_capacity_factor_must_be_positive_and_finite(capsys, bad):
  assert f"argument --capacity-factor: capacity factor {float(bad)}" in _plan_cli_error(
    capsys, f"--capacity-factor={bad}")
  with pytest.raises(ValueError, match="must be a positive finite number"):
    plan.make_plan(deepseek_v4.tiny(), dict(expert=2), "fsdp_ep",
                   plan.Settings(capacity_factor=float(bad)))
  assert plan.parse_capacity_factor("1.25") == 1.25


def test_device_count_must_fill_whole_hosts(capsys):
  flash = deepseek_v4.flash()
  with pytest.raises(ValueError, match=r"12 devices are not a whole number of hosts of "
                                       r"devices_per_host=8"):
    plan.default_mesh(flash, 12)
  assert plan.default_mesh(flash, 4) == dict(data=1, fsdp=1, expert=4, tensor=1)  # part of a host
  assert plan.default_mesh(flash, 12, devices_per_host=4) == dict(data=3, fsdp=1, expert=4,
                                                                  tensor=1)
  rc = cli.main(["plan", "--preset", "tiny", "--devices", "12"])
  assert rc == cli.USAGE_ERROR and "--devices-per-host" in capsys.readouterr().err


def test_freeze_pattern_matching_nothing_is_refused(capsys):
  cfg = deepseek_v4.tiny()
  with pytest.raises(ValueError, match=r"/layer\\.0\\./ match no parameter"):
    plan.make_plan(cfg, dict(fsdp=2), "fsdp", plan.Settings(train=True, freeze=(r"layer\.0\.",)))
  ok = plan.make_plan(cfg, dict(fsdp=2), "fsdp", plan.Settings(train=True,
                                                               freeze=(r"layers\.0\.",)))
  full = plan.make_plan(cfg, dict(fsdp=2), "fsdp", plan.Settings(train=True))
  assert _line(ok, "gradients") < _line(full, "gradients")
  rc = cli.main(["plan", "--preset", "tiny", "--train", "--freeze", r"layer\.0\."])
  assert rc == cli.USAGE_ERROR and "match no parameter" in capsys.readouterr().err


def test_invalid_freeze_regex_names_the_flag(capsys):
  err = _plan_cli_error(capsys, "--train", "--freeze", "[")
  assert "argument --freeze: '[' is not a regular expression" in err
  with pytest.raises(ValueError, match=r"'\[' is not a regular expression"):
    plan.make_plan(deepseek_v4.tiny(), dict(fsdp=2), "fsdp", plan.Settings(train=True,
                                                                          freeze=("[",)))


@pytest.mark.parametrize("text, says", [("0GB", "must be positive"), ("0", "must be positive"),
                                        ("-5GB", "expected e.g. 141GB"),
                                        ("0.5KB", "under 1 MB")])
def test_device_memory_zero_or_tiny_gets_a_sensible_error(capsys, text, says):
  with pytest.raises(ValueError, match=says):
    plan.parse_bytes(text)
  err = _plan_cli_error(capsys, f"--device-memory={text}")
  assert "argument --device-memory" in err and says in err and "write e.g. 0GB" not in err
