"""Two local processes joined by `jax.distributed.initialize` (a localhost coordinator, CPU
collectives over gloo) run the real `train` CLI on a mesh over both; its losses must equal the
one-process run's (`trainer.fit` on one device, same data and settings)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import deepseek_v4
from deepseek_v4 import data as data_lib
from deepseek_v4 import train, trainer
from tests.tolerances import F32_SHARDED_REL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400
# One CSA layer (the compile time of two processes on 2 cores).
SETS = ["compress_ratios=4", "num_hash_layers=0", "hc_sinkhorn_iters=2", "num_mtp_layers=0"]
CFG = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=0, hc_sinkhorn_iters=2,
                       num_mtp_layers=0)
RUN = dict(seq_len=32, batch_size=8, steps=4, learning_rate=5e-3, warmup_steps=1, log_every=1,
           save_every=2)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _corpus(tmp_path) -> str:
  """A real text file: the start of the standard library's `os` module source."""
  path = tmp_path / "corpus.txt"
  with open(os.__file__, encoding="utf-8") as f:
    path.write_text(f.read()[:20_000])
  return str(path)


def _cli_args(data: str, out: str) -> list[str]:
  args = ["--preset", "tiny", "--data", data, "--out", out, "--no-progress", "--sample", "0",
          "--seq-len", str(RUN["seq_len"]), "--batch-size", str(RUN["batch_size"]),
          "--steps", str(RUN["steps"]), "--lr", str(RUN["learning_rate"]),
          "--warmup", str(RUN["warmup_steps"]), "--log-every", "1", "--save-every",
          str(RUN["save_every"])]
  for s in SETS:
    args += ["--set", s]
  return args


@pytest.mark.slow  # ~3 min: two processes compile the sharded step on 2 cores
def test_two_process_train_cli_equals_one_process(tmp_path):
  data = _corpus(tmp_path)
  out = str(tmp_path / "run")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", "4",
                             *_cli_args(data, out), "--mesh", "data=2,fsdp=2,expert=2",
                             "--rules", "fsdp_ep", "--coordinator", f"localhost:{port}",
                             "--num-processes", "2", "--process-id", str(i)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(2)]
  try:
    # The one-process reference runs here while the workers compile.
    rows = data_lib.load_rows(data, data_lib.byte_tokenizer(), RUN["seq_len"])
    ref = trainer.fit(CFG, train.TrainConfig(**RUN), rows, progress=False)
    logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, text) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i} failed:\n{text[-4000:]}"
  assert "loss" in logs[0] and "loss" not in logs[1]  # process 0 alone reports
  metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  assert [m["step"] for m in metrics] == list(range(1, RUN["steps"] + 1))
  got = np.array([m["loss"] for m in metrics])
  want = np.array(ref.losses)
  err = float(np.max(np.abs(got - want) / np.abs(want)))
  print(f"\n2 processes x 4 devices vs one device: losses {got} vs {want}, max rel {err:.1e}")
  assert err < F32_SHARDED_REL
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["2", "4"]
  assert os.path.exists(os.path.join(out, "loss.png"))


def test_initialize_distributed_is_a_noop_for_one_process(monkeypatch):
  from deepseek_v4 import distributed, sharding

  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  assert sharding.initialize_distributed() is False
  assert distributed.initialize() is False
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    sharding.initialize_distributed("localhost:1234")
  with pytest.raises(ValueError, match="need --coordinator"):
    distributed.initialize(None, 2, 0)
  with pytest.raises(ValueError, match="--process-id 2: expected 0 <= id < --num-processes 2"):
    distributed.initialize("localhost:1234", 2, 2)
