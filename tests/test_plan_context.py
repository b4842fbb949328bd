"""`plan --context-parallel N` (deepseek_v4/plan.py's context part, deepseek_v4/plan_context.py):
the per-layer exchange bytes and the per-device memory of one sequence split over N devices,
checked against the paper's numbers, the cache pytree's own arrays and counts by hand."""

import math

import jax
import numpy as np
import pytest

import deepseek_v4
from deepseek_v4 import cache, cli, plan, plan_context, summary

MIB = 1 << 20


def _line(p: plan.Plan, prefix: str) -> float:
  (b,) = [b for label, b, _ in p.lines if label.startswith(prefix)]
  return b


def test_flash_exchange_is_the_papers_arithmetic_at_1m_tokens():
  """V4 paper, 1M tokens: a CSA layer gathers ~256 MiB of entries + ~64 MiB of indexer keys, an
  HCA layer ~8 MiB, against ~1 GiB for a ring over the raw K=V head."""
  ex = {e.kind: e for e in plan_context.exchanges(deepseek_v4.flash(), 1 << 20, 8)}
  assert set(ex) == {"sliding", "CSA", "HCA (m=128)"}
  assert (ex["sliding"].layers, ex["CSA"].layers, ex["HCA (m=128)"].layers) == (2, 21, 20)
  assert ex["CSA"].entries == 256 * MIB and ex["CSA"].index_keys == 64 * MIB
  assert ex["HCA (m=128)"].entries == 8 * MIB and ex["HCA (m=128)"].index_keys == 0
  assert ex["sliding"].gathered == 0
  for e in ex.values():
    assert e.ring_kv == 1024 * MIB
    assert e.received(8) == e.gathered * 7 / 8  # the other seven slices
  # stage 1: the 127 tokens before a slice (W = 128; CSA's window of 4 is inside them): their
  # attention input (bf16, D = 4096)
  for e in ex.values():
    assert e.neighbour == 127 * 4096 * 2


def test_gathered_buffers_are_the_cache_arrays_at_the_full_length():
  """What a layer all-gathers equals, array for array, the entries and indexer keys a cache of
  the whole (padded) sequence holds for that layer (the cache pytree, built abstractly)."""
  cfg = deepseek_v4.tiny()
  T = plan_context.padded_length(cfg, 500, 4)  # 512: tiny's max positions
  c = jax.eval_shape(lambda: cache.init_cache(cfg, 1, T, scan_layers=False))
  nbytes = lambda a: 0 if a is None else math.prod(a.shape) * np.dtype(a.dtype).itemsize
  ex = {e.kind: e for e in plan_context.exchanges(cfg, 500, 4)}
  for i, kind in enumerate(cfg.layer_kinds):
    layer = c.layer(i)
    label = kind.label + (f" (m={kind.ratio})" if kind.name == "hca" else "")
    assert ex[label].entries == nbytes(layer.entries), label
    assert ex[label].index_keys == nbytes(layer.index_keys), label


@pytest.mark.parametrize("seq, n", [(1000, 4), (1, 8), (4096, 8), (777, 3)])
def test_padded_length_is_the_smallest_whole_slices(seq, n):
  cfg = deepseek_v4.tiny()  # ratios 4 and 16: slices of a multiple of 16 tokens
  T = plan_context.padded_length(cfg, seq, n)
  assert T >= seq and T % (16 * n) == 0 and T - 16 * n < seq
  with pytest.raises(ValueError, match="devices=0"):
    plan_context.padded_length(cfg, seq, 0)


def test_context_plan_by_hand():
  """Tiny (float32) under `fsdp` with context=4: parameters as without the axis (replicated along
  it), streams of T/4 tokens, and the block's attention is the slice's intermediates, one query
  block's (here the whole slice of 128 and the halo before it), the kernel's blocks at the full
  length and what context parallelism adds, counted from the cache arrays and by hand."""
  cfg = deepseek_v4.tiny()
  N, seq = 4, 500
  T = plan_context.padded_length(cfg, seq, N)
  s = plan.Settings(batch=1, seq=seq, prefill_chunk=seq)
  cp = plan.make_plan(cfg, dict(fsdp=2, context=N), "fsdp", s)
  one = plan.make_plan(cfg, dict(fsdp=2), "fsdp", plan.Settings(batch=1, seq=T,
                                                                 prefill_chunk=T // N))
  assert _line(cp, "parameters") == _line(one, "parameters")
  M, D, act = cfg.hc_mult, cfg.d_model, 4
  assert _line(cp, "prefill chunk") == 2 * (T // N) * M * D * act
  c = jax.eval_shape(lambda: cache.init_cache(cfg, 1, T, scan_layers=False))
  nbytes = lambda a: 0 if a is None else math.prod(a.shape) * np.dtype(a.dtype).itemsize
  gathered = max(nbytes(c.layer(i).entries) + nbytes(c.layer(i).index_keys)
                 for i in range(cfg.num_layers))
  neighbour = (cfg.window - 1) * D * act  # the band's tokens' attention input
  H, J, F, S = cfg.head_dim, cfg.index_head_dim, cfg.moe_inter_dim, cfg.num_shared_experts
  # over the slice: hyper-connections (f32 streams, new streams, collapse; two sites), the
  # attention's output and K=V, CSA's two compressors (two overlapping f32 series of kv and gate,
  # widths H and J), the shared expert (f32 SwiGLU, output) and the router (f32 scores, weights)
  slice_tok = (2 * (M * D * 4 + M * D * 4 + D * 4) + (D + H) * 4 + 2 * 2 * 4 * (H + J)
               + S * (3 * F * 4 + D * 4) + cfg.num_experts * 8)
  # per query of a block: the low-rank query and K=V, q / its f32 normalization / o per head,
  # the grouped output's input, the indexer's queries and weights
  query_tok = ((cfg.q_lora_rank + H) * 4 + cfg.num_heads * H * 12
               + cfg.o_groups * cfg.o_lora_rank * 4 + cfg.index_heads * (J * 4 + 4))
  assert plan.context_query_block(cfg, seq, N) == T // N == 128
  tokens = (T // N) * slice_tok + (T // N + cfg.window - 1) * query_tok
  assert _line(cp, "one block") == pytest.approx(
    tokens + plan.attention_block_bytes(cfg, 1, T, 1) + gathered + neighbour)
  # the cache, gathered: whole on every device (what a context-parallel prefill leaves)
  assert _line(cp, "KV cache") == cache.cache_bytes(c)
  assert cp.total == pytest.approx(sum(b for _, b, _ in cp.lines))


def test_flash_prefill_at_1m_runs_its_queries_in_blocks():
  """Flash, 1M tokens over 8 devices: 131,072 tokens per slice, queries in 16 blocks of 8192
  with the 127-token halo before each; the intermediates over the slice and per query of a block
  by hand (bf16; D 4096, 4 streams, 64 heads of 512, CSA's indexer 64 x 128). The MoE's side
  holds one layer's gathered weights (its 256 x 3 expert matrices), not a scan step's two."""
  from deepseek_v4.aot import long_context

  flash = deepseek_v4.flash()
  assert plan.context_query_block(flash, 1 << 20, 8) == 8192
  assert plan_context.largest_halo(flash, 1 << 20, 8) == 127
  # 2 x (f32 + bf16 streams + collapse) + output and K=V + CSA's series (2 x 2 x 4 x (512 + 128))
  # + shared expert (3 x 2048 x 4 + 4096 x 4) + router (256 x 8)
  slice_tok = 2 * (65536 + 32768 + 8192) + (4096 + 512) * 2 + 10240 + 40960 + 2048
  # (q_lora 1024 + K=V 512) x 2 + 64 x 512 x (2 + 2 + 4) + 8 x 1024 x 2 + 64 x (128 x 2 + 4)
  query_tok = 3072 + 262144 + 16384 + 16640
  assert plan.context_slice_bytes_per_token(flash, 1, 1) == slice_tok == 275456
  assert plan.context_query_bytes_per_token(flash, 1) == query_tok == 298240
  p = plan.make_plan(flash, dict(context=8), long_context.zero_over_context("fsdp_ep"),
                     plan.Settings(batch=1, seq=1 << 20, prefill_chunk=1 << 20))
  tokens = 131072 * slice_tok + (8192 + 127) * query_tok
  assert f"query blocks of 8,319 tokens) {plan.gb(tokens)}" in p.notes[1]
  experts = 256 * 3 * 2048 * 4096 * 2  # one layer's routed experts, bf16
  gathered = float(p.notes[1].split("gathered along context ")[1].split()[0]) * 1e9
  assert experts < gathered < experts + 0.5e9


def test_context_training_plan_by_hand():
  """Training: each device saves the block-boundary streams of its T/N tokens (remat full), and
  the gathered buffers are held twice (the forward's and their cotangents)."""
  cfg = deepseek_v4.tiny()
  N, seq = 8, 2048
  s = plan.Settings(train=True, batch=1, seq=seq, optimizer="adamw")
  cp = plan.make_plan(cfg, dict(context=N), "fsdp", s)
  L = cfg.num_layers + cfg.num_mtp_layers
  assert _line(cp, "saved activations") == L * (seq // N) * cfg.hc_mult * cfg.d_model * 4
  one = plan.make_plan(cfg, {}, "fsdp", plan.Settings(train=True, batch=1, seq=seq,
                                                      optimizer="adamw"))
  assert _line(cp, "gradients") == _line(one, "gradients")  # replicated along context
  ex = plan_context.exchanges(cfg, seq, N)
  extra = 2 * max(e.gathered for e in ex) + max(e.neighbour for e in ex)
  per_block = plan.block_bytes_per_token(cfg, 1, 1, False)
  query = plan.attention_block_bytes(cfg, 1, seq, 1)
  assert _line(cp, "one block's backward") == pytest.approx(
    2 * (seq // N) * per_block + 3 * query + extra)


def test_moe_tokens_are_split_over_context_too():
  """Inside the MoE's shard_map each device holds its slice's tokens: the expert-parallel
  buffers are the one-device plan's for T / N tokens."""
  cfg = deepseek_v4.tiny()
  s = plan.Settings(batch=1, seq=4096, prefill_chunk=4096, capacity_factor=1.25)
  cp = plan.make_plan(cfg, dict(context=4, expert=2), "fsdp_ep", s)
  moe = plan.ep_buffer_bytes(cfg, 4096 // 8, 2, 1.25, 1, "ragged", "tiled")
  assert f"MoE all-to-all (ragged, tiled gmm, capacity factor 1.25) {plan.gb(moe)}" in cp.notes[1]


def test_prefill_time_on_the_papers_arithmetic():
  flash = deepseek_v4.flash()
  T = 1 << 20
  flops = plan_context.prefill_flops(flash, T)
  assert flops == summary.flops_per_token(flash, T).total_prefill_mean * T
  t8 = plan_context.prefill_seconds(flash, T, 8)
  assert t8 == pytest.approx(flops / (8 * 790e12 * 0.4))
  assert plan_context.prefill_seconds(flash, T, 16) == pytest.approx(t8 / 2)
  x = plan_context.exchange_seconds(flash, T, 8)
  # 21 CSA x 280 MiB + 20 HCA x 7 MiB received per device, 43 layers x 896 MiB for the ring
  assert x["all_gather"] == pytest.approx((21 * 280 + 20 * 7) * MIB / 900e9)
  assert x["ring_kv"] == pytest.approx(43 * 896 * MIB / 900e9)


def test_cli(capsys):
  rc = cli.main(["plan", "--preset", "tiny", "--mesh", "fsdp=2", "--context-parallel", "4",
                 "--batch", "1", "--seq", "1000", "--device-memory", "80GB"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "on 8 devices" in out and "context=4" in out and "sequence split 4 ways" in out
  assert "per-layer exchange, one row of 1,024 tokens over 4 devices" in out
  assert "whole on every context device" in out and "FITS" in out
  rc = cli.main(["plan", "--preset", "tiny", "--devices", "6", "--context-parallel", "4"])
  assert rc == cli.USAGE_ERROR
  assert "6 devices cannot hold a context axis of 4" in capsys.readouterr().err
  with pytest.raises(ValueError, match="already has context=2"):
    plan.with_context(dict(context=2), 4)


def test_collectives_counted_from_the_compiled_program():
  """aot.collectives reads each collective's bytes from the optimized HLO of a program on the 8
  CPU devices: a tiled all-gather, a neighbour ppermute and a psum_scatter of known shapes, one
  of them inside a scanned loop body (listed once: one iteration's traffic)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from deepseek_v4.aot import collectives

  mesh = jax.make_mesh((8,), ("c",), devices=jax.devices()[:8])

  def per_device(x):  # x: [16, 32] float32, this device's slice
    full = jax.lax.all_gather(x, "c", tiled=True)  # [128, 32]
    tail = jax.lax.ppermute(x[-3:], "c", [(i, (i + 1) % 8) for i in range(8)])  # [3, 32]

    def body(carry, _):
      return carry + jax.lax.psum_scatter(carry * 2.0, "c", tiled=True).sum(), None

    looped, _ = jax.lax.scan(body, full, None, length=4)
    return x + full.sum() + tail.sum() + looped.sum()

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("c"), out_specs=P("c")))
  x = jax.ShapeDtypeStruct((128, 32), np.float32, sharding=NamedSharding(mesh, P("c")))
  found = collectives.collectives(fn.lower(x).compile().as_text())
  by_op = collectives.totals(found)
  gather = [c for c in found if c.op == "all-gather"]
  assert [(c.result_bytes, c.operand_bytes, c.group) for c in gather] == [(128 * 32 * 4,
                                                                           16 * 32 * 4, 8)]
  assert by_op["collective-permute"]["result_bytes"] == 3 * 32 * 4
  scatter = [c for c in found if c.op == "reduce-scatter"]
  assert [(c.result_bytes, c.operand_bytes) for c in scatter] == [(16 * 32 * 4, 128 * 32 * 4)]
  assert scatter[0].computation != gather[0].computation  # inside the loop body, listed once
  with pytest.raises(ValueError, match="element type 'q7'"):
    collectives.collectives("  %x = q7[4]{0} all-gather(%y), replica_groups={{0,1}}")


@pytest.mark.parametrize("groups, size", [("{{0,1,2,3},{4,5,6,7}}", 4), ("[2,4]<=[8]", 4),
                                          ("mesh['axis_0'=8,'axis_1'=2] {'axis_0'}", 8),
                                          ("{}", 16)])
def test_collective_group_spellings(groups, size):
  """XLA prints replica groups four ways; an all-gather's operand is its result / group size."""
  from deepseek_v4.aot import collectives

  text = ("HloModule m, num_partitions=16\n\nENTRY %main (p: bf16[4,8]) -> bf16[64,8] {\n"
          f"  %ag = bf16[64,8]{{1,0}} all-gather(%p), replica_groups={groups}, "
          "dimensions={0}\n}")
  (c,) = collectives.collectives(text)
  assert (c.group, c.result_bytes, c.operand_bytes, c.computation) == (size, 1024, 1024 // size,
                                                                       "main")


# A small-width model with Flash's layer kinds (window 128, CSA top-k below the visible entries,
# HCA at 128): realistic shapes for the exchange, cheap to compile.
SMALL = dict(d_model=128, num_heads=8, head_dim=64, rope_dim=32, q_lora_rank=64, o_groups=2,
             o_lora_rank=32, compress_ratios=(0, 4, 128), index_heads=4, index_head_dim=32,
             index_topk=64, num_experts=4, experts_per_token=2, moe_inter_dim=64, window=128,
             num_hash_layers=1, vocab_size=256, max_position_embeddings=4096, num_mtp_layers=0)


def test_compiled_context_parallel_exchange_is_plans():
  """The context-parallel prefill compiled for the 8 CPU devices (context=8): per layer kind, the
  attention's collectives are one permute of the halo's attention input and one all-gather per
  compressed array, of exactly plan_context's bytes."""
  import collections

  from deepseek_v4 import parallel, sharding
  from deepseek_v4.aot import collectives, long_context

  cfg = deepseek_v4.tiny(**SMALL)
  T = 2048
  mesh = sharding.make_mesh(context=8, devices=jax.devices()[:8])
  graphdef, state = parallel.abstract_model(cfg, mesh, "fsdp")
  shardings = jax.tree.map(lambda a: a.sharding, state)
  fn = long_context.prefill_program(graphdef, shardings, mesh, "fsdp", (1, T),
                                    options=parallel.options(mesh, "fsdp"))
  ids = jax.ShapeDtypeStruct((1, T), np.int32)
  with sharding.use(mesh, "fsdp"):
    text = fn.lower(state, ids).compile().as_text()
  seen = collections.defaultdict(lambda: collections.defaultdict(set))
  for c in collectives.collectives(text):
    for kind in ("sliding", "csa", "hca"):
      if f"attention_{kind}/shard_map/" in c.source:
        seen[kind][c.op].add((c.result_bytes, c.group))
  halo = cfg.window - 1  # the CSA window (4) is inside the band's 127 tokens
  for e in plan_context.exchanges(cfg, T, 8):
    kind = e.kind.split()[0].lower()
    # x's halo, and where XLA does not recompute them, the halo's int32 positions or documents
    assert seen[kind]["collective-permute"] - {(halo * 4, 2)} == {(e.neighbour, 2)}, kind
    assert seen[kind]["all-gather"] == {(b, 8) for b in (e.entries, e.index_keys) if b}, kind


def test_combined_async_collectives_are_listed_per_array():
  """XLA:GPU combines collectives: one all-gather-start of two arrays (operands, then results)
  is two entries; a collective-permute-start's trailing u32[] contexts are not arrays."""
  from deepseek_v4.aot import collectives

  text = ("HloModule m, num_partitions=8\n\nENTRY %main (a: f32[4,8]) -> f32[32,8] {\n"
          "  %s = (f32[4,8]{1,0}, bf16[2,16]{1,0}, f32[32,8]{1,0}, bf16[16,16]{1,0}) "
          "all-gather-start(%a, %b), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}\n"
          "  %p = (f32[3,8]{1,0}, f32[3,8]{1,0}, u32[], u32[]) collective-permute-start(%a), "
          "source_target_pairs={{0,1}}\n}")
  found = collectives.collectives(text)
  assert [(c.op, c.result_bytes, c.operand_bytes) for c in found] == [
    ("all-gather", 32 * 8 * 4, 4 * 8 * 4), ("all-gather", 16 * 16 * 2, 2 * 16 * 2),
    ("collective-permute", 3 * 8 * 4, 3 * 8 * 4)]


def test_prefill_program_refuses_unknown_param_layouts():
  from deepseek_v4 import sharding
  from deepseek_v4.aot import long_context

  mesh = sharding.make_mesh(context=8, devices=jax.devices()[:8])
  with pytest.raises(ValueError, match=r"param_layouts='rowmajor'; expected one of"):
    long_context.prefill_program(None, {}, mesh, "fsdp", (1, 64), options=None,
                                 param_layouts="rowmajor")


def test_compile_long_refuses_a_chunk_without_its_program():
  from deepseek_v4.aot import long_context

  cfg = deepseek_v4.tiny()
  with pytest.raises(ValueError, match="chunk=64: the chunk length goes with"):
    long_context.compile_long(cfg, "h200", dict(context=8), "fsdp", "prefill", 256, chunk=64)
  with pytest.raises(ValueError, match="chunk=None: the chunk length goes with"):
    long_context.compile_long(cfg, "h200", dict(context=8), "fsdp", "prefill_chunk", 256)
  with pytest.raises(ValueError, match=r"chunk=512 must be in \[1, seq=256\]"):
    long_context.compile_long(cfg, "h200", dict(context=8), "fsdp", "prefill_chunk", 256,
                              chunk=512)
