"""Data: readers, tokenizers, packing, the resumable batch iterator, and clear errors for bad
input."""

import json

import numpy as np
import pytest

from deepseek_v4 import data


@pytest.fixture
def tok():
  return data.byte_tokenizer()


def test_byte_tokenizer_round_trip(tok):
  text = "def f(x):\n    return x ** 2  # é ✓"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert min(ids) >= 0 and max(ids) < tok.vocab_size
  assert tok.eos_id not in ids and tok.bos_id not in ids


def test_concat_packing_rows_and_targets():
  docs = [(np.arange(10, 17, dtype=np.int32), np.ones(7, bool)),
          (np.arange(20, 26, dtype=np.int32), np.ones(6, bool))]
  rows = data.pack(docs, seq_len=4)
  stream = np.concatenate([d[0] for d in docs])  # 13 tokens -> (13 - 1) // 4 = 3 rows
  assert len(rows) == 3
  for r in range(3):
    np.testing.assert_array_equal(rows.inputs[r], stream[4 * r: 4 * r + 4])
    np.testing.assert_array_equal(rows.targets[r], stream[4 * r + 1: 4 * r + 5])
  assert rows.input_mask.all()


def test_prompt_tokens_are_not_scored(tmp_path, tok):
  path = tmp_path / "sft.jsonl"
  path.write_text(json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}) + "\n" +
                  json.dumps({"text": "plain"}) + "\n")
  docs = data.read_documents(str(path))
  assert docs == [data.Document(" 4", "Q: 2+2?"), data.Document("plain")]
  (ids, scored), _ = data.tokenize(docs, tok)
  n_prompt = len(tok.encode("Q: 2+2?"))
  assert not scored[:n_prompt].any() and scored[n_prompt:].all() and ids[-1] == tok.eos_id
  rows = data.pack(data.tokenize(docs, tok), seq_len=32, mode="pad", pad_id=tok.eos_id)
  assert len(rows) == 2
  # Row 0: targets scored only from the completion on; padding neither scored nor "real".
  t0 = rows.targets[0]
  assert (t0[: n_prompt - 1] == data.IGNORE).all() and (t0[n_prompt - 1: n_prompt + 2] >= 0).all()
  assert (t0[n_prompt + 2:] == data.IGNORE).all()
  assert rows.input_mask[0, : n_prompt + 3].all() and not rows.input_mask[0, n_prompt + 3:].any()


def test_text_file_and_folder(tmp_path, tok):
  (tmp_path / "a.txt").write_text("hello world")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.md").write_text("second")
  assert [d.text for d in data.read_documents(str(tmp_path))] == ["hello world", "second"]
  rows = data.load_rows(str(tmp_path / "a.txt"), tok, seq_len=8)
  assert rows.inputs.shape == (1, 8)


def test_missing_empty_and_short_data_fail_clearly(tmp_path, tok):
  with pytest.raises(FileNotFoundError, match="data file not found"):
    data.load_rows(str(tmp_path / "nope.txt"), tok, 16)
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="is empty"):
    data.load_rows(str(tmp_path / "empty.txt"), tok, 16)
  (tmp_path / "blank.jsonl").write_text("\n\n")
  with pytest.raises(ValueError, match="is empty"):
    data.load_rows(str(tmp_path / "blank.jsonl"), tok, 16)
  (tmp_path / "short.txt").write_text("tiny")
  with pytest.raises(ValueError, match=r"has 5 tokens; one training sequence needs seq_len \+ 1 "
                                       r"= 17"):
    data.load_rows(str(tmp_path / "short.txt"), tok, 16)
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
    data.read_documents(str(tmp_path / "bad.jsonl"))
  (tmp_path / "keys.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match="needs 'text' or 'prompt'/'completion'"):
    data.read_documents(str(tmp_path / "keys.jsonl"))


def test_batches_resume_exactly():
  toks = np.arange(1000, dtype=np.int32) % 250 + 2
  rows = data.pack([(toks, np.ones(len(toks), bool))], seq_len=10)
  a = data.Batches(rows, batch_size=7, seed=3)
  seq = [a.next() for _ in range(40)]  # crosses several epochs (99 rows)
  b = data.Batches(rows, batch_size=7, seed=3)
  for _ in range(17):
    b.next()
  c = data.Batches(rows, batch_size=7, seed=3, state=b.state())
  for want in seq[17:]:
    got = c.next()
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
  assert a.epoch >= 2


def test_demo_corpus_is_python_source(tok):
  docs = data.demo_corpus(max_bytes=50_000)
  assert docs and sum(len(d.text) for d in docs) >= 50_000
  assert any("def " in d.text for d in docs)


def test_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers

  vocab = {"<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "[UNK]": 2, "hello": 3,
           "world": 4}
  t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.save(str(tmp_path / "tokenizer.json"))
  tok = data.get_tokenizer(str(tmp_path))
  assert tok.encode("hello world hello") == [3, 4, 3]
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 5)
  with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
    data.get_tokenizer(str(tmp_path / "missing.json"))


def test_pad_packing_splits_long_documents_without_truncation():
  """`pad` keeps one document per row; a longer document continues in further rows, so every
  next-token target of every document is scored exactly once."""
  from deepseek_v4.data import pack

  docs = [(np.arange(10), np.ones(10, bool)), (np.arange(100, 103), np.ones(3, bool))]
  p = pack(docs, 4, "pad")
  np.testing.assert_array_equal(p.inputs[:, 0], [0, 4, 8, 100])
  scored = p.targets[p.targets >= 0]
  np.testing.assert_array_equal(np.sort(scored), [1, 2, 3, 4, 5, 6, 7, 8, 9, 101, 102])
  real = p.input_mask > 0
  doc_a = ((p.inputs < 10) & real).any(axis=1)
  doc_b = ((p.inputs >= 100) & real).any(axis=1)
  assert not (doc_a & doc_b).any()  # no row mixes documents


# ----- aligned packing (sample-level masking, docs/architecture.md#schedule) ----------------------
def _docs(*lengths, start=10):
  out = []
  for i, n in enumerate(lengths):
    out.append((np.arange(n, dtype=np.int32) + start + 100 * i, np.ones(n, bool)))
  return out


def _check_aligned(rows, docs, seq_len, align):
  R, T = rows.inputs.shape
  assert T == seq_len and rows.segments.shape == rows.positions.shape == (R, T)
  assert rows.segments.dtype == rows.positions.dtype == np.int32
  assert (np.diff(rows.segments, axis=1) >= 0).all()  # non-decreasing along a row
  pairs = []  # every (input, target) pair the rows score
  for r in range(R):
    seg, pos = rows.segments[r], rows.positions[r]
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    assert (starts % align == 0).all(), starts  # every piece starts at an aligned offset
    for s, e in zip(starts, np.r_[starts[1:], T]):
      np.testing.assert_array_equal(pos[s:e], np.arange(e - s))  # padding keeps counting
      real = rows.input_mask[r, s:e] > 0
      n = int(real.sum())
      assert real[:n].all() and not real[n:].any()  # real tokens, then padding
      assert (rows.targets[r, s + n:e] == data.IGNORE).all()  # padding not scored
      # The last real input predicts the next token of its own document, never the next piece's.
      pairs += [(int(rows.inputs[r, j]), int(rows.targets[r, j])) for j in range(s, s + n)]
  expected = [(int(ids[k]), int(ids[k + 1])) for ids, _ in docs for k in range(len(ids) - 1)]
  # No token dropped, none duplicated, no target across documents.
  assert sorted(pairs) == sorted(expected)


@pytest.mark.parametrize("lengths,seq_len,align", [
  ((10, 7, 30), 32, 8), ((5,), 16, 4), ((70, 3, 17, 17, 2), 32, 16), ((33, 32, 31), 32, 16),
  ((12, 12), 24, 16)])
def test_aligned_packing_segments_positions_and_targets(lengths, seq_len, align):
  docs = _docs(*lengths)
  rows = data.pack(docs, seq_len, "aligned", pad_id=1, align=align)
  _check_aligned(rows, docs, seq_len, align)


def test_aligned_packing_layout():
  docs = _docs(6, 5)  # 5 and 4 inputs
  rows = data.pack(docs, 16, "aligned", pad_id=1, align=8)
  assert len(rows) == 1
  np.testing.assert_array_equal(rows.segments[0], [0] * 8 + [1] * 8)
  np.testing.assert_array_equal(rows.positions[0], list(range(8)) * 2)
  np.testing.assert_array_equal(rows.inputs[0, :5], docs[0][0][:5])
  np.testing.assert_array_equal(rows.targets[0, :5], docs[0][0][1:])
  np.testing.assert_array_equal(rows.inputs[0, 8:12], docs[1][0][:4])
  np.testing.assert_array_equal(rows.targets[0, 8:12], docs[1][0][1:])
  assert (rows.inputs[0, 5:8] == 1).all() and (rows.targets[0, 5:8] == data.IGNORE).all()
  np.testing.assert_array_equal(rows.input_mask[0], [1] * 5 + [0] * 3 + [1] * 4 + [0] * 4)


def test_aligned_packing_continues_long_documents_as_new_segments():
  docs = _docs(40)  # 39 inputs in rows of 16: 16 + 16 + 7
  rows = data.pack(docs, 16, "aligned", pad_id=1, align=4)
  assert len(rows) == 3
  np.testing.assert_array_equal(rows.inputs[1], docs[0][0][16:32])
  np.testing.assert_array_equal(rows.targets[0, -1], docs[0][0][16])  # the row's last target
  assert (rows.positions[1] == np.arange(16)).all() and (rows.segments[1] == 0).all()
  _check_aligned(rows, docs, 16, 4)


def test_aligned_batches_carry_segments_and_prompts_stay_unscored(tok):
  docs = [data.Document(" 4", "Q: 2+2?"), data.Document("plain text")]
  rows = data.pack(data.tokenize(docs, tok), 32, "aligned", pad_id=tok.eos_id, align=16)
  n_prompt = len(tok.encode("Q: 2+2?"))
  assert (rows.targets[0, : n_prompt - 1] == data.IGNORE).all()
  assert (rows.targets[0, n_prompt - 1: n_prompt + 2] >= 0).all()
  b = data.Batches(rows, 3, seed=0).next()
  assert set(b) == {"inputs", "targets", "input_mask", "segments", "positions"}
  assert b["segments"].shape == b["positions"].shape == (3, 32)
  assert "segments" not in data.Batches(data.pack(data.tokenize(docs, tok), 4), 2).next()


def test_packing_align_of_model_config():
  import deepseek_v4
  assert data.packing_align(deepseek_v4.tiny()) == 16
  assert data.packing_align(deepseek_v4.tiny(compress_ratios=(0, 0), num_hash_layers=0)) == 4
