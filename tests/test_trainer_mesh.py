"""`trainer.fit` on a device mesh (8 simulated CPU devices): the same loop as on one device.

Oracles: the one-device run of the same data and settings (losses within F32_SHARDED_REL), an
uninterrupted mesh run (a run killed with SIGKILL after a save, then resumed, gives exactly its
losses), and the 8-device run again for a checkpoint resumed on 4 devices and on one.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import deepseek_v4
from deepseek_v4 import cli, distributed, evaluate, sharding, train, trainer
from deepseek_v4 import data as data_lib
from tests.tolerances import F32_SHARDED_REL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CSA layer with learned routing: the compile time of the sharded step dominates on 2 cores,
# and every part of the step (Muon/AdamW, balance loss, router-bias update) is still there; the
# MTP block and a hash-routed sliding-window layer come in a slow variant.
CFG = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, hc_sinkhorn_iters=2,
                       num_mtp_layers=0)
MESH, RULES = "data=2,fsdp=2,expert=2", "fsdp_ep"
RUN = dict(seq_len=32, batch_size=8, steps=10, learning_rate=5e-3, warmup_steps=2, log_every=1,
           save_every=5)


def _rows(T=32, n=40, seed=0):
  toks = np.random.default_rng(seed).integers(2, CFG.vocab_size, n * T + 1).astype(np.int32)
  return data_lib.pack([(toks, np.ones(len(toks), bool))], T)


def _max_rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.max(np.abs(got - want) / np.abs(want)))


def _mesh(devices: int = 8):
  if devices == 8:
    return distributed.mesh_and_rules(MESH, RULES)
  return sharding.make_mesh(data=2, fsdp=devices // 2, devices=jax.devices()[:devices]), RULES


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
  """The 8-device run (Muon, the default optimizer) with checkpoints at steps 5 and 10."""
  out = str(tmp_path_factory.mktemp("mesh") / "run")
  mesh, rules = _mesh()
  result = trainer.fit(CFG, train.TrainConfig(**RUN), _rows(), out, progress=False, mesh=mesh,
                       rules=rules)
  return out, result


def test_fit_on_mesh_equals_one_device(mesh_run):
  _, on_mesh = mesh_run
  one = trainer.fit(CFG, train.TrainConfig(**RUN), _rows(), progress=False)
  err = _max_rel(on_mesh.losses, one.losses)
  print(f"\nmesh {MESH} vs one device, 10 steps (Muon): max rel loss difference {err:.1e}")
  assert err < F32_SHARDED_REL
  # The parameters live in their shards: the experts split over 'expert'.
  experts = on_mesh.model.layer(0).ffn.experts.w1.get_value()
  assert len(experts.sharding.device_set) == 8 and not experts.sharding.is_fully_replicated


def test_fit_on_a_context_mesh_equals_one_device(monkeypatch):
  """`trainer.fit` on `context=8` (`train --mesh context=8`): each device reads its slice of the
  sequence (`distributed.global_batch` places [B, T] leaves by (batch, seq)), the attention runs
  context-parallel, and the losses are the one-device run's."""
  from deepseek_v4.layers import context_parallel

  calls = []
  original = context_parallel.full_attention
  monkeypatch.setattr(context_parallel, "full_attention",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  run = dict(RUN, seq_len=64, batch_size=2, steps=3, eval_every=3, eval_rows=2)
  val = evaluate.ValidationSet(_rows(T=64, n=2, seed=1), bytes_per_token=1.0, documents=1)
  mesh, rules = distributed.mesh_and_rules("context=8", "fsdp")
  on_mesh = trainer.fit(CFG, train.TrainConfig(**run), _rows(T=64, n=10), progress=False,
                        mesh=mesh, rules=rules, val=val)
  assert calls  # the sequence was split
  one = trainer.fit(CFG, train.TrainConfig(**run), _rows(T=64, n=10), progress=False, val=val)
  assert _max_rel(on_mesh.last_val_loss, one.last_val_loss) < F32_SHARDED_REL
  err = _max_rel(on_mesh.losses, one.losses)
  print(f"\ncontext=8 vs one device, 3 steps: max rel loss difference {err:.1e}")
  assert err < F32_SHARDED_REL
  batch = distributed.global_batch(_rows(T=64, n=10), np.arange(2), mesh, rules)
  assert batch["inputs"].sharding.spec[1] == "context"


@pytest.mark.slow  # ~4 min: three one-device and three mesh programs to compile
@pytest.mark.parametrize("settings, model", [
  (dict(optimizer="adamw"), {}),
  (dict(lora_rank=4, lora_alpha=8.0), dict(compress_ratios=(0, 4), num_hash_layers=1,
                                           num_mtp_layers=1)),
  (dict(optimizer="adamw", freeze=(r"attn\.",), grad_accum=2), {}),
], ids=["adamw", "lora-muon-mtp-hash", "freeze-adamw-accum"])
def test_fit_on_mesh_equals_one_device_variants(settings, model):
  cfg = CFG.replace(**model)
  tcfg = train.TrainConfig(**{**RUN, **settings})
  mesh, rules = _mesh()
  on_mesh = trainer.fit(cfg, tcfg, _rows(), progress=False, mesh=mesh, rules=rules)
  one = trainer.fit(cfg, tcfg, _rows(), progress=False)
  err = _max_rel(on_mesh.losses, one.losses)
  print(f"\n{settings}: max rel loss difference {err:.1e}")
  assert err < F32_SHARDED_REL


_KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests import test_trainer_mesh as t
from deepseek_v4 import train, trainer

def die(step, model):
  if step == 7:  # after the save of step 5, in the middle of the next interval
    os.kill(os.getpid(), signal.SIGKILL)

mesh, rules = t._mesh()
trainer.fit(t.CFG, train.TrainConfig(**t.RUN), t._rows(), {out!r}, progress=False, mesh=mesh,
            rules=rules, callback=die)
"""


@pytest.mark.slow  # ~2 min: a subprocess compiles the mesh step again (or reads the cache)
def test_mesh_run_killed_after_a_save_resumes_bit_for_bit(mesh_run, tmp_path):
  _, full = mesh_run
  out = str(tmp_path / "run")
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED.format(root=ROOT, out=out))],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["5"]
  mesh, rules = _mesh()
  rest = trainer.fit(CFG, train.TrainConfig(**RUN), _rows(), out, resume=True, progress=False,
                     mesh=mesh, rules=rules)
  assert rest.losses == full.losses[5:]  # exact float equality
  for a, b in zip(jax.tree.leaves(jax.device_get(_params(full.model))),
                  jax.tree.leaves(jax.device_get(_params(rest.model)))):
    np.testing.assert_array_equal(a, b)


def _params(model):
  from flax import nnx

  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.slow  # ~2 min: a 4-device and a one-device program
@pytest.mark.parametrize("devices", [4, 1])
def test_checkpoint_of_8_devices_resumes_on_fewer(mesh_run, tmp_path, devices):
  src, full = mesh_run
  out = str(tmp_path / "run")
  shutil.copytree(src, out)
  placement = {}
  if devices > 1:
    mesh, rules = _mesh(devices)
    placement = dict(mesh=mesh, rules=rules)
  rest = trainer.fit(CFG, train.TrainConfig(**RUN), _rows(), out, resume_step=5, progress=False,
                     **placement)
  err = _max_rel(rest.losses, full.losses[5:])
  print(f"\n8 devices -> {devices}: steps 6-10 max rel loss difference {err:.1e}")
  assert err < F32_SHARDED_REL
  if devices > 1:
    w = rest.model.layer(0).ffn.experts.w1.get_value()
    assert len(w.sharding.device_set) == devices


# ----- flags --------------------------------------------------------------------------------------
def _cli(tmp_path, *flags) -> list[str]:
  (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n" * 40)
  return ["train", "--preset", "tiny", "--data", str(tmp_path / "corpus.txt"), "--seq-len", "32",
          "--batch-size", "8", "--steps", "1", "--no-progress", "--sample", "0", "--out",
          str(tmp_path / "run"), *flags]


@pytest.mark.parametrize("flags, message", [
  (["--mesh", "data=2,fsdp=2"], "--mesh data=2,fsdp=2: .* has 4 devices, but 8 devices are "
                                "available"),
  (["--mesh", "data=8", "--rules", "fsdp_zz"], "invalid choice: 'fsdp_zz'"),
  (["--rules", "fsdp"], "--rules fsdp needs --mesh"),
  (["--mesh", "data=2,pipeline=4"], "mesh entry 'pipeline=4': expected AXIS=SIZE"),
  (["--mesh", "data=8", "--batch-size", "4"], "batch_size=4 cannot be split over the batch axes"),
  (["--num-processes", "2", "--process-id", "0"], "need --coordinator"),
], ids=["product", "rules", "rules-alone", "axis", "batch", "processes"])
def test_bad_mesh_flags_are_named(tmp_path, capsys, flags, message):
  if "invalid choice" in message:  # argparse refuses it
    with pytest.raises(SystemExit):
      cli.main(_cli(tmp_path, *flags))
  else:
    assert cli.main(_cli(tmp_path, *flags)) == 2
  err = capsys.readouterr().err
  assert re.search(message, err), err


def test_fit_refuses_rules_without_a_mesh_and_a_mesh_without_rules():
  mesh, _ = _mesh()
  with pytest.raises(ValueError, match="rules='fsdp' given without a mesh"):
    trainer.fit(CFG, train.TrainConfig(**RUN), _rows(), rules="fsdp", progress=False)
  with pytest.raises(ValueError, match="a mesh needs its sharding rules"):
    trainer.fit(CFG, train.TrainConfig(**RUN), _rows(), mesh=mesh, progress=False)
  with pytest.raises(ValueError, match="unknown sharding rules 'zz'"):
    trainer.fit(CFG, train.TrainConfig(**RUN), _rows(), mesh=mesh, rules="zz", progress=False)


@pytest.mark.slow  # ~2 min: the CLI compiles the mesh step and the decoding programs
def test_train_cli_on_a_mesh_trains_resumes_and_samples(tmp_path, capsys):
  argv = _cli(tmp_path, "--mesh", MESH, "--rules", RULES, "--set", "compress_ratios=4", "--set",
              "num_hash_layers=0", "--set", "num_mtp_layers=0", "--log-every", "1",
              "--save-every", "1")
  assert cli.main(argv) == 0
  assert cli.main([*argv, "--resume", "--steps", "2", "--sample", "4"]) == 0  # last flag wins
  out = capsys.readouterr()
  assert "mesh data=2,fsdp=2,expert=2 (fsdp_ep, 1 process)" in out.err
  assert "resumed from step 1" in out.err and "sample:" in out.out
  steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert steps == [1, 2]
