"""The report of an ablation grid (see `deepseek_v4.ablate`): results.csv, results.md, curves.png.

Statistics (stated in results.md too): a variant's final validation loss is the mean ± sample
standard deviation over its seeds. Its difference to the baseline is paired by seed (seed s of
both runs saw the same batches in the same order and the same held-out documents), and the 95%
confidence interval is mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n) over the n paired seeds (Student
t); with one seed there is no interval.

Runs that diverged (`status` "diverged" in their result.json) are listed under the table and left
out of every statistic; a seed whose baseline run diverged has no paired difference.

Compute: forward FLOPs per token at the training length (`summary.flops_per_token`, mean over the
positions of a row, plus the MTP block's matmuls), and training compute ~ 3 x forward x tokens.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any

from deepseek_v4 import ablate_spec, summary
from deepseek_v4.config import ModelConfig
from deepseek_v4.train import TrainConfig

CSV_FIELDS = ("variant", "seed", "status", "steps", "tokens", "val_loss", "val_bpb",
              "train_loss", "tokens_per_s", "wall_s", "params_total", "params_active",
              "flops_per_token", "train_flops", "mtp_acceptance")


def model_costs(cfg: ModelConfig, tcfg: TrainConfig) -> dict[str, float]:
  """{params_total (with MTP), params_active (per token, without embedding, with MTP),
  flops_per_token (forward, at seq_len)} from shapes only."""
  counts = summary.count_params(cfg)
  flops = summary.flops_per_token(cfg, tcfg.seq_len, counts)
  mtp_matmul = 2.0 * sum(counts.mtp_matmul_active.values())
  return {"params_total": counts.trunk + counts.mtp,
          "params_active": counts.active_excl_embedding + sum(counts.mtp_active.values()),
          "flops_per_token": flops.total_prefill_mean + mtp_matmul}


def t_quantile(df: int, q: float = 0.975) -> float:
  """Student t quantile (scipy, a JAX dependency)."""
  from scipy import stats

  return float(stats.t.ppf(q, df))


def variant_rows(records: list[dict], variants: list[str], baseline: str) -> list[dict[str, Any]]:
  """Per variant: n, mean/std of the final validation loss, paired difference to the baseline
  with its 95% CI, mean bpb, costs and throughput (diverged runs left out)."""
  finished = [r for r in records if r.get("status", "done") == "done"]
  by = {v: {r["seed"]: r for r in finished if r["variant"] == v} for v in variants}
  base = by[baseline]
  out = []
  for v in variants:
    runs = by[v]
    if not runs:
      continue
    losses = [r["val_loss"] for r in runs.values()]
    diffs = [runs[s]["val_loss"] - base[s]["val_loss"] for s in runs if s in base]
    row = {"variant": v, "n": len(losses), "mean": statistics.fmean(losses),
           "std": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
           "bpb": statistics.fmean(r["val_bpb"] for r in runs.values()),
           "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs.values()),
           "tokens": statistics.fmean(r["tokens"] for r in runs.values()),
           "train_flops": sum(r["train_flops"] for r in runs.values()),
           "wall_s": sum(r["wall_s"] for r in runs.values())}
    accepts = [r["mtp_acceptance"] for r in runs.values() if r.get("mtp_acceptance") is not None]
    row["mtp_acceptance"] = statistics.fmean(accepts) if accepts else None
    for k in ("params_total", "params_active", "flops_per_token"):
      row[k] = next(iter(runs.values()))[k]
    row["diff"] = statistics.fmean(diffs) if diffs and v != baseline else float("nan")
    row["ci"] = (t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
                 if len(diffs) > 1 and v != baseline else float("nan"))
    out.append(row)
  return out


def _h(n: float) -> str:
  return summary.human(n).strip()


def _accept(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def format_markdown(spec, rows: list[dict], records: list[dict]) -> str:
  """results.md: the setting, the table, the method."""
  variants = dict(spec.variants)
  seeds = sorted({r["seed"] for r in records})
  tokens = rows[0]["tokens"] if rows else 0  # every finished run trains on the same tokens
  lines = [f"# Ablation: {spec.name}", ""]
  if spec.description:
    lines += [spec.description.strip(), ""]
  base_fields = {**spec.model}
  lines += [f"Base: preset `{spec.preset}`" +
            (f" with {', '.join(f'{k}={v}' for k, v in base_fields.items())}" if base_fields
             else "") +
            f"; data: {spec.data or f'the embedded demo corpus ({spec.max_bytes:,} bytes max)'}"
            f"; run settings: {', '.join(f'{k}={v}' for k, v in spec.train.items())}.",
            f"Every run: {_h(tokens)} training tokens; seeds {seeds}. Validation loss: "
            "next-token nats per token on held-out documents, at the last step.", "",
            "| variant | changes | params total | params active | FLOPs/token | tokens/s | "
            "val loss (mean ± std) | Δ vs baseline [95% CI] | val bits/byte | train compute | "
            "MTP acceptance |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    changes = ", ".join(f"{k}={v}" for k, v in variants[r["variant"]].items()) or "(base)"
    if r["variant"] == spec.baseline:
      diff = "baseline"
    elif math.isnan(r["ci"]):
      diff = f"{r['diff']:+.4f}" if not math.isnan(r["diff"]) else "n/a"
    else:
      diff = f"{r['diff']:+.4f} [{r['diff'] - r['ci']:+.4f}, {r['diff'] + r['ci']:+.4f}]"
    std = "" if math.isnan(r["std"]) else f" ± {r['std']:.4f}"
    lines.append(f"| {r['variant']} | {changes} | {_h(r['params_total'])} | "
                 f"{_h(r['params_active'])} | {_h(r['flops_per_token'])} | "
                 f"{r['tokens_per_s']:,.0f} | {r['mean']:.4f}{std} (n={r['n']}) | {diff} | "
                 f"{r['bpb']:.4f} | {_h(r['train_flops'])}FLOP, {r['wall_s']:.0f} s | "
                 f"{_accept(r.get('mtp_acceptance'))} |")
  diverged = [r for r in records if r.get("status") == "diverged"]
  if diverged:
    lines += ["", "Diverged (left out of the table and the statistics): " + "; ".join(
      f"{r['variant']} seed {r['seed']} at step {r['steps']}" for r in diverged) + "."]
  lines += ["", "Method: Δ is the mean over seeds of the paired difference (variant − baseline, "
            "same seed: same batches and held-out documents); its 95% confidence interval is "
            "mean ± t(0.975, n−1)·sd/√n over the n paired seeds (Student t). Negative Δ: lower "
            "loss than the baseline. An interval that contains 0 means no difference was "
            "resolved at this scale.",
            "Compute: FLOPs/token is the forward pass at the training length (attention "
            "included, MTP block's matmuls included); train compute ≈ 3 × FLOPs/token × tokens "
            "summed over seeds, and the wall-clock seconds of the runs (compilation and "
            "evaluation included). tokens/s is the trainer's training throughput. MTP acceptance: on "
            "the validation rows, how often the MTP block's greedy draft equals the model's "
            "next greedy token (teacher forced; docs/speculative.md), the k = 1 acceptance of "
            "speculative decoding; - without MTP.", ""]
  return "\n".join(lines)


def _curves(out_dir: str, records: list[dict]) -> dict[str, dict[int, list[tuple[float, float]]]]:
  """variant -> seed -> [(tokens, val_loss)] from each run's metrics.jsonl."""
  curves: dict[str, dict[int, list]] = {}
  for r in records:
    if r.get("status", "done") != "done":
      continue
    path = os.path.join(out_dir, r["variant"], f"seed{r['seed']}", "metrics.jsonl")
    if not os.path.exists(path):
      continue
    tokens_per_step = r["tokens"] / max(r["steps"], 1)
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    curves.setdefault(r["variant"], {})[r["seed"]] = [
      (m["step"] * tokens_per_step, m["val_loss"]) for m in rows if "val_loss" in m]
  return curves


def plot_curves(out_dir: str, records: list[dict], variants: list[str], png: str) -> bool:
  """Validation loss vs training tokens: one line (mean over seeds) per variant, a band from the
  lowest to the highest seed. False when matplotlib is missing or there is nothing to plot."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  curves = _curves(out_dir, records)
  if not curves:
    return False
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for v in variants:
    seeds = curves.get(v)
    if not seeds:
      continue
    points: dict[float, list[float]] = {}
    for pts in seeds.values():
      for t, loss in pts:
        points.setdefault(t, []).append(loss)
    ts = sorted(points)
    mean = [statistics.fmean(points[t]) for t in ts]
    line, = ax.plot(ts, mean, "o-", ms=3, label=f"{v} (n={len(seeds)})")
    if len(seeds) > 1:
      ax.fill_between(ts, [min(points[t]) for t in ts], [max(points[t]) for t in ts],
                      color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training tokens")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("held-out loss; band: min-max over seeds")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  plt.close(fig)
  return True


def markdown(spec, records: list[dict]) -> str:
  """The text of results.md for these records (nothing written)."""
  rows = variant_rows(records, [v for v, _ in spec.variants], spec.baseline)
  return format_markdown(spec, rows, records)


def write_report(out_dir: str, spec, records: list[dict]) -> list[dict]:
  """Writes results.csv, results.md and curves.png into `out_dir`; returns the variant rows."""
  variants = [v for v, _ in spec.variants]
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in records:
      w.writerow(r)
  rows = variant_rows(records, variants, spec.baseline)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(format_markdown(spec, rows, records))
  plot_curves(out_dir, records, variants, os.path.join(out_dir, "curves.png"))
  return rows


def read_results(out_dir: str) -> tuple[Any, list[dict]]:
  """(spec, run records) of a finished or partial results folder (for notebooks).

  Raises:
    ablate_spec.SpecError: spec.json or a result.json is not valid JSON (the file named).
  """

  def read(path: str) -> Any:
    try:
      with open(path) as f:
        return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ablate_spec.SpecError(f"{path}: not valid JSON ({e})") from None

  path = os.path.join(out_dir, "spec.json")
  spec = ablate_spec.parse_spec(read(path), source=path)
  records = []
  for v, _ in spec.variants:
    for s in spec.seeds:
      path = os.path.join(out_dir, v, f"seed{s}", "result.json")
      if os.path.exists(path):
        records.append(read(path))
  return spec, records
