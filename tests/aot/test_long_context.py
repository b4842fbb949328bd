"""A context-parallel prefill compiled for 8 compile-only H200s (deepseek_v4/aot/long_context.py):
the exchanges in the compiled program are the ones plan_context computes from the config.

Per layer kind, the collectives the context-parallel attention issues (named by their
`attention_<kind>/shard_map/` source) are one neighbour permute of the halo's attention input and
an all-gather of each compressed array (entries; CSA's indexer keys), of exactly the bytes
`plan_context.exchanges` gives; tests/test_plan_context.py checks the same on the 8 CPU devices
in the default suite. This compile takes minutes on 2 cores (slow). Flash itself at 1M tokens:
scripts/compile_long.py (docs/plan.md "Context parallelism").
"""

import collections

import pytest

import deepseek_v4
from deepseek_v4 import plan_context
from deepseek_v4.aot import compile as aot_compile
from deepseek_v4.aot import long_context, targets
from deepseek_v4.options import Options
from tests.aot import backend
from tests.tolerances import PLAN_VS_COMPILER_REL
from tests.test_plan_context import SMALL

pytestmark = [pytest.mark.aot, pytest.mark.slow]

# The H200's 141 GB as NVIDIA states it (decimal; the target's own budget, 141 GiB, is larger).
H200_GB = 141e9


def test_context_parallel_prefill_on_8_h200_exchanges_what_plan_says():
  backend.require("h200")
  cfg = deepseek_v4.tiny(**SMALL)
  T = 2048
  r = long_context.compile_long(cfg, "h200", dict(context=8), "fsdp", "prefill", T)
  seen = collections.defaultdict(lambda: collections.defaultdict(set))
  for c in r.collectives:
    for kind in ("sliding", "csa", "hca"):
      if f"attention_{kind}/shard_map/" in c.source:
        seen[kind][c.op].add((c.result_bytes, c.group))
  want = {e.kind.split()[0].lower(): e for e in plan_context.exchanges(cfg, T, 8)}
  # XLA:GPU may fold one layer's halo permute into another's (one instruction, one source name):
  # every halo permute found is x's halo (or its int32 positions), and at least one is found.
  halo = cfg.window - 1
  permutes = set().union(*(seen[kind]["collective-permute"] for kind in want))
  assert permutes - {(halo * 4, 2)} == {(e.neighbour, 2) for e in want.values()}
  for kind, e in want.items():
    gathered = {(b, 8) for b in (e.entries, e.index_keys) if b}
    assert seen[kind]["all-gather"] == gathered, kind
  assert 0 < r.total_bytes < targets.target("h200").memory_bytes


def test_flash_1m_prefill_fits_8_h200_and_plan_agrees():
  """Flash, one sequence of 1,048,576 tokens over context=8 (parameters ZeRO-sharded along it, in
  XLA-chosen layouts, the Pallas attention kernels), all 43 layers: the compiled program's
  per-device bytes fit the H200 and plan's estimate is within the plan-vs-compiler tolerance."""
  backend.require("h200")
  from deepseek_v4 import sharding

  flash = deepseek_v4.flash()
  rules = long_context.zero_over_context("fsdp_ep")
  r = long_context.compile_long(flash, "h200", dict(context=8), rules, "prefill", 1 << 20,
                                param_layouts="auto", options=Options(kernel_impl="auto"))
  assert r.layers == 43 and r.mesh == {**dict.fromkeys(sharding.MESH_AXES, 1), "context": 8}
  assert r.total_bytes <= H200_GB, r.total_bytes
  assert abs(r.plan_ratio - 1) <= PLAN_VS_COMPILER_REL, (r.total_bytes, r.plan_bytes)
  # One CSA layer gathers its compressed entries and indexer keys (plan_context's bytes).
  csa, = (e for e in plan_context.exchanges(flash, 1 << 20, 8) if e.kind == "CSA")
  assert set(r.exchanged("all-gather", csa.index_keys)) >= {csa.entries, csa.index_keys}
  _pallas_fit(r, {"v4_sparse_attention_fwd", "v4_indexer_scores"})


def test_flash_1m_prefill_in_4_chunks_fits_8_h200_and_plan_agrees():
  """One chunk of 262,144 tokens of Flash's chunked context-parallel prefill into the gathered
  cache of 1,048,576 tokens (the cache donated and counted), all 43 layers, the Pallas kernels:
  fits the H200, within the plan-vs-compiler tolerance of plan (cache line included)."""
  backend.require("h200")
  flash = deepseek_v4.flash()
  rules = long_context.zero_over_context("fsdp_ep")
  r = long_context.compile_long(flash, "h200", dict(context=8), rules, "prefill_chunk", 1 << 20,
                                chunk=1 << 18, param_layouts="auto",
                                options=Options(kernel_impl="auto"))
  assert r.total_bytes <= H200_GB, r.total_bytes
  assert abs(r.plan_ratio - 1) <= PLAN_VS_COMPILER_REL, (r.total_bytes, r.plan_bytes)
  assert any(label.startswith("KV cache") for label, _, _ in r.plan_lines)
  assert r.alias_bytes > 7e9  # the gathered cache (7.2 GB) is updated in place
  _pallas_fit(r, {"v4_sparse_attention_fwd", "v4_indexer_scores"})


def test_flash_128k_lora_training_fits_8_h200():
  """Flash LoRA training (rank 8, AdamW on the adapters, remat full) of one 131,072-token sequence
  over context=8, all 43 layers, forward + backward + update, the Pallas attention kernels
  included: fits the H200, and plan's estimate is within the plan-vs-compiler tolerance."""
  backend.require("h200")
  from deepseek_v4 import train

  flash = deepseek_v4.flash()
  tcfg = train.TrainConfig(seq_len=1 << 17, batch_size=1, lora_rank=8, optimizer="adamw",
                           remat="full")
  r = long_context.compile_long(flash, "h200", dict(context=8),
                                long_context.zero_over_context("fsdp_ep"), "train", 1 << 17,
                                tcfg=tcfg, param_layouts="auto",
                                options=Options(kernel_impl="auto"))
  assert r.layers == 43 and r.program == "train"
  assert r.total_bytes <= H200_GB, r.total_bytes
  assert abs(r.plan_ratio - 1) <= PLAN_VS_COMPILER_REL, (r.total_bytes, r.plan_bytes)
  _pallas_fit(r, {"v4_sparse_attention_fwd", "v4_sparse_attention_dq", "v4_indexer_scores"})


def _pallas_fit(r, names):
  """The Pallas kernels run inside the context-parallel shard_map at Flash's shapes: each named
  one is there, none spills, each fits the H200's shared memory (ptxas on the compiled PTX)."""
  assert names <= {k.name for k in r.kernels}, r.kernels
  for k in r.kernels:
    assert k.spill_bytes == 0, k
    assert 0 < k.shared_memory_bytes <= aot_compile.shared_memory_limit("h200"), k
