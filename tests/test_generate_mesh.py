"""`generate` on a device mesh: `decoding.generate(..., mesh=, rules=)` and
`python -m deepseek_v4 generate --mesh ... --rules ...` give the one-device tokens, token for
token, from a checkpoint restored into the shards of the mesh (8 simulated CPU devices)."""

import io

import jax
import numpy as np
import pytest
from flax import nnx

import deepseek_v4
from deepseek_v4 import cli, decoding, generate_cli, sharding, tokenizer
from deepseek_v4.checkpoint.io import Checkpointer, load_model
from tests.hf_oracle import randomize_params

# One CSA layer with a hash-routed MoE (the expert-parallel path routes by token id there); the
# byte tokenizer of the CLI needs vocab >= 270.
CFG = deepseek_v4.tiny(compress_ratios=(4,), num_hash_layers=1, hc_sinkhorn_iters=2,
                       num_mtp_layers=0)
# Ragged prompts; 8 rows divide the batch axes of both meshes below (data x fsdp [x expert]).
PROMPTS = [[1, 5, 9, 200, 7, 3, 11], [4, 2], [300, 301, 302, 303, 304], [17],
           [8, 8, 8, 8, 8, 8, 8, 8, 8], [99, 100, 101], [450, 3], [60, 61, 62, 63]]
MESHES = {"fsdp": (dict(fsdp=8), "fsdp"), "fsdp_ep": (dict(fsdp=4, expert=2), "fsdp_ep")}
N_NEW = 6
# Each case compiles the whole loop on 8 devices (the default run keeps fsdp_ep here and fsdp in
# the CLI test, one compile each).
GREEDY = [pytest.param("fsdp", marks=pytest.mark.slow), "fsdp_ep"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """(one-device model, a `train --out`-style folder holding it)."""
  model = randomize_params(deepseek_v4.Transformer(CFG, rngs=nnx.Rngs(0)), seed=3)
  path = tmp_path_factory.mktemp("run")
  ck = Checkpointer(path / "checkpoints")
  ck.save(1, model)
  ck.close()
  return model, str(path)


def _check_in_shards(model, mesh, rules):
  """Every parameter lives in the shards the rule table gives it (never whole on one device)."""
  state = nnx.state(model)
  for leaf, want in zip(jax.tree.leaves(state),
                        jax.tree.leaves(sharding.state_shardings(state, mesh, rules))):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, want)


def _sharded(path, mesh_name):
  sizes, rules = MESHES[mesh_name]
  mesh = sharding.make_mesh(**sizes)
  model = load_model(f"{path}/checkpoints", mesh=mesh, rules=rules)  # straight into shards
  _check_in_shards(model, mesh, rules)
  return model, mesh, rules


@pytest.mark.parametrize("mesh_name", GREEDY)
def test_greedy_generate_on_a_mesh_equals_one_device(run_dir, mesh_name):
  ref_model, path = run_dir
  model, mesh, rules = _sharded(path, mesh_name)
  ref = decoding.generate(ref_model, PROMPTS, N_NEW, stop_tokens=(450,))
  out = decoding.generate(model, PROMPTS, N_NEW, stop_tokens=(450,), mesh=mesh, rules=rules)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  # The output comes back split over the batch axes, and the parameters were not moved.
  assert out.sharding.is_equivalent_to(sharding.batch_sharding(mesh, rules, out.shape), 2)
  _check_in_shards(model, mesh, rules)


@pytest.mark.slow
def test_sampled_generate_on_a_mesh_equals_one_device(run_dir):
  """Row b draws with fold_in(key, b) from threefry's partitionable bits, so with a fixed seed
  the draws do not depend on the layout either (logits agree to float rounding)."""
  ref_model, path = run_dir
  model, mesh, rules = _sharded(path, "fsdp_ep")
  kw = dict(temperature=1.0, top_k=50, seed=7)
  ref = decoding.generate(ref_model, PROMPTS, N_NEW, **kw)
  out = decoding.generate(model, PROMPTS, N_NEW, mesh=mesh, rules=rules, **kw)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_generate_cli_on_a_mesh_equals_one_device(run_dir, monkeypatch):
  ref_model, path = run_dir
  calls = []
  inner = decoding.generate

  def recording_generate(model, *args, **kwargs):  # what the CLI decodes with, and its tokens
    out = inner(model, *args, **kwargs)
    calls.append((model, args, kwargs, out))
    return out

  monkeypatch.setattr(decoding, "generate", recording_generate)
  args = cli.build_parser("generate").parse_args(
    ["generate", "--checkpoint", path, "--prompt", "def f(x):", "--max-new-tokens", str(N_NEW),
     "--mesh", "fsdp=8", "--rules", "fsdp"])
  text = io.StringIO()
  assert generate_cli.run(args, out=text) == 0
  (model, gen_args, kwargs, out), = calls
  mesh, rules = kwargs["mesh"], kwargs["rules"]
  assert dict(mesh.shape) == dict(data=1, fsdp=8, context=1, expert=1, tensor=1)
  assert rules == "fsdp"
  _check_in_shards(model, mesh, rules)
  tok = tokenizer.ByteTokenizer()
  prompt = tok.encode("def f(x):")
  assert gen_args[0] == [prompt]
  ref = inner(ref_model, [prompt], N_NEW, stop_tokens=kwargs["stop_tokens"])
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  new = decoding.cut_at_stop(np.asarray(ref)[0, len(prompt):], kwargs["stop_tokens"])
  assert text.getvalue() == tok.decode(new.tolist(), skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("flags, message", [
  (["--mesh", "fsdp=4"], "--mesh fsdp=4: mesh data=1,fsdp=4,context=1,expert=1,tensor=1 has 4 "
                         "devices, "
                         "but 8 devices are available"),
  (["--mesh", "fsdp=4,pipe=2"], "--mesh fsdp=4,pipe=2: mesh entry 'pipe=2': expected AXIS=SIZE"),
  (["--mesh", "fsdp=8", "--rules", "zero3"], "--rules 'zero3': unknown; known: ['fsdp', "
                                             "'fsdp_ep', 'fsdp_tp']"),
  (["--rules", "fsdp_ep"], "--rules fsdp_ep: needs --mesh"),
], ids=["product", "axis", "rules", "rules-without-mesh"])
def test_generate_cli_bad_mesh_or_rules(run_dir, capsys, flags, message):
  _, path = run_dir
  assert cli.main(["generate", "--checkpoint", path, "--prompt", "x", *flags]) == cli.USAGE_ERROR
  assert message in capsys.readouterr().err


def test_generate_bad_mesh_arguments(run_dir):
  model, _ = run_dir
  mesh = sharding.make_mesh(fsdp=8)
  with pytest.raises(ValueError, match="generate: mesh and rules go together"):
    decoding.generate(model, [[1, 2]], 2, mesh=mesh)
  with pytest.raises(ValueError, match=r"unknown sharding rules 'zero3'; known: \['fsdp'"):
    decoding.generate(model, [[1, 2]], 2, mesh=mesh, rules="zero3")


def test_printer_puts_unordered_steps_back_in_order():
  """On a mesh the stream callbacks are unordered: the CLI's printer prints by step index."""
  tok = tokenizer.ByteTokenizer()
  ids = tok.encode("héllo") + [tok.eos_id, 7]
  text = io.StringIO()
  stream = generate_cli.printer(tokenizer.StreamDecoder(tok, skip_special_tokens=True), text)
  for step in (2, 0, 5, 1, 4, 3, 6, 7):  # the stop token (step 6) ends the text
    stream(step, np.array([ids[step]]), np.array([step >= 6]))
  assert text.getvalue() == "héllo"
