"""Time V4's attention kernels (Pallas vs the reference) at Flash and Pro shapes.

Cases per preset (Flash: 64 heads, Pro: 128 heads; head dim 512, window 128, bf16):
  csa_fwd / csa_fwd_bwd   prefill of a CSA layer (ratio 4, top-k 512 / 1024 picks per query)
  hca_fwd / hca_fwd_bwd   prefill of an HCA layer (ratio 128, every visible entry)
  indexer                 lightning-indexer scores + top-k (64 heads x 128)
  decode                  one query per row against the window ring and the CSA picks
FLOPs are exact counts over the visible (query, key) pairs: 4*N*H per pair forward (QK^T and PV),
10*N*H backward (the usual 2.5x, so TFLOP/s compare with FlashMLA / TileLang figures), 2*I*J per
(query, entry) for the indexer. Decode is memory-bound: GB/s counts the K=V rows read once per row.

On a GPU both impls run (pallas, reference); on CPU only the reference, at shapes scaled down by
--cpu-scale (the real ones take hours there). Writes a table and benchmarks/results JSON.

  PYTHONPATH=. python scripts/bench_kernels.py                       # T = 8K, 32K; decode at 128K
  PYTHONPATH=. python scripts/bench_kernels.py --seq 8192,32768,131072 --presets flash,pro
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas.indexer_topk import ops as idx_ops  # noqa: E402
from kernels_pallas.sparse_attention import ops, sources  # noqa: E402

PRESETS = {"flash": dict(N=64, P=512), "pro": dict(N=128, P=1024)}
H, W, I, J = 512, 128, 64, 128
CSA, HCA = 4, 128


def _time(f, *args, reps: int) -> float:
  """Median seconds of `reps` calls after one warm-up (compile) call."""
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _pairs(T: int, ratio: int, P: int | None, start: int = 0) -> tuple[int, int]:
  """(window pairs, entry pairs) of T queries at positions start .. start+T-1."""
  t = np.arange(start, start + T, dtype=np.int64)
  win = int(np.minimum(t + 1, W).sum())
  nvis = (t + 1) // ratio
  ent = int(np.minimum(nvis, P).sum()) if P is not None else int(nvis.sum())
  return win, ent


def _csa_idx(key, B, T, P, start=0):
  """Valid random picks: slot j < visible count gets an entry below it, the rest -1."""
  nvis = ((jnp.arange(start, start + T) + 1) // CSA)[None, :, None]
  r = jax.random.randint(key, (B, T, P), 0, 2**30) % jnp.maximum(nvis, 1)
  return jnp.where(jnp.arange(P)[None, None, :] < nvis, r, -1).astype(jnp.int32)


def prefill_cases(preset: str, T: int, impl: str, reps: int):
  N, P = PRESETS[preset]["N"], PRESETS[preset]["P"]
  k = jax.random.split(jax.random.key(0), 6)
  bf = jnp.bfloat16
  q = jax.random.normal(k[0], (1, T, N, H), bf)
  kv = jax.random.normal(k[1], (1, T, H), bf)
  sink = jnp.zeros((N,), jnp.float32)
  pos = jnp.arange(T, dtype=jnp.int32)[None]
  rows = []
  for kind, ratio in (("csa", CSA), ("hca", HCA)):
    comp = jax.random.normal(k[2], (1, T // ratio, H), bf)
    idx = _csa_idx(k[3], 1, T, P) if kind == "csa" else None
    def fwd(q, kv, c, i, ratio=ratio):
      entries = sources.VisibleEntries(c, ratio) if i is None else sources.PickedEntries(c, i)
      keys = sources.KeySources(sources.Band(kv, W), entries=entries)
      return ops.sparse_attention(q, pos, sink, keys, scale=H**-0.5, block=256, impl=impl)

    fwd = jax.jit(fwd)
    loss = lambda q, kv, c, i: jnp.sum(fwd(q, kv, c, i).astype(jnp.float32))
    fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    win, ent = _pairs(T, ratio, P if kind == "csa" else None)
    flops = 4 * N * H * (win + ent)
    for name, f, fl in ((f"{kind}_fwd", fwd, flops), (f"{kind}_fwd_bwd", fb, flops * 14 // 4)):
      rows.append(_row(preset, name, T, impl, lambda f=f: _time(f, q, kv, comp, idx, reps=reps),
                       fl, None))
  # Indexer: scores against T/4 entries and top-k.
  iq = jax.random.normal(k[4], (1, T, I, J), bf)
  iw = jax.random.normal(k[5], (1, T, I), bf)
  ik = jax.random.normal(k[2], (1, T // CSA, J), bf)
  sel = jax.jit(lambda iq, iw, ik: idx_ops.indexer_topk(iq, iw, ik, pos, ratio=CSA, topk=P,
                                                        block=256, impl=impl))
  _, ent = _pairs(T, CSA, None)
  rows.append(_row(preset, "indexer", T, impl, lambda: _time(sel, iq, iw, ik, reps=reps),
                   2 * I * J * ent, None))
  return rows


def decode_case(preset: str, B: int, ctx: int, impl: str, reps: int):
  N, P = PRESETS[preset]["N"], PRESETS[preset]["P"]
  k = jax.random.split(jax.random.key(1), 5)
  bf = jnp.bfloat16
  q = jax.random.normal(k[0], (B, 1, N, H), bf)
  kv = jax.random.normal(k[1], (B, 1, H), bf)
  ring = jax.random.normal(k[2], (B, W, H), bf)
  ring_pos = jnp.broadcast_to(ctx - W + jnp.arange(W, dtype=jnp.int32), (B, W))
  comp = jax.random.normal(k[3], (B, ctx // CSA, H), bf)
  idx = _csa_idx(k[4], B, 1, P, start=ctx)
  pos = jnp.full((B, 1), ctx, jnp.int32)
  sink = jnp.zeros((N,), jnp.float32)
  f = jax.jit(lambda q, kv, ring, comp, idx: ops.sparse_attention(
    q, pos, sink, sources.KeySources(sources.Band(kv, W), ring=sources.Ring(ring, ring_pos),
                                     entries=sources.PickedEntries(comp, idx)),
    scale=H**-0.5, block=1, impl=impl))
  keys = W + min(P, (ctx + 1) // CSA)  # ring (W - 1 in window) + own token + picks, ~ W + P
  flops = 4 * N * H * keys * B
  nbytes = B * (keys * H * 2 + 2 * N * H * 2)  # K=V rows read + q read + out written
  return _row(preset, f"decode_b{B}", ctx, impl,
              lambda: _time(f, q, kv, ring, comp, idx, reps=reps), flops, nbytes)


def _row(preset, case, T, impl, timer, flops, nbytes):
  row = dict(preset=preset, case=case, T=T, impl=impl, flops=flops)
  try:
    s = timer()
    row.update(ms=s * 1e3, tflops=flops / s / 1e12)
    if nbytes:
      row["gbps"] = nbytes / s / 1e9
  except Exception as e:  # one failed case (OOM, missing backend) must not end the run
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  print(_fmt(row), flush=True)
  return row


def _fmt(r) -> str:
  if "error" in r:
    return f"{r['preset']:6} {r['case']:14} {r['T']:>7} {r['impl']:10} ERROR {r['error']}"
  bw = f"{r['gbps']:8.1f} GB/s" if "gbps" in r else ""
  return (f"{r['preset']:6} {r['case']:14} {r['T']:>7} {r['impl']:10} {r['ms']:10.3f} ms "
          f"{r['tflops']:9.4f} TFLOP/s {bw}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--presets", default="flash,pro")
  p.add_argument("--seq", default="8192,32768", help="prefill lengths")
  p.add_argument("--decode-ctx", type=int, default=131072)
  p.add_argument("--decode-batch", default="1,32")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--impls", default=None, help="default: pallas,reference on GPU; reference on CPU")
  p.add_argument("--cpu-scale", type=int, default=64, help="divide T and context by this on CPU")
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  dev = jax.devices()[0]
  on_cpu = dev.platform == "cpu"
  impls = a.impls.split(",") if a.impls else (["reference"] if on_cpu else ["pallas", "reference"])
  scale = a.cpu_scale if on_cpu else 1
  seqs = [max(int(s) // scale, 256) for s in a.seq.split(",")]
  ctx = max(a.decode_ctx // scale, 1024)
  print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); impls {impls}"
        + (f"; CPU: shapes / {scale}" if on_cpu else ""), flush=True)
  out = a.out or os.path.join(REPO, "benchmarks", "results", f"bench_kernels_{dev.platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  meta = dict(jax=jax.__version__, device=dev.device_kind, platform=dev.platform,
              python=platform.python_version(), scale=scale, time=time.strftime("%F %T"))
  rows = []
  for preset in a.presets.split(","):
    for impl in impls:
      for T in seqs:
        rows += prefill_cases(preset, T, impl, a.reps)
      for B in (int(b) for b in a.decode_batch.split(",")):
        rows.append(decode_case(preset, B, ctx, impl, a.reps))
      with open(out, "w") as f:  # after every (preset, impl): a killed run keeps its rows
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  main()
