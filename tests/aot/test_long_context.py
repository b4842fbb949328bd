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
from deepseek_v4.aot import long_context, targets
from tests.aot import backend
from tests.test_plan_context import SMALL

pytestmark = [pytest.mark.aot, pytest.mark.slow]


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
