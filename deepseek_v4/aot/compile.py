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

from deepseek_v4.options import Options
from kernels_pallas import common as kernel_common

# ----- GPU kernel resources -----------------------------------------------------------------------
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


# ----- kernel programs at V4 widths (tests/aot/test_gpu_kernels.py, scripts/tune_kernel_blocks.py)
# config.flash() / config.pro(): query heads and indexer top-k; both: head dim 512, window 128,
# indexer 64 heads x 128, CSA ratio 4, HCA ratio 128.
KERNEL_PRESETS = {"flash": dict(N=64, P=512), "pro": dict(N=128, P=1024)}
HEAD_DIM, WINDOW, INDEXER_HEADS, INDEXER_DIM = 512, 128, 64, 128
KERNEL_TOKENS = 1024  # tokens of a training / prefill row (CSA entries T/4, HCA T/128)
DECODE_ROWS, DECODE_ENTRIES = 8, 32768 // 4  # decode: rows, CSA entries of a 32K context
KIND_RATIOS = {"csa": 4, "hca": 128, "window": 0}


def shared_memory_limit(target: str) -> int:
  """The per-block shared-memory limit (opt-in) of a GPU target, from its description."""
  from deepseek_v4.aot import targets

  text = (Path(targets.__file__).parent / "gpu_targets" / targets.target(target).spec).read_text()
  return int(re.search(r"shared_memory_per_block_optin:\s*(\d+)", text)[1])


def _replicated_on(target: str):
  """`(shape, dtype) -> jax.ShapeDtypeStruct` on one compile-only device of `target`."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from deepseek_v4.aot import targets

  placed = NamedSharding(Mesh(targets.devices(target, 1), ("d",)), PartitionSpec())
  return lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=placed)


def attention_program(attention, target: str, kind: str, *, N: int, P: int, decode: bool,
                      grad: bool, head_dim: int = HEAD_DIM, window: int = WINDOW,
                      dtype=None):
  """(fn, abstract args on one device of `target`) of sparse attention for a layer kind.

  `attention` is `kernels_pallas.sparse_attention.ops.sparse_attention` (with its `impl`) or the
  kernel's own `kernel.sparse_attention` (with `block_sizes`). The forward returns (out, lse) on
  KERNEL_TOKENS queries; `decode`: one token per row against a window ring (and DECODE_ENTRIES
  compressed entries); `grad`: the gradient of a loss of both outputs with respect to every
  float input, the entries' included (else XLA drops the HCA dKV kernel), which runs the
  forward, dQ and dKV kernels.
  """
  import jax.numpy as jnp

  from kernels_pallas.sparse_attention import sources

  if kind not in KIND_RATIOS:
    raise ValueError(f"unknown layer kind {kind!r}; expected one of {tuple(KIND_RATIOS)}")
  f32, i32 = jnp.float32, jnp.int32
  dtype = dtype or jnp.bfloat16
  B, T = (DECODE_ROWS, 1) if decode else (1, KERNEL_TOKENS)
  C = DECODE_ENTRIES if decode else T // max(KIND_RATIOS[kind], 1)
  sd = _replicated_on(target)
  H = head_dim
  args = [sd((B, T, N, H), dtype), sd((B, T), i32), sd((B, T, H), dtype), sd((N,), f32)]
  if decode:
    args += [sd((B, window, H), dtype), sd((B, window), i32)]
  if kind != "window":
    args.append(sd((B, C, H), dtype))
  if kind == "csa":
    args.append(sd((B, T, P), i32))

  def attend(q, pos, kv, sink, *rest):
    ring = None
    if decode:
      ring, rest = sources.Ring(rest[0], rest[1]), rest[2:]
    entries = None
    if kind == "hca":
      entries = sources.VisibleEntries(rest[0], KIND_RATIOS[kind])
    elif kind == "csa":
      entries = sources.PickedEntries(rest[0], rest[1])
    keys = sources.KeySources(sources.Band(kv, window), ring=ring, entries=entries)
    return attention(q, pos, sink, keys, scale=H**-0.5, block=64, return_lse=True)

  if not grad:
    return attend, args

  def gradient(q, pos, kv, sink, *rest):
    def loss(q, kv, sink, *rest):
      out, lse = attend(q, pos, kv, sink, *rest)
      return jnp.sum(out.astype(f32)) + jnp.sum(lse)

    comp = rest[:1] if kind != "window" else ()
    return jax.grad(lambda q, kv, sink, *c: loss(q, kv, sink, *c, *rest[len(c):]),
                    argnums=tuple(range(3 + len(comp))))(q, kv, sink, *comp)

  return gradient, args


def indexer_program(indexer_topk, target: str, *, P: int):
  """(fn, abstract args on one device of `target`) of the indexer's top-k over KERNEL_TOKENS
  queries and their CSA entries (T/4); `indexer_topk` is `kernels_pallas.indexer_topk.ops`'s
  (with its `impl`) or `kernel`'s (with `block_sizes`)."""
  import jax.numpy as jnp

  T, C = KERNEL_TOKENS, KERNEL_TOKENS // 4
  sd = _replicated_on(target)
  bf16 = jnp.bfloat16
  args = [sd((1, T, INDEXER_HEADS, INDEXER_DIM), bf16), sd((1, T, INDEXER_HEADS), bf16),
          sd((1, C, INDEXER_DIM), bf16), sd((1, T), jnp.int32)]

  def topk(q, w, k, pos):
    return indexer_topk(q, w, k, pos, ratio=4, topk=P, block=128)

  return topk, args


# ----- the project's programs, compiled for a target ----------------------------------------------
PROGRAMS = ("forward", "prefill", "decode", "train")


@dataclasses.dataclass
class CompileReport:
  """One program compiled for one target: XLA's per-device bytes beside plan's estimate.

  Attributes:
    target, devices, mesh, rules: where it was compiled for (mesh: axis sizes).
    program: "forward" (logits of [batch, seq]), "prefill" (one chunk of `chunk` tokens into a
      cache of capacity `seq`), "decode" (one token per row into that cache) or "train" (one
      optimizer step on [batch, seq]).
    argument_bytes, temp_bytes, output_bytes, alias_bytes: XLA's per-device memory analysis
      (`compiled.memory_analysis()`); aliased bytes are outputs written into donated arguments.
    compile_seconds, lower_seconds: wall time of XLA's compile, and of tracing plus lowering.
    device_memory: the target's memory per device.
    plan_bytes: `deepseek_v4.plan.make_plan`'s total for the same run; plan_lines its lines.
    kernels: GPU targets: each Pallas kernel's resources (empty on TPU or without kernels).
    error: the compiler's message when it refused the program (bytes are then 0).
  """

  target: str
  devices: int
  mesh: dict[str, int]
  rules: str
  program: str
  batch: int
  seq: int
  chunk: int | None
  kernel_impl: str
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  compile_seconds: float
  lower_seconds: float
  device_memory: int
  headroom: float
  plan_bytes: float
  plan_lines: list[tuple[str, float, str]]
  plan_notes: list[str]
  kernels: list[KernelResources]
  error: str | None = None

  @property
  def total_bytes(self) -> int:
    """Per-device bytes the program holds at its peak: arguments + temporaries + outputs, less
    the outputs that alias donated arguments (counted once)."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  @property
  def usable(self) -> float:
    return self.device_memory * (1 - self.headroom)

  @property
  def verdict(self) -> str:
    """FITS (within the memory left after headroom), TIGHT (within the device memory but not the
    headroom), DOES NOT FIT (also when the compiler ran out of device memory), or COMPILE FAILED
    (any other refusal, e.g. a kernel's shared memory)."""
    if self.error is not None:
      return "DOES NOT FIT" if "Ran out of memory" in self.error else "COMPILE FAILED"
    if self.total_bytes <= self.usable:
      return "FITS"
    return "TIGHT" if self.total_bytes <= self.device_memory else "DOES NOT FIT"

  @property
  def plan_ratio(self) -> float | None:
    """XLA's total over plan's (1.0 = plan exact)."""
    return self.total_bytes / self.plan_bytes if self.plan_bytes and self.error is None else None

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(total_bytes=self.total_bytes, verdict=self.verdict, plan_ratio=self.plan_ratio,
               kernels=[{**dataclasses.asdict(k), "spill_bytes": k.spill_bytes}
                        for k in self.kernels])
    return out


def _plan(cfg, sizes: dict[str, int], rules: str, program: str, batch: int, seq: int,
          chunk: int | None, tcfg, capacity_factor: float | None, platform: str, t, headroom,
          options: Options = Options()):
  """plan's estimate of the same run (deepseek_v4.plan.make_plan)."""
  from deepseek_v4 import plan as plan_lib
  from deepseek_v4.layers.moe_ep import default_all_to_all

  common = dict(batch=batch, seq=seq, capacity_factor=capacity_factor,
                all_to_all=default_all_to_all(platform))
  notes = []
  if program == "train":
    remat = "none" if tcfg.remat == "none" else "full"
    if tcfg.remat not in ("none", "full"):
      notes.append(f"plan models remat {tcfg.remat!r} as 'full'")
    settings = plan_lib.Settings(
      train=True, grad_accum=tcfg.grad_accum, remat=remat, ce_chunk=tcfg.ce_chunk,
      optimizer="adamw" if tcfg.optimizer == "adamw" else "muon", freeze=tuple(tcfg.freeze),
      lora_rank=tcfg.lora_rank, lora_targets=tuple(tcfg.lora_targets), **common)
  else:
    step = {"forward": seq, "prefill": chunk or seq, "decode": 1}[program]
    settings = plan_lib.Settings(prefill_chunk=step, **common)
  p = plan_lib.make_plan(cfg, sizes, rules, settings, device_memory=t.memory_bytes,
                         headroom=headroom, options=options)
  lines = list(p.lines)
  if program == "forward":  # a forward without a cache: plan's cache line does not apply
    lines = [line for line in lines if not line[0].startswith("KV cache")]
    notes.append("plan: inference plan without its KV-cache line (the forward holds no cache)")
  return sum(b for _, b, _ in lines), lines, p.notes + notes


def _placed(tree, shardings):
  """`tree`'s leaves as `jax.ShapeDtypeStruct`s placed by `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def build_program(cfg, mesh, rules, program: str, *, batch: int, seq: int,
                  chunk: int | None = None, tcfg=None, capacity_factor: float | None = None,
                  gmm: str = "auto", options: Options = Options()):
  """(jitted function, abstract arguments) of `program`, from the abstract model
  (deepseek_v4/abstract.py, built with `options`) and sharded as a run shards it; trace it under
  `sharding.use(mesh, rules)` and the target's `targets.compiling_for`. The program runs with
  `options` and the MoE of the mesh (`parallel.moe_impl` with `capacity_factor` and `gmm`).

  * "forward": `parallel.forward_program` (as `parallel.jit_forward`) on ids [batch, seq].
  * "prefill" / "decode": decoding's one chunk step (`decoding._extend_jit`, as `prefill` and
    `decode_step` run it) of `chunk` tokens (default seq; decode: 1) per row into a cache of
    capacity `seq`, the cache donated; prefill returns the last real token's logits.
  * "train": `parallel.train_step_program` (as `parallel.jit_train_step`) of `train.train_step_fn`
    with `tcfg` on [batch, seq], parameters and optimizer state donated.

  Build it outside any mesh context (see `abstract.build`). Unused arguments are kept
  (`keep_unused`): a run holds every parameter on its devices (the MTP block, which inference
  never calls, included), so XLA's argument bytes must count them.
  """
  import functools

  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from deepseek_v4 import abstract, decoding, parallel, sharding, train
  from deepseek_v4 import cache as cache_lib
  from deepseek_v4.layers import context_parallel

  if program not in PROGRAMS:
    raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")
  rules = sharding.get_rules(rules)
  # On a mesh whose rules split the sequence (a `context` axis) the programs run
  # context-parallel (docs/context_parallel.md); a prefill chunk is then split as well.
  run = options.replace(moe=parallel.moe_impl(mesh, rules, capacity_factor=capacity_factor,
                                              gmm=gmm),
                        context=context_parallel.context_parallel_layout(mesh, rules))
  i32 = jnp.int32
  if program == "train":
    if tcfg is None:
      raise ValueError("the train program needs its train.TrainConfig (tcfg)")
    graphdef, state = nnx.split(abstract.train_state(cfg, tcfg, options))
    shardings = sharding.state_shardings(state, mesh, rules)
    ids = jax.ShapeDtypeStruct((batch, seq), i32,
                               sharding=sharding.token_sharding(mesh, rules, (batch, seq)))
    batch_abs = {"inputs": ids, "targets": ids}
    fn = parallel.train_step_program(functools.partial(train.train_step_fn, tcfg=tcfg), graphdef,
                                     shardings, mesh, rules, batch_abs, 1, options=run,
                                     keep_unused=True)
    mtp = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    return fn, (_placed(state, shardings), batch_abs, mtp)

  graphdef, state = parallel.abstract_model(cfg, mesh, rules, options=options)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  if program == "forward":
    fn = parallel.forward_program(graphdef, shardings, mesh, rules, (batch, seq), cfg.vocab_size,
                                  options=run, keep_unused=True)
    ids = jax.ShapeDtypeStruct((batch, seq), i32,
                               sharding=sharding.token_sharding(mesh, rules, (batch, seq)))
    return fn, (state, ids)

  T = 1 if program == "decode" else (chunk or seq)
  cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, seq,
                                                      scan_layers=options.scan_layers))
  cache_sh = sharding.cache_shardings(cache, mesh, rules)
  rows = NamedSharding(mesh, sharding.logical_to_spec(("batch", None), (batch, T), mesh,
                                                      rules.activations, strict=False))
  n_sh = NamedSharding(mesh, PartitionSpec(*rows.spec[:1]))
  extend = functools.partial(decoding._extend_jit.__wrapped__, graphdef,
                             last_only=program == "prefill", options=run,
                             context_chunk=program == "prefill")
  fn = jax.jit(lambda st, c, i, n: extend(st, c, i, n),
               in_shardings=(shardings, cache_sh, rows, n_sh), out_shardings=(None, cache_sh),
               donate_argnums=(1,), keep_unused=True)
  ids = jax.ShapeDtypeStruct((batch, T), i32, sharding=rows)
  return fn, (state, _placed(cache, cache_sh), ids,
              jax.ShapeDtypeStruct((batch,), i32, sharding=n_sh))


def lower_program(cfg, target: str, mesh, rules, program: str, **kwargs):
  """`build_program(cfg, mesh, rules, program, **kwargs)` traced and lowered for `target`: the
  abstract model is built outside the mesh context with the target's kernel choices, then traced
  under `targets.compiling_for(target, mesh)` and the strategy (`sharding.use`)."""
  from deepseek_v4 import sharding
  from deepseek_v4.aot import targets

  with kernel_common.target_platform(targets.target(target).platform):
    fn, args = build_program(cfg, mesh, rules, program, **kwargs)
  with targets.compiling_for(target, mesh), sharding.use(mesh, rules):
    return fn.lower(*args)


def make_mesh(target: str, devices: int, mesh: str | dict[str, int] | None, cfg=None,
              train: bool = False) -> jax.sharding.Mesh:
  """A mesh of `devices` compile-only devices of `target`: `mesh` axis sizes ("expert=8" or a
  dict; -1 = the rest), or plan's recommended mesh when None."""
  from deepseek_v4 import plan as plan_lib
  from deepseek_v4 import sharding

  from deepseek_v4.aot import targets

  if mesh is None:
    sizes = plan_lib.default_mesh(cfg, devices, train=train)
  else:
    sizes = sharding.parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
    unknown = sorted(set(sizes) - set(sharding.MESH_AXES))
    if unknown:
      raise ValueError(f"mesh {mesh!r}: unknown axes {unknown}; expected {sharding.MESH_AXES}")
  sizes = sharding.mesh_shape(**sizes, num_devices=devices)
  return sharding.make_mesh(**sizes, devices=targets.devices(target, devices))


def compile_program(cfg, *, target: str, program: str = "forward", devices: int = 1,
                    mesh: str | dict[str, int] | None = None, rules: str | None = None,
                    batch: int = 1, seq: int = 4096, chunk: int | None = None, tcfg=None,
                    capacity_factor: float | None = None, kernels: bool = True,
                    headroom: float = 0.1, dump_dir: str | None = None,
                    options: Options = Options()) -> CompileReport:
  """Builds `program` for `cfg` abstractly (no weights), compiles it for `devices` compile-only
  devices of `target` and reports XLA's per-device memory beside plan's.

  Args:
    cfg: the ModelConfig (e.g. `deepseek_v4.flash(...)`).
    target: "h100", "h200", "tpu-v5e", "tpu-v5p" or "tpu-v6e" (deepseek_v4.aot.targets).
    program: one of PROGRAMS (see CompileReport.program).
    devices: the device count; mesh: axis sizes over them (default: plan's recommended mesh).
    rules: rule table name (default: plan's choice for the mesh).
    batch, seq: global rows and tokens per row (train, forward) or cache capacity (prefill,
      decode); chunk: prefill chunk length (default seq).
    tcfg: train.TrainConfig of the train program (optimizer, LoRA, freezing, remat, ...).
    capacity_factor: expert-parallel capacity factor (None: dropless).
    kernels: GPU targets: read each Pallas kernel's resources (ptxas; adds a few seconds).
    headroom: the share of device memory the verdict keeps free (as plan's --headroom).
    dump_dir: keep XLA's dump (GPU kernels) there.
    options: the run's `Options` (`Options(kernel_impl="pallas")` compiles the Pallas kernels;
      attn_block, scan_layers); the MoE comes from the mesh and `capacity_factor`.

  Raises:
    ValueError: an unknown target or program, a bad mesh, rules or sizes (named).
    RuntimeError: the aot extra is missing or JAX_PLATFORMS is not "cpu".
  """
  import time

  from deepseek_v4 import plan as plan_lib
  from deepseek_v4 import sharding, train
  from deepseek_v4.aot import targets

  t = targets.target(target)
  if program not in PROGRAMS:
    raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")
  if chunk is not None and program != "prefill":
    raise ValueError(f"chunk={chunk} applies to the prefill program only, not {program!r}")
  if chunk is not None and not 1 <= chunk <= seq:
    raise ValueError(f"chunk={chunk} must be in [1, seq={seq}]")
  why = targets.missing_backend(t)
  if why:
    raise RuntimeError(why)
  if program == "train":
    tcfg = tcfg or train.TrainConfig(seq_len=seq, batch_size=batch)
    cfg = train.training_model_config(cfg, tcfg)
  elif tcfg is not None:
    raise ValueError(f"a TrainConfig applies to the train program only, not {program!r}")
  m = make_mesh(target, devices, mesh, cfg, train=program == "train")
  sizes = dict(m.shape)
  rules = rules or plan_lib.default_rules(sizes)
  sharding.get_rules(rules)  # an unknown name is refused here, by name
  plan_bytes, plan_lines, plan_notes = _plan(cfg, sizes, rules, program, batch, seq, chunk, tcfg,
                                             capacity_factor, t.platform, t, headroom, options)
  kern: list[KernelResources] = []
  error = None
  stats = None
  start = time.perf_counter()
  lowered = lower_program(cfg, target, m, rules, program, batch=batch, seq=seq, chunk=chunk,
                          tcfg=tcfg, capacity_factor=capacity_factor, options=options)
  lower_s = time.perf_counter() - start
  with targets.compiling_for(target, m), sharding.use(m, rules):
    start = time.perf_counter()
    try:
      if t.platform == "gpu" and kernels:
        compiled, kern = compile_with_kernel_resources(lowered, dump_dir=dump_dir)
      else:
        compiled = lowered.compile()
      stats = compiled.memory_analysis()
    except jax.errors.JaxRuntimeError as e:
      error = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    compile_s = time.perf_counter() - start
  get = lambda name: int(getattr(stats, name, 0) or 0)
  return CompileReport(
    target=target, devices=devices, mesh=sizes, rules=rules, program=program, batch=batch,
    seq=seq, chunk=chunk if program == "prefill" else None, kernel_impl=options.kernel_impl,
    argument_bytes=get("argument_size_in_bytes"), temp_bytes=get("temp_size_in_bytes"),
    output_bytes=get("output_size_in_bytes"), alias_bytes=get("alias_size_in_bytes"),
    compile_seconds=compile_s, lower_seconds=lower_s, device_memory=t.memory_bytes,
    headroom=headroom, plan_bytes=plan_bytes, plan_lines=plan_lines, plan_notes=plan_notes,
    kernels=kern, error=error)


def format_report(r: CompileReport) -> str:
  """The report as a table: XLA's bytes beside plan's, the verdict, and the GPU kernels."""
  gb = lambda n: f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.2f} MB"
  mesh = ",".join(f"{k}={v}" for k, v in r.mesh.items())
  what = f"{r.program} batch {r.batch} x seq {r.seq}" + (f" (chunk {r.chunk})" if r.chunk else "")
  out = [f"compile: {what} for {r.devices} x {r.target}, mesh {mesh}, rules {r.rules}, "
         f"kernel_impl {r.kernel_impl}",
         f"  traced+lowered in {r.lower_seconds:.1f} s, compiled in {r.compile_seconds:.1f} s"]
  if r.error:
    out += [f"  the compiler refused it (no bytes to report): {r.error}"]
  out += ["", f"{'per device':<34}{'XLA':>12}", "-" * 46]
  rows = (("arguments", r.argument_bytes), ("temporaries", r.temp_bytes),
          ("outputs", r.output_bytes), ("aliased (donated, counted once)", -r.alias_bytes))
  for label, n in rows:
    out.append(f"{label:<34}{gb(n):>12}")
  out += ["-" * 46, f"{'total':<34}{gb(r.total_bytes):>12}", "",
          f"plan's estimate of the same run: {gb(r.plan_bytes)}"
          + (f" (XLA / plan = {r.plan_ratio:.2f})" if r.plan_ratio is not None else "")]
  out += [f"  {label:<58}{gb(b):>12}  {kind}" for label, b, kind in r.plan_lines]
  out += [f"  {n}" for n in r.plan_notes]
  out += ["", f"device memory {gb(r.device_memory)}, usable {gb(r.usable)} after "
          f"{r.headroom:.0%} headroom: {r.verdict}"]
  if r.kernels:
    out += ["", f"{'Pallas kernel':<36}{'shared':>10}{'regs':>6}{'spill st/ld':>13}"
            f"{'stack':>7}  grid x threads", "-" * 90]
    for k in r.kernels:
      out.append(f"{k.name:<36}{k.shared_memory_bytes:>10}{k.registers:>6}"
                 f"{f'{k.spill_store_bytes}/{k.spill_load_bytes}':>13}{k.stack_bytes:>7}  "
                 f"{list(k.grid)} x {list(k.threads)}")
  return "\n".join(out)
