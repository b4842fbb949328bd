"""DeepSeek-V4's optimizer (docs/architecture.md#optimizer; report §2.4): Muon for matrices, AdamW
for the rest.

Muon, per logically independent matrix `W` (n x m), step t:

  M_t = mu M_{t-1} + G_t                       (heavy-ball momentum, no EMA damping)
  X   = mu M_t + G_t                           (Nesterov)
  O   = HybridNewtonSchulz(X) * sqrt(max(n, m)) * gamma
  W  <- W (1 - lr wd) - lr O

HybridNewtonSchulz runs 8 quintic steps with (3.4445, -4.7750, 2.0315), which push every singular
value quickly into ~[0.7, 1.2], then 2 steps with (2, -1.5, 0.5), whose fixed point 1 has zero
slope and so pins the singular values at 1. The rescaling gives the update an RMS of gamma = 0.18,
matching AdamW's typical update RMS so one learning rate serves both groups.

What differs from `optax.contrib.muon` (so it is written here rather than reused):
  * momentum: optax keeps an EMA `(1-b) sum b^k g` with bias correction; DeepSeek keeps the plain
    sum. Without Nesterov the two differ only by a positive scalar, which the Frobenius
    normalization removes, so the updates coincide; with Nesterov they coincide at step 1 and
    differ later by the bias-correction weights (see tests/test_optim.py).
  * logical blocks: a fused weight (the mHC `hc_*_fn` = [W^pre; W^post; W^res] with unequal row
    counts, the CSA compressor's two series, the output projection's groups, stacked experts) is
    orthogonalized block by block, each block with its own sqrt(max(n, m)) factor.
  * optax's Newton-Schulz helpers are private; ours is the ten-line function below.

Everything is an optax `GradientTransformation` with a `NamedTuple` state; `deepseek_optimizer`
composes them with `optax.partition` (labels from parameter paths) and `optax.chain`.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import kernels_pallas.common as kernel_common
from deepseek_v4 import layout
from deepseek_v4.layout import path_name
from deepseek_v4.config import ModelConfig

# 8 fast quintic steps, then 2 steps that converge to singular value 1
# (docs/architecture.md#optimizer).
HYBRID_NS_COEFFS: tuple[tuple[float, float, float], ...] = (
  ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
)

MUON, ADAMW = "muon", "adamw"


# ----- Newton-Schulz ------------------------------------------------------------------------------
# Bytes of matrices per Newton-Schulz loop step on CPU (see `ns_chunk`).
_CPU_NS_BYTES = 1 << 20


def ns_chunk(count: int, rows: int, cols: int, itemsize: int = 4) -> int:
  """Matrices per step when Newton-Schulz iterates a stack of `count` [rows, cols] matrices.

  Elsewhere the whole stack is one batched call. On CPU it runs `chunk` matrices at a time (the
  largest divisor of `count` whose matrices fit in `_CPU_NS_BYTES`), so every iteration's matmuls
  work in cache: at 768 x [128, 256] (the 64-expert training config's expert stack) one batched
  call ran at 106-111 GFLOP/s and chunks of 1-16 matrices at 188-204 (2 CPU cores); at
  256 x [256, 512], 201 -> 363-395. Each matrix is computed alone either way: the results were
  bit-identical.
  """
  if kernel_common.platform() != "cpu" or count <= 1:
    return max(count, 1)
  fit = max(1, _CPU_NS_BYTES // max(1, rows * cols * itemsize))
  return max(d for d in range(1, min(count, fit) + 1) if count % d == 0)


def newton_schulz(x: jax.Array, coeffs: Sequence[tuple[float, float, float]] = HYBRID_NS_COEFFS,
                  eps: float = 1e-7, chunk: int | None = None) -> jax.Array:
  """Approximately orthogonalizes the last two axes of `x` (leading axes: independent matrices).

  `M_0 = X / ||X||_F`, then `M_k = a M + b (M M^T) M + c (M M^T)^2 M` per coefficient row. A tall
  matrix is iterated as its transpose so that `M M^T` is the smaller Gram matrix (same result).
  `chunk`: matrices per loop step (a divisor of their count); None = `ns_chunk`'s choice.
  """
  lead, (rows, cols) = x.shape[:-2], x.shape[-2:]
  count = math.prod(lead)
  chunk = ns_chunk(count, rows, cols, x.dtype.itemsize) if chunk is None else chunk
  if count and not (isinstance(chunk, int) and chunk >= 1 and count % chunk == 0):
    raise ValueError(f"newton_schulz: chunk={chunk!r} must be a positive divisor of the "
                     f"{count} matrices of a {x.shape} stack")
  if count and chunk < count:
    stack = x.reshape(count // chunk, chunk, rows, cols)
    return jax.lax.map(lambda m: newton_schulz(m, coeffs, eps, chunk), stack).reshape(x.shape)
  tall = rows > cols
  m = jnp.swapaxes(x, -1, -2) if tall else x
  norm = jnp.sqrt(jnp.sum(jnp.square(m.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
  m = m / (norm + eps).astype(m.dtype)

  def step(m, abc):  # a scan, not a Python loop: one small HLO body however many iterations
    a, b, c = abc[0], abc[1], abc[2]
    gram = m @ jnp.swapaxes(m, -1, -2)  # [..., n, n] with n = min(rows, cols)
    return a * m + (b * gram + c * gram @ gram) @ m, None

  m, _ = jax.lax.scan(step, m, jnp.asarray(coeffs, m.dtype))
  return jnp.swapaxes(m, -1, -2) if tall else m


class MatrixBlocks(NamedTuple):
  """How one Muon parameter `[..., rows, cols]` splits into logically independent matrices.

  Leading axes (e.g. the expert axis of `[E, F, D]`) always index separate matrices. `row_blocks`
  further cuts the rows into consecutive blocks (sizes summing to `rows`); empty = one block.
  This is the role `optax.contrib.MuonDimensionNumbers` plays for plain batch axes.
  """

  row_blocks: tuple[int, ...] = ()


def split_blocks(x: jax.Array, blocks: MatrixBlocks) -> list[jax.Array]:
  """The independent matrices of `x` as stacks `[..., n, cols]` (one stack per row-block size).

  The leading axes stay as they are (not flattened): a stacked, expert-sharded `[layers, E, n, m]`
  keeps its sharding, where flattening `layers x E` made XLA replicate the whole stack.
  """
  rows, cols = x.shape[-2:]
  sizes = blocks.row_blocks or (rows,)
  if sum(sizes) != rows:
    raise ValueError(f"row_blocks={sizes} do not sum to the {rows} rows of a {x.shape} parameter")
  if len(sizes) == 1:
    return [x]
  if len(set(sizes)) == 1:  # equal blocks: a reshape
    return [x.reshape(*x.shape[:-2], len(sizes), sizes[0], cols)]
  return jnp.split(x, list(itertools.accumulate(sizes[:-1])), axis=-2)


def merge_blocks(parts: list[jax.Array], like: jax.Array, blocks: MatrixBlocks) -> jax.Array:
  """Inverse of `split_blocks`."""
  rows, cols = like.shape[-2:]
  sizes = blocks.row_blocks or (rows,)
  if len(set(sizes)) == 1:
    return parts[0].reshape(like.shape)
  lead = like.shape[:-2]
  return jnp.concatenate([p.reshape(*lead, p.shape[-2], cols) for p in parts], axis=-2)


def orthogonalize_many(mats: list[jax.Array], *, rms_scale: float, coeffs=HYBRID_NS_COEFFS,
                       eps: float = 1e-7, ns_dtype=None) -> list[jax.Array]:
  """Newton-Schulz on stacks of matrices `[..., n, m]`, each scaled by `sqrt(max(n, m)) rms_scale`.

  Stacks of the same (n, m) up to transposition are concatenated and orthogonalized in one batched
  call: a model has a few dozen Muon tensors but only a handful of distinct matrix shapes, and this
  keeps both the compiled program and the matmul count small. Not on GPU/TPU: there the stacks are
  sharded (experts over `expert`), and a concatenation (or a flattening of `layers x E`) along the
  sharded axis is replicated: each device orthogonalized every matrix of the model (2-layer Flash
  training step over 8 H200s: [2313, 2048, 2048] Gram stacks, 65.3 GB of temporaries; 25.1 GB
  with each stack alone, unflattened; docs/plan.md). Every matrix is computed alone either way.
  """
  together = kernel_common.platform() == "cpu"
  groups: dict[tuple, list[int]] = {}
  prepared = []
  for i, x in enumerate(mats):
    tall = x.shape[-2] > x.shape[-1]
    y = jnp.swapaxes(x, -1, -2) if tall else x  # wide: [k, small, large]
    y = y.astype(ns_dtype) if ns_dtype is not None else y
    prepared.append((y, tall))
    groups.setdefault((y.shape[-2:], y.dtype if together else i), []).append(i)
  out: list[jax.Array | None] = [None] * len(mats)
  for (shape, _), members in groups.items():
    if together:
      flat = [prepared[i][0].reshape(-1, *shape) for i in members]
      ortho = newton_schulz(jnp.concatenate(flat, axis=0), coeffs, eps)
      offsets = itertools.accumulate([f.shape[0] for f in flat][:-1])
      pieces = [p.reshape(prepared[i][0].shape)
                for i, p in zip(members, jnp.split(ortho, list(offsets), axis=0))]
    else:
      pieces = [newton_schulz(prepared[members[0]][0], coeffs, eps)]
    for i, piece in zip(members, pieces):
      piece = piece * (math.sqrt(max(shape)) * rms_scale)
      y = jnp.swapaxes(piece, -1, -2) if prepared[i][1] else piece
      out[i] = y.astype(mats[i].dtype)
  return out


def orthogonalize(x: jax.Array, blocks: MatrixBlocks = MatrixBlocks(), *, rms_scale: float,
                  coeffs=HYBRID_NS_COEFFS, eps: float = 1e-7, ns_dtype=None) -> jax.Array:
  """Newton-Schulz per logical block of one parameter, each rescaled by sqrt(max(n, m)) gamma."""
  parts = orthogonalize_many(split_blocks(x, blocks), rms_scale=rms_scale, coeffs=coeffs, eps=eps,
                             ns_dtype=ns_dtype)
  return merge_blocks(parts, x, blocks)


# ----- the Muon transformation --------------------------------------------------------------------
class DeepSeekMuonState(NamedTuple):
  """Momentum buffer `M` (one per Muon parameter)."""

  momentum: optax.Updates


BlocksFn = Callable[[str, tuple[int, ...]], MatrixBlocks]


def scale_by_deepseek_muon(blocks_fn: BlocksFn | None = None, *, momentum: float = 0.95,
                           nesterov: bool = True, rms_scale: float = 0.18,
                           coeffs=HYBRID_NS_COEFFS, eps: float = 1e-7, mu_dtype=None,
                           ns_dtype=None) -> optax.GradientTransformation:
  """Momentum, Nesterov, hybrid Newton-Schulz and RMS rescaling (no learning rate, no decay).

  Args:
    blocks_fn: `(path name, shape) -> MatrixBlocks` for each parameter; None = one matrix per
      trailing 2-D slice.
    momentum: mu (0.95).
    nesterov: use `mu M_t + G_t` instead of `M_t`.
    rms_scale: gamma (0.18); the update of an n x m block is scaled by `sqrt(max(n, m)) gamma`.
    coeffs: Newton-Schulz coefficient rows, one per iteration.
    eps: added to the Frobenius norm before the first iteration.
    mu_dtype: dtype of the momentum buffer (default: the parameter's).
    ns_dtype: dtype of the Newton-Schulz matmuls (default: the gradient's; bf16 is stable).
  """
  blocks_fn = blocks_fn or (lambda name, shape: MatrixBlocks())

  def init_fn(params):
    return DeepSeekMuonState(optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    new_m = jax.tree.map(lambda m, g: (momentum * m + g).astype(m.dtype), state.momentum, updates)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    moms = treedef.flatten_up_to(new_m)
    specs, mats, counts = [], [], []
    for (path, g), m in zip(flat, moms):
      if g.ndim < 2:
        raise ValueError(f"Muon got a {g.ndim}-D parameter {path_name(path)}; label it adamw")
      x = momentum * m.astype(g.dtype) + g if nesterov else m.astype(g.dtype)
      spec = blocks_fn(path_name(path), g.shape)
      parts = split_blocks(x, spec)
      specs.append(spec)
      counts.append(len(parts))
      mats.extend(parts)
    ortho = orthogonalize_many(mats, rms_scale=rms_scale, coeffs=coeffs, eps=eps,
                               ns_dtype=ns_dtype)
    out, pos = [], 0
    for (_, g), spec, n in zip(flat, specs, counts):
      out.append(merge_blocks(ortho[pos:pos + n], g, spec).astype(g.dtype))
      pos += n
    return jax.tree_util.tree_unflatten(treedef, out), DeepSeekMuonState(new_m)

  return optax.GradientTransformation(init_fn, update_fn)


def deepseek_muon(learning_rate: optax.ScalarOrSchedule, blocks_fn: BlocksFn | None = None, *,
                  momentum: float = 0.95, nesterov: bool = True, rms_scale: float = 0.18,
                  weight_decay: float = 0.1, coeffs=HYBRID_NS_COEFFS, eps: float = 1e-7,
                  mu_dtype=None, ns_dtype=None) -> optax.GradientTransformation:
  """Muon with decoupled weight decay: `W <- W (1 - lr wd) - lr O` (docs/architecture.md#optimizer
  step 5)."""
  return optax.chain(
    scale_by_deepseek_muon(blocks_fn, momentum=momentum, nesterov=nesterov, rms_scale=rms_scale,
                           coeffs=coeffs, eps=eps, mu_dtype=mu_dtype, ns_dtype=ns_dtype),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )


# ----- parameter groups ---------------------------------------------------------------------------
# AdamW groups of docs/architecture.md#optimizer (plus the tensors the report leaves unnamed,
# resolved as AdamW for every 1-D or bias-like tensor). Everything else is a matrix: Muon.
ADAMW_RULES: tuple[tuple[str, str], ...] = (
  (r"(^|\.)embed\.weight$", "embedding"),
  (r"(^|\.)head\.weight$", "LM head (prediction head)"),
  (r"(^|\.)(\w*norm)\.weight$", "RMSNorm weight"),
  (r"(^|\.)hc_\w+_base$", "mHC static bias"),
  (r"(^|\.)hc_\w+_scale$", "mHC gating factor"),
  (r"(^|\.)attn_sink$", "attention sink (1-D; UNVERIFIED group)"),
  (r"(^|\.)ape$", "compressor positional bias (bias-like; UNVERIFIED group)"),
  (r"(^|\.)lora_[ab]$", "LoRA adapter (fine-tuning)"),
)


def param_group(name: str, ndim: int) -> tuple[str, str]:
  """(optimizer label, reason) of one parameter by its dotted path name."""
  for pattern, why in ADAMW_RULES:
    if re.search(pattern, name):
      return ADAMW, why
  if ndim < 2:
    raise ValueError(f"parameter {name!r} is {ndim}-D and matches no AdamW rule; add one to "
                     "ADAMW_RULES (Muon needs matrices)")
  return MUON, "matrix"


def matrix_blocks(cfg: ModelConfig) -> BlocksFn:
  """`(name, shape) -> MatrixBlocks`: the logically independent matrices of each Muon parameter.

  * `hc_{attn,ffn}_fn` [(2+M)M, M D] = [W^pre (M rows); W^post (M rows); W^res (M^2 rows)];
  * `attn.wo_a` [G d_g, N H / G]: one block per output group;
  * a layer's own attention parameters: what its kind's `muon_blocks` answers (CSA's
    compressors, main and indexer, `wkv`/`wgate` [2 c, D]: series A and series B);
  * stacked experts [E, ., .]: each expert is its own matrix (leading axis);
  * everything else: one matrix.
  """
  M = cfg.hc_mult

  def fn(name: str, shape: tuple[int, ...]) -> MatrixBlocks:
    if re.search(r"(^|\.)hc_(attn|ffn)_fn$", name):
      return MatrixBlocks((M, M, M * M))
    if name.endswith("attn.wo_a.weight"):
      return MatrixBlocks((cfg.o_lora_rank,) * cfg.o_groups)
    attn = layout.attention_param(cfg, name)
    if attn is not None:  # the layer's kind knows its own parameters' blocks
      kind, rest = attn
      blocks = kind.muon_blocks(cfg, rest, shape)
      if blocks is not None:
        return MatrixBlocks(tuple(blocks))
    return MatrixBlocks()

  return fn


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_labels(params) -> object:
  """The label tree ('muon' / 'adamw') of a parameter tree (nnx.State or plain pytree)."""
  return jax.tree_util.tree_map_with_path(
    lambda p, x: param_group(path_name(p), len(x.shape))[0], params, is_leaf=_is_var)


def describe(model_or_state, cfg: ModelConfig | None = None, wrt=nnx.Param) -> list[dict]:
  """Which optimizer each parameter gets: rows of {name, shape, optimizer, reason, blocks}.

  `blocks` lists the shapes of the independent matrices Muon orthogonalizes separately.
  """
  state, scan_layers = model_or_state, True
  if isinstance(model_or_state, nnx.Module):
    cfg = cfg or model_or_state.cfg
    options = getattr(model_or_state, "options", None)
    scan_layers = True if options is None else options.scan_layers
    state = nnx.state(model_or_state, wrt)
  blocks_fn = matrix_blocks(cfg) if cfg is not None else (lambda n, s: MatrixBlocks())
  rows = []
  for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]:
    # Official per-layer names (`layers.7.attn.wq_a.weight`): a stack of scanned layers is one
    # tensor but one row per layer, each orthogonalized on its own (the stacked axis is a batch).
    for name, r in layout.official(cfg, path, scan_layers):
      shape = tuple(var.shape)[r is not None:]
      label, why = param_group(name, len(shape))
      blocks = []
      if label == MUON:
        sizes = blocks_fn(name, shape).row_blocks or (shape[-2],)
        count = math.prod(shape[:-2])
        blocks = [(count, (n, shape[-1])) for n in sizes]
      rows.append(dict(name=name, shape=shape, optimizer=label, reason=why, blocks=blocks))
  return rows


def format_groups(rows: list[dict]) -> str:
  """A printable table of `describe` rows."""
  lines = []
  for r in rows:
    blocks = ", ".join(f"{c}x{s[0]}x{s[1]}" if c > 1 else f"{s[0]}x{s[1]}" for c, s in r["blocks"])
    lines.append(f"{r['name']:<52} {str(r['shape']):<16} {r['optimizer']:<6} "
                 f"{blocks or r['reason']}")
  return "\n".join(lines)


def deepseek_optimizer(learning_rate: optax.ScalarOrSchedule, cfg: ModelConfig, *,
                       muon_momentum: float = 0.95, muon_rms_scale: float = 0.18,
                       muon_weight_decay: float = 0.1, adam_b1: float = 0.9,
                       adam_b2: float = 0.95, adam_eps: float = 1e-20,
                       adam_weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                       mu_dtype=None, ns_dtype=None) -> optax.GradientTransformation:
  """DeepSeek-V4's hybrid optimizer: global-norm clipping, then Muon or AdamW by label (§7.1).

  Both groups share one learning rate (Muon's RMS rescaling makes that possible).
  """
  muon_tx = deepseek_muon(learning_rate, matrix_blocks(cfg), momentum=muon_momentum,
                          rms_scale=muon_rms_scale, weight_decay=muon_weight_decay,
                          mu_dtype=mu_dtype, ns_dtype=ns_dtype)
  adam_tx = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                        weight_decay=adam_weight_decay, mu_dtype=mu_dtype)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.partition({MUON: muon_tx, ADAMW: adam_tx}, param_labels))
  return optax.chain(*parts)


def adamw_optimizer(learning_rate: optax.ScalarOrSchedule, *, adam_b1: float = 0.9,
                    adam_b2: float = 0.95, adam_eps: float = 1e-20,
                    adam_weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                    mu_dtype=None) -> optax.GradientTransformation:
  """The AdamW baseline (TrainConfig.optimizer="adamw"): global-norm clipping, then AdamW with
  decoupled weight decay on every parameter, matrices included (the usual pre-Muon recipe)."""
  adam_tx = optax.adamw(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps,
                        weight_decay=adam_weight_decay, mu_dtype=mu_dtype)
  return optax.chain(*([optax.clip_by_global_norm(clip_norm)] if clip_norm else []), adam_tx)
