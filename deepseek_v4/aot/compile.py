"""Compile the real programs for a GPU or TPU target on this CPU host, and read what the compiler
says about them (docs/aot.md).

Two layers:

* `gpu_kernel_resources(lowered)`: compiles one lowered GPU program with XLA's dump switched on,
  and reads each Pallas (Triton) kernel's shared memory from the dumped thunk sequence and its
  registers, spills and stack from `ptxas -v` on the dumped PTX. The kernel tests call it.
* `compile_program(...)`: builds the model abstractly (shapes and shardings only, no weights),
  traces one of the project's programs (forward, chunked prefill, decode step, training step) with
  the sharded builders of deepseek_v4/parallel.py, compiles it for the target's compile-only
  devices (deepseek_v4/aot/targets.py) and reports XLA's per-device bytes beside `plan`'s
  estimate for the same run.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import jax

# ----- GPU kernel resources ------------------------------------------------------------------------
# A Triton call in the lowered StableHLO: `custom_call @__gpu$xla.gpu.triton(...) {... name = "k"}`.
_TRITON_CALL = re.compile(r"@__gpu\$xla\.gpu\.triton\(.*?\bname = \"([^\"]+)\"")
# One kernel launch in XLA's dumped thunk sequence.
_THUNK = re.compile(r"\s(\S+) grid: \[(\d+), (\d+), (\d+)\] threads: \[(\d+), (\d+), (\d+)\]"
                    r"\s+shared_memory: (\d+) bytes")
_PTX_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(")
_PTX_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.M)
_PTXAS_FUNCTION = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, "
                             r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Compiling entry function '([^']+)'.*?Used (\d+) registers", re.S)


@dataclasses.dataclass(frozen=True)
class KernelResources:
  """What one compiled GPU kernel needs per thread block, as ptxas and XLA report it.

  Attributes:
    name: the kernel's PTX entry name (a Pallas kernel's `name=`).
    arch: the PTX target ptxas compiled for, e.g. "sm_90a".
    shared_memory_bytes: dynamic shared memory per block (XLA's launch; the largest launch when
      the kernel runs more than once).
    registers: registers per thread.
    spill_store_bytes, spill_load_bytes: local-memory spill traffic per thread.
    stack_bytes: the stack frame per thread.
    grid, threads: the launch (of the largest-shared-memory launch).
    launches: how many launches of it the program holds (a launch inside a loop counts once).
  """

  name: str
  arch: str
  shared_memory_bytes: int
  registers: int
  spill_store_bytes: int
  spill_load_bytes: int
  stack_bytes: int
  grid: tuple[int, int, int]
  threads: tuple[int, int, int]
  launches: int

  @property
  def spill_bytes(self) -> int:
    return self.spill_store_bytes + self.spill_load_bytes


def ptxas_path() -> Path:
  """ptxas from the `nvidia-cuda-nvcc-cu12` wheel (the aot extra)."""
  try:
    from nvidia import cuda_nvcc
  except ImportError:
    raise RuntimeError("reading GPU kernel resources needs ptxas from nvidia-cuda-nvcc-cu12: "
                       "pip install -e \".[aot]\"") from None
  path = Path(list(cuda_nvcc.__path__)[0]) / "bin" / "ptxas"
  if not path.exists():
    raise RuntimeError(f"nvidia-cuda-nvcc-cu12 is installed but {path} is missing")
  return path


def triton_kernel_names(lowered_text: str) -> set[str]:
  """The names of the Pallas/Triton kernels called in a lowered GPU program's StableHLO text."""
  return {m for line in lowered_text.splitlines() if "xla.gpu.triton" in line
          for m in _TRITON_CALL.findall(line)}


def _launches(dump: Path) -> dict[str, list[tuple[int, tuple, tuple]]]:
  """kernel name -> [(shared bytes, grid, threads)] from every dumped thunk sequence."""
  out: dict[str, list] = {}
  for f in sorted(dump.glob("*thunk_sequence.txt")):
    for m in _THUNK.finditer(f.read_text()):
      grid = tuple(int(x) for x in m.group(2, 3, 4))
      threads = tuple(int(x) for x in m.group(5, 6, 7))
      out.setdefault(m[1], []).append((int(m[8]), grid, threads))
  return out


def ptxas_report(ptx: Path, arch: str | None = None) -> dict[str, dict[str, int]]:
  """`ptxas -v` on one PTX file: entry name -> registers, spill stores/loads and stack bytes."""
  text = ptx.read_text()
  arch = arch or (_PTX_TARGET.search(text) or [None, "sm_90a"])[1]
  proc = subprocess.run([str(ptxas_path()), "-v", f"-arch={arch}", str(ptx), "-o", "/dev/null"],
                        capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"ptxas -arch={arch} failed on {ptx.name}: {proc.stderr.strip()[-2000:]}")
  log = proc.stderr + proc.stdout
  regs = dict((n, int(r)) for n, r in _PTXAS_REGISTERS.findall(log))
  out = {}
  for name, stack, stores, loads in _PTXAS_FUNCTION.findall(log):
    out[name] = dict(registers=regs.get(name, 0), stack_bytes=int(stack),
                     spill_store_bytes=int(stores), spill_load_bytes=int(loads), arch=arch)
  return out


def kernel_resources_from_dump(dump: Path, names: set[str] | None = None) -> list[KernelResources]:
  """The kernels of an XLA:GPU dump folder (`xla_dump_to`), sorted by name.

  Args:
    dump: the folder XLA wrote (thunk sequence and PTX files).
    names: keep only these kernel names (e.g. `triton_kernel_names(lowered.as_text())`); None
      keeps every kernel, XLA's own fusions included.
  """
  launches = _launches(dump)
  ptx_files = [p for p in sorted(dump.glob("*.ptx")) if p.stat().st_size]
  if not ptx_files:
    raise RuntimeError(f"XLA wrote no PTX under {dump}: was the program compiled for a GPU "
                       "target (and not loaded from the compilation cache)?")
  out = []
  for ptx in ptx_files:
    entries = set(_PTX_ENTRY.findall(ptx.read_text()))
    if names is not None:
      entries &= names
    if not entries:
      continue
    for name, r in ptxas_report(ptx).items():
      if name not in entries:
        continue
      runs = launches.get(name, [(0, (0, 0, 0), (0, 0, 0))])
      smem, grid, threads = max(runs)
      out.append(KernelResources(name=name, arch=r["arch"], shared_memory_bytes=smem,
                                 registers=r["registers"],
                                 spill_store_bytes=r["spill_store_bytes"],
                                 spill_load_bytes=r["spill_load_bytes"],
                                 stack_bytes=r["stack_bytes"], grid=grid, threads=threads,
                                 launches=len(launches.get(name, []))))
  return sorted(out, key=lambda k: k.name)


def compile_with_kernel_resources(lowered, *, pallas_only: bool = True, dump_dir: str | None = None,
                                  compiler_options: dict | None = None):
  """(compiled, kernels): compiles `lowered` (a `jax.stages.Lowered` for a GPU target) with XLA's
  dump on, and reads the kernels' resources from it (see `gpu_kernel_resources`)."""
  names = triton_kernel_names(lowered.as_text()) if pallas_only else None
  with tempfile.TemporaryDirectory(prefix="dsv4-aot-dump-") as tmp:
    dump = Path(dump_dir or tmp)
    dump.mkdir(parents=True, exist_ok=True)
    options = {**(compiler_options or {}), "xla_dump_to": str(dump)}
    # The dump path is not part of the persistent cache's key: a cached program would be loaded
    # without compiling, and XLA would write nothing to read.
    cache_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
      compiled = lowered.compile(compiler_options=options)
    finally:
      jax.config.update("jax_enable_compilation_cache", cache_on)
    if names == set():
      return compiled, []
    return compiled, kernel_resources_from_dump(dump, names)


def gpu_kernel_resources(lowered, *, pallas_only: bool = True,
                         dump_dir: str | None = None) -> list[KernelResources]:
  """Each GPU kernel's shared memory, registers and spills, from compiling `lowered` for real.

  Usage (on this CPU host, JAX_PLATFORMS=cpu, the aot extra installed):

    devs = targets.devices("h100", 1)
    with targets.compiling_for("h100"):
      lowered = jax.jit(f).lower(*abstract_args_on(devs))
    for k in gpu_kernel_resources(lowered):
      assert k.spill_bytes == 0 and k.shared_memory_bytes <= LIMIT

  Args:
    lowered: `jax.jit(f).lower(...)` of a program placed on GPU devices (compile-only ones from
      `targets.devices("h100"|"h200", n)`, or real ones).
    pallas_only: keep only the Pallas/Triton kernels the program calls (by their `name=`); False
      also lists XLA's own fusion kernels.
    dump_dir: keep XLA's dump there (PTX, thunk sequence, HLO) instead of a temporary folder.

  Returns:
    One `KernelResources` per distinct kernel, sorted by name; empty when the program calls no
    Pallas kernel.

  Raises:
    jax.errors.JaxRuntimeError (XlaRuntimeError): the compiler refused the program, e.g.
      `RESOURCE_EXHAUSTED: Shared memory size limit exceeded` when a kernel asks for more shared
      memory than the target has.
    RuntimeError: ptxas is missing or fails, or XLA wrote no PTX.
  """
  return compile_with_kernel_resources(lowered, pallas_only=pallas_only, dump_dir=dump_dir)[1]
