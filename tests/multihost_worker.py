"""One process of the 2-process test (tests/test_multihost.py); not a test module itself.

    python -m tests.multihost_worker LOCAL_DEVICES TRAIN_ARGS...

Simulates LOCAL_DEVICES CPU devices at the test's matmul precision, then runs the real `train`
CLI (`python -m deepseek_v4 train TRAIN_ARGS`): with `--coordinator/--num-processes/--process-id`
it joins JAX's distributed runtime, and the trainer runs on the mesh over every process's devices.
"""

import os
import sys


def main(local_devices: int, argv: list[str]) -> int:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from deepseek_v4 import cli

  code = cli.main(["train", *argv])
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  return code


if __name__ == "__main__":
  sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
