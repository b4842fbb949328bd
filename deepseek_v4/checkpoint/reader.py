"""Stored tensors -> lazily read, dequantized tensors under hub names.

`hub_tensors(listing, dtype)` turns the stored keys of a checkpoint (hub naming, or transformers'
with `model.` prefixes, `.weight_scale_inv` scales and stacked `gate_up_proj` / `down_proj`
experts) into `{hub name: LazyTensor}`. Nothing is read yet: each `LazyTensor` knows its logical
shape and dtype, and reads (memory-mapped) and dequantizes only when a consumer asks for its
values with `np.asarray(t)`, `jnp.asarray(t)` (dequantized on the default device) or `t[rows]`
(only those rows are read). Every pairing, dtype and scale-grid problem is found here, before
any byte of tensor data is read, and named with its file and tensor.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepseek_v4 import quant_codecs as quant
from deepseek_v4.checkpoint import names
from deepseek_v4.checkpoint.safetensors_io import DTYPES, CheckpointError, TensorInfo, read_array

_INT_OK = re.compile(r"(^|\.)tid2eid$")
_FP8_CODES = {"F8_E4M3"}
_FP4_CODES = {"I8", "U8"}
_SCALE_CODES = {"F8_E8M0", "U8", "F32"}


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Rows [r0, r1) of a stored tensor seen as a matrix [rows, cols] (stacked experts flattened
  into rows)."""
  info: TensorInfo
  r0: int
  r1: int

  @property
  def shape(self) -> tuple[int, ...]:
    if len(self.info.shape) < 2:
      return self.info.shape
    return (self.r1 - self.r0,) + self.info.shape[-1:]

  def read(self, a: int = 0, b: int | None = None) -> np.ndarray:
    """Rows a:b of this view as a NumPy array (a memory-map of just those bytes)."""
    if len(self.info.shape) < 2:
      return read_array(self.info)
    b = self.r1 - self.r0 if b is None else b
    flat = dataclasses.replace(self.info, shape=(math.prod(self.info.shape[:-1]),) + self.info.shape[-1:])
    return read_array(flat, (slice(self.r0 + a, self.r0 + b),))


class LazyTensor:
  """One hub tensor, read (and dequantized) on demand. `shape` / `dtype` are the logical ones.

  `stored` (a dtype) reads the bytes as stored instead, reinterpreted as that dtype of the same
  width (packed FP4 codes as uint8, E8M0 scales): the kept-quantized form (`keep_quantized`).
  """

  def __init__(self, name: str, weight: _Rows, scale: _Rows | None = None,
               spec: quant.QuantSpec | None = None, dtype=None, stored=None,
               codes: _Rows | None = None):
    self.name, self.weight, self.scale, self.spec = name, weight, scale, spec
    self.stored = None if stored is None else np.dtype(stored)
    # Kept FP4 scales (`stored` E8M0): the codes they scale and the compute dtype, so a read
    # refuses the scales the dequantizing load would refuse (`_check_kept_scales`).
    self.codes, self.compute = codes, None if dtype is None else np.dtype(dtype)
    self.shape = spec.shape if spec else weight.shape
    self.dtype = np.dtype(dtype) if spec else self.stored or DTYPES[weight.info.dtype]
    self.ndim = len(self.shape)

  def where(self) -> str:
    extra = f" (stored as {self.weight.info.key!r})" if self.weight.info.key != self.name else ""
    return f"{self.weight.info.file}: tensor {self.name!r}{extra}"

  def __repr__(self) -> str:
    kind = f"{self.spec.fmt} " if self.spec else ""
    return f"LazyTensor({self.name!r}, {kind}{self.dtype}{list(self.shape)})"

  def _dequantized(self, r0: int = 0, r1: int | None = None) -> jax.Array:
    r1 = self.shape[0] if r1 is None else r1
    b0 = self.spec.block[0]
    w = self.weight.read(r0, r1)
    s = self.scale.read(r0 // b0, -(-r1 // b0))
    exact = self.scale.info.dtype != "F32"
    if not exact and not (s > 0).all():  # a NaN, zero or negative multiplier
      bad = np.argwhere(~(s > 0))[0]
      raise CheckpointError(
        f"{self.where()}: float32 scale {self.scale.info.key!r} holds {s[tuple(bad)]!r} at block "
        f"{tuple(int(i) for i in bad)} ({int(np.sum(~(s > 0)))} such); a scale must be a positive "
        "power of two: the file is corrupt")
    try:
      out = quant.dequantize(self.spec, w, s.view(np.dtype("float8_e8m0fnu")) if s.dtype == np.uint8 else s,
                             self.dtype if exact else jnp.float32, offset=(r0 - (r0 // b0) * b0, 0))
    except Exception as e:  # noqa: BLE001 -- name the tensor whatever the decoder raised
      raise CheckpointError(f"{self.where()}: cannot dequantize: {e}") from e
    if not exact:
      out = out.astype(self.dtype)
    bad = int(jnp.sum(~jnp.isfinite(out)))
    if bad:
      raise CheckpointError(f"{self.where()}: {bad} values decode to NaN/inf (a NaN FP8 byte or an "
                            f"E8M0 scale of 255 in {self.scale.info.key!r}); the file is corrupt")
    return out

  def read(self, rows: slice = slice(None)) -> np.ndarray | jax.Array:
    r0, r1, step = rows.indices(self.shape[0] if self.shape else 0)
    if step != 1:
      raise ValueError(f"{self.name}: only unit-step row slices are read, got {rows}")
    if self.spec:
      return self._dequantized(r0, r1)
    try:
      out = np.asarray(self.weight.read(r0, r1) if self.shape else self.weight.read())
    except OSError as e:
      raise CheckpointError(f"{self.where()}: cannot read: {e}") from e
    if self.stored is not None:
      out = _as_stored(out, self.stored, self.where())
      if self.codes is not None:
        _check_kept_scales(out, self.codes, r0, self.compute, self.where())
      return out
    if out.dtype.kind == "f" or out.dtype.name == "bfloat16":
      _check_finite(out, self.where())
    return out

  def __array__(self, dtype=None, copy=None):
    out = np.asarray(self.read())
    return out if dtype is None else out.astype(dtype)

  def __jax_array__(self):
    return jnp.asarray(self.read())

  def __getitem__(self, index) -> np.ndarray:
    """`t[idx]` reads only the rows in `idx[0]` (a shard's block), then slices the rest."""
    index = index if isinstance(index, tuple) else (index,)
    first = index[0] if index else slice(None)
    if not isinstance(first, slice) or self.ndim < 2:
      return np.asarray(self)[index]
    block = np.asarray(self.read(first))
    return block[(slice(None),) + index[1:]]


def _as_stored(raw: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
  """Stored bytes as `dtype` without decoding: a same-width view (int8 -> uint8 codes, U8 ->
  E8M0), or for a float32 scale the E8M0 byte of each (power-of-two) value, checked exact."""
  if raw.dtype.itemsize == dtype.itemsize:
    return raw.view(dtype)
  out = raw.astype(dtype)
  if not np.array_equal(out.astype(raw.dtype), raw):
    raise CheckpointError(f"{where}: {raw.dtype} scales that are not powers of two cannot be kept "
                          "as E8M0")
  return out


def _check_finite(values: np.ndarray, where: str) -> None:
  """A float weight as read holds no NaN or inf (one pass over what was just read)."""
  finite = np.isfinite(values)
  if not finite.all():
    first = tuple(int(i) for i in np.argwhere(~finite)[0])
    raise CheckpointError(f"{where}: {int(finite.size - finite.sum())} NaN/inf values (first at "
                          f"{first}: {values[first]!r}); the file is corrupt")


E2M1_MAX = 6.0  # the largest E2M1 magnitude


def _check_kept_scales(scale: np.ndarray, codes: _Rows, r0: int, dtype: np.dtype | None,
                       where: str) -> None:
  """Kept FP4 scales (E8M0, rows r0.. of the weight) that the MoE could decode: none is NaN (byte
  255), and no block's values times its scale overflow `dtype` (the dequantizing load refuses
  both). Only blocks whose scale could overflow with the largest code read their codes."""
  u = scale.view(np.uint8).astype(np.int64)
  nan = np.argwhere(u == 255)
  if len(nan):
    raise CheckpointError(f"{where}: {len(nan)} E8M0 scales are NaN (byte 255), first at row "
                          f"{int(nan[0][0]) + r0}, block {int(nan[0][1])}; the file is corrupt")
  limit = float(ml_dtypes.finfo(dtype if dtype is not None else np.float32).max)
  risky = np.unique(np.argwhere(np.ldexp(E2M1_MAX, u - 127) > limit)[:, 0])
  for row in risky:
    values = np.abs(np.asarray(quant.unpack_fp4(codes.read(r0 + row, r0 + row + 1)), np.float64))
    mag = np.pad(values[0], (0, -values.shape[1] % 32)).reshape(-1, 32).max(axis=1)
    over = np.argwhere(np.ldexp(mag, u[row, :len(mag)] - 127) > limit)
    if len(over):
      b = int(over[0][0])
      raise CheckpointError(
        f"{where}: the E8M0 scale 2^{u[row, b] - 127} of row {r0 + row}, block {b} makes its FP4 "
        f"values overflow {np.dtype(dtype or np.float32).name} (|value| up to {mag[b]:g} x "
        f"2^{u[row, b] - 127}); the file is corrupt")


def _kept_pair(name: str, w: _Rows, s: _Rows | None, dtype) -> dict[str, LazyTensor]:
  """An FP4 weight and its scale as stored, under `name` and its `.scale` name."""
  fmt = None if s is None else _quant_spec(name, w, s).fmt
  if fmt != "fp4":
    raise CheckpointError(
      f"{w.info.where()}: keep_quantized='experts' keeps routed experts in FP4 (packed I8 codes + "
      f"1x32 E8M0 scales), but {name!r} is stored as {fmt or w.info.dtype + ' without a scale'}; "
      "load with keep_quantized=None to dequantize it")
  scale_name = name[: -len(".weight")] + ".scale"
  return {name: LazyTensor(name, w, stored=np.uint8),
          scale_name: LazyTensor(scale_name, s, stored=np.dtype("float8_e8m0fnu"), dtype=dtype,
                                 codes=w)}


def _quant_spec(name: str, w: _Rows, s: _Rows) -> quant.QuantSpec:
  code = w.info.dtype
  if code in _FP8_CODES:
    spec = quant.QuantSpec("fp8", tuple(w.shape))
  elif code in _FP4_CODES:
    spec = quant.QuantSpec("fp4", (w.shape[0], 2 * w.shape[1]))
  else:
    raise CheckpointError(f"{w.info.where()}: a {code} weight cannot have a scale ({s.info.key!r}); "
                          "quantized weights are F8_E4M3 (128x128 blocks) or I8 packed FP4 (1x32)")
  if len(w.shape) != 2:
    raise CheckpointError(f"{w.info.where()}: a quantized weight must be a matrix, got {list(w.shape)}")
  if s.info.dtype not in _SCALE_CODES:
    raise CheckpointError(f"{s.info.where()}: scale dtype {s.info.dtype}; expected F8_E8M0")
  if tuple(s.shape) != spec.scale_shape:
    raise CheckpointError(
      f"{s.info.where()}: scale grid {list(s.shape)} does not fit {spec.fmt} weight {name!r} of "
      f"logical shape {list(spec.shape)} (expected {list(spec.scale_shape)} for "
      f"{spec.block[0]}x{spec.block[1]} blocks, edge blocks partial)")
  return spec


def _check_dtype(name: str, w: _Rows) -> None:
  code = w.info.dtype
  is_int = code.startswith(("I", "U")) or code == "BOOL"
  if _INT_OK.search(name):
    if not is_int:
      raise CheckpointError(f"{w.info.where()}: {name} holds expert ids but is stored as {code}; "
                            "refusing to cast it to integers (expected I64)")
  elif is_int or code in _FP8_CODES:
    raise CheckpointError(f"{w.info.where()}: stored as {code} without a scale; a weight must be "
                          "a float (F32/BF16/F16), refusing to cast it (a quantized weight needs "
                          "its .scale / .weight_scale_inv)")


def hub_tensors(listing: Mapping[str, TensorInfo], canonical: Callable[[str], str], *,
                dtype=jnp.float32, keep: Callable[[str], bool] = lambda name: True,
                kept: Callable[[str], bool] = lambda name: False) -> dict[str, LazyTensor]:
  """`{hub name: LazyTensor}` for a checkpoint listing (see module doc); `dtype` is what
  quantized weights dequantize to, `keep(hub name)` drops tensors (partial loads), and the FP4
  weights for which `kept(hub name)` holds stay as stored: `name` the codes, `.scale` the
  scales (a weight that is not FP4 is an error)."""
  weights: dict[str, _Rows] = {}
  scales: dict[str, _Rows] = {}

  def add(table: dict, name: str, view: _Rows) -> None:
    if name in table:
      raise CheckpointError(f"tensor {name!r} appears twice: as {table[name].info.key!r} in "
                            f"{table[name].info.file} and as {view.info.key!r} in {view.info.file}")
    table[name] = view

  for key, info in listing.items():
    if key.endswith(".weight_scale_inv"):  # transformers' name for the same multiplier
      scale, name = True, canonical(key[: -len("_scale_inv")])
    else:
      name = canonical(key)  # first, so transformers' `attn_hc.scale` is not taken for a scale
      scale = name.endswith(".scale")
      name = name[: -len(".scale")] + ".weight" if scale else name
    m = names.HF_STACKED.match(name)
    if m is not None:
      for n, view in _unstack(m, info):
        add(scales if m["s"] else weights, n, view)
      continue
    view = _Rows(info, 0, info.shape[0] if len(info.shape) >= 2 else 0)
    if scale:
      add(scales, name, view)
    else:
      add(weights, name, view)
  orphans = sorted(set(scales) - set(weights))
  if orphans:
    n = orphans[0]
    raise CheckpointError(f"{scales[n].info.where()}: a scale without its weight {n!r} "
                          f"({len(orphans)} such scales)")
  out: dict[str, LazyTensor] = {}
  for name, w in weights.items():
    if not keep(name):
      continue
    if kept(name):
      out.update(_kept_pair(name, w, scales.get(name), dtype))
    elif name in scales:
      out[name] = LazyTensor(name, w, scales[name], _quant_spec(name, w, scales[name]), dtype)
    else:
      _check_dtype(name, w)
      out[name] = LazyTensor(name, w)
  return out


def _unstack(m: re.Match, info: TensorInfo):
  """transformers' stacked experts [E, R, C] -> per-expert row views: gate_up rows are
  [w1; w3], down_proj is w2. A scale splits the same way when its rows split at the same place."""
  if len(info.shape) != 3:
    raise CheckpointError(f"{info.where()}: stacked experts must be [experts, rows, cols], "
                          f"got {list(info.shape)}")
  E, R, _ = info.shape
  parts = [("w2", 0, R)] if m["w"] == "down_proj" else [("w1", 0, R // 2), ("w3", R // 2, R)]
  if m["w"] == "gate_up_proj" and R % 2:
    raise CheckpointError(f"{info.where()}: gate_up_proj has an odd row count {R}; it must be "
                          "[w1; w3] of equal heights (a scale grid that does not split)")
  for e in range(E):  # scales are keyed by their weight's name
    for w, a, b in parts:
      yield f"{m['pre']}.{e}.{w}.weight", _Rows(info, e * R + a, e * R + b)
