"""MoE speed on CPU: the grouped matmul alone and one MoE layer, forward and forward+backward.

For each expert count E (default 8, 64, 256; top-2 of 8, top-6 of 64 and 256 as Flash routes),
at Flash's shape scaled down to fit this machine (d_model 256, expert width 128 by default):

  op:    one grouped matmul of T*k expert-sorted rows [T*k, D] x [E, D, F]:
           tiled       kernels_pallas/moe_gmm (impl="tiled": one matmul per row tile, custom VJP)
           ragged_dot  jax.lax.ragged_dot (XLA:CPU: a masked product over every expert; skipped
                       when E*M*K*N is over --ragged-limit, it would take minutes)
           dense       every expert on every row, then the row's own expert picked
  layer: one learned-routing MoE (router, top-k, routed experts, shared expert):
           ours        deepseek_v4.layers.moe.MoE (MoEImpl(gmm="auto"), the tiled path here)
           dense       the same layer with every expert applied to every token (weights 0 for
                       unselected experts): the all-experts product the issue compares against
           hf          transformers' DeepseekV4SparseMoeBlock (PyTorch) with the same weights, with
                       its default experts loop ("eager") and its "grouped_mm" backend; the
                       faster one is the baseline
The forward+backward step differentiates sum(y * probe) with respect to the input and every
weight. Each case is timed `--repeats` times after warm-up and the median kept (the layer cases
also keep the minimum); ours and transformers alternate. The machine may be shared: timings are
noisy. Prints a table and writes benchmarks/results/bench_moe.json.

  python scripts/bench_moe.py [--experts 8,64,256] [--tokens 2048] [--d-model 256] [--ffn 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks", "results", "bench_moe.json")


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    fn()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def topk_for(E: int) -> int:
  return 2 if E <= 8 else 6


# ----- the op alone ------------------------------------------------------------------------------
def bench_op(E, k, T, D, F, repeats, ragged_limit, seed=0):
  import jax
  import jax.numpy as jnp

  from kernels_pallas.moe_gmm import ops

  M = T * k
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((E, D, F)) / np.sqrt(D), jnp.float32)
  sizes = jnp.asarray(np.bincount(rng.integers(0, E, M), minlength=E), jnp.int32)
  probe = jnp.asarray(rng.standard_normal((M, F)), jnp.float32)

  def dense(x, w, sizes):
    gid = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(M), side="right"), E - 1)
    y = jnp.einsum("MD,EDF->EMF", x, w)  # every expert on every row
    return jnp.take_along_axis(y, gid[None, :, None], 0)[0]

  fns = {
    "tiled": lambda x, w, s: ops.grouped_matmul(x, w, s, impl="tiled"),
    "ragged_dot": lambda x, w, s: ops.grouped_matmul(x, w, s, impl="ragged_dot"),
    "dense": dense,
  }
  out = {}
  for name, f in fns.items():
    if name == "ragged_dot" and E * M * D * F > ragged_limit:
      out[name] = None
      continue
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w, sizes) * probe), argnums=(0, 1)))
    out[name] = {
      "forward_s": median_time(lambda: jax.block_until_ready(fwd(x, w, sizes)), repeats),
      "forward_backward_s": median_time(lambda: jax.block_until_ready(grad(x, w)), repeats),
    }
  return dict(M=M, K=D, N=F, E=E, results=out)


# ----- one MoE layer -----------------------------------------------------------------------------
def build_layer(E, k, D, F, seed=0):
  """Our MoE (learned routing) with random weights, and the same weights as numpy arrays."""
  import jax.numpy as jnp
  from flax import nnx

  import deepseek_v4
  from deepseek_v4.layers import moe

  cfg = deepseek_v4.tiny(d_model=D, moe_inter_dim=F, num_experts=E, experts_per_token=k)
  layer = moe.MoE(cfg, hashed=False, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(layer)):
    shape = var.shape
    v = 0.1 * rng.standard_normal(shape) if len(shape) == 1 else (
      rng.standard_normal(shape) / np.sqrt(shape[-1]))
    var.set_value(jnp.asarray(v, var.dtype))
  return cfg, layer


def hf_layer(cfg, layer, backend: str | None):
  import torch
  from transformers import DeepseekV4Config
  from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

  from deepseek_v4.config_hf import fields_to_hf

  hc = DeepseekV4Config(**fields_to_hf(cfg))
  hc._experts_implementation = backend
  learned = hc.mlp_layer_types.index("moe")
  block = DeepseekV4SparseMoeBlock(hc, learned).float()
  t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731
  e, sh = layer.experts, layer.shared_experts
  with torch.no_grad():
    block.gate.weight.copy_(t(layer.gate.weight[...]))
    block.gate.e_score_correction_bias.copy_(t(layer.gate.bias[...]))
    block.experts.gate_up_proj.copy_(torch.cat([t(e.w1[...]), t(e.w3[...])], dim=1))
    block.experts.down_proj.copy_(t(e.w2[...]))
    block.shared_experts.gate_proj.weight.copy_(t(sh.w1.weight[...]))
    block.shared_experts.up_proj.weight.copy_(t(sh.w3.weight[...]))
    block.shared_experts.down_proj.weight.copy_(t(sh.w2.weight[...]))
  return block


def dense_moe(layer, x):
  """The same layer with every expert on every token (unselected experts weigh 0)."""
  import jax.numpy as jnp

  from deepseek_v4.layers import moe

  B, T, D = x.shape
  flat = x.reshape(B * T, D)
  scores, idx, w = layer.route(flat, jnp.zeros((B * T,), jnp.int32))
  E = scores.shape[1]
  dense_w = jnp.zeros((B * T, E), jnp.float32).at[jnp.arange(B * T)[:, None], idx].set(w)
  e = layer.experts
  g = jnp.einsum("TD,EFD->ETF", flat, e.w1[...])
  v = jnp.einsum("TD,EFD->ETF", flat, e.w3[...])
  h = moe.swiglu(g, v, layer.cfg.swiglu_limit) * dense_w.T[:, :, None]
  y = jnp.einsum("ETF,EDF->TD", h, e.w2[...])
  y = y + layer.shared_experts(flat, layer.cfg.swiglu_limit)
  return y.reshape(B, T, D)


def bench_layer(E, k, T, D, F, repeats, seed=0):
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  cfg, layer = build_layer(E, k, D, F, seed)
  rng = np.random.default_rng(seed + 1)
  x_np = rng.standard_normal((1, T, D)).astype(np.float32)
  probe_np = rng.standard_normal((1, T, D)).astype(np.float32)
  x, probe = jnp.asarray(x_np), jnp.asarray(probe_np)
  ids = jnp.zeros((1, T), jnp.int32)

  # Pure functions of (state, x) under jax.jit: no per-call module traversal in the timing.
  graphdef, state = nnx.split(layer)
  ours_f = lambda st, x: nnx.merge(graphdef, st)(x, ids)[0]  # noqa: E731
  dense_f = lambda st, x: dense_moe(nnx.merge(graphdef, st), x)  # noqa: E731

  def step(f):
    return jax.jit(jax.grad(lambda st, x: jnp.sum(f(st, x) * probe), argnums=(0, 1)))

  ours_fwd, dense_fwd = jax.jit(ours_f), jax.jit(dense_f)
  ours_grad, dense_grad = step(ours_f), step(dense_f)
  y_ours = np.asarray(ours_fwd(state, x))
  y_dense = np.asarray(dense_fwd(state, x))

  def jax_case(fn):
    return lambda: jax.block_until_ready(fn(state, x))

  res = {}
  hf = {}
  for backend in ("eager", "grouped_mm"):
    try:
      block = hf_layer(cfg, layer, None if backend == "eager" else backend)
      tx = torch.as_tensor(x_np)
      with torch.no_grad():
        y_hf = block(tx).numpy()
    except Exception as err:  # a backend this torch build lacks
      hf[backend] = {"error": f"{type(err).__name__}: {err}"[:200]}
      continue
    tp = torch.as_tensor(probe_np)

    def hf_fwd(block=block, tx=tx):
      with torch.no_grad():
        block(tx)

    def hf_step(block=block):
      xg = torch.as_tensor(x_np).requires_grad_(True)
      block.zero_grad(set_to_none=True)
      (block(xg) * tp).sum().backward()

    err = float(np.max(np.abs(y_hf - y_ours)) / np.max(np.abs(y_hf)))
    hf[backend] = {"rel_err_vs_ours": err, "fwd": hf_fwd, "step": hf_step}
  # Alternate ours and transformers so a busy machine slows both alike.
  times: dict[str, dict[str, list[float]]] = {}
  cases = {"ours": (jax_case(ours_fwd), jax_case(ours_grad)),
           "dense": (jax_case(dense_fwd), jax_case(dense_grad))}
  for b, h in hf.items():
    if "fwd" in h:
      cases[f"hf_{b}"] = (h["fwd"], h["step"])
  for name, (f, s) in cases.items():  # warm up (compiles)
    f(), s()
  for _ in range(repeats):
    for name, (f, s) in cases.items():
      t = times.setdefault(name, {"forward_s": [], "forward_backward_s": []})
      t["forward_s"].append(median_time(f, 1, 0))
      t["forward_backward_s"].append(median_time(s, 1, 0))
  for name, t in times.items():
    res[name] = {key: statistics.median(v) for key, v in t.items()}
    res[name].update({f"{key}_min": min(v) for key, v in t.items()})
  for b, h in hf.items():
    res.setdefault(f"hf_{b}", {}).update({k: v for k, v in h.items() if k in ("error",
                                                                             "rel_err_vs_ours")})
  res["dense"]["rel_err_vs_ours"] = float(np.max(np.abs(y_dense - y_ours)) /
                                          np.max(np.abs(y_ours)))
  return dict(E=E, k=k, tokens=T, d_model=D, ffn=F, results=res)


# ----- report ------------------------------------------------------------------------------------
def ms(t):
  return "-" if t is None else f"{t * 1e3:9.1f}"


def best_hf(res, key):
  ts = [r[key] for n, r in res.items() if n.startswith("hf_") and key in r]
  return min(ts) if ts else None


def print_tables(ops_out, layers_out):
  print("\nop alone: grouped matmul [T*k, D] x [E, D, F], ms (median)")
  print(f"{'E':>4} {'M':>6} | {'tiled fwd':>10} {'ragged fwd':>10} {'dense fwd':>10} | "
        f"{'tiled f+b':>10} {'ragged f+b':>10} {'dense f+b':>10}")
  for o in ops_out:
    r = o["results"]
    get = lambda n, key: None if r.get(n) is None else r[n][key]  # noqa: E731
    print(f"{o['E']:>4} {o['M']:>6} | " + " ".join(
      f"{ms(get(n, 'forward_s')):>10}" for n in ("tiled", "ragged_dot", "dense")) + " | " +
      " ".join(f"{ms(get(n, 'forward_backward_s')):>10}" for n in ("tiled", "ragged_dot",
                                                                    "dense")))
  print("\none MoE layer (router + routed + shared expert), ms (median); speedups = other / ours")
  print(f"{'E':>4} {'k':>2} | {'ours fwd':>9} {'dense':>9} {'hf best':>9} {'x hf':>6} | "
        f"{'ours f+b':>9} {'dense':>9} {'hf best':>9} {'x hf':>6} {'x dense':>7}")
  for o in layers_out:
    r = o["results"]
    of, ob = r["ours"]["forward_s"], r["ours"]["forward_backward_s"]
    hf_f, hf_b = best_hf(r, "forward_s"), best_hf(r, "forward_backward_s")
    df, db = r["dense"]["forward_s"], r["dense"]["forward_backward_s"]
    print(f"{o['E']:>4} {o['k']:>2} | {ms(of)} {ms(df)} {ms(hf_f)} {hf_f / of:6.1f} | "
          f"{ms(ob)} {ms(db)} {ms(hf_b)} {hf_b / ob:6.1f} {db / ob:7.1f}")
  print("same with the fastest of the repeats (interference on a shared machine only slows):")
  for o in layers_out:
    r = o["results"]
    ob = r["ours"]["forward_backward_s_min"]
    hb = best_hf(r, "forward_backward_s_min")
    print(f"{o['E']:>4} {o['k']:>2} | ours f+b {ms(ob)}  hf best {ms(hb)}  x hf {hb / ob:5.1f}  "
          f"x dense {r['dense']['forward_backward_s_min'] / ob:5.1f}")
  for o in layers_out:
    errs = {n: v.get("rel_err_vs_ours") for n, v in o["results"].items() if n != "ours"}
    print(f"  E={o['E']}: max rel err of the other layers' outputs vs ours: " +
          ", ".join(f"{n} {e:.1e}" for n, e in errs.items() if e is not None))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--experts", default="8,64,256")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--d-model", type=int, default=256)
  parser.add_argument("--ffn", type=int, default=128, help="expert width (Flash: 2048)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--ragged-limit", type=float, default=4e11,
                      help="skip ragged_dot (op alone) when E*M*K*N is above this")
  parser.add_argument("--skip-op", action="store_true")
  parser.add_argument("--skip-layer", action="store_true")
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)

  import jax
  import torch

  experts = [int(e) for e in args.experts.split(",")]
  T, D, F = args.tokens, args.d_model, args.ffn
  ops_out, layers_out = [], []
  for E in experts:
    k = topk_for(E)
    if not args.skip_op:
      ops_out.append(bench_op(E, k, T, D, F, args.repeats, args.ragged_limit))
      print(f"op E={E}: {json.dumps(ops_out[-1]['results'])}", flush=True)
    if not args.skip_layer:
      layers_out.append(bench_layer(E, k, T, D, F, args.repeats))
      print(f"layer E={E}: {json.dumps(layers_out[-1]['results'])}", flush=True)
  print_tables(ops_out, layers_out)
  from deepseek_v4 import hugepages

  result = dict(
    machine=dict(cpus=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
                 torch_threads=torch.get_num_threads(), backend=jax.default_backend(),
                 **hugepages.status()),
    settings=vars(args), op=ops_out, layer=layers_out)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  from deepseek_v4 import hugepages

  hugepages.reexec()  # huge pages for XLA:CPU's buffers (deepseek_v4/hugepages.py)
  raise SystemExit(main())
