"""`python -m deepseek_v4 generate`: load a checkpoint, generate from a prompt, stream the text.

  python -m deepseek_v4 generate --checkpoint DIR --prompt "Hello" --max-new-tokens 64
  python -m deepseek_v4 generate --checkpoint DIR --prompt "Hi" --chat --temperature 1.0

The tokenizer is DIR/tokenizer.json when present (or `--tokenizer PATH`), else the byte
tokenizer of models trained here. Tokens are printed as the jitted loop produces them (an ordered
`jax.debug.callback`, see `deepseek_v4.decoding.generate`).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from deepseek_v4.cli import positive_int

  parser.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="folder with config.json and *.safetensors (hub or transformers names)")
  parser.add_argument("--prompt", required=True, help="prompt text")
  parser.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N")
  parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                      help="0 = greedy (default); the V4 release recommends 1.0")
  parser.add_argument("--top-k", type=positive_int, default=None, metavar="K")
  parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus, in (0, 1]")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--chat", action="store_true",
                      help="wrap the prompt as one user turn in the V4 chat encoding")
  parser.add_argument("--thinking", action="store_true", help="chat in thinking mode (<think>)")
  parser.add_argument("--tokenizer", metavar="PATH", default=None,
                      help="tokenizer.json (default: the checkpoint's, else bytes)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")


def run(args: argparse.Namespace, out=None) -> int:
  import jax.numpy as jnp

  from deepseek_v4 import decoding, tokenizer
  from deepseek_v4.checkpoint import load_hf_checkpoint

  out = out or sys.stdout
  tok = tokenizer.load_tokenizer(args.tokenizer or args.checkpoint)
  if args.tokenizer and isinstance(tok, tokenizer.ByteTokenizer):
    raise ValueError(f"--tokenizer {args.tokenizer!r}: no tokenizer.json there")
  model = load_hf_checkpoint(args.checkpoint, dtype=jnp.dtype(args.dtype))
  cfg = model.cfg
  if tok.vocab_size > cfg.vocab_size and isinstance(tok, tokenizer.ByteTokenizer):
    raise ValueError(f"the checkpoint has vocab_size={cfg.vocab_size}, too small for the byte "
                     f"tokenizer ({tok.vocab_size} ids) and there is no tokenizer.json in "
                     f"{args.checkpoint!r}")
  if args.chat or args.thinking:
    text = tokenizer.encode_messages([{"role": "user", "content": args.prompt}],
                                     thinking_mode="thinking" if args.thinking else "chat")
  else:
    text = args.prompt
  ids = tok.encode(text)
  if not ids:
    raise ValueError(f"--prompt {args.prompt!r} encodes to no tokens")
  stops = tuple(i for i in (tok.eos_id,) if i is not None and i < cfg.vocab_size)
  dec = tokenizer.StreamDecoder(tok, skip_special_tokens=True)
  decoding.generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=stops,
                    stream=printer(dec, out)).block_until_ready()
  out.write(dec.flush() + "\n")
  out.flush()
  return 0


def printer(dec, out):
  """The `stream` callback of `generate` for one row: prints each token's text when complete."""
  finished = [False]

  def stream(step, tokens, done):
    if finished[0]:
      return
    text = dec.push([int(tokens[0])])
    if text:
      out.write(text)
      out.flush()
    finished[0] = bool(done[0])

  return stream
