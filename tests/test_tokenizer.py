"""Byte tokenizer, Hugging Face tokenizer.json loading, and the V4 chat encoding
(docs/architecture.md#tokenizer)."""

import json

import pytest

from deepseek_v4 import tokenizer as T


def test_byte_tokenizer_round_trip():
  tok = T.ByteTokenizer()
  # "<｜User|>" (ASCII | at the end) is not a special token: it stays bytes.
  text = T.BOS + "héllo ✓" + T.USER + "<｜User|>" + T.EOS
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id == 0 and ids[-1] == tok.eos_id == 1
  assert tok.token_to_id(T.USER) in ids
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special_tokens=True) == "héllo ✓<｜User|>"
  assert max(ids) < tok.vocab_size == 270


def test_stream_decoder_holds_split_characters():
  tok = T.ByteTokenizer()
  dec = T.StreamDecoder(tok)
  pieces = [dec.push([i]) for i in tok.encode("a✓b")]  # ✓ is 3 bytes
  assert pieces == ["a", "", "", "✓", "b"]


def test_chat_single_turn():
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  assert T.encode_messages(msgs) == f"{T.BOS}Be brief.{T.USER}Hi{T.ASSISTANT}{T.END_THINK}"
  assert T.encode_messages(msgs, "thinking").endswith(f"{T.USER}Hi{T.ASSISTANT}{T.THINK}")
  assert not T.encode_messages(msgs, add_default_bos_token=False).startswith(T.BOS)


def test_multi_turn_drops_old_reasoning():
  msgs = [{"role": "user", "content": "1+1?"},
          {"role": "assistant", "reasoning_content": "add", "content": "2"},
          {"role": "user", "content": "and 2+2?"}]
  chat = T.encode_messages(msgs)
  assert chat == (f"{T.BOS}{T.USER}1+1?{T.ASSISTANT}{T.END_THINK}2{T.EOS}"
                  f"{T.USER}and 2+2?{T.ASSISTANT}{T.END_THINK}")
  think = T.encode_messages(msgs, "thinking")
  assert "add" not in think
  assert think.endswith(f"{T.USER}and 2+2?{T.ASSISTANT}{T.THINK}")
  kept = T.encode_messages(msgs, "thinking", drop_thinking=False)
  assert f"{T.ASSISTANT}{T.THINK}add{T.END_THINK}2{T.EOS}" in kept


def test_tool_calls_and_results():
  tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
  msgs = [{"role": "system", "content": "S", "tools": tools},
          {"role": "user", "content": "weather?"},
          {"role": "assistant", "content": "",
           "tool_calls": [{"id": "a", "function": {"name": "get", "arguments": '{"city": "Oslo"}'}},
                          {"id": "b", "function": {"name": "get", "arguments": {"n": 2}}}]},
          {"role": "tool", "tool_call_id": "b", "content": "r2"},
          {"role": "tool", "tool_call_id": "a", "content": "r1"}]
  text = T.encode_messages(msgs)
  assert "## Tools" in text and json.dumps(tools[0]["function"]) in text
  call = (f'\n\n<{T.DSML}tool_calls>\n<{T.DSML}invoke name="get">\n'
          f'<{T.DSML}parameter name="city" string="true">Oslo</{T.DSML}parameter>\n'
          f'</{T.DSML}invoke>\n<{T.DSML}invoke name="get">\n'
          f'<{T.DSML}parameter name="n" string="false">2</{T.DSML}parameter>\n'
          f'</{T.DSML}invoke>\n</{T.DSML}tool_calls>{T.EOS}')
  assert call in text
  # Results join one user turn, ordered like the calls.
  assert text.endswith(f"{T.EOS}{T.USER}<tool_result>r1</tool_result>\n\n"
                       f"<tool_result>r2</tool_result>{T.ASSISTANT}{T.END_THINK}")


def test_reminder_and_tasks():
  msgs = [{"role": "user", "content": "q"}, {"role": "latest_reminder", "content": "today"}]
  assert T.encode_messages(msgs).endswith(f"{T.ASSISTANT}{T.END_THINK}{T.LATEST_REMINDER}today")
  msgs = [{"role": "user", "content": "q", "task": "title"}]
  assert T.encode_messages(msgs).endswith(f"{T.USER}q{T.TASK_TOKENS['title']}")
  msgs = [{"role": "user", "content": "q", "task": "action"}]
  assert T.encode_messages(msgs).endswith(f"{T.ASSISTANT}{T.END_THINK}{T.TASK_TOKENS['action']}")


def test_encoding_errors():
  with pytest.raises(ValueError, match="thinking_mode='fast'"):
    T.encode_messages([{"role": "user", "content": "x"}], "fast")
  with pytest.raises(ValueError, match="reasoning_effort='max'"):
    T.encode_messages([{"role": "user", "content": "x"}], "thinking", reasoning_effort="max")
  with pytest.raises(ValueError, match="role 'robot'"):
    T.encode_messages([{"role": "robot", "content": "x"}])


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, pre_tokenizers

  vocab = {"[UNK]": 0, "hello": 1, "world": 2, "!": 3}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([T.BOS, T.EOS, T.USER, T.ASSISTANT])
  tok.save(str(tmp_path / "tokenizer.json"))
  hf = T.load_tokenizer(tmp_path)
  assert isinstance(hf, T.HFTokenizer)
  assert (hf.bos_id, hf.eos_id) == (4, 5) and hf.vocab_size == 8
  ids = hf.encode(f"{T.BOS}{T.USER}hello world!{T.ASSISTANT}")
  assert ids == [4, 6, 1, 2, 3, 7]  # specials in the text are matched; none are added
  assert hf.encode("hello") == [1]
  assert hf.decode(ids, skip_special_tokens=True) == "hello world !"
  assert isinstance(T.load_tokenizer(tmp_path / "missing"), T.ByteTokenizer)
  with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
    T.HFTokenizer(tmp_path / "nope.json")
