"""Long sequences compiled for the hardware: one sequence split over a `context` mesh axis
(layers/context_parallel.py), its per-device bytes beside `plan`'s and its exchanges counted in
the compiled program beside plan_context's arithmetic (docs/plan.md "Context parallelism").

`compile_long(cfg, target, mesh, rules, program, seq)` builds the model abstractly, shards it by
the rule table, traces one of

* "prefill": the whole sequence through the trunk, context-parallel, and the float32 logits of
  each row's last token (what generation needs next; the full [T, V] logits of a million tokens
  would be 0.5 TB);
* "prefill_chunk": one chunk of `chunk` tokens of a chunked context-parallel prefill into a
  gathered cache of `seq` tokens (docs/context_parallel.md#prefill; the cache donated, the last
  token's logits out), i.e. what each of a 1M prompt's chunks runs;
* "train": `parallel.train_step_program` of `train.train_step_fn` (forward, backward, the
  optimizer's update) with the sequence split the same way,

compiles it for compile-only devices of `target` (deepseek_v4/aot/targets.py) and returns XLA's
`memory_analysis()` per device, the collectives of the optimized program
(deepseek_v4/aot/collectives.py) and plan's estimate of the same run.

`zero_over_context(rules)` is the parameter layout a one-node run needs: the rule tables
replicate parameters along the context axis, so 8 devices of context=8 would each hold all of
Flash (582 GB); this variant also ZeRO-shards the parameters the tables shard over `fsdp` /
`expert` (the `embed` dimension of every matrix, the experts' included) along the sequence's
axis, and XLA gathers one layer's weights where the layer runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_v4.aot import collectives as collectives_lib
from deepseek_v4.aot import targets
from deepseek_v4.options import Options

PROGRAMS = ("prefill", "prefill_chunk", "train")
PARAM_LAYOUTS = ("default", "auto")
_ZERO_NAMES = ("embed", "q_lora", "o_lora", "hc_embed")


def zero_over_context(rules):
  """`rules` with the activation rule of `seq` (the context axis) appended to the parameter
  rules of `embed`, `q_lora`, `o_lora` and `hc_embed` (see the module docstring)."""
  from deepseek_v4 import sharding

  r = sharding.get_rules(rules)
  seq = dict(r.activations)["seq"]
  axes = (seq,) if isinstance(seq, str) else tuple(seq or ())
  if not axes:
    raise ValueError(f"rules {r.name}: no activation rule for 'seq'; nothing to shard over")

  def more(target):
    have = (target,) if isinstance(target, str) else tuple(target or ())
    return have + tuple(a for a in axes if a not in have)

  params = tuple((n, more(t) if n in _ZERO_NAMES else t) for n, t in r.params)
  return r.replace(name=f"{r.name}+zero_context", params=params)


def experts_over_context(rules):
  """`zero_over_context(rules)` with the routed experts split along the context axis as well
  (expert parallelism over the devices that hold the sequence: each keeps E / N whole experts
  and tokens move to them, instead of every device gathering a layer's experts). A layout for
  `plan` to weigh: layers/moe_ep.py exchanges tokens only along a batch axis today, so it is not
  compiled here."""
  r = zero_over_context(rules)
  seq = dict(r.activations)["seq"]
  axes = (seq,) if isinstance(seq, str) else tuple(seq)

  def more(target):
    have = (target,) if isinstance(target, str) else tuple(target or ())
    return have + tuple(a for a in axes if a not in have)

  params = tuple((n, more(t) if n == "expert" else t) for n, t in r.params)
  return r.replace(name=f"{sharding_name(rules)}+experts_context", params=params)


def sharding_name(rules) -> str:
  from deepseek_v4 import sharding

  return sharding.get_rules(rules).name


def prefill_program(graphdef, shardings, mesh, rules, shape: tuple[int, int], *,
                    options: Options, keep_unused: bool = True, param_layouts: str = "default"):
  """`fn(state, ids) -> [B, V]` float32 logits of each row's last token, the trunk run on the
  whole [B, T] sequence with ids split as the rules split (batch, seq).

  `param_layouts`: "default" (row-major parameters) or "auto" (XLA picks each parameter's
  device layout, `jax.experimental.layout.Layout.AUTO`; the weights are then stored the way the
  layer loop reads them: with the default, XLA transposes each scanned group's whole stack of
  ZeRO-sharded weights into a temporary before the loop, docs/plan.md "Context parallelism")."""
  from flax import nnx
  from jax.sharding import NamedSharding

  from deepseek_v4 import sharding

  r = sharding.get_rules(rules)
  ids_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), shape, mesh,
                                                        r.activations, strict=False))

  def fn(state, ids):
    model = nnx.merge(graphdef, state)
    streams, _, _ = model.trunk(ids, options=options)
    return model.logits(model.final_hidden(streams[:, -1:]))[:, 0]

  if param_layouts not in PARAM_LAYOUTS:
    raise ValueError(f"param_layouts={param_layouts!r}; expected one of {PARAM_LAYOUTS}")
  if param_layouts == "auto":
    from jax.experimental.layout import Format, Layout

    shardings = jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings)
  return jax.jit(fn, in_shardings=(shardings, ids_sh), out_shardings=sharding.replicated(mesh),
                 keep_unused=keep_unused)


@dataclasses.dataclass
class LongReport:
  """One long-sequence program compiled for a target.

  Attributes:
    target, mesh, rules, program, batch, seq, layers: what was compiled.
    argument_bytes .. alias_bytes: XLA's per-device memory analysis; total_bytes its peak.
    plan_bytes, plan_lines: plan's estimate of the same run.
    collectives: every collective of the optimized program (one loop iteration for a scanned
      group of layers).
    kernels: on a GPU target, each Pallas kernel the program calls, with its shared memory,
      registers and spills from ptxas (`aot.compile.KernelResources`); empty when it calls none
      (`Options.kernel_impl="reference"`, the default).
    lower_seconds, compile_seconds: wall time of tracing + lowering, and of XLA's compile.
  """

  target: str
  mesh: dict[str, int]
  rules: str
  program: str
  batch: int
  seq: int
  layers: int
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  plan_bytes: float
  plan_lines: list
  collectives: list
  lower_seconds: float
  compile_seconds: float
  kernels: list = dataclasses.field(default_factory=list)

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  @property
  def plan_ratio(self) -> float:
    return self.total_bytes / self.plan_bytes

  def exchanged(self, op: str, min_bytes: int = 0) -> list[int]:
    """Result bytes of each `op` collective of at least `min_bytes` (e.g. the all-gathers of
    compressed entries, not the small ones of positions)."""
    return [c.result_bytes for c in self.collectives if c.op == op and c.result_bytes >= min_bytes]

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(total_bytes=self.total_bytes, plan_ratio=self.plan_ratio,
               collective_totals=collectives_lib.totals(self.collectives))
    return out


def prefill_chunk_program(graphdef, shardings, cache_shardings, mesh, rules,
                          shape: tuple[int, int], *, options: Options, param_layouts: str = "default"):
  """`fn(state, cache, ids, n_valid) -> ([B, V] float32 logits of each row's last real token,
  new cache)`: one context-parallel prefill chunk of `shape` [B, chunk] into the gathered cache
  (`decoding.forward_chunk(..., context_chunk=True)`), the cache donated. Rows continue from
  `cache.lengths`, which must be multiples of the compression ratios' lcm (inside jit a row
  that is not gets NaN logits: `decoding.prefill` checks it)."""
  from flax import nnx
  from jax.sharding import NamedSharding

  from deepseek_v4 import decoding, sharding

  r = sharding.get_rules(rules)
  ids_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch", "seq"), shape, mesh,
                                                        r.activations, strict=False))
  rows_sh = NamedSharding(mesh, sharding.logical_to_spec(("batch",), shape[:1], mesh,
                                                         r.activations, strict=False))

  def fn(state, cache, ids, n_valid):
    model = nnx.merge(graphdef, state)
    h, cache = decoding.forward_chunk(model, cache, ids, n_valid, options, context_chunk=True)
    last = h[jnp.arange(h.shape[0]), jnp.maximum(n_valid - 1, 0)]
    return model.logits(last[:, None])[:, 0], cache

  if param_layouts == "auto":
    from jax.experimental.layout import Format, Layout

    shardings = jax.tree.map(lambda s: Format(Layout.AUTO, s), shardings)
  return jax.jit(fn, in_shardings=(shardings, cache_shardings, ids_sh, rows_sh),
                 out_shardings=(sharding.replicated(mesh), cache_shardings), donate_argnums=(1,),
                 keep_unused=True)


def _plan(cfg, sizes, rules, program, batch, seq, tcfg, capacity_factor, platform, options,
          chunk=None):
  from deepseek_v4 import plan as plan_lib
  from deepseek_v4.layers.moe_ep import default_all_to_all

  common = dict(batch=batch, seq=seq, capacity_factor=capacity_factor,
                all_to_all=default_all_to_all(platform))
  if program == "train":
    s = plan_lib.Settings(train=True, remat="none" if tcfg.remat == "none" else "full",
                          ce_chunk=tcfg.ce_chunk, freeze=tuple(tcfg.freeze),
                          lora_rank=tcfg.lora_rank, lora_targets=tuple(tcfg.lora_targets),
                          optimizer="adamw" if tcfg.optimizer == "adamw" else "muon", **common)
  else:
    s = plan_lib.Settings(prefill_chunk=chunk or seq, **common)
  p = plan_lib.make_plan(cfg, sizes, rules, s, options=options)
  lines = p.lines
  if program != "prefill_chunk":  # only a chunk into a cache holds the cache
    lines = [line for line in lines if not line[0].startswith("KV cache")]
  return sum(b for _, b, _ in lines), lines


def compile_long(cfg, target: str, mesh_sizes: dict[str, int], rules, program: str, seq: int, *,
                 batch: int = 1, tcfg=None, capacity_factor: float | None = None,
                 options: Options = Options(), compiler_options: dict | None = None,
                 param_layouts: str = "default", chunk: int | None = None) -> LongReport:
  """Compile `program` ("prefill" or "train") of `batch` rows of `seq` tokens for compile-only
  devices of `target` on a mesh of `mesh_sizes` under `rules` (a name or a Rules table, e.g.
  `zero_over_context("fsdp_ep")`), and report (module docstring). `compiler_options` go to
  XLA (e.g. {"xla_dump_to": dir} for `aot.memory.largest_temporaries`); `param_layouts` is
  `prefill_program`'s, and for "train" `parallel.train_step_program`'s `state_layouts`.
  `chunk`: the tokens of a "prefill_chunk" program (its cache holds `seq`).

  Raises:
    ValueError: an unknown program, or a train program without its TrainConfig.
  """
  from flax import nnx

  from deepseek_v4 import abstract, parallel, sharding, train
  from kernels_pallas import common as kernel_common

  if program not in PROGRAMS:
    raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")
  if param_layouts not in PARAM_LAYOUTS:
    raise ValueError(f"param_layouts={param_layouts!r}; expected one of {PARAM_LAYOUTS}")
  if program == "train" and tcfg is None:
    raise ValueError("the train program needs its train.TrainConfig (tcfg)")
  if (program == "prefill_chunk") != (chunk is not None):
    raise ValueError(f"chunk={chunk!r}: the chunk length goes with (and only with) the "
                     "prefill_chunk program")
  if chunk is not None and not 0 < chunk <= seq:
    raise ValueError(f"chunk={chunk} must be in [1, seq={seq}]")
  t = targets.target(target)
  r = sharding.get_rules(rules)
  sizes = {**dict.fromkeys(sharding.MESH_AXES, 1), **mesh_sizes}
  mesh = sharding.make_mesh(**sizes, devices=targets.devices(target, math.prod(sizes.values())))
  plan_bytes, plan_lines = _plan(cfg, sizes, r, program, batch, seq, tcfg, capacity_factor,
                                 t.platform, options, chunk)
  start = time.perf_counter()
  with kernel_common.target_platform(t.platform):
    run = parallel.options(mesh, r, capacity_factor=capacity_factor).replace(
      kernel_impl=options.kernel_impl, attn_block=options.attn_block,
      scan_layers=options.scan_layers)
    shape = (batch, seq)
    if program == "train":
      graphdef, state = nnx.split(abstract.train_state(cfg, tcfg, options))
      shardings = sharding.state_shardings(state, mesh, r)
      ids_sh = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(
        ("batch", "seq"), shape, mesh, r.activations, strict=False))
      ids = jax.ShapeDtypeStruct(shape, "int32", sharding=ids_sh)
      batch_abs = {"inputs": ids, "targets": ids}
      fn = parallel.train_step_program(functools.partial(train.train_step_fn, tcfg=tcfg),
                                       graphdef, shardings, mesh, r, batch_abs, 1, options=run,
                                       keep_unused=True, state_layouts=param_layouts)
      mtp = jax.ShapeDtypeStruct((), "float32", sharding=sharding.replicated(mesh))
      args = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           state, shardings), batch_abs, mtp)
    elif program == "prefill_chunk":
      from deepseek_v4 import cache as cache_lib

      graphdef, state = parallel.abstract_model(cfg, mesh, r, options=options)
      shardings = jax.tree.map(lambda a: a.sharding, state)
      cache = jax.eval_shape(lambda: cache_lib.init_cache(cfg, batch, seq,
                                                          scan_layers=options.scan_layers))
      cache_sh = sharding.cache_shardings(cache, mesh, r)
      fn = prefill_chunk_program(graphdef, shardings, cache_sh, mesh, r, (batch, chunk),
                                 options=run, param_layouts=param_layouts)
      shaped = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
      args = (state, jax.tree.map(shaped, cache, cache_sh),
              jax.ShapeDtypeStruct((batch, chunk), "int32"),
              jax.ShapeDtypeStruct((batch,), "int32"))
    else:
      graphdef, state = parallel.abstract_model(cfg, mesh, r, options=options)
      shardings = jax.tree.map(lambda a: a.sharding, state)
      fn = prefill_program(graphdef, shardings, mesh, r, shape, options=run,
                           param_layouts=param_layouts)
      ids = jax.ShapeDtypeStruct(shape, "int32", sharding=jax.sharding.NamedSharding(
        mesh, sharding.logical_to_spec(("batch", "seq"), shape, mesh, r.activations,
                                       strict=False)))
      args = (state, ids)
  with targets.compiling_for(target, mesh), sharding.use(mesh, r):
    lowered = fn.lower(*args)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    kernels = []
    if t.platform == "gpu":  # ptxas reads the Pallas kernels' registers and spills
      from deepseek_v4.aot import compile as aot_compile

      compiled, kernels = aot_compile.compile_with_kernel_resources(
        lowered, compiler_options=compiler_options,
        dump_dir=(compiler_options or {}).get("xla_dump_to"))
    else:
      compiled = lowered.compile(compiler_options or {})
    compile_s = time.perf_counter() - start
  m = compiled.memory_analysis()
  return LongReport(
    target=target, mesh=sizes, rules=r.name, program=program, batch=batch, seq=seq,
    layers=cfg.num_layers, argument_bytes=int(m.argument_size_in_bytes),
    temp_bytes=int(m.temp_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
    alias_bytes=int(m.alias_size_in_bytes), plan_bytes=plan_bytes, plan_lines=plan_lines,
    collectives=collectives_lib.collectives(compiled.as_text()), lower_seconds=lower_s,
    compile_seconds=compile_s, kernels=kernels)
