"""The device mesh (axes `data, fsdp, context, expert, tensor`) and the multi-process runtime."""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

from deepseek_v4.sharding.rules import MESH_AXES, _fmt


# ----- mesh --------------------------------------------------------------------------------------
def parse_mesh(text: str) -> dict[str, int]:
  """`"fsdp=8,expert=2"` -> {"data": 1, "fsdp": 8, "context": 1, "expert": 2, "tensor": 1}."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in sizes:
      raise ValueError(f"mesh entry {item!r}: expected AXIS=SIZE with AXIS in {MESH_AXES}")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"mesh entry {item!r}: size {value!r} is not an integer") from None
    if sizes[name] < 1 and sizes[name] != -1:
      raise ValueError(f"mesh entry {item!r}: size must be >= 1 (or -1 for 'the rest')")
  return sizes


def mesh_shape(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1,
               context: int = 1, *, num_devices: int) -> dict[str, int]:
  """Axis sizes with at most one `-1` filled in; checks the product equals `num_devices`."""
  sizes = dict(data=data, fsdp=fsdp, context=context, expert=expert, tensor=tensor)
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {_fmt(sizes)}: at most one axis may be -1")
  bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or (v < 1 and v != -1)}
  if bad:
    raise ValueError(f"mesh {_fmt(sizes)}: axis sizes must be positive integers, got {bad}")
  if free:
    rest = math.prod(v for v in sizes.values() if v != -1)
    if num_devices % rest:
      raise ValueError(f"mesh {_fmt(sizes)}: {num_devices} devices are not divisible by the "
                       f"product {rest} of the other axes")
    sizes[free[0]] = num_devices // rest
  total = math.prod(sizes.values())
  if total != num_devices:
    raise ValueError(f"mesh {_fmt(sizes)} has {total} devices, but {num_devices} devices are "
                     f"available; the product of the axis sizes must equal the device count")
  return sizes


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, context: int = 1,
              *, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 5-axis mesh `(data, fsdp, context, expert, tensor)` over all devices (every process's, if
  several).

  Axis order puts `tensor` innermost, so tensor- and expert-parallel groups stay inside a host
  (NVLink) and `data`, outermost, crosses hosts; `context` (the sequence, whose neighbour
  exchange and entry all-gather are light) sits between. One axis may be -1: "all remaining
  devices".

  Raises:
    ValueError: the product of the sizes differs from the device count (both are named).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(data, fsdp, expert, tensor, context, num_devices=len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)



# ----- multi-host --------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None) -> bool:
  """Starts JAX's multi-process runtime; returns whether it did. Call before any JAX work.

  * explicit: `coordinator_address="host0:1234", num_processes=N, process_id=i`;
  * under SLURM with more than one task (`srun`): JAX reads the coordinator, process count and
    id from the SLURM_* environment (no arguments needed);
  * otherwise (one process): does nothing.
  After it, `jax.devices()` lists every process's devices and `make_mesh` spans all hosts.
  """
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator_address={coordinator_address!r} needs num_processes "
                       f"and process_id (got {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
    jax.distributed.initialize(local_device_ids=local_device_ids)
    return True
  return False

