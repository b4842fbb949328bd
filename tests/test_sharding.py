"""Sharding on 8 simulated CPU devices: rule tables, born-sharded init, sharded forward and train
step equal to one device, sharded checkpoint load, Orbax restore into another mesh, bad input.

Errors are float32 relative errors `max |sharded - single| / max |single|` (tests/tolerances.py).
For the train step the error is taken over the whole gradient (read from SGD's momentum buffer,
which holds exactly the first step's gradient) and over the whole parameter state after the step.
(Not over the update `params after - params before`: near 1.0, e.g. norm weights, one float32
ulp of the stored parameter is 6e-8, i.e. 1.5e-5 of the largest update.) Per leaf, the gradients
of a few near-zero parameters (`hc_head_scale`, `hc_head_base`: ~1e-6, summed over every token
with cancellation) differ by up to ~1e-4 relative under ANY change of reduction order; splitting
the batch into 8 pieces on one device moves them just as much.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import deepseek_v4
from deepseek_v4 import layout, parallel, sharding
from deepseek_v4.checkpoint import convert
from tests import sharded_steps as steps
from tests.tolerances import F32_SHARDED_REL, rel_err

# name -> (mesh axis sizes, rule table)
MESHES = {
  "fsdp8": (dict(fsdp=8), "fsdp"),
  "data2_fsdp4": (dict(data=2, fsdp=4), "fsdp"),
  "fsdp2_tp4": (dict(fsdp=2, tensor=4), "fsdp_tp"),
  "fsdp2_ep4": (dict(fsdp=2, expert=4), "fsdp_ep"),
  "data2_fsdp2_ep2": (dict(data=2, fsdp=2, expert=2), "fsdp_ep"),
  "ep8": (dict(expert=8), "fsdp_ep"),
}
FAST = "data2_fsdp2_ep2"  # the one mesh in the default (not slow) run: data + FSDP + EP at once


def _mesh_params():
  return [pytest.param(name, marks=() if name == FAST else pytest.mark.slow) for name in MESHES]


# ----- single-device references (computed once per config) ----------------------------------------
_REFS: dict = {}


def _reference(cfg):
  """Unsharded model, logits, and (loss, params) after one train step, all on one device."""
  if cfg not in _REFS:
    b = steps.batch(cfg)
    model = deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0))
    init = steps.flat_params(model)
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, b["inputs"]))
    trained = nnx.clone(model)  # the step updates Variables in place
    opt = steps.optimizer(trained)
    metrics = nnx.jit(steps.lm_step)(trained, opt, b)
    _REFS[cfg] = dict(model=model, init=init, logits=logits, loss=float(metrics["loss"]),
                      params=steps.flat_params(trained), grads=steps.flat_gradients(opt))
  return _REFS[cfg]


@pytest.fixture(scope="module")
def small_ref():
  return _reference(steps.CFG_SMALL)


def _state_rel_err(ours: dict, ref: dict) -> float:
  """Relative error over a whole parameter state (max abs difference over max abs value)."""
  diff = max(float(np.max(np.abs(ours[k].astype(np.float64) - ref[k]))) for k in ref)
  scale = max(float(np.max(np.abs(ref[k]))) for k in ref)
  return diff / scale


# ----- mesh and rule tables ----------------------------------------------------------------------
def test_make_mesh_axes_and_fill():
  mesh = sharding.make_mesh(fsdp=-1, tensor=2)
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == dict(data=1, fsdp=4, context=1, expert=1, tensor=2)
  assert sharding.parse_mesh("fsdp=8,expert=2") == dict(data=1, fsdp=8, context=1, expert=2,
                                                        tensor=1)


def test_mesh_size_must_match_device_count():
  with pytest.raises(ValueError, match=r"has 4 devices, but 8 devices are available"):
    sharding.make_mesh(fsdp=4)
  with pytest.raises(ValueError, match=r"has 16 devices, but 8"):
    sharding.make_mesh(fsdp=8, expert=2)


def test_axis_that_does_not_divide_names_both_numbers():
  mesh = sharding.make_mesh(tensor=8)  # tiny has 4 attention heads
  with pytest.raises(ValueError, match=r"attn_sink: dimension [01] \('heads'\) has size 4, which is "
                                       r"not divisible by the mesh axis 'tensor' of size 8"):
    parallel.init_model(deepseek_v4.tiny(), mesh, "fsdp_tp")
  with pytest.raises(ValueError, match=r"input batch: dimension 0 \('batch'\) has size 6, which "
                                       r"is not divisible by the mesh axes data x fsdp of total "
                                       r"size 8"):
    sharding.shard_batch(np.zeros((6, 4), np.int32), sharding.make_mesh(fsdp=8), "fsdp")


def test_unknown_names_are_errors():
  with pytest.raises(ValueError, match="unknown sharding rules 'zero'"):
    sharding.get_rules("zero")
  with pytest.raises(ValueError, match="logical axis 'embd' is not in the rules table"):
    sharding.logical_to_spec(("embd",), (8,), dict(fsdp=8), sharding.RULES_fsdp.params)


def _abstract_specs(cfg, sizes, rules) -> dict[str, P]:
  abstract = nnx.eval_shape(lambda: deepseek_v4.Transformer(cfg, rngs=nnx.Rngs(0)))
  specs = sharding.state_specs(nnx.state(abstract), sizes, rules)
  out = {}
  for p, v in nnx.to_flat_state(specs):
    name, spec = ".".join(map(str, p)), v.get_value()
    out[name] = spec
    # Also under the official per-layer names (a scanned stack's `layers` axis is unsharded).
    for official, r in layout.official_names(cfg, name):
      out[official] = spec if r is None else P(*tuple(spec)[1:])
  return out


# Hand-written expectations: every logical name appears at least once per table.
EXPECTED = {
  "fsdp": {
    "embed.weight": P(None, "fsdp"),
    "head.weight": P(None, "fsdp"),
    "hc_head_fn": P(None, "fsdp"),
    "layers.0.attn.wq_a.weight": P("fsdp", None),  # q_lora wins, embed gets nothing left
    "layers.0.attn.wq_b.weight": P(None, "fsdp"),
    "layers.0.attn.wkv.weight": P(None, "fsdp"),
    "layers.0.attn.wo_a.weight": P("fsdp", None),
    "layers.0.attn.wo_b.weight": P("fsdp", None),
    "layers.0.attn.attn_sink": P(None),
    "layers.0.attn.kv_norm.weight": P(None),
    "layers.0.hc_attn_fn": P(None, "fsdp"),
    "layers.0.ffn.experts.w1": P(None, None, "fsdp"),
    "layers.0.ffn.experts.w2": P(None, "fsdp", None),
    "layers.0.ffn.gate.tid2eid": P(None, None),
    "layers.2.attn.indexer.wq_b.weight": P(None, "fsdp"),
    "layers.2.attn.compressor.ape": P(None, None),
    "layers.3.ffn.gate.bias": P(None),
    "mtp.0.e_proj.weight": P("fsdp", None),
  },
  "fsdp_tp": {
    "embed.weight": P("tensor", "fsdp"),
    "head.weight": P("tensor", "fsdp"),
    "layers.0.attn.wq_b.weight": P("tensor", "fsdp"),
    "layers.0.attn.wo_a.weight": P("tensor", "fsdp"),
    "layers.0.attn.wo_b.weight": P("fsdp", "tensor"),
    "layers.0.attn.attn_sink": P("tensor"),
    "layers.0.ffn.experts.w1": P(None, "tensor", "fsdp"),
    "layers.0.ffn.experts.w2": P(None, "fsdp", "tensor"),
    "layers.0.ffn.shared_experts.w1.weight": P("tensor", "fsdp"),
    "layers.2.attn.indexer.wq_b.weight": P("tensor", "fsdp"),
    "layers.0.ffn.gate.tid2eid": P("tensor", None),
  },
  "fsdp_ep": {
    "embed.weight": P(None, ("fsdp", "expert")),
    "layers.0.attn.wq_b.weight": P(None, ("fsdp", "expert")),
    "layers.0.ffn.experts.w1": P("expert", None, "fsdp"),
    "layers.0.ffn.experts.w2": P("expert", "fsdp", None),
    "layers.0.ffn.gate.weight": P("expert", "fsdp"),
    "layers.3.ffn.gate.bias": P("expert"),
    "layers.0.ffn.shared_experts.w2.weight": P(("fsdp", "expert"), None),
  },
}


@pytest.mark.parametrize("rules", EXPECTED)
def test_param_specs_follow_the_table(rules):
  specs = _abstract_specs(deepseek_v4.tiny(), dict(data=1, fsdp=2, expert=2, tensor=2), rules)
  for name, spec in EXPECTED[rules].items():
    assert specs[name] == spec, name
  # Every spec is exactly the table's placement of each dimension's logical name.
  table = dict(sharding.get_rules(rules).params)
  abstract = nnx.eval_shape(lambda: deepseek_v4.Transformer(deepseek_v4.tiny(), rngs=nnx.Rngs(0)))
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    spec = specs[".".join(map(str, path))]
    used = set()
    for name, axes in zip(sharding.variable_names(var), spec):
      want = table[name] if name else None
      want = (want,) if isinstance(want, str) else tuple(want or ())
      want = tuple(a for a in want if a not in used)
      got = (axes,) if isinstance(axes, str) else tuple(axes or ())
      assert got == want, (path, name)
      used.update(got)


def test_constrain_is_a_noop_without_a_mesh():
  x = jnp.ones((2, 3))
  assert sharding.constrain(x, ("batch", "embed")) is x


# ----- sharded model vs one device ---------------------------------------------------------------
def _check_born_sharded(model, mesh, rules):
  """Every parameter carries the table's sharding, and sharded ones are never whole on a device."""
  specs = sharding.state_specs(nnx.state(model), mesh, rules)
  for (path, var), (_, spec) in zip(nnx.to_flat_state(nnx.state(model)),
                                    nnx.to_flat_state(specs)):
    arr = var.get_value()
    want = NamedSharding(mesh, spec.get_value())
    assert arr.sharding.is_equivalent_to(want, arr.ndim), path
    assert arr.addressable_shards[0].data.shape == want.shard_shape(arr.shape), path


def _run_forward_and_step(cfg, mesh_name):
  sizes, rules = MESHES[mesh_name]
  ref = _reference(cfg)
  mesh = sharding.make_mesh(**sizes)
  model = parallel.init_model(cfg, mesh, rules)
  _check_born_sharded(model, mesh, rules)
  init = steps.flat_params(model)
  init_err = _state_rel_err(init, ref["init"])

  b = steps.batch(cfg)
  inputs = sharding.shard_batch(b["inputs"], mesh, rules)
  logits = parallel.jit_forward(model, mesh, rules)(model, inputs)
  fwd_err = rel_err(logits, ref["logits"])

  opt = steps.optimizer(model)
  step = parallel.jit_train_step(steps.lm_step, model, opt, mesh, rules, donate=False)
  metrics = step(model, opt, jax.tree.map(lambda x: sharding.shard_batch(x, mesh, rules), b))
  loss_err = abs(float(metrics["loss"]) - ref["loss"]) / abs(ref["loss"])
  step_err = _state_rel_err(steps.flat_params(model), ref["params"])
  grad_err = _state_rel_err(steps.flat_gradients(opt), ref["grads"])
  _check_born_sharded(model, mesh, rules)  # the step keeps the layout
  print(f"\n{mesh_name} ({rules}): init {init_err:.1e}  forward {fwd_err:.1e}  "
        f"loss {loss_err:.1e}  gradients {grad_err:.1e}  params after step {step_err:.1e}")
  for err in (init_err, fwd_err, loss_err, grad_err, step_err):
    assert err < F32_SHARDED_REL


def test_forward_and_train_step_small_model():
  """The default-run check: data + FSDP + expert parallelism on the 1-layer model."""
  _run_forward_and_step(steps.CFG_SMALL, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_forward_and_train_step(mesh_name):
  _run_forward_and_step(steps.CFG, mesh_name)


DECODE_MESHES = ["data2_fsdp2_ep2", "fsdp2_tp4", "fsdp8", "ep8"]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", DECODE_MESHES)
def test_prefill_decode_and_generate_equal_single_device(mesh_name):
  decoding = pytest.importorskip("deepseek_v4.decoding")
  from deepseek_v4 import cache as cache_lib

  cfg = steps.CFG_SMALL
  sizes, rules = MESHES[mesh_name]
  ref_model = _reference(cfg)["model"]
  ids = steps.batch(cfg, B=8, T=16)["inputs"]
  ref_ids, ref_logits = decoding.generate(ref_model, ids, 4, return_logits=True)
  c = cache_lib.init_cache(cfg, 8, 32)
  ref_pre, c = decoding.prefill(ref_model, c, ids, logits="last")
  nxt = np.asarray(jnp.argmax(ref_pre, -1))
  ref_dec, _ = decoding.decode_step(ref_model, c, nxt)

  mesh = sharding.make_mesh(**sizes)
  model = parallel.init_model(cfg, mesh, rules)
  c = cache_lib.init_cache(cfg, 8, 32)
  c = jax.device_put(c, sharding.cache_shardings(c, mesh, rules))
  options = parallel.options(mesh, rules)
  with sharding.use(mesh, rules):
    pre, c = decoding.prefill(model, c, sharding.shard_batch(ids, mesh, rules), logits="last",
                              options=options)
    dec, c = decoding.decode_step(model, c, nxt, options=options)
    out_ids, logits = decoding.generate(model, ids, 4, return_logits=True, options=options)
  for leaf, want in zip(jax.tree.leaves(c), jax.tree.leaves(sharding.cache_shardings(c, mesh,
                                                                                      rules))):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)  # the cache stays batch-sharded
  errs = dict(prefill=rel_err(pre, ref_pre), decode=rel_err(dec, ref_dec),
              generate=rel_err(logits, ref_logits))
  print(f"\n{mesh_name} ({rules}): " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
  np.testing.assert_array_equal(np.asarray(out_ids), np.asarray(ref_ids))
  want = sharding.batch_sharding(mesh, rules, out_ids.shape)
  assert out_ids.sharding.is_equivalent_to(want, 2)  # generate's output comes back batch-sharded
  assert max(errs.values()) < F32_SHARDED_REL


def test_sharded_generate_partitions_without_replicating(capfd, no_compilation_cache):
  """Issue 11: generate on an 8-device mesh printed XLA "Involuntary full rematerialization"
  warnings. Two causes: the grouped output projection (its weight's first axis is FSDP-sharded,
  so the partitioner split the product over groups and replicated the batch-sharded activations
  around it; now pinned batch-sharded) and the local MoE's global sort of batch-sharded tokens
  (decoding now takes the expert-parallel `Options` as training does)."""
  decoding = pytest.importorskip("deepseek_v4.decoding")
  cfg = steps.CFG_SMALL
  ids = steps.batch(cfg, B=8, T=16)["inputs"]
  ref = decoding.generate(_reference(cfg)["model"], ids, 3)
  for name in ("data2_fsdp2_ep2", "fsdp8"):
    sizes, rules = MESHES[name]
    mesh = sharding.make_mesh(**sizes)
    model = parallel.init_model(cfg, mesh, rules)
    capfd.readouterr()
    with sharding.use(mesh, rules):
      out = decoding.generate(model, ids, 3, options=parallel.options(mesh, rules))
    err = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in err, (name, err[:2000])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.slow
def test_train_py_step_sharded_equals_single_device():
  """deepseek_v4.train's own step (Muon/AdamW, balance loss, router-bias update) under
  jit_train_step.

  Compared: every metric (loss parts, the global gradient norm, load imbalance) and the router
  biases. Parameters after the step are not compared leaf by leaf: AdamW with eps=1e-20 and Muon
  both normalize, so gradient entries that are zero up to rounding (e.g. symmetric mHC rows at
  layer 0) get O(lr) updates of arbitrary sign, sharded or not.
  """
  import functools

  train = pytest.importorskip("deepseek_v4.train")
  cfg = steps.CFG_SMALL
  tcfg = train.TrainConfig(seq_len=32, batch_size=8)
  b = steps.batch(cfg)
  ref_model = nnx.clone(_reference(cfg)["model"])
  ref_opt = train.make_optimizer(ref_model, tcfg)
  ref = nnx.jit(train.train_step_fn, static_argnames=("tcfg",))(ref_model, ref_opt, b, 0.3, tcfg)
  sizes, rules = MESHES[FAST]
  mesh = sharding.make_mesh(**sizes)
  model = parallel.init_model(cfg, mesh, rules)
  opt = train.make_optimizer(model, tcfg)
  step = parallel.jit_train_step(functools.partial(train.train_step_fn, tcfg=tcfg), model, opt,
                                 mesh, rules, donate=False)
  got = step(model, opt, {k: sharding.shard_batch(v, mesh, rules) for k, v in b.items()},
             jnp.float32(0.3))
  for k, v in ref.items():
    assert abs(float(got[k]) - float(v)) <= F32_SHARDED_REL * max(abs(float(v)), 1e-30), k
  bias = lambda m: np.asarray(m.layer(0).ffn.gate.bias.get_value())  # noqa: E731
  np.testing.assert_array_equal(bias(model), bias(ref_model))


# ----- checkpoints -------------------------------------------------------------------------------
def test_load_hf_checkpoint_places_every_tensor_in_its_shard(small_ref, tmp_path):
  convert.save_hf_checkpoint(small_ref["model"], tmp_path)
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  model = deepseek_v4.load_hf_checkpoint(tmp_path, dtype=jnp.float32, config=steps.CFG_SMALL,
                                         mesh=mesh, rules="fsdp_ep")
  _check_born_sharded(model, mesh, "fsdp_ep")
  got = steps.flat_params(model)
  for k, v in small_ref["init"].items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_orbax_restore_into_another_mesh(small_ref, tmp_path):
  import orbax.checkpoint as ocp

  mesh_a = sharding.make_mesh(fsdp=8)
  graphdef, state = nnx.split(small_ref["model"])
  state_a = jax.device_put(state, sharding.state_shardings(state, mesh_a, "fsdp"))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", state_a)
  for sizes, rules in ((dict(fsdp=2, tensor=4), "fsdp_tp"), (dict(data=2, expert=4), "fsdp_ep")):
    mesh_b = sharding.make_mesh(**sizes)
    _, target = parallel.abstract_model(steps.CFG_SMALL, mesh_b, rules)
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore(tmp_path / "ckpt", target)
    model = nnx.merge(graphdef, restored)
    _check_born_sharded(model, mesh_b, rules)
    got = steps.flat_params(model)
    for k, v in small_ref["init"].items():
      np.testing.assert_array_equal(got[k], v, err_msg=f"{sizes}: {k}")
