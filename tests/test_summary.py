"""Tests of deepseek_v4/summary.py and the `summary` CLI subcommand.

What the summary counts (see the summary module docstring): parameters are `nnx.Param` leaves
(the router bias and `tid2eid` tables are buffers); "total" excludes the MTP block; "active"
counts routed experts at K/E and everything else fully, with or without the embedding table. The
published figures (report: Flash 284B / 13B, Pro 1.6T / 49B) match total without MTP and active
excluding the embedding:

  Flash: total 284.33B without MTP (+0.1%), 290.94B with; active 13.27B excl. embedding (+2.1%),
         13.80B incl. (+6.2%).
  Pro:   total 1.573T without MTP (-1.7%; "1.6T" is a two-digit rounding), 1.599T with (-0.1%);
         active 48.85B excl. embedding (-0.3%), 49.78B incl. (+1.6%).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cli, summary
from deepseek_v4.model import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC_TINY_PARAMS = 829_345  # docs/architecture.md#tiny: the tiny model without MTP


@pytest.fixture(scope="module")
def flash_counts():
  return summary.count_params(deepseek_v4.flash())


@pytest.fixture(scope="module")
def pro_counts():
  return summary.count_params(deepseek_v4.pro())


def test_tiny_matches_initialized_model_and_spec():
  counts = summary.count_params(deepseek_v4.tiny())
  assert counts.trunk == SPEC_TINY_PARAMS
  # An actually-initialized model (with MTP): trunk = every Param outside `mtp.`.
  model = Transformer(deepseek_v4.tiny(), rngs=nnx.Rngs(0))
  sizes = [(path[0], v.get_value().size)
           for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert counts.trunk == sum(n for top, n in sizes if top != "mtp")
  assert counts.mtp == sum(n for top, n in sizes if top == "mtp")


def test_tiny_components_and_buffers():
  cfg = deepseek_v4.tiny()
  counts = summary.count_params(cfg)
  assert set(counts.total) == set(summary.COMPONENTS)
  assert all(v > 0 for v in counts.total.values())  # tiny has every kind of component
  E, K = cfg.num_experts, cfg.experts_per_token
  routed = 3 * E * cfg.moe_inter_dim * cfg.d_model * cfg.num_layers
  assert counts.total["routed_experts"] == routed
  assert counts.active["routed_experts"] == pytest.approx(routed * K / E)
  assert counts.total["embedding"] == counts.total["lm_head"] == cfg.vocab_size * cfg.d_model
  assert counts.active_incl_embedding - counts.active_excl_embedding == counts.total["embedding"]
  # 3 hash layers hold tid2eid [V, K]; 3 learned layers + the MTP block hold a bias [E].
  assert counts.buffers["hash_tables"][0] == 3 * cfg.vocab_size * K
  assert counts.buffers["router_bias"][0] == 4 * E


def test_flash_matches_published(flash_counts):
  assert flash_counts.trunk == pytest.approx(284e9, rel=0.01)
  assert flash_counts.active_excl_embedding == pytest.approx(13e9, rel=0.05)
  # With MTP the total no longer rounds to the published 284B: MTP is not in the headline.
  assert flash_counts.trunk + flash_counts.mtp > 290e9


def test_pro_matches_published(pro_counts):
  assert pro_counts.trunk == pytest.approx(1.6e12, rel=0.03)
  assert pro_counts.trunk + pro_counts.mtp == pytest.approx(1.6e12, rel=0.01)
  assert pro_counts.active_excl_embedding == pytest.approx(49e9, rel=0.02)


def test_flash_kv_cache_matches_spec_table():
  kv = summary.kv_cache(deepseek_v4.flash(), 1048576)
  # docs/architecture.md#cache-bytes: ≈ 3.62 GB mixed / 7.22 GB BF16; 3,450 / 6,880 B per token of
  # context.
  assert kv.total_serving == pytest.approx(3.62e9, rel=0.005)
  assert kv.total_bf16 == pytest.approx(7.22e9, rel=0.005)
  assert kv.per_token_serving == 3450
  assert kv.per_token_bf16 == 6880
  rows = {r.name: r for r in kv.rows}
  assert rows["CSA entries"].layers * rows["CSA entries"].entries == 5_505_024
  assert rows["HCA entries (m=128)"].layers * rows["HCA entries (m=128)"].entries == 163_840
  # 43 trunk layers x W: the MTP block caches nothing (tests/test_cache_bytes.py)
  assert rows["sliding windows (W=128)"].layers * rows["sliding windows (W=128)"].entries == 5504


def test_attention_keys_per_layer_kind():
  cfg = deepseek_v4.tiny()  # W=8, top-k 4, HCA ratio 16
  ctx = np.array([1, 8, 12, 64, 100])
  np.testing.assert_array_equal(summary.attention_keys(cfg, 0, ctx)[0], [1, 8, 8, 8, 8])
  keys, scored = summary.attention_keys(cfg, 4, ctx)
  np.testing.assert_array_equal(scored, [0, 2, 3, 16, 25])
  np.testing.assert_array_equal(keys, [1, 10, 11, 12, 12])
  np.testing.assert_array_equal(summary.attention_keys(cfg, 16, ctx)[0], [1, 8, 8, 12, 14])


def test_flash_flops_at_1m(flash_counts):
  cfg = deepseek_v4.flash()
  f = summary.flops_per_token(cfg, 1048576, flash_counts)
  assert f.attention["indexer_scores"] == 21 * 262144 * 64 * 128 * 2
  assert f.attention["attn_core_hca"] == 20 * (128 + 8192) * 2 * 2 * 64 * 512
  assert f.matmul["routed_experts"] == pytest.approx(2 * 6 * 3 * 2048 * 4096 * 43)
  assert "embedding" not in f.matmul  # a lookup, not a matmul
  assert f.total_prefill_mean < f.total


def test_summary_json_roundtrip(tmp_path):
  path = tmp_path / "s.json"
  assert cli.main(["summary", "--preset", "tiny", "--context", "64", "--json", str(path)]) == 0
  d = json.loads(path.read_text())
  assert d["params"]["total_without_mtp"] == SPEC_TINY_PARAMS
  assert d["kv_cache"]["context"] == 64


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "deepseek_v4", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=120)


def test_cli_summary_tiny_subprocess():
  proc = _run_cli("summary", "--preset", "tiny")
  assert proc.returncode == 0, proc.stderr
  assert f"{SPEC_TINY_PARAMS:,}" in proc.stdout


@pytest.mark.parametrize("assignment, named", [
  ("d_model=abc", "abc"),
  ("no_such_field=1", "no_such_field"),
  ("num_heads=7", "num_heads=7"),
], ids=["bad-value", "unknown-field", "invalid-config"])
def test_cli_bad_set_names_the_value(assignment, named, capsys):
  assert cli.main(["summary", "--preset", "tiny", "--set", assignment]) == cli.USAGE_ERROR
  assert named in capsys.readouterr().err


def test_cli_bad_preset_names_the_value(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["summary", "--preset", "huge"])
  assert e.value.code == cli.USAGE_ERROR
  assert "huge" in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
  (["--set", "d_model=abc"], "abc"),
  (["--preset", "huge"], "huge"),
], ids=["bad-set", "bad-preset"])
def test_cli_bad_flags_subprocess(args, named):
  proc = _run_cli("summary", *args)
  assert proc.returncode != 0
  assert named in proc.stderr


# ----- summary --context works from shapes ----------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "flash", "dense"])
def test_prefill_mean_closed_form_equals_the_sum_over_positions(preset):
  cfg = deepseek_v4.tiny().replace(attention="dense") if preset == "dense" else (
    getattr(deepseek_v4, preset)())
  for context in (1, 2, 3, 7, 8, 127, 128, 129, 1000, 4095, 4096, 5000):
    brute = summary.attention_flops(cfg, np.arange(1, context + 1, dtype=np.int64))
    got = summary.attention_flops_prefill_mean(cfg, context)
    for k, v in brute.items():
      assert got[k] == pytest.approx(float(np.mean(v)), rel=1e-12, abs=0), (context, k)


def test_summary_context_memory_does_not_grow_with_the_context():
  import tracemalloc

  cfg = deepseek_v4.flash()
  counts = summary.count_params(cfg)
  tracemalloc.start()
  try:
    summary.flops_per_token(cfg, 10**7, counts)  # an array over the context: 80 MB per kind
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 2 * 10**6
  f = summary.flops_per_token(cfg, 10**12, counts)  # 8 TB as an array: MemoryError
  # at a huge context the mean of the HCA entries is ~ context / (2 * 128) per layer
  per_key = 4 * cfg.num_heads * cfg.head_dim
  hca_layers = sum(1 for r in cfg.layer_ratios if r > 4)
  assert f.attention_prefill_mean["attn_core_hca"] == pytest.approx(
    hca_layers * per_key * (10**12 / 256), rel=1e-6)
