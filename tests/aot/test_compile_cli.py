"""`python -m deepseek_v4 compile` end to end on a tiny config, and its errors.

The end-to-end run (a chunked-prefill step of a 3-layer tiny model for an H100) is a fresh process
started WITHOUT JAX_PLATFORMS (the command sets it itself): its JSON must hold XLA's bytes, their
sum, the verdict and the Pallas kernels the table prints.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_v4 import cli
from deepseek_v4.aot import targets
from tests.aot import backend

pytestmark = pytest.mark.aot

backend.require("h100", module=True)

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny", "--layers", "3", "--kernel-impl", "pallas", "--set",
        "num_mtp_layers=0", "--batch", "2", "--seq", "32"]


def test_compile_command_end_to_end(tmp_path):
  out = tmp_path / "report.json"
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run(
    [sys.executable, "-m", "deepseek_v4", "compile", "--target", "h100", *TINY,
     "--program", "prefill", "--chunk", "16", "--json", str(out)],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["target"] == "h100" and report["program"] == "prefill" and report["chunk"] == 16
  assert report["error"] is None and report["verdict"] == "FITS"
  assert report["total_bytes"] == (report["argument_bytes"] + report["temp_bytes"]
                                   + report["output_bytes"] - report["alias_bytes"])
  # Outputs: the last token's float32 logits [2, vocab 512] and the new cache, which aliases the
  # donated one.
  assert report["output_bytes"] >= 2 * 512 * 4 + report["alias_bytes"] > 2 * 512 * 4
  assert report["device_memory"] == targets.TARGETS["h100"].memory_bytes
  names = {k["name"] for k in report["kernels"]}
  assert {"v4_sparse_attention_fwd", "v4_indexer_scores"} <= names  # layer 3 is CSA
  for k in report["kernels"]:
    assert k["name"] in proc.stdout and k["registers"] > 0
  assert "plan's estimate of the same run" in proc.stdout and "FITS" in proc.stdout


def _error(capsys, argv) -> tuple[int, str]:
  try:
    rc = cli.main(["compile", *argv])
  except SystemExit as e:  # argparse's own usage errors
    rc = e.code
  return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, status, message", [
  (["--target", "h300"], 2, "invalid choice: 'h300'"),
  (["--target", "h100", "--devices", "8", "--mesh", "expert=3"], 2,
   "mesh data=1,fsdp=1,context=1,expert=3,tensor=1 has 3 devices, but 8 devices"),
  (["--target", "h100", "--mesh", "experts=8"], 2, "mesh entry 'experts=8': expected AXIS=SIZE"),
  (["--target", "h100", "--program", "forward", "--optimizer", "adamw"], 2,
   "--optimizer apply to --program train only"),
  (["--target", "h100", "--program", "decode", "--chunk", "8"], 2,
   "--chunk 8 applies to --program prefill only"),
  (["--target", "h100", "--preset", "tiny", "--layers", "9"], 2,
   "--layers 9: the config has 6 layers"),
  (["--target", "tpu-v5p", "--program", "jit"], 2, "invalid choice: 'jit'"),
])
def test_bad_flags_are_named(capsys, argv, status, message):
  rc, err = _error(capsys, argv)
  assert rc == status and message in err, err


def test_another_jax_platform_is_refused(capsys, monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  rc, err = _error(capsys, ["--target", "h100", "--preset", "tiny"])
  assert rc == 2 and "got JAX_PLATFORMS='cuda'" in err, err


def test_a_program_past_the_device_memory_is_refused_by_the_compiler(tmp_path, capsys):
  """32768 rows x 512 tokens of a 1-layer tiny model need about 124 GB of temporaries: libtpu
  refuses it for a 16 GiB v5e; the command says so and exits with status 1."""
  backend.require("tpu-v5e")
  out = tmp_path / "oom.json"
  rc = cli.main(["compile", "--target", "tpu-v5e", "--preset", "tiny", "--layers", "1", "--set",
                 "num_mtp_layers=0", "--batch", "32768", "--seq", "512", "--json", str(out)])
  report = json.loads(out.read_text())
  assert rc == 1
  assert report["error"].startswith("RESOURCE_EXHAUSTED: Ran out of memory")
  assert report["verdict"] == "DOES NOT FIT" and report["total_bytes"] == 0
  assert "the compiler refused it" in capsys.readouterr().out
