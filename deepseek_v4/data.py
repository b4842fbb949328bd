"""Training data: readers (text, JSONL), tokenization, packing into fixed-length rows, and a
deterministic, resumable batch iterator. Plus the embedded demo corpus (the Python standard
library's own sources, present on every machine with Python).

Packing (docs/architecture.md#schedule): "concat" joins documents with an EOS token between them
and cuts the stream into rows of `seq_len + 1` tokens (inputs = row[:-1], targets = row[1:]), so no
token is wasted; "pad" puts one document per row (a long one continues in further rows; padding not
scored), which isolates documents exactly but wastes the padding; "aligned" (recommended) is
DeepSeek's packing with sample-level attention masking (docs/architecture.md#schedule): documents
share rows, each starts at a row offset that is a multiple of `align` (the largest compression
ratio, so no compression window straddles two documents), and the rows carry `segments` (document
id per token) and `positions` (position inside the document) for the model's document mask.
"concat" has no segments, so a document attends to the previous one in its row (as GPT-style
pre-training does).

JSONL rows are {"text": ...} (every token scored) or {"prompt": ..., "completion": ...} (only
the completion and its EOS are scored).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sysconfig
import warnings
from typing import Iterator, Protocol

import numpy as np

from deepseek_v4 import tokenizer as tokenizer_lib

IGNORE = -1  # target id that is not scored


# ----- tokenizers ---------------------------------------------------------------------------------
class Tokenizer(Protocol):
  """What the data pipeline needs: deepseek_v4.tokenizer's ByteTokenizer and HFTokenizer."""

  bos_id: int | None
  eos_id: int | None
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids) -> str: ...


def byte_tokenizer() -> Tokenizer:
  """UTF-8 bytes plus the chat special tokens (270 ids; BOS 0, EOS 1)."""
  return tokenizer_lib.ByteTokenizer()


def get_tokenizer(spec: str | None) -> Tokenizer:
  """None / "bytes" -> byte-level; a path to a tokenizer.json (or its folder) -> HFTokenizer.

  Raises:
    FileNotFoundError: the tokenizer file does not exist.
  """
  if spec in (None, "", "bytes", "byte"):
    return byte_tokenizer()
  return tokenizer_lib.HFTokenizer(spec)


# ----- documents ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Document:
  """A training sample: `prompt` is context only (not scored), `text` is scored."""

  text: str
  prompt: str = ""


# A file is refused as not text when more than this fraction of its characters are not UTF-8.
MAX_UNDECODABLE_FRACTION = 0.01
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # the bytes that surrogateescape could not decode


def _read_text(path: str) -> str:
  """The UTF-8 text of `path` (a leading byte-order mark dropped).

  A text file with a few undecodable bytes is read with each replaced by U+FFFD, and a warning
  names the file and their count.

  Raises:
    ValueError: naming the file, when it is not text: it holds NUL bytes, or more than
      MAX_UNDECODABLE_FRACTION of its characters are not UTF-8.
  """
  with open(path, "rb") as f:
    raw = f.read()
  if b"\x00" in raw:
    raise ValueError(f"{path}: not a text file (it holds NUL bytes, at byte {raw.index(0)} first); "
                     "expected UTF-8 text")
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    first = e.start
  bad = len(_UNDECODABLE.findall(raw.decode("utf-8-sig", errors="surrogateescape")))
  text = raw.decode("utf-8-sig", errors="replace")
  if bad > MAX_UNDECODABLE_FRACTION * len(text):
    raise ValueError(f"{path}: not a UTF-8 text file: {bad} undecodable bytes in {len(text)} "
                     f"characters (the first at byte {first}); convert it to UTF-8 or remove it")
  warnings.warn(f"{path}: {bad} undecodable byte(s) (the first at byte {first}) replaced by "
                "U+FFFD", stacklevel=3)
  return text


def _string_field(row: dict, key: str, where: str) -> str:
  value = row[key]
  if not isinstance(value, str):
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__} {shown}")
  return value


def _read_jsonl(path: str) -> list[Document]:
  docs = []
  for n, line in enumerate(_read_text(path).split("\n"), 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" in row:
      docs.append(Document(_string_field(row, "text", where)))
    elif "completion" in row:
      prompt = _string_field(row, "prompt", where) if "prompt" in row else ""
      docs.append(Document(_string_field(row, "completion", where), prompt))
    else:
      raise ValueError(f"{where}: a row needs 'text' or 'prompt'/'completion'; got keys "
                       f"{sorted(row)}")
  return docs


def read_documents(path: str) -> list[Document]:
  """Documents of a .jsonl file, a text file (one document), or a folder (every .txt/.md/.jsonl
  file in it, recursively, in sorted order).

  Files must be UTF-8 text (see `_read_text`: a binary file is refused, a few bad bytes are
  replaced with a warning); in .jsonl, "text", "prompt" and "completion" must be strings.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the file or folder holds no text; a file is not text; a .jsonl row is not a JSON
      object with string fields (the message names the file and line).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path!r}")
  if os.path.isdir(path):
    files = sorted(f for ext in ("txt", "md", "jsonl")
                   for f in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
    docs = [d for f in files for d in read_documents(f)] if files else []
  elif path.endswith(".jsonl"):
    docs = _read_jsonl(path)
  else:
    docs = [Document(_read_text(path))]
  docs = [d for d in docs if d.text or d.prompt]
  if not docs:
    raise ValueError(f"data {path!r} is empty: no text to train on")
  return docs


def demo_corpus(max_bytes: int = 1_500_000) -> list[Document]:
  """The Python standard library's own top-level .py files (sorted), up to `max_bytes` of text."""
  root = sysconfig.get_paths()["stdlib"]
  docs, total = [], 0
  for f in sorted(glob.glob(os.path.join(root, "*.py"))):
    with open(f, encoding="utf-8", errors="replace") as fh:
      text = fh.read()
    docs.append(Document(text))
    total += len(text)
    if total >= max_bytes:
      break
  if not docs:
    raise ValueError(f"no .py files under the standard library folder {root!r}")
  return docs


# ----- tokenization and packing -------------------------------------------------------------------
def tokenize(docs: list[Document], tok: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, scored) per document; each document ends with EOS (scored)."""
  if tok.eos_id is None:
    raise ValueError("the tokenizer has no end-of-sentence token (<｜end▁of▁sentence｜>) to "
                     "separate documents")
  out = []
  for d in docs:
    prompt = tok.encode(d.prompt) if d.prompt else []
    body = tok.encode(d.text) + [tok.eos_id]
    ids = np.asarray(prompt + body, np.int32)
    scored = np.concatenate([np.zeros(len(prompt), bool), np.ones(len(body), bool)])
    out.append((ids, scored))
  return out


@dataclasses.dataclass
class PackedRows:
  """Fixed-length rows: inputs/targets [R, T] (targets -1 = not scored), input_mask [R, T];
  "aligned" packing adds segments [R, T] (document piece id per input token, non-decreasing
  along a row) and positions [R, T] (position inside the piece, 0 at its first token)."""

  inputs: np.ndarray
  targets: np.ndarray
  input_mask: np.ndarray
  segments: np.ndarray | None = None
  positions: np.ndarray | None = None

  def __len__(self) -> int:
    return self.inputs.shape[0]


def packing_align(cfg) -> int:
  """Row offset multiple at which "aligned" packing starts documents for a ModelConfig: the
  largest compression ratio (and at least 4), so compression windows never straddle documents."""
  return max(tuple(cfg.layer_ratios) + (4,))


def _pack_aligned(tokenized, seq_len: int, align: int, pad_id: int, source: str) -> PackedRows:
  """Documents share rows, each piece starting at a multiple of `align` (see the module docstring).

  A document of n tokens has n - 1 inputs (its last token is only a target). A document with more
  inputs than the rest of the row fills the row and continues at the start of the next one as a
  new piece (a new segment, positions from 0); the continuation's first input is the previous
  piece's last target, so every token after the document's first is a target exactly once. Slots
  from a piece's end to the next aligned start are padding of that piece's segment (positions
  keep counting, not scored, input_mask 0).
  """
  if align < 1:
    raise ValueError(f"align={align} must be a positive integer")
  T = seq_len
  inputs, targets, mask, segments, positions = [], [], [], [], []

  def new_row():
    inputs.append(np.full(T, pad_id, np.int32))
    targets.append(np.full(T, IGNORE, np.int32))
    mask.append(np.zeros(T, np.float32))
    segments.append(np.zeros(T, np.int32))
    positions.append(np.zeros(T, np.int32))

  cur, seg = T, -1  # slot of the next piece in the last row (T = start a new row)
  for ids, scored in tokenized:
    n_in = len(ids) - 1
    k = 0
    while k < n_in:
      if cur >= T:
        new_row()
        cur, seg = 0, -1
      m = min(n_in - k, T - cur)
      seg += 1
      end = -(-(cur + m) // align) * align  # the next aligned start (padding up to it)
      end = min(end, T)
      sl = slice(cur, cur + m)
      inputs[-1][sl] = ids[k:k + m]
      targets[-1][sl] = np.where(scored[k + 1:k + m + 1], ids[k + 1:k + m + 1], IGNORE)
      mask[-1][sl] = 1.0
      segments[-1][cur:end] = seg
      positions[-1][cur:end] = np.arange(end - cur)
      k += m
      cur = end
  if not inputs:
    raise ValueError(f"{source}: no document has two tokens (an input and its target)")
  # Trailing slots of the last row after its last piece stay that piece's padding.
  if cur < T:
    last = int(segments[-1][cur - 1])
    segments[-1][cur:] = last
    positions[-1][cur:] = positions[-1][cur - 1] + 1 + np.arange(T - cur)
  rows = PackedRows(np.stack(inputs), np.stack(targets), np.stack(mask), np.stack(segments),
                    np.stack(positions))
  if not (rows.targets >= 0).any():
    raise ValueError(f"{source}: no scored token to train on")
  return rows


def pack(tokenized: list[tuple[np.ndarray, np.ndarray]], seq_len: int, mode: str = "concat",
         pad_id: int = 1, source: str = "data", align: int = 16) -> PackedRows:
  """Packs tokenized documents into rows of `seq_len` inputs (see the module docstring).

  Args:
    align: "aligned" mode only: documents start at row offsets that are multiples of it (use
      `packing_align(model_cfg)`).
  Raises:
    ValueError: the data holds fewer tokens than one row needs (`seq_len + 1`).
  """
  if mode == "aligned":
    return _pack_aligned(tokenized, seq_len, align, pad_id, source)
  if mode == "concat":
    ids = np.concatenate([t[0] for t in tokenized])
    scored = np.concatenate([t[1] for t in tokenized])
    n = (len(ids) - 1) // seq_len
    if n < 1:
      raise ValueError(f"{source} has {len(ids)} tokens; one training sequence needs seq_len + 1 "
                       f"= {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [R, T+1]
    rows, keep = ids[idx], scored[idx]
    targets = np.where(keep[:, 1:], rows[:, 1:], IGNORE)
    return PackedRows(rows[:, :-1], targets.astype(np.int32), np.ones((n, seq_len), np.float32))
  if mode == "pad":
    # One document per row; a document longer than a row continues in the next rows (each row
    # starts where the previous one's inputs ended), so nothing is truncated and no row mixes
    # documents.
    pieces = [(ids[k:k + seq_len + 1], scored[k:k + seq_len + 1])
              for ids, scored in tokenized
              for k in range(0, max(len(ids) - 1, 1), seq_len)]
    R = len(pieces)
    rows = np.full((R, seq_len + 1), pad_id, np.int32)
    keep = np.zeros((R, seq_len + 1), bool)
    real = np.zeros((R, seq_len + 1), bool)
    for r, (ids, scored) in enumerate(pieces):
      m = len(ids)
      rows[r, :m], keep[r, :m], real[r, :m] = ids, scored, True
    targets = np.where(keep[:, 1:], rows[:, 1:], IGNORE)
    if not (targets >= 0).any():
      raise ValueError(f"{source}: no scored token fits in rows of seq_len + 1 = {seq_len + 1}")
    return PackedRows(rows[:, :-1], targets.astype(np.int32), real[:, :-1].astype(np.float32))
  raise ValueError(f"packing mode {mode!r}; expected 'concat', 'pad' or 'aligned'")


# ----- the batch iterator -------------------------------------------------------------------------
class Batches:
  """Shuffled batches of packed rows, reproducible from (seed, epoch, index).

  Each epoch is a fresh permutation of the rows (drawn from `seed + epoch`); `state()` is the
  position of the next batch, and `Batches(rows, ..., state=s)` continues exactly from it.
  """

  def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0,
               state: dict | None = None):
    if len(rows) < 1:
      raise ValueError("no rows to draw batches from")
    self.rows = rows
    self.batch_size = batch_size
    self.seed = seed
    self.epoch = int(state["epoch"]) if state else 0
    self.index = int(state["index"]) if state else 0
    self._perm = self._permutation(self.epoch)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def next(self) -> dict[str, np.ndarray]:
    """The next batch {inputs, targets, input_mask[, segments, positions]} (rows wrap into the
    next epoch)."""
    return take(self.rows, self.next_picks())

  def next_picks(self) -> np.ndarray:
    """The row indices of the next batch, in order (`next` reads them; on a mesh each process
    reads only its devices' share, `distributed.global_batch`)."""
    picks = []
    while len(picks) < self.batch_size:
      if self.index >= len(self._perm):
        self.epoch += 1
        self.index = 0
        self._perm = self._permutation(self.epoch)
      n = min(self.batch_size - len(picks), len(self._perm) - self.index)
      picks.extend(self._perm[self.index: self.index + n])
      self.index += n
    return np.asarray(picks)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    while True:
      yield self.next()


def take(rows: PackedRows, picks: np.ndarray) -> dict[str, np.ndarray]:
  """The rows `picks` of `rows` as a batch {inputs, targets, input_mask[, segments, positions]}."""
  out = {"inputs": rows.inputs[picks], "targets": rows.targets[picks],
         "input_mask": rows.input_mask[picks]}
  if rows.segments is not None:
    out["segments"] = rows.segments[picks]
    out["positions"] = rows.positions[picks]
  return out


def load_rows(path: str | None, tok: Tokenizer, seq_len: int, mode: str = "concat",
              align: int = 16) -> PackedRows:
  """Read, tokenize and pack `path` (None = the embedded demo corpus); `align` is for
  "aligned" packing (`packing_align(model_cfg)`)."""
  docs = demo_corpus() if path is None else read_documents(path)
  source = "the demo corpus" if path is None else f"data {path!r}"
  return pack(tokenize(docs, tok), seq_len, mode, pad_id=tok.eos_id, source=source, align=align)
