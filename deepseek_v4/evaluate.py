"""Held-out evaluation: a validation set split off the data by document, and its loss.

The documents are shuffled with a fixed seed (independent of the run's seed, so every run and
every seed of an ablation sees the same split) and `TrainConfig.val_fraction` of them (or
`val_documents` of them) are held out; no token of a held-out document is ever trained on.

Validation loss is the next-token cross-entropy (nats per scored token) of a fixed prefix of the
validation rows (`TrainConfig.eval_rows`), so successive evaluations are comparable.
Bits per byte = nats / ln 2 / UTF-8 bytes, with the bytes per scored token of the held-out
documents as a whole (their text's UTF-8 bytes over their scored tokens): it compares runs with
different tokenizers, and for the byte tokenizer it is the loss in bits per character byte
(end-of-document tokens count as tokens with no bytes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import data as data_lib
from deepseek_v4 import losses, train
from deepseek_v4.model import default_positions
from deepseek_v4.options import Options

SPLIT_SEED = 1234  # the document shuffle of the split; fixed, so all seeds share one split


@dataclasses.dataclass
class ValidationSet:
  """Packed validation rows and what turns their loss into bits per byte.

  Attributes:
    rows: the packed held-out documents.
    bytes_per_token: UTF-8 bytes of the held-out text per scored token.
    documents: number of held-out documents.
  """

  rows: data_lib.PackedRows
  bytes_per_token: float
  documents: int


def split_documents(docs: list[data_lib.Document], fraction: float = 0.0, count: int = 0
                    ) -> tuple[list[data_lib.Document], list[data_lib.Document]]:
  """(train, validation) documents: `count` documents, or `fraction` of them (at least one),
  chosen by a fixed shuffle; both keep the documents' original order.

  Raises:
    ValueError: a split is asked of fewer than two documents, or it would leave no training data.
  """
  if not fraction and not count:
    return docs, []
  n_val = count or max(1, round(fraction * len(docs)))
  if len(docs) < 2 or n_val >= len(docs):
    raise ValueError(f"cannot hold out {n_val} of {len(docs)} document(s) by document and keep "
                     "some to train on: give more documents (a folder or a .jsonl file) or a "
                     "smaller val_fraction / val_documents")
  held = set(np.random.default_rng(SPLIT_SEED).permutation(len(docs))[:n_val].tolist())
  return ([d for i, d in enumerate(docs) if i not in held],
          [d for i, d in enumerate(docs) if i in held])


def load_split(path: str | None, tok: data_lib.Tokenizer, tcfg: train.TrainConfig,
               align: int = 16, max_bytes: int | None = None
               ) -> tuple[data_lib.PackedRows, ValidationSet | None]:
  """Training rows and the validation set (None when `tcfg` holds out nothing) of `path`
  (None = the embedded demo corpus, up to `max_bytes` of it), packed as `tcfg` says."""
  if path is None:
    docs = data_lib.demo_corpus() if max_bytes is None else data_lib.demo_corpus(max_bytes)
  else:
    docs = data_lib.read_documents(path)
  source = "the demo corpus" if path is None else f"data {path!r}"
  train_docs, val_docs = split_documents(docs, tcfg.val_fraction, tcfg.val_documents)
  pad = tok.eos_id

  def pack(ds, what):
    return data_lib.pack(data_lib.tokenize(ds, tok), tcfg.seq_len, tcfg.packing, pad_id=pad,
                         source=f"{source} ({what})", align=align)

  rows = pack(train_docs, "training documents")
  if not val_docs:
    return rows, None
  val = pack(val_docs, "validation documents")
  n_bytes = sum(len(d.text.encode("utf-8")) for d in val_docs)
  n_scored = sum(int(s.sum()) for _, s in data_lib.tokenize(val_docs, tok))
  return rows, ValidationSet(val, n_bytes / max(n_scored, 1), len(val_docs))


@nnx.jit(static_argnames=("tcfg", "options"))
def _lm_sums(model, batch: dict, tcfg: train.TrainConfig,
             options: Options | None = None) -> tuple[jax.Array, jax.Array]:
  """(summed next-token nats, scored tokens) of one batch: the trunk and head only (no MTP)."""
  segments = batch.get("segments")
  positions = default_positions(batch["inputs"], batch.get("positions"), segments)
  streams, _, _ = model.trunk(batch["inputs"], positions, segments=segments,
                              options=train.step_options(tcfg.replace(remat="none"),
                                                         options or model.options))
  return losses.chunked_cross_entropy(model.final_hidden(streams), model.head.weight[...],
                                      batch["targets"], tcfg.ce_chunk)


def evaluate(model, val: ValidationSet, tcfg: train.TrainConfig,
             options: Options | None = None, place=None) -> dict[str, float]:
  """{val_loss (nats per scored token), val_bpb (bits per byte), val_tokens} of the first
  `tcfg.eval_rows` validation rows (whole batches of `tcfg.batch_size`, one compiled shape), run
  with `options` (default `model.options`; indexer stage from `tcfg`, no remat). `place(picks)`:
  the batch of those row indices as device arrays (on a mesh, `distributed.global_batch`)."""
  rows = val.rows
  b = min(tcfg.batch_size, len(rows))
  n = max(min(tcfg.eval_rows, len(rows)) // b, 1) * b
  total, count = 0.0, 0.0
  for s in range(0, n, b):
    if place is not None:
      batch = place(np.arange(s, s + b))
    else:
      sl = slice(s, s + b)
      batch = train.as_batch(rows.inputs[sl], rows.targets[sl], rows.input_mask[sl],
                             None if rows.segments is None else rows.segments[sl],
                             None if rows.positions is None else rows.positions[sl])
    nats, tokens = jax.device_get(_lm_sums(model, batch, tcfg, options))
    total, count = total + float(nats), count + float(tokens)
  loss = total / max(count, 1.0)
  return {"val_loss": loss, "val_bpb": loss / math.log(2) / val.bytes_per_token,
          "val_tokens": count}

