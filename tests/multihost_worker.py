"""One process of the 2-process test (tests/test_multihost.py); not a test module itself.

    python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT.npz

Starts JAX's distributed runtime against a localhost coordinator, builds the global mesh
(data across the processes, FSDP + expert parallelism inside each), creates the model born
sharded, runs one sharded train step and writes (process 0) the loss and every parameter.
"""

import os
import sys


def main(process_id: int, num_processes: int, port: int, local_devices: int, out: str) -> None:
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from deepseek_v4 import parallel, sharding

  assert sharding.initialize_distributed(f"localhost:{port}", num_processes, process_id)
  import numpy as np
  from flax import nnx

  from tests import sharded_steps as steps

  n = len(jax.devices())
  assert n == num_processes * local_devices, (n, num_processes, local_devices)
  assert len(jax.local_devices()) == local_devices
  # data spans the processes (the slow link); FSDP and experts stay inside one process.
  rules = "fsdp_ep"
  mesh = sharding.make_mesh(data=num_processes, fsdp=-1, expert=min(2, local_devices))
  model = parallel.init_model(steps.CFG_SMALL, mesh, rules)
  opt = steps.optimizer(model)
  step = parallel.jit_train_step(steps.lm_step, model, opt, mesh, rules, donate=False)
  batch = steps.batch(steps.CFG_SMALL)  # every process holds the global batch; each places its
  batch = {k: sharding.shard_batch(v, mesh, rules) for k, v in batch.items()}  # own shards
  metrics = step(model, opt, batch)
  # A replicated copy of every parameter (gathered across the processes) to write out.
  params = {".".join(map(str, p)): v.get_value()
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # the first step's gradient, from SGD's momentum buffer (see tests/sharded_steps.py)
  params.update({"grad:" + ".".join(map(str, p)): v.get_value()
                 for p, v in nnx.to_flat_state(nnx.state(opt)) if "trace" in p})
  params = jax.jit(lambda s: s, out_shardings=sharding.replicated(mesh))(params)
  if process_id == 0:
    np.savez(out, loss=np.asarray(metrics["loss"]), **{k: np.asarray(v) for k, v in params.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, nproc, port, local, out = sys.argv[1:6]
  main(int(pid), int(nproc), int(port), int(local), out)
