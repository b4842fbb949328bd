"""Bad training data is refused, naming the file (and line), instead of trained on silently:
non-string .jsonl fields, binary and non-UTF-8 files, the same in folders."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from deepseek_v4 import data


def _jsonl(tmp_path, rows, name="d.jsonl") -> str:
  path = os.path.join(tmp_path, name)
  with open(path, "w") as f:
    f.write("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
  return path


@pytest.mark.parametrize("row,needles", [
  ({"text": None}, ("'text' must be a string", "NoneType")),
  ({"text": ["a", "b"]}, ("'text' must be a string", "list")),
  ({"text": 3}, ("'text' must be a string", "int 3")),
  ({"text": {"a": 1}}, ("'text'", "dict")),
  ({"prompt": "q", "completion": None}, ("'completion' must be a string",)),
  ({"prompt": 7, "completion": "a"}, ("'prompt' must be a string", "int 7")),
  ({"prompt": None, "completion": "a"}, ("'prompt' must be a string",)),
], ids=["null", "list", "number", "object", "null_completion", "number_prompt", "null_prompt"])
def test_non_string_fields_are_refused_with_file_and_line(tmp_path, row, needles):
  path = _jsonl(tmp_path, [{"text": "fine"}, "", row])
  with pytest.raises(ValueError) as info:
    data.read_documents(path)
  assert f"{path}:3:" in str(info.value)
  for needle in needles:
    assert needle in str(info.value)


def test_long_bad_values_are_shortened(tmp_path):
  path = _jsonl(tmp_path, [{"text": list(range(1000))}])
  with pytest.raises(ValueError) as info:
    data.read_documents(path)
  assert len(str(info.value)) < len(path) + 150 and "..." in str(info.value)


def test_string_rows_still_read(tmp_path):
  path = _jsonl(tmp_path, [{"text": "a\u2028b"}, {"prompt": "q", "completion": "a"},
                           {"completion": "c"}])
  docs = data.read_documents(path)
  assert [(d.prompt, d.text) for d in docs] == [("", "a\u2028b"), ("q", "a"), ("", "c")]


def test_crlf_and_bom_jsonl(tmp_path):
  path = os.path.join(tmp_path, "w.jsonl")
  with open(path, "wb") as f:
    f.write(b'\xef\xbb\xbf{"text": "one"}\r\n{"text": "two"}\r\n')
  assert [d.text for d in data.read_documents(path)] == ["one", "two"]


def _binary() -> bytes:
  # A PNG-like header and random-looking bytes: mostly not UTF-8.
  return bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]) + bytes(
    (i * 97 + 13) % 256 for i in range(2000))


@pytest.mark.parametrize("name", ["blob.txt", "blob.md", "blob.jsonl"])
def test_binary_file_is_refused(tmp_path, name):
  path = os.path.join(tmp_path, name)
  with open(path, "wb") as f:
    f.write(_binary())
  with pytest.raises(ValueError) as info:
    data.read_documents(path)
  assert path in str(info.value) and "not a" in str(info.value)


def test_non_utf8_without_nul_is_refused_with_the_count(tmp_path):
  path = os.path.join(tmp_path, "latin1.txt")
  text = "Grüße aus Köln, schön! " * 20
  with open(path, "wb") as f:
    f.write(text.encode("latin-1"))
  with pytest.raises(ValueError) as info:
    data.read_documents(path)
  n_bad = sum(1 for ch in text if ord(ch) > 127)
  assert path in str(info.value) and f"{n_bad} undecodable bytes" in str(info.value)


def test_text_with_a_few_bad_bytes_is_read_with_a_warning(tmp_path):
  path = os.path.join(tmp_path, "mostly.txt")
  body = ("plain ascii text " * 100).encode()
  with open(path, "wb") as f:
    f.write(body[:50] + b"\xff\xfe" + body[50:])
  with pytest.warns(UserWarning) as record:
    docs = data.read_documents(path)
  message = str(record[0].message)
  assert path in message and "2 undecodable byte" in message and "at byte 50" in message
  assert docs[0].text.count("\ufffd") == 2 and len(docs[0].text) == len(body) + 2


def test_clean_utf8_gives_no_warning(tmp_path):
  path = os.path.join(tmp_path, "ok.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("naïve café \ufffd kept as written")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert data.read_documents(path)[0].text == "naïve café \ufffd kept as written"


def test_folder_applies_the_rules_per_file(tmp_path):
  (tmp_path / "a.txt").write_text("good text")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
  with pytest.raises(ValueError) as info:
    data.read_documents(str(tmp_path))
  assert f"{tmp_path / 'sub' / 'b.jsonl'}:2:" in str(info.value)
  (tmp_path / "sub" / "b.jsonl").write_text('{"text": "fine"}\n')
  (tmp_path / "c.md").write_bytes(_binary())
  with pytest.raises(ValueError) as info:
    data.read_documents(str(tmp_path))
  assert str(tmp_path / "c.md") in str(info.value)
  (tmp_path / "c.md").unlink()
  assert [d.text for d in data.read_documents(str(tmp_path))] == ["good text", "fine"]
