"""Running one program on a device mesh, on one host or many (docs/multihost.md).

Every process runs the same program (SPMD). This module holds what the `train` / `ablate` CLIs and
`trainer.fit` need around that: starting JAX's multi-process runtime (explicit flags, or SLURM
detected), the mesh and rule table of the `--mesh` / `--rules` flags, which process speaks, and
the global batch built from process-local pieces.

Usage:
  distributed.initialize(coordinator, num_processes, process_id)  # before any other JAX work
  mesh, rules = distributed.mesh_and_rules("data=2,fsdp=2,expert=2", "fsdp_ep")
  batch = distributed.global_batch(rows, picks, mesh, rules)      # each process reads its rows
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from deepseek_v4.sharding import Rules, get_rules, make_mesh, parse_mesh, token_sharding
from deepseek_v4.sharding import initialize_distributed as _initialize


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts JAX's multi-process runtime when asked (or under a multi-task SLURM job); returns
  whether it did. One process without flags: nothing happens.

  Raises:
    ValueError: `coordinator` without `num_processes` and `process_id`, or flags out of range
      (the values are named).
  """
  if coordinator is None and (num_processes is not None or process_id is not None):
    raise ValueError(f"--num-processes {num_processes} / --process-id {process_id} need "
                     "--coordinator HOST:PORT (the address of process 0)")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num-processes {num_processes}: expected an integer >= 1")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process-id {process_id}: expected 0 <= id < --num-processes "
                     f"{num_processes}")
  return _initialize(coordinator, num_processes, process_id)


def mesh_and_rules(mesh: str, rules: str | Rules) -> tuple[Mesh, Rules]:
  """The mesh of a `--mesh AXIS=SIZE,...` string over every process's devices, and the rule
  table of `--rules`.

  Raises:
    ValueError: unknown rules (the known ones listed), a malformed mesh, or axis sizes whose
      product is not the device count (both named).
  """
  table = get_rules(rules)
  try:
    return make_mesh(**parse_mesh(mesh)), table
  except ValueError as e:
    raise ValueError(f"--mesh {mesh}: {e}") from None


def is_lead() -> bool:
  """Whether this process is the one that prints, plots and writes metrics (process 0)."""
  return jax.process_index() == 0


def process_count() -> int:
  return jax.process_count()


def barrier(name: str) -> None:
  """Waits until every process got here (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def global_batch(rows, picks: np.ndarray, mesh: Mesh, rules: str | Rules) -> dict[str, jax.Array]:
  """The global batch of rows `picks` (indices into `rows`, a `data.PackedRows`), split by the
  batch axes, with each process reading only the rows its own devices hold.

  No process gathers the whole batch: each device's block is cut from `rows` by its slice of
  `picks`, so the rows seen (and their order) are the same on every mesh.
  """
  fields = {"inputs": (rows.inputs, np.int32), "targets": (rows.targets, np.int32),
            "input_mask": (rows.input_mask, np.float32)}
  if rows.segments is not None:
    fields["segments"] = (rows.segments, np.int32)
    fields["positions"] = (rows.positions, np.int32)
  out = {}
  for name, (table, dtype) in fields.items():
    shape = (len(picks), *table.shape[1:])

    def block(idx, table=table, dtype=dtype):
      return np.asarray(table[picks[idx[0]]][(slice(None), *idx[1:])], dtype)

    # [B, T] leaves split by (batch, seq) as the train step takes them: with a context axis
    # each device reads only its slice of its rows.
    out[name] = jax.make_array_from_callback(shape, token_sharding(mesh, rules, shape), block)
  return out
