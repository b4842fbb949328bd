"""What XLA allocates per device for a `plan` row, beside what `plan` says (docs/plan.md).

`measure(cfg, mesh, settings, target)` compiles, on compile-only devices of `target`
(`deepseek_v4.aot.targets`), the program a plan row describes, with every argument placed by the
same rule table a real run uses:

* inference (`settings.train` False): one prefill step, `settings.prefill_chunk` tokens of
  `settings.batch` rows into a cache of `settings.seq` tokens, returning the logits of each row's
  last token and the new cache (the cache donated): `decoding._extend_jit` as `prefill` and
  `generate` run it. A decode step is the same program with one token, so this is the peak.
* training: `train.train_step_fn` (loss, gradients, the DeepSeek optimizer's update, the
  router-bias update), with the parameters and optimizer state donated, as
  `parallel.jit_train_step` runs it.

Both programs are built by `deepseek_v4.aot.compile.build_program` (one builder for the
compile CLI and this harness), from the abstract model of deepseek_v4/abstract.py.

Unused arguments are kept (`keep_unused=True`): a real run holds every parameter on the device
(the MTP block, which inference does not call, included), so they count.

XLA's `memory_analysis()` splits a device's bytes into arguments, outputs, temporaries and the
output bytes that alias a donated argument; the peak is arguments + outputs - aliased +
temporaries. `Measurement.total` is that figure, the one `plan`'s total estimates.

Requires `JAX_PLATFORMS=cpu` set before jax is imported, and the `aot` extra.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from deepseek_v4 import plan as plan_lib
from deepseek_v4 import sharding
from deepseek_v4.aot import targets
from deepseek_v4.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Per-device bytes of one compiled program, and plan's figure for the same run."""

  arguments: int
  temporaries: int
  output: int
  aliased: int
  plan: float
  compile_s: float

  @property
  def total(self) -> int:
    return self.arguments + self.output - self.aliased + self.temporaries

  @property
  def ratio(self) -> float:
    """XLA's total over plan's."""
    return self.total / self.plan

  def to_dict(self) -> dict[str, Any]:
    return dict(arguments=self.arguments, temporaries=self.temporaries, output=self.output,
                aliased=self.aliased, total=self.total, plan=self.plan, ratio=self.ratio,
                compile_s=self.compile_s)


def truncated(cfg: ModelConfig, num_layers: int) -> ModelConfig:
  """`cfg` with its first `num_layers` layers (the MTP block kept): per-layer kinds as in `cfg`."""
  if not 1 <= num_layers <= cfg.num_layers:
    raise ValueError(f"num_layers={num_layers} must be in [1, {cfg.num_layers}]")
  return cfg.replace(compress_ratios=cfg.compress_ratios[:num_layers],
                     num_hash_layers=min(cfg.num_hash_layers, num_layers))


def _train_config(s: plan_lib.Settings):
  from deepseek_v4 import train

  return train.TrainConfig(seq_len=s.seq, batch_size=s.batch, grad_accum=s.grad_accum,
                           remat=s.remat, ce_chunk=s.ce_chunk, freeze=tuple(s.freeze),
                           optimizer="muon_v4" if s.optimizer == "muon" else "adamw")


def lower(cfg: ModelConfig, mesh_sizes: dict[str, int], settings: plan_lib.Settings,
          target: str = "h200", rules: str | None = None):
  """The lowered program of a plan row on compile-only devices of `target` (see module doc):
  `aot.compile.build_program`'s "train" or "prefill" program with the row's settings."""
  from deepseek_v4.aot import compile as aot_compile

  s = settings
  sizes = {**dict.fromkeys(sharding.MESH_AXES, 1), **mesh_sizes}
  rules = rules or plan_lib.default_rules(sizes)
  mesh = sharding.make_mesh(**sizes, devices=targets.devices(target, math.prod(sizes.values())))
  common = dict(batch=s.batch, seq=s.seq, capacity_factor=s.capacity_factor, gmm=s.gmm)
  if not s.train:
    return aot_compile.lower_program(cfg, target, mesh, rules, "prefill",
                                     chunk=min(s.prefill_chunk, s.seq), **common)
  if s.moment_dtype != "float32" or s.param_dtype not in (None, cfg.param_dtype):
    raise ValueError(f"moment_dtype={s.moment_dtype!r}, param_dtype={s.param_dtype!r}: "
                     "deepseek_v4.train builds float32 moments and the config's parameter dtype; "
                     "such a row cannot be compiled")
  return aot_compile.lower_program(cfg, target, mesh, rules, "train", tcfg=_train_config(s),
                                   **common)


def measure(cfg: ModelConfig, mesh_sizes: dict[str, int], settings: plan_lib.Settings,
            target: str = "h200", rules: str | None = None, *,
            compiler_options: dict | None = None) -> Measurement:
  """Compile a plan row for `target` and return XLA's per-device bytes beside plan's total.

  `settings.all_to_all` and `settings.gmm` must be what the target runs (plan's defaults are the
  GPU/TPU paths).
  """
  t0 = time.perf_counter()
  lowered = lower(cfg, mesh_sizes, settings, target, rules)
  with targets.compiling_for(target):
    compiled = lowered.compile(compiler_options or {})
  elapsed = time.perf_counter() - t0
  m = compiled.memory_analysis()
  p = plan_lib.make_plan(cfg, mesh_sizes, rules, settings)
  return Measurement(arguments=int(m.argument_size_in_bytes),
                     temporaries=int(m.temp_size_in_bytes),
                     output=int(m.output_size_in_bytes),
                     aliased=int(m.alias_size_in_bytes), plan=p.total, compile_s=elapsed)


def extrapolate(a: tuple[int, Measurement], b: tuple[int, Measurement], layers: int,
                plan: float) -> Measurement:
  """The measurement at `layers` layers, linear in the layer count through two compiled
  truncations (a = (layers_a, measurement_a), b likewise, with the same periodic tail)."""
  (la, ma), (lb, mb) = a, b
  if la == lb:
    raise ValueError(f"two different layer counts needed, got {la} twice")

  def line(field):
    va, vb = getattr(ma, field), getattr(mb, field)
    return int(round(va + (vb - va) * (layers - la) / (lb - la)))

  return Measurement(arguments=line("arguments"), temporaries=line("temporaries"),
                     output=line("output"), aliased=line("aliased"), plan=plan,
                     compile_s=ma.compile_s + mb.compile_s)


def largest_temporaries(dump_dir: str, top: int = 12) -> list[tuple[int, str, str]]:
  """(bytes, XLA value, shape) of the largest values inside the temporary allocation of the
  buffer-assignment dump under `dump_dir` (compile with compiler_options={"xla_dump_to": ...});
  values at overlapping offsets are not alive at the same time."""
  import glob
  import os
  import re

  files = sorted(glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt")), key=os.path.getsize)
  if not files:
    raise FileNotFoundError(f"no *buffer-assignment.txt under {dump_dir}")
  out, inside = [], False
  with open(files[-1]) as f:
    for line in f:
      if line.startswith("allocation"):
        inside = "preallocated-temp" in line
      m = inside and re.match(r"\s*value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)",
                              line)
      if m:
        out.append((int(m[2]), m[1], m[3]))
  return sorted(out, reverse=True)[:top]
