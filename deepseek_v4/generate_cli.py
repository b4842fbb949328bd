"""`python -m deepseek_v4 generate`: load a checkpoint, generate from a prompt, stream the text.

  python -m deepseek_v4 generate --checkpoint DIR --prompt "Hello" --max-new-tokens 64
  python -m deepseek_v4 generate --checkpoint DIR --prompt "Hi" --chat --temperature 1.0
  python -m deepseek_v4 generate --checkpoint runs/a --step 400 --prompt "def "   # train --out
  python -m deepseek_v4 generate --checkpoint runs/a --prompt "def " --mesh fsdp=4,expert=2 \
      --rules fsdp_ep                                     # restored into the shards of a mesh

DIR is a hub / transformers folder (config.json + *.safetensors), or a folder that `train --out`
wrote (Orbax checkpoints; the latest step, or `--step N`; LoRA adapters are merged). The tokenizer
is `--tokenizer PATH`, else DIR/tokenizer.json when present, else the byte tokenizer of models
trained here. Tokens are printed as the jitted loop produces them (an ordered `jax.debug.callback`,
see `deepseek_v4.decoding.generate`); the text ends at the stop (end-of-sequence) token.

`--mesh AXIS=N,...` (axes data, fsdp, context, expert, tensor; their product = this host's device
count; `context=N` prefills the prompt split along the sequence, docs/context_parallel.md)
with `--rules fsdp|fsdp_tp|fsdp_ep` (default fsdp) reads the checkpoint straight into the shards
of that mesh (an Orbax folder through `restore_model(mesh=, rules=)`, a hub folder tensor by
tensor) and decodes there (`generate(mesh=, rules=)`; the expert-parallel MoE under fsdp_ep).
One prompt is one row, so it is replicated over the batch axes; the parameters stay sharded.
A `train --out` folder with LoRA adapters is the one exception: it restores on one device, is
merged, then placed into its shards. A QLoRA run with adapters on the kept FP4 routed experts
keeps those adapters unmerged (`restore_model`) and generates on one device only. One process
only (no multi-host flags here).
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from deepseek_v4.cli import positive_int

  parser.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="folder with config.json and *.safetensors (hub or transformers names), "
                           "or a `train --out` folder (Orbax checkpoints)")
  parser.add_argument("--step", type=int, default=None, metavar="N",
                      help="with a `train --out` folder: the checkpoint step (default: the latest)")
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
  parser.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                      help="decode on this device mesh, e.g. fsdp=4,expert=2 (axes data, fsdp, "
                           "context, expert, tensor; the product must equal the device count; "
                           "context=N prefills context-parallel)")
  parser.add_argument("--rules", default=None, metavar="NAME",
                      help="with --mesh: the sharding rule table, fsdp | fsdp_tp | fsdp_ep "
                           "(default fsdp)")
  parser.add_argument("--speculative", choices=("mtp",), default=None,
                      help="self-speculative decoding: the MTP block drafts, the model verifies "
                           "(docs/speculative.md); prints the acceptance statistics")
  parser.add_argument("--num-draft", type=positive_int, default=1, metavar="K",
                      help="with --speculative: tokens drafted per verify call (default 1)")
  from deepseek_v4 import cli

  cli.add_options_arguments(parser, ("kernel_impl", "attn_block", "keep_quantized"))


def training_checkpoints(path: str) -> str | None:
  """The Orbax checkpoint folder of a `train --out` folder (PATH/checkpoints, or PATH itself when
  it holds step folders), or None."""
  for folder in (os.path.join(path, "checkpoints"), path):
    if os.path.isdir(folder) and any(
        name.isdigit() and os.path.isdir(os.path.join(folder, name))
        for name in os.listdir(folder)):
      return folder
  return None


def load_training_checkpoint(folder: str, step: int | None, dtype: str, mesh=None, rules=None):
  """The model of an Orbax training checkpoint (LoRA adapters merged), in `dtype`: on this
  process's first device, or in its shards of `mesh` by `rules`."""
  import dataclasses

  import jax.numpy as jnp

  from deepseek_v4.checkpoint import from_hub_tensors, to_hub_tensors
  from deepseek_v4.checkpoint.io import Checkpointer, restore_model

  ck = Checkpointer(folder)
  try:
    lora = bool((ck.read_meta(step).get("train_config") or {}).get("lora_rank"))
  finally:
    ck.close()
  from deepseek_v4 import lora as lora_lib

  if mesh is not None:
    # Straight into the shards; adapters are merged on one device first (restore_model refuses
    # a LoRA checkpoint on a mesh), then the merged weights are placed.
    model, _ = restore_model(folder, step, **({} if lora else dict(mesh=mesh, rules=rules)))
    if lora_lib.kept_expert_adapters(model):
      raise ValueError(f"{folder}: a QLoRA run with adapters on the routed experts (kept FP4, "
                       "merged only by a lossy requantization) generates on one device: drop "
                       "--mesh, or export it with `convert --to hub --quantize fp4-experts`")
    return _sharded_in_dtype(model, dtype, mesh, rules)
  model, _ = restore_model(folder, step)  # on this process's device, whatever mesh wrote it
  cfg = model.cfg
  if not (cfg.dtype == dtype and cfg.param_dtype == dtype):
    # The same casts as a hub checkpoint loaded in `dtype` (norms, mHC, router bias stay f32);
    # adapters left unmerged over kept FP4 experts (QLoRA) stay float32 and come along.
    name = jnp.dtype(dtype).name
    held = lora_lib.detach_expert_adapters(model)
    model = from_hub_tensors(dataclasses.replace(cfg, dtype=name, param_dtype=name),
                             to_hub_tensors(model), options=model.options)
    lora_lib.attach_expert_adapters(model, held)
  return model


def _sharded_in_dtype(model, dtype: str, mesh, rules):
  """`model` in `dtype` (each leaf cast to the dtype the same config built in `dtype` gives it:
  norms, mHC, router bias stay float32, as in a hub load) with every leaf in its shards."""
  import dataclasses

  import jax
  from flax import nnx

  from deepseek_v4 import abstract, sharding

  state = nnx.state(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh, rules))  # no-op if placed
  if model.cfg.dtype == dtype and model.cfg.param_dtype == dtype:
    return nnx.merge(nnx.graphdef(model), state)
  cfg = dataclasses.replace(model.cfg, dtype=dtype, param_dtype=dtype)
  graphdef, target = nnx.split(abstract.model(cfg, options=model.options))
  cast = jax.jit(lambda s: jax.tree.map(lambda x, t: x.astype(t.dtype), s, target),
                 out_shardings=sharding.state_shardings(target, mesh, rules))
  return nnx.merge(graphdef, cast(state))


def _tokenizer(args: argparse.Namespace):
  from deepseek_v4 import tokenizer

  path = args.tokenizer or args.checkpoint
  try:
    tok = tokenizer.load_tokenizer(path)
  except (ValueError, OSError):  # these name the file already
    raise
  except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
    flag = "--tokenizer" if args.tokenizer else "--checkpoint"
    raise ValueError(f"{flag} {path!r}: not a readable tokenizer.json ({e})") from None
  if args.tokenizer and isinstance(tok, tokenizer.ByteTokenizer):
    raise ValueError(f"--tokenizer {args.tokenizer!r}: no tokenizer.json there")
  return tok


def _check_prompt(prompt: str) -> None:
  """The prompt must be text: bytes that are not UTF-8 reach Python's argv as lone surrogates
  (PEP 383), which no tokenizer can encode."""
  try:
    prompt.encode("utf-8")
  except UnicodeEncodeError as e:
    offset = len(prompt[:e.start].encode("utf-8"))
    code = ord(prompt[e.start])
    what = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF  # an undecodable byte
            else f"lone surrogate U+{code:04X}")
    raise ValueError(f"--prompt is not valid UTF-8 text: {what} at byte offset {offset} (pass "
                     "the prompt in UTF-8, e.g. convert it with iconv)") from None


def _check_folder(path: str) -> None:
  if not os.path.exists(path):
    raise ValueError(f"--checkpoint {path!r} does not exist")
  if not os.path.isdir(path):
    raise ValueError(f"--checkpoint {path!r} is a file; expected a folder (config.json + "
                     "*.safetensors, or a `train --out` folder)")


def _mesh(args: argparse.Namespace):
  """(mesh, rules) of `--mesh` / `--rules`, or (None, None); checked before anything is read."""
  from deepseek_v4 import sharding

  if args.mesh is None:
    if args.rules is not None:
      raise ValueError(f"--rules {args.rules}: needs --mesh (without a mesh nothing is sharded)")
    return None, None
  rules = args.rules or "fsdp"
  if rules not in sharding.RULES:
    raise ValueError(f"--rules {rules!r}: unknown; known: {sorted(sharding.RULES)}")
  try:
    mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh))
  except ValueError as e:  # an unknown axis, or a product that is not the device count
    raise ValueError(f"--mesh {args.mesh}: {e}") from None
  return mesh, rules


def _model(args: argparse.Namespace, mesh=None, rules=None):
  import jax.numpy as jnp

  from deepseek_v4.checkpoint import load_hf_checkpoint

  path = args.checkpoint
  orbax = training_checkpoints(path)
  if orbax is not None:
    if args.keep_quantized:
      raise ValueError(f"--keep-quantized {args.keep_quantized}: {path!r} is a training checkpoint "
                       "(no released FP4 experts to keep); drop --keep-quantized")
    return load_training_checkpoint(orbax, args.step, args.dtype, mesh, rules)
  if args.step is not None:
    raise ValueError(f"--step {args.step}: {path!r} is not a `train --out` folder (it has no "
                     "checkpoints/<step> folders)")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ValueError(f"--checkpoint {path!r} holds neither config.json (a hub / transformers "
                     "checkpoint) nor checkpoints/<step> folders (written by `train --out`)")
  return load_hf_checkpoint(path, dtype=jnp.dtype(args.dtype), mesh=mesh, rules=rules,
                            keep_quantized=args.keep_quantized)


def run(args: argparse.Namespace, out=None) -> int:
  import jax

  from deepseek_v4 import decoding, tokenizer

  out = out or sys.stdout
  if args.num_draft != 1 and not args.speculative:
    raise ValueError(f"--num-draft {args.num_draft} needs --speculative mtp")
  _check_prompt(args.prompt)
  _check_folder(args.checkpoint)
  mesh, rules = _mesh(args)
  tok = _tokenizer(args)
  model = _model(args, mesh, rules)
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
  options = model.options.replace(kernel_impl=args.kernel_impl, attn_block=args.attn_block)
  if mesh is not None:
    from deepseek_v4 import parallel

    options = options.replace(moe=parallel.moe_impl(mesh, rules))
  spec = {}
  if args.speculative:
    spec = dict(draft=args.speculative, num_draft=args.num_draft, stats=True)
  result = decoding.generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             stop_tokens=stops, stream=printer(dec, out), options=options,
                             mesh=mesh, rules=rules, **spec)
  jax.block_until_ready(result)
  out.write(dec.flush() + "\n")
  if args.speculative:
    from deepseek_v4 import speculative

    out.write(speculative.format_stats(result[1]) + "\n")
  out.flush()
  return 0


def printer(dec, out):
  """The `stream` callback of `generate` for one row: prints each token's text when complete.

  The text ends before the stop token: the step whose `done` turns true produced the stop token,
  and everything after it is padding. Steps are taken in order of their index: on a mesh the
  callbacks are unordered (see `decoding.generate`), so an early one waits for its predecessors.
  """
  finished = [False]
  pending: dict[int, tuple[int, bool]] = {}  # step -> (token, done), not yet printed
  next_step = [0]

  def one(token: int, done: bool):
    if finished[0]:
      return
    finished[0] = done
    if finished[0]:  # the stop token itself: not part of the text
      return
    text = dec.push([token])
    if text:
      out.write(text)
      out.flush()

  def stream(step, tokens, done):
    pending[int(step)] = (int(tokens[0]), bool(done[0]))
    while next_step[0] in pending:
      one(*pending.pop(next_step[0]))
      next_step[0] += 1

  return stream
