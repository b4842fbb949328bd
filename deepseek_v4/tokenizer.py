"""Tokenizers and DeepSeek-V4's chat encoding (docs/architecture.md#tokenizer).

* `HFTokenizer`: a Hugging Face `tokenizer.json` (the released V4 BPE tokenizer) through the
  `tokenizers` library. Text is encoded WITHOUT adding special tokens (the chat encoding writes
  BOS itself); special-token strings inside the text (`<｜User｜>`, ...) become their ids.
* `ByteTokenizer`: UTF-8 bytes plus the chat special tokens, for models trained here
  (vocab = 14 specials + 256 bytes = 270 ids; BOS = 0 and EOS = 1, as in the V4 config).
* `encode_messages`: the V4 prompt format. There is no Jinja template: the official
  `encoding/encoding_dsv4.py` builds the prompt string, which is then tokenized without special
  tokens. This is a simplified re-implementation of its conventions as the spec lists them:
  BOS, system text, `<｜User｜>{text}`, `<｜Assistant｜>` + `</think>` (chat) or `<think>`
  (thinking), completed assistant turns `{reasoning}</think>{content}{tool calls}` + EOS, tool
  results merged into the next user turn as `<tool_result>...</tool_result>`, DSML tool calls,
  `<｜latest_reminder｜>`, and the quick-instruction task tokens. Simplified / UNVERIFIED: the
  wording of the "## Tools" preamble (ours is shorter; the schemas are one JSON object per line
  as in the official one) and the reasoning-effort preamble (not reproduced: pass
  `reasoning_effort=None`). Special-token ids of the released tokenizer come from
  `tokenizer.json` itself, never from a table here.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Sequence

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
LATEST_REMINDER = "<｜latest_reminder｜>"
DSML = "｜DSML｜"
TASK_TOKENS = {
  "action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
  "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>",
}
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, LATEST_REMINDER, DSML,
                  *TASK_TOKENS.values())


# ----- tokenizers ---------------------------------------------------------------------------------
class ByteTokenizer:
  """UTF-8 bytes with the chat special tokens first: id i < 14 is SPECIAL_TOKENS[i], byte b is
  id 14 + b. Special-token strings in the text are matched (longest first) before bytes."""

  def __init__(self, specials: Sequence[str] = SPECIAL_TOKENS):
    self.specials = tuple(specials)
    self.offset = len(self.specials)
    self._ids = {s: i for i, s in enumerate(self.specials)}
    alts = sorted(self.specials, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(re.escape(s) for s in alts) + ")")

  @property
  def vocab_size(self) -> int:
    return self.offset + 256

  @property
  def bos_id(self) -> int:
    return self._ids[BOS]

  @property
  def eos_id(self) -> int:
    return self._ids[EOS]

  def token_to_id(self, token: str) -> int | None:
    return self._ids.get(token)

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for part in self._split.split(text):
      if part in self._ids:
        ids.append(self._ids[part])
      elif part:
        ids.extend(b + self.offset for b in part.encode("utf-8"))
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; ids past the vocabulary (unused embedding rows) decode to nothing."""
    out, buf = [], bytearray()
    for i in map(int, ids):
      if not (0 <= i < self.vocab_size):
        continue  # a model's unused rows past the byte vocabulary have no text
      if i >= self.offset:
        buf.append(i - self.offset)
        continue
      out.append(buf.decode("utf-8", errors="replace"))
      buf = bytearray()
      if not skip_special_tokens:
        out.append(self.specials[i])
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (path or its folder), via the `tokenizers` library."""

  def __init__(self, path: str | os.PathLike):
    """Raises FileNotFoundError (no such file) or ValueError naming `path` (not a tokenizer.json:
    not UTF-8 JSON, a JSON file of another kind, or one the tokenizers library refuses)."""
    from tokenizers import Tokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path!r}")
    self.path = path
    self._tok = _read_tokenizer_json(path, Tokenizer)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self.token_to_id(BOS)

  @property
  def eos_id(self) -> int | None:
    return self.token_to_id(EOS)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no special tokens are added (docs/architecture.md#tokenizer), those in
    the text are kept."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _read_tokenizer_json(path: str, tokenizer_cls):
  """`tokenizer_cls.from_str` of the file at `path`; a ValueError naming it if it is not a
  tokenizer.json."""
  expected = "expected a Hugging Face tokenizer.json"
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    spec = json.loads(text)
  except UnicodeDecodeError:
    raise ValueError(f"{path}: not a text file (not UTF-8); {expected}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                     f"{expected}") from None
  if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
    kind = (f"a JSON object with keys {sorted(spec)[:8]}" if isinstance(spec, dict)
            else f"a JSON {type(spec).__name__}")
    raise ValueError(f"{path}: {kind}, not a tokenizer (no 'model' object); {expected}")
  try:
    return tokenizer_cls.from_str(text)
  except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
    raise ValueError(f"{path}: the tokenizers library cannot read it ({e}); {expected}") from None


def load_tokenizer(path: str | os.PathLike | None):
  """`HFTokenizer` for a tokenizer.json (or a folder holding one), else a `ByteTokenizer`."""
  if path is not None:
    p = os.fspath(path)
    if os.path.isfile(p) or os.path.isfile(os.path.join(p, "tokenizer.json")):
      return HFTokenizer(p)
  return ByteTokenizer()


class StreamDecoder:
  """Incremental detokenization: `push(ids)` returns the new text once it is complete (a
  multi-byte character split across tokens is held back until its last byte arrives)."""

  def __init__(self, tokenizer, skip_special_tokens: bool = False):
    self.tokenizer = tokenizer
    self.skip = skip_special_tokens
    self.ids: list[int] = []
    self.shown = 0

  def push(self, ids: Sequence[int]) -> str:
    self.ids.extend(int(i) for i in ids)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
    if text.endswith("\ufffd"):
      return ""
    new, self.shown = text[self.shown:], len(text)
    return new

  def flush(self) -> str:
    """Whatever is still held back (e.g. an incomplete character at the very end)."""
    text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
    new, self.shown = text[self.shown:], len(text)
    return new


# ----- chat encoding (docs/architecture.md#tokenizer) ---------------------------------------------
def _to_json(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False)


def render_tools(tools: Sequence[dict]) -> str:
  """A "## Tools" section: how to call tools in DSML, then one JSON schema per line.

  Simplified: the official preamble's exact wording is UNVERIFIED here; the call syntax and the
  one-schema-per-line layout follow the spec.
  """
  funcs = [t.get("function", t) for t in tools]
  example = (f"<{DSML}tool_calls>\n<{DSML}invoke name=\"$TOOL_NAME\">\n"
             f"<{DSML}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$VALUE"
             f"</{DSML}parameter>\n...\n</{DSML}invoke>\n</{DSML}tool_calls>")
  return ("## Tools\n\nYou can call the tools below by writing a block like this:\n\n"
          f"{example}\n\nUse string=\"true\" for string values and string=\"false\" with a JSON "
          "value for every other type.\n\n### Available Tool Schemas\n\n"
          + "\n".join(_to_json(f) for f in funcs))


def render_tool_calls(tool_calls: Sequence[dict]) -> str:
  """`\\n\\n<｜DSML｜tool_calls>...` with one invoke per call (docs/architecture.md#tokenizer)."""
  invokes = []
  for tc in tool_calls:
    fn = tc.get("function", tc)
    args = fn.get("arguments", {})
    if isinstance(args, str):
      try:
        args = json.loads(args)
      except json.JSONDecodeError:
        args = {"arguments": args}
    params = []
    for k, v in args.items():
      raw = isinstance(v, str)  # raw strings as they are, everything else as JSON
      params.append(f"<{DSML}parameter name=\"{k}\" string=\"{'true' if raw else 'false'}\">"
                    f"{v if raw else _to_json(v)}</{DSML}parameter>")
    invokes.append(f"<{DSML}invoke name=\"{fn['name']}\">\n" + "\n".join(params)
                   + f"\n</{DSML}invoke>")
  return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def merge_tool_messages(messages: Sequence[dict]) -> list[dict]:
  """V4 has no tool role: tool results become `<tool_result>` blocks of a user turn, and
  consecutive user / tool turns merge into one (blocks joined by a blank line). The results are
  ordered like the calls of the last assistant turn (matched by `tool_call_id`)."""
  out: list[dict] = []
  order: dict[str, int] = {}
  for msg in messages:
    msg = copy.deepcopy(msg)
    role = msg.get("role")
    if role == "assistant" and msg.get("tool_calls"):
      order = {tc.get("id", ""): i for i, tc in enumerate(msg["tool_calls"]) if tc.get("id")}
    if role not in ("tool", "user"):
      out.append(msg)
      continue
    if role == "tool":
      block = {"type": "tool_result", "id": msg.get("tool_call_id", ""),
               "content": msg.get("content", "")}
    else:
      block = {"type": "text", "text": msg.get("content") or ""}
    prev = out[-1] if out else {}
    if prev.get("role") == "user" and "blocks" in prev and prev.get("task") is None:
      prev["blocks"].append(block)
    else:
      extra = {k: msg[k] for k in ("task", "wo_eos") if role == "user" and k in msg}
      out.append({"role": "user", "blocks": [block], "_order": order, **extra})
  for msg in out:
    if "blocks" in msg:
      rank = msg.pop("_order")
      results = iter(sorted((b for b in msg["blocks"] if b["type"] == "tool_result"),
                            key=lambda b: rank.get(b["id"], 0)))
      msg["blocks"] = [next(results) if b["type"] == "tool_result" else b for b in msg["blocks"]]
  return out


def _user_text(msg: dict) -> str:
  if "blocks" not in msg:
    return msg.get("content") or ""
  return "\n\n".join(f"<tool_result>{b['content']}</tool_result>" if b["type"] == "tool_result"
                     else b["text"] for b in msg["blocks"])


def _last_user(messages: Sequence[dict]) -> int:
  for i in range(len(messages) - 1, -1, -1):
    if messages[i].get("role") in ("user", "developer"):
      return i
  return -1


def _render(i: int, msgs: Sequence[dict], thinking: bool, drop: bool) -> str:
  msg, role = msgs[i], msgs[i].get("role")
  last_user = _last_user(msgs)
  out = ""
  if role == "system":
    out += msg.get("content") or ""
    if msg.get("tools"):
      out += "\n\n" + render_tools(msg["tools"])
  elif role in ("user", "developer"):
    out += USER + _user_text(msg)
    if role == "developer" and msg.get("tools"):
      out += "\n\n" + render_tools(msg["tools"])
  elif role == "latest_reminder":
    out += LATEST_REMINDER + (msg.get("content") or "")
  elif role == "assistant":
    prev_task = i > 0 and msgs[i - 1].get("task") is not None
    reasoning = ""
    if thinking and not prev_task and (not drop or i > last_user):
      reasoning = (msg.get("reasoning_content") or "") + END_THINK
    calls = render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
    out += reasoning + (msg.get("content") or "") + calls
    out += "" if msg.get("wo_eos") else EOS
  else:
    raise ValueError(f"unknown message role {role!r} (message {i}); expected system, user, "
                     "developer, assistant, tool or latest_reminder")
  # The turn change is written only before an assistant / reminder message or at the end.
  if i + 1 < len(msgs) and msgs[i + 1].get("role") not in ("assistant", "latest_reminder"):
    return out
  task = msg.get("task")
  if task is not None:
    if task not in TASK_TOKENS:
      raise ValueError(f"task={task!r}; expected one of {sorted(TASK_TOKENS)}")
    if task == "action":
      out += ASSISTANT + (THINK if thinking else END_THINK) + TASK_TOKENS[task]
    else:
      out += TASK_TOKENS[task]
  elif role in ("user", "developer"):
    opens = thinking and (not drop or i >= last_user)
    out += ASSISTANT + (THINK if opens else END_THINK)
  return out


def encode_messages(messages: Sequence[dict], thinking_mode: str = "chat",
                    drop_thinking: bool = True, add_default_bos_token: bool = True,
                    reasoning_effort: str | None = None) -> str:
  """The V4 prompt string of an OpenAI-style message list (tokenize it without special tokens).

  Args:
    messages: dicts with `role` (system, user, developer, assistant, tool, latest_reminder) and
      `content`; assistant turns may carry `reasoning_content` and `tool_calls`; system /
      developer turns may carry `tools`; tool turns carry `tool_call_id`; any turn may carry a
      quick-instruction `task`.
    thinking_mode: "chat" (the assistant turn opens with `</think>`) or "thinking" (`<think>`).
    drop_thinking: in thinking mode, drop the reasoning of assistant turns before the last user
      turn (never when any message carries tools).
    add_default_bos_token: start with BOS.
    reasoning_effort: must be None (the official effort preambles are not reproduced here).
  Returns:
    The prompt text.
  """
  if thinking_mode not in ("chat", "thinking"):
    raise ValueError(f"thinking_mode={thinking_mode!r}; expected 'chat' or 'thinking'")
  if reasoning_effort is not None:
    raise ValueError(f"reasoning_effort={reasoning_effort!r} is not supported: the official "
                     "effort preamble is not reproduced here (put it in the system message)")
  msgs = merge_tool_messages(messages)
  thinking = thinking_mode == "thinking"
  drop = drop_thinking and not any(m.get("tools") for m in msgs)
  if thinking and drop:
    last_user = _last_user(msgs)
    kept = []
    for i, m in enumerate(msgs):
      if i < last_user and m.get("role") == "developer":
        continue  # earlier developer turns are dropped with the old reasoning
      if i < last_user and m.get("role") == "assistant":
        m = {k: v for k, v in m.items() if k != "reasoning_content"}
      kept.append(m)
    msgs = kept
  prompt = BOS if add_default_bos_token else ""
  return prompt + "".join(_render(i, msgs, thinking, drop) for i in range(len(msgs)))
