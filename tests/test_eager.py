"""`model(ids)` outside a trace runs a cached compiled forward: the same numbers as
an explicit `nnx.jit` and as op-by-op execution, parameters changed between calls are always the
ones used, a second call with the same shapes does not retrace, and inside a user's trace the call
is traced op by op into the user's program as before."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import deepseek_v4
from deepseek_v4 import lora, sharding
from deepseek_v4.model import Transformer, under_trace
from tests.hf_oracle import randomize_params
from tests.tolerances import F32_MODEL_REL, F32_SHARDED_REL, rel_err

# Every attention kind (sliding, CSA, HCA) and both routers, kept short to compile.
CFG = deepseek_v4.tiny(compress_ratios=(0, 4, 16), num_hash_layers=1, num_mtp_layers=0)


@pytest.fixture(scope="module")
def model():
  return randomize_params(Transformer(CFG, rngs=nnx.Rngs(0)), seed=5)


def _ids(B: int, T: int, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


@pytest.fixture
def traces(monkeypatch):
  """Counts the Python executions of `Transformer.trunk`: one per trace of the forward (and one
  per op-by-op call); a cached compiled call runs none."""
  calls = []
  trunk = Transformer.trunk

  def counting(self, *args, **kwargs):
    calls.append(1)
    return trunk(self, *args, **kwargs)

  monkeypatch.setattr(Transformer, "trunk", counting)
  return calls


def test_call_equals_nnx_jit_and_op_by_op(model):
  ids = _ids(2, 32)
  got = np.asarray(model(ids))
  jitted = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
  np.testing.assert_array_equal(got, jitted)  # the same program: bit for bit
  eager = np.asarray(model(ids, jit=False))
  err = rel_err(got, eager)
  print(f"\ncompiled vs op by op: rel err {err:.2e}")
  assert got.shape == (2, 32, CFG.vocab_size) and got.dtype == np.float32
  assert err < F32_MODEL_REL


def test_changed_parameters_are_seen(model):
  m = nnx.clone(model)
  ids = _ids(2, 32)
  before = np.asarray(m(ids))
  # The LM head is linear in its weight, and doubling is exact in floating point: 2x the logits.
  m.head.weight.set_value(m.head.weight[...] * 2)
  np.testing.assert_array_equal(np.asarray(m(ids)), 2 * before)
  # A whole new state (what loading a checkpoint does), same structure.
  other = randomize_params(Transformer(CFG, rngs=nnx.Rngs(0)), seed=6)
  nnx.update(m, nnx.state(other))
  np.testing.assert_array_equal(np.asarray(m(ids)), np.asarray(other(ids)))
  assert not np.allclose(np.asarray(m(ids)), before)
  # A new structure: LoRA adapters with an effect (B starts at zero).
  lora.apply_lora(m, ("wq_a", "wo_b"), rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  for mod in lora.lora_modules(m):
    mod.lora_b.set_value(0.5 * np.ones(mod.lora_b.shape, np.float32))
  tuned = np.asarray(m(ids))
  np.testing.assert_array_equal(tuned, np.asarray(nnx.jit(lambda m, x: m(x))(m, ids)))
  assert rel_err(tuned, np.asarray(other(ids))) > 1e-3  # the adapters changed the logits


def test_second_call_does_not_retrace(model, traces):
  ids = _ids(3, 5, seed=1)  # a shape no other test compiles
  first = np.asarray(model(ids))
  assert len(traces) == 1
  again = np.asarray(model(_ids(3, 5, seed=2)))
  assert len(traces) == 1  # same shapes: the cached executable
  assert not np.array_equal(first, again)  # ... on the new ids
  m = nnx.clone(model)
  m.head.weight.set_value(m.head.weight[...] * 2)
  np.testing.assert_array_equal(np.asarray(m(ids)), 2 * first)
  assert len(traces) == 1  # another model of the same structure: no retrace either
  model(_ids(3, 6))
  assert len(traces) == 2  # a new length traces once
  model(ids, jit=False)
  model(ids, jit=False)
  assert len(traces) == 4  # the opt-out runs op by op every call


def _calls_compiled_forward(jaxpr) -> bool:
  return any(e.primitive.name in ("pjit", "jit") and e.params.get("name") == "_compiled_forward"
             for e in jaxpr.eqns)


def test_inside_a_user_trace_the_call_is_traced_op_by_op(model, traces):
  ids = _ids(1, 7)
  traced_ids = jax.make_jaxpr(lambda x: model(x))(ids)  # the ids are tracers
  closed_over = jax.make_jaxpr(lambda: model(ids))()  # nothing is a tracer, a jit traces
  graphdef, state = nnx.split(model)
  as_argument = jax.make_jaxpr(lambda st: nnx.merge(graphdef, st)(ids))(state)  # params traced
  for jaxpr in (traced_ids, closed_over, as_argument):
    assert not _calls_compiled_forward(jaxpr.jaxpr)
  assert len(traces) == 3
  # The top level is no trace; inside jit it is, even for constants.
  assert not under_trace(ids)
  assert jax.jit(lambda: jnp.asarray(under_trace(np.int32(1))))()
  # Opt-out and default agree inside a trace (both trace op by op).
  a = jax.jit(lambda x: model(x))(ids)
  b = jax.jit(lambda x: model(x, jit=False))(ids)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_sharding_rules_are_part_of_the_cache_key(model, traces):
  # Under `sharding.use(mesh, rules)` the trace pins activations to the rules' layout: a call
  # under other rules on the same mesh must not reuse that executable (jax keys on the mesh only).
  mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
  by_seq = sharding.RULES_fsdp.replace(name="fsdp_by_seq", activations=tuple(
    (n, {"batch": None, "seq": "data"}.get(n, a)) for n, a in sharding.RULES_fsdp.activations))
  ids = _ids(2, 10)
  plain = np.asarray(model(ids))
  replicated = NamedSharding(mesh, PartitionSpec())
  m = nnx.clone(model)
  nnx.update(m, jax.device_put(nnx.state(m), replicated))
  ids = jax.device_put(ids, replicated)
  n = len(traces)
  outs = {}
  for rules in (sharding.RULES_fsdp, by_seq):
    with sharding.use(mesh, rules):
      outs[rules.name] = m(ids)
  assert len(traces) == n + 2
  spec = {k: (tuple(v.sharding.spec) + (None, None))[:2] for k, v in outs.items()}
  assert spec == {"fsdp": ("data", None), "fsdp_by_seq": (None, "data")}  # rows / positions split
  for out in outs.values():
    assert rel_err(np.asarray(out), plain) < F32_SHARDED_REL


def test_bad_ids_are_refused_before_compiling(model, traces):
  with pytest.raises(ValueError, match=f"id {CFG.vocab_size} outside the vocabulary"):
    model(jnp.full((1, 4), CFG.vocab_size, jnp.int32))
  with pytest.raises(TypeError, match="integer array"):
    model(jnp.zeros((1, 4), jnp.float32))
  assert not traces
