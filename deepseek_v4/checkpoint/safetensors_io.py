"""safetensors files without the safetensors package: headers, raw memory-mapped reads, writers.

We parse the format ourselves (8-byte little-endian header length, a JSON header, then the raw
bytes) because on this stack safetensors' numpy/flax backends cannot return `F8_E4M3` /
`F8_E8M0` tensors, and because a load must stream tensor by tensor: each tensor is a fresh
memory map of its own byte range, so host memory holds one tensor at a time, not a shard.

A folder checkpoint is either `model.safetensors.index.json` plus the shards it names, or (without
an index) every `*.safetensors` file of the folder. Every inconsistency (an index naming a
missing file or tensor, a shard holding tensors the index does not list, a stray `.safetensors`
file next to an index, a truncated or corrupt file) is a `CheckpointError` naming the file and
the tensor.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own limit

DTYPES: dict[str, np.dtype] = {
  "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
  "I8": np.dtype(np.int8),
  "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
  "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
  "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_CODES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint is unreadable or does not match the model; the message names file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one stored tensor lives: `file`, its stored `key`, safetensors `dtype` code, `shape`,
  and its absolute byte range [start, end) in the file."""
  file: str
  key: str
  dtype: str
  shape: tuple[int, ...]
  start: int
  end: int

  @property
  def nbytes(self) -> int:
    return self.end - self.start

  def where(self) -> str:
    return f"{self.file}: tensor {self.key!r}"


def read_header(file: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
  """The tensors and `__metadata__` of one safetensors file, with every offset validated."""
  try:
    size = os.path.getsize(file)
    with open(file, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, too short for a header)")
      (n,) = struct.unpack("<Q", head)
      if n > min(_MAX_HEADER, size - 8):
        raise CheckpointError(
          f"{file}: not a safetensors file or truncated (header length {n} but the file has "
          f"{size} bytes)")
      raw = f.read(n)
  except OSError as e:
    raise CheckpointError(f"{file}: cannot read ({e.strerror or e})") from e
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: not a safetensors file (its header is not JSON: {e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{file}: not a safetensors file (its header is not a JSON object)")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict):
    raise CheckpointError(f"{file}: __metadata__ is not an object")
  data_start, data_size = 8 + n, size - 8 - n
  out: dict[str, TensorInfo] = {}
  for key, entry in header.items():
    out[key] = _entry(file, key, entry, data_start, data_size)
  _check_coverage(file, list(out.values()), data_size, data_start)
  return out, metadata


def _entry(file: str, key: str, entry, data_start: int, data_size: int) -> TensorInfo:
  where = f"{file}: tensor {key!r}"
  try:
    code, shape, (b, e) = entry["dtype"], entry["shape"], entry["data_offsets"]
    shape = tuple(shape)
    ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(b, int) and isinstance(e, int)
  except (TypeError, KeyError, ValueError):
    ok = False
  if not ok:
    raise CheckpointError(f"{where} has a malformed header entry {entry!r}")
  if code not in DTYPES:
    raise CheckpointError(f"{where} has dtype {code!r}, which this reader does not know "
                          f"(known: {', '.join(DTYPES)})")
  want = math.prod(shape) * DTYPES[code].itemsize
  if not 0 <= b <= e or e - b != want:
    raise CheckpointError(f"{where}: byte range [{b}, {e}) does not hold {code} {list(shape)} "
                          f"({want} bytes)")
  if e > data_size:
    raise CheckpointError(f"{where} ends at byte {e} but the file holds only {data_size} data "
                          "bytes (truncated file)")
  return TensorInfo(file, key, code, shape, data_start + b, data_start + e)


def _check_coverage(file: str, infos: list[TensorInfo], data_size: int, data_start: int) -> None:
  pos = data_start
  for info in sorted(infos, key=lambda i: (i.start, i.end)):
    if info.start < pos:
      raise CheckpointError(f"{info.where()} overlaps the tensor before it (corrupt header)")
    pos = info.end
  if pos != data_start + data_size:
    raise CheckpointError(f"{file}: {data_start + data_size - pos} bytes after the last tensor "
                          "(corrupt header or a file written over)")


def read_array(info: TensorInfo, index: tuple[slice, ...] | None = None) -> np.ndarray:
  """The stored tensor (or its rows `index[0]`, further axes sliced in memory) as a NumPy
  array of the stored dtype, viewed through ml_dtypes. The bytes are memory-mapped per tensor,
  so the map is released with the returned array; a row slice maps only those rows."""
  dtype, shape = DTYPES[info.dtype], info.shape
  start, end = info.start, info.end
  rest: tuple = ()
  if index is not None and shape:
    rows = range(shape[0])[index[0]]
    if rows.step != 1:
      raise ValueError(f"{info.where()}: only unit-step row slices are read, got {index[0]}")
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    start, end = info.start + rows.start * row_bytes, info.start + rows.stop * row_bytes
    shape, rest = (len(rows),) + shape[1:], tuple(index[1:])
  if end == start:
    out = np.zeros(shape, dtype)
  else:
    try:
      mm = np.memmap(info.file, dtype=np.uint8, mode="r", offset=start, shape=(end - start,))
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{info.where()}: cannot map bytes [{start}, {end}): {e}") from e
    out = mm.view(dtype).reshape(shape)
  return out[(slice(None),) + rest] if rest else out


# ----- folders and the index ----------------------------------------------------------------------
def list_checkpoint(path: str) -> dict[str, TensorInfo]:
  """Stored key -> TensorInfo over a checkpoint folder, after checking that the index (if any)
  and the files agree exactly."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint folder not found: {path!r}")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: is a file; a checkpoint is a folder holding config.json and "
                          f"*.safetensors (e.g. {os.path.dirname(path) or '.'!r})")
  on_disk = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  index = os.path.join(path, INDEX)
  if not os.path.isfile(index):
    if not on_disk:
      raise FileNotFoundError(f"no *.safetensors files in {path!r}")
    out: dict[str, TensorInfo] = {}
    for file in on_disk:
      for key, info in read_header(file)[0].items():
        if key in out:
          raise CheckpointError(f"tensor {key!r} is in both {out[key].file} and {file} (two "
                                f"checkpoints in one folder, and no {INDEX} to choose)")
        out[key] = info
    return out
  weight_map = read_index(index)
  files = sorted(set(weight_map.values()))
  missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
  stray = sorted(os.path.basename(f) for f in on_disk if os.path.basename(f) not in files)
  if stray:
    raise CheckpointError(f"{path}: {stray} are not named by {INDEX} (left by another save?); "
                          "the folder holds more than one checkpoint: remove them or the index")
  out = {}
  for name in files:
    file = os.path.join(path, name)
    infos = read_header(file)[0]
    want = {k for k, v in weight_map.items() if v == name}
    absent = sorted(want - set(infos))
    if absent:
      raise CheckpointError(f"{index} places {len(absent)} tensors in {file} that it does not "
                            f"hold, e.g. {absent[:3]}")
    unlisted = sorted(set(infos) - want)
    if unlisted:
      raise CheckpointError(f"{file} holds {len(unlisted)} tensors that {index} does not place "
                            f"there, e.g. {unlisted[:3]} (index and files disagree)")
    out.update(infos)
  return out


def read_index(index: str) -> dict[str, str]:
  try:
    with open(index, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{index}: not a readable JSON index ({e})") from e
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise CheckpointError(f"{index}: lacks a 'weight_map' object of tensor name -> file name")
  bad = sorted({v for v in weight_map.values() if os.path.basename(v) != v})
  if bad:
    raise CheckpointError(f"{index}: shard names must be plain file names, got {bad[:3]}")
  return weight_map


# ----- writing ------------------------------------------------------------------------------------
Producer = Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Pending:
  """A tensor to write: its shape and dtype now, its values when `produce()` is called."""
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Producer

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _pending(value) -> Pending:
  if isinstance(value, Pending):
    return value
  value = np.asarray(value)
  return Pending(tuple(value.shape), value.dtype, lambda: value)


def natural_key(name: str) -> list:
  """`layers.10` after `layers.9`: digits compare as numbers."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def write_file(file: str, tensors: Mapping[str, Pending | np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
  """One safetensors file, tensors in natural name order, each produced and written in turn."""
  items = sorted(((k, _pending(v)) for k, v in tensors.items()), key=lambda kv: natural_key(kv[0]))
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  pos = 0
  for key, p in items:
    dtype = np.dtype(p.dtype)
    if dtype not in _CODES:
      raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}, which safetensors cannot store")
    header[key] = {"dtype": _CODES[dtype], "shape": list(p.shape),
                   "data_offsets": [pos, pos + p.nbytes]}
    pos += p.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for key, p in items:
      value = np.ascontiguousarray(p.produce())
      if value.shape != p.shape or value.dtype != np.dtype(p.dtype):
        raise CheckpointError(f"{file}: tensor {key!r} produced {value.dtype}{list(value.shape)}, "
                              f"announced {np.dtype(p.dtype)}{list(p.shape)}")
      f.write(value.reshape(-1).view(np.uint8).data)


def shard_plan(tensors: Mapping[str, Pending | np.ndarray], max_shard_bytes: int) -> list[list[str]]:
  """Tensor names grouped into shards of at most `max_shard_bytes` (a larger tensor gets its own
  shard), in natural name order so each layer's tensors sit together."""
  shards: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors, key=natural_key):
    n = _pending(tensors[name]).nbytes
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  return shards


def write_checkpoint_files(folder: str, tensors: Mapping[str, Pending | np.ndarray], *,
                           max_shard_bytes: int, metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes `model.safetensors` (one shard) or `model-0000i-of-0000n.safetensors` + the index
  into `folder`; returns the file names written."""
  shards = shard_plan(tensors, max_shard_bytes)
  if len(shards) == 1:
    write_file(os.path.join(folder, SINGLE), tensors, metadata)
    return [SINGLE]
  n = len(shards)
  names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  weight_map: dict[str, str] = {}
  total = 0
  for name, keys in zip(names, shards):
    write_file(os.path.join(folder, name), {k: tensors[k] for k in keys}, metadata)
    for k in keys:
      weight_map[k] = name
      total += _pending(tensors[k]).nbytes
  with open(os.path.join(folder, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
              f, indent=2)
    f.write("\n")
  return names + [INDEX]


def _old_checkpoint_files(folder: str) -> list[str]:
  """The files of a checkpoint already in `folder`: its index, every shard the index names, and
  every `model*.safetensors`."""
  old = set()
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    old.add(INDEX)
    try:
      old |= set(read_index(index).values())
    except CheckpointError:
      pass  # an unreadable index is replaced all the same
  old |= {os.path.basename(f) for f in glob.glob(os.path.join(folder, "model*.safetensors"))}
  return sorted(f for f in old if os.path.isfile(os.path.join(folder, f)))


def replace_checkpoint(folder: str, write: Callable[[str], Iterable[str]]) -> None:
  """Writes a checkpoint with `write(tmp_folder) -> file names` into a temporary folder next to
  the files, then swaps it in: the old index and shards are removed and the new files moved into
  place (index last). Other files of `folder` (tokenizer, README) are kept. If `write` fails
  the folder is untouched; a crash during the swap leaves a folder the loader refuses, never a
  mix it would load."""
  os.makedirs(folder, exist_ok=True)
  old = set(_old_checkpoint_files(folder))
  foreign = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "*.safetensors"))
                   if os.path.basename(f) not in old)
  if foreign:
    # The loader reads every *.safetensors of a folder without an index (and refuses stray ones
    # beside an index), so these would make the saved checkpoint fail to load. They are not ours
    # to delete (e.g. a LoRA adapter_model.safetensors).
    raise CheckpointError(f"{folder}: holds {foreign}, which are not part of a checkpoint this "
                          "save replaces; the loader would read them with it. Save into another "
                          "folder, or move them out first")
  tmp = tempfile.mkdtemp(prefix=".dsv4-save-", dir=folder)
  try:
    written = list(write(tmp))
    for name in _old_checkpoint_files(folder):
      os.remove(os.path.join(folder, name))
    for name in sorted(written, key=lambda n: n == INDEX):  # the index last
      os.replace(os.path.join(tmp, name), os.path.join(folder, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
