"""A file that is not a tokenizer.json gives a ValueError naming its path, not a raw traceback
from the tokenizers library (never raw tracebacks)."""

from __future__ import annotations

import json

import pytest

from deepseek_v4 import data
from deepseek_v4 import tokenizer as T

pytest.importorskip("tokenizers")


@pytest.mark.parametrize("content,needle", [
  (json.dumps({"vocab_size": 512, "hidden_size": 64}), "not a tokenizer"),
  (json.dumps([1, 2, 3]), "a JSON list"),
  ('{"model": {"type": "BPE", "vocab": ', "not valid JSON"),
  (json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}), "cannot read it"),
  (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "not a text file"),
], ids=["config_json", "list", "truncated", "unknown_model", "binary"])
def test_not_a_tokenizer_json_names_the_path(tmp_path, content, needle):
  path = tmp_path / "tokenizer.json"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  for load in (T.HFTokenizer, T.load_tokenizer, data.get_tokenizer):
    with pytest.raises(ValueError) as info:
      load(str(path))
    assert str(path) in str(info.value) and needle in str(info.value)
    assert "tokenizer.json" in str(info.value)
  with pytest.raises(ValueError, match=needle):
    T.HFTokenizer(tmp_path)  # the folder: its tokenizer.json


def test_a_config_json_given_as_tokenizer(tmp_path):
  path = tmp_path / "config.json"
  path.write_text(json.dumps({"model_type": "deepseek_v4", "vocab_size": 512}))
  with pytest.raises(ValueError) as info:
    T.HFTokenizer(path)
  assert str(path) in str(info.value) and "model_type" in str(info.value)
