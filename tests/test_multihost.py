"""Two local processes joined by `jax.distributed.initialize` (a localhost coordinator, CPU
collectives over gloo) run one sharded train step; it must equal the single-process step."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from tests import sharded_steps as steps
from tests.tolerances import F32_SHARDED_REL, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("local_devices", [4])
@pytest.mark.slow  # ~90 s: two processes compile the step
def test_two_process_train_step_equals_single_process(tmp_path, local_devices):
  out = tmp_path / "multihost.npz"
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), "2",
                             str(port), str(local_devices), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    # The single-process reference runs here while the workers compile.
    b = steps.batch(steps.CFG_SMALL)
    model = deepseek_v4.Transformer(steps.CFG_SMALL, rngs=nnx.Rngs(0))
    opt = steps.optimizer(model)
    metrics = nnx.jit(steps.lm_step)(model, opt, b)
    ref = steps.flat_params(model)
    ref_grads = steps.flat_gradients(opt)
    logs = []
    for p in procs:
      text, _ = p.communicate(timeout=TIMEOUT_S)
      logs.append(text)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, text) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{text[-4000:]}"
  got = dict(np.load(out))
  loss_err = abs(float(got.pop("loss")) - float(metrics["loss"])) / abs(float(metrics["loss"]))
  grads = {k.split(":", 1)[1]: got.pop(k) for k in list(got) if k.startswith("grad:")}
  assert set(got) == set(ref) and set(grads) == set(ref_grads)
  state_err, grad_err = _state_rel_err(got, ref), _state_rel_err(grads, ref_grads)
  print(f"\n2 processes x {local_devices} devices: loss {loss_err:.1e}  gradients {grad_err:.1e}  "
        f"params {state_err:.1e}  embed {rel_err(got['embed.weight'], ref['embed.weight']):.1e}")
  assert loss_err < F32_SHARDED_REL
  assert grad_err < F32_SHARDED_REL
  assert state_err < F32_SHARDED_REL


def _state_rel_err(ours: dict, ref: dict) -> float:
  diff = max(float(np.max(np.abs(ours[k].astype(np.float64) - ref[k]))) for k in ref)
  return diff / max(float(np.max(np.abs(ref[k]))) for k in ref)


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
  from deepseek_v4 import sharding

  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  assert sharding.initialize_distributed() is False
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    sharding.initialize_distributed("localhost:1234")
