"""Compile-only devices for the hardware we target, built on this host (no accelerator needed).

A target names a chip: "h100", "h200" (NVIDIA, through jax's CUDA plugin and ptxas from
`nvidia-cuda-nvcc-cu12`) or "tpu-v5e", "tpu-v5p", "tpu-v6e" (through libtpu). `devices(target, n)`
returns n compile-only devices of it; `jax.jit(f).lower(...).compile()` on arrays placed on them
runs the real backend compiler (Triton and ptxas with the shared-memory budget, or Mosaic and the
TPU's memory limits), so a kernel that would fail on the hardware fails here. Install the
`aot` extra (`pip install -e ".[aot]"`) and run with `JAX_PLATFORMS=cpu`.

The GPU descriptions in gpu_targets/ are XLA's own target specs for the H100 SXM and H200 (the
fields jaxlib 0.10's parser knows), in GpuTargetConfigProto text format.

On a host with real GPUs, `DSV4_AOT_NATIVE=1` makes the GPU targets' `devices(...)` the host's own
GPUs (the same checks, compiled by the GPU's own XLA; scripts/device_check.sh uses it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
from pathlib import Path

import jax

from kernels_pallas import common as kernel_common


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str            # "gpu" or "tpu": the code paths kernels_pallas chooses
  memory_bytes: int        # HBM per device
  spec: str                # GPU: target-config file; TPU: topology family ("v5e", ...)
  max_devices: int | None = None


_GIB = 1 << 30
TARGETS: dict[str, Target] = {
    "h100": Target("h100", "gpu", 84_942_979_072, "h100.txtpb"),     # device_memory_size there
    "h200": Target("h200", "gpu", 151_397_597_184, "h200.txtpb"),
    "tpu-v5e": Target("tpu-v5e", "tpu", 16 * _GIB, "v5e"),
    "tpu-v5p": Target("tpu-v5p", "tpu", 95 * _GIB, "v5p"),
    "tpu-v6e": Target("tpu-v6e", "tpu", 32 * _GIB, "v6e"),
}


def target(name: str) -> Target:
  if name not in TARGETS:
    raise ValueError(f"unknown compile target {name!r}; expected one of {sorted(TARGETS)}")
  return TARGETS[name]


def native() -> bool:
  """DSV4_AOT_NATIVE=1: GPU targets compile for this host's own GPUs instead of compile-only ones
  (scripts/device_check.sh runs the compile checks this way on a real GPU)."""
  return os.environ.get("DSV4_AOT_NATIVE", "") == "1"


def missing_backend(t: Target) -> str | None:
  """Why `t` cannot be compiled for on this install, or None when it can."""
  if t.platform == "gpu" and native():
    if jax.default_backend() != "gpu":
      return (f"DSV4_AOT_NATIVE=1 compiles {t.name} programs for this host's GPUs, but JAX's "
              f"backend here is {jax.default_backend()!r}")
    return None
  if t.platform == "gpu":
    need = [("jax_cuda12_plugin", "jax-cuda12-plugin"),
            ("nvidia.cuda_nvcc", "nvidia-cuda-nvcc-cu12")]
  else:
    need = [("libtpu", "libtpu (jax[tpu])")]
  absent = [pip for mod, pip in need if importlib.util.find_spec(mod) is None]
  if absent:
    return (f"compiling for {t.name} needs {', '.join(absent)} at jax {jax.__version__}: "
            f"pip install -e \".[aot]\"")
  if os.environ.get("JAX_PLATFORMS", "") != "cpu":
    return (f"compiling for {t.name} on a host without the hardware needs JAX_PLATFORMS=cpu "
            f"(set before jax is imported), got JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}")
  return None


def _tpu_grid(n: int) -> tuple[str, tuple[int, int, int]]:
  """A topology string and host bounds for n chips (n a power of two, 1 to 256)."""
  if n < 1 or n & (n - 1) or n > 256:
    raise ValueError(f"a TPU topology here takes a power-of-two chip count in [1, 256], got {n}")
  x, y, z, axis = 1, 1, 1, 0
  while x * y * z < n:
    if axis == 0:
      x *= 2
    elif axis == 1:
      y *= 2
    else:
      z *= 2
    axis = (axis + 1) % 3
  return f"{x}x{y}x{z}", (min(x, 2), min(y, 2), 1)


@functools.cache
def devices(name: str, count: int = 1) -> tuple[jax.Device, ...]:
  """`count` compile-only devices of target `name` (one host's worth for GPUs: 1 to 8 per host)."""
  t = target(name)
  why = missing_backend(t)
  if why:
    raise RuntimeError(why)
  if count < 1:
    raise ValueError(f"device count must be >= 1, got {count}")
  from jax.experimental import topologies

  if t.platform == "gpu" and native():
    local = [d for d in jax.devices() if d.platform == "gpu"]
    if count > len(local):
      raise ValueError(f"{name}: {count} devices asked for, this host has {len(local)} GPUs")
    return tuple(local[:count])
  if t.platform == "gpu":
    text = (Path(__file__).parent / "gpu_targets" / t.spec).read_text()
    per_host = min(count, 8)
    if count % per_host:
      raise ValueError(f"{name}: {count} devices is not a whole number of 8-GPU hosts")
    topo = topologies.get_topology_desc(platform="cuda", target_config=text,
                                        topology=f"{count // per_host}x1x{per_host}")
  else:
    # libtpu takes a host-wide lock meant for processes that drive real chips; compile-only
    # topologies drive none, and several compiling processes (pytest's subprocesses, parallel
    # runs) would otherwise refuse each other with "multi-process lockfile".
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if t.spec in ("v5e", "v6e"):   # 2-D tori
      if count < 1 or count & (count - 1) or count > 256:
        raise ValueError(f"{name}: a power-of-two chip count in [1, 256] expected, got {count}")
      x = 1
      while x * x < count:
        x *= 2
      y = count // x
      topo_name, bounds = f"{t.spec}:{x}x{y}", (min(x, 2), min(y, 2), 1)
    else:
      grid, bounds = _tpu_grid(count)
      topo_name = f"{t.spec}:{grid}"
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topo_name,
                                        chip_config_name="default", chips_per_host_bounds=bounds,
                                        num_slices=1, wrap=(False, False, False))
  devs = tuple(topo.devices)
  if len(devs) != count:
    raise RuntimeError(f"{name}: asked for {count} devices, the topology gave {len(devs)}")
  return devs


@contextlib.contextmanager
def compiling_for(name: str, mesh: jax.sharding.Mesh | None = None):
  """Trace and compile for target `name`: the project's platform choices follow the target, and on
  TPU the mesh of compile-only devices is set (Mosaic asks it for the chip generation)."""
  t = target(name)
  with contextlib.ExitStack() as stack:
    stack.enter_context(kernel_common.target_platform(t.platform))
    if t.platform == "tpu":
      if mesh is None:
        mesh = jax.sharding.Mesh(devices(name, 1), ("_aot",))
      stack.enter_context(jax.set_mesh(mesh))
    yield t
