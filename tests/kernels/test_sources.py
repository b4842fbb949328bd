"""The key-source records of the core attention (kernels_pallas/sparse_attention/sources.py): each
checks its own shapes when built, `KeySources` checks that its parts agree, `kind` names the layer
kind, and the records pass through JAX transformations as pytrees with W and m static."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.sparse_attention import sources
from kernels_pallas.sparse_attention.sources import (Band, KeySources, PickedEntries, Ring,
                                                     VisibleEntries)

B, T, H, S, C, P = 2, 6, 4, 5, 3, 2
f32, i32 = jnp.float32, jnp.int32


def _z(*shape, dtype=f32):
  return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("build, message", [
  (lambda: Band(_z(B, T), 3), r"Band: kv must be \[B, T, H\], got shape \(2, 6\)"),
  (lambda: Band(_z(B, T, H), 0), r"Band: window must be an int >= 1, got 0"),
  (lambda: Band(_z(B, T, H), 2.5), r"Band: window must be an int >= 1, got 2.5"),
  (lambda: Band(_z(B, T, H), 3, _z(B, T + 1, dtype=i32)),
   r"Band: segments must be \[B, T\]=\(2, 6\), got shape \(2, 7\)"),
  (lambda: Ring(_z(B, S), _z(B, S, dtype=i32)), r"Ring: kv must be \[B, S, H\]"),
  (lambda: Ring(_z(B, S, H), _z(B, S - 1, dtype=i32)),
   r"Ring: pos must be \[B, S\]=\(2, 5\), got shape \(2, 4\)"),
  (lambda: VisibleEntries(_z(B, C, H), 0), r"VisibleEntries: ratio must be an int >= 1, got 0"),
  (lambda: VisibleEntries(_z(B, C), 4), r"VisibleEntries: kv must be \[B, C, H\]"),
  (lambda: VisibleEntries(_z(B, C, H), 4, _z(B, C + 1, dtype=i32)),
   r"VisibleEntries: segments must be \[B, C\]=\(2, 3\), got shape \(2, 4\)"),
  (lambda: PickedEntries(_z(B, C, H), _z(B, T, dtype=i32)),
   r"PickedEntries: picks must be \[B, T, P\]=\(2, \?, \?\), got shape \(2, 6\)"),
  (lambda: PickedEntries(_z(B, C, H), _z(B + 1, T, P, dtype=i32)),
   r"PickedEntries: picks must be \[B, T, P\]=\(2, \?, \?\), got shape \(3, 6, 2\)"),
], ids=["band-rank", "window-0", "window-float", "band-seg", "ring-rank", "ring-pos", "ratio-0",
        "entries-rank", "entries-seg", "picks-rank", "picks-batch"])
def test_records_check_their_own_shapes(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def _band(**kw):
  return Band(_z(B, T, H), 3, **kw)


@pytest.mark.parametrize("build, message", [
  (lambda: KeySources(_z(B, T, H)), "band must be a Band, got ArrayImpl"),
  (lambda: KeySources(_band(), ring=Ring(_z(B, S, H + 1), _z(B, S, dtype=i32))),
   r"ring.kv must be \[B, S, H\]=\(2, \?, 4\), got shape \(2, 5, 5\)"),
  (lambda: KeySources(_band(), entries=VisibleEntries(_z(B + 1, C, H), 4)),
   r"entries.kv must be \[B, C, H\]=\(2, \?, 4\), got shape \(3, 3, 4\)"),
  (lambda: KeySources(_band(), entries=PickedEntries(_z(B, C, H), _z(B, T - 1, P, dtype=i32))),
   r"entries.picks must be \[B, T, P\]=\(2, 6, \?\), got shape \(2, 5, 2\)"),
  (lambda: KeySources(_band(segments=_z(B, T, dtype=i32)),
                      ring=Ring(_z(B, S, H), _z(B, S, dtype=i32))), "not with a ring"),
  (lambda: KeySources(_band(segments=_z(B, T, dtype=i32)),
                      entries=VisibleEntries(_z(B, C, H), 4)), "entries need segments"),
  (lambda: KeySources(_band(), entries=Ring(_z(B, S, H), _z(B, S, dtype=i32))),
   "entries must be VisibleEntries, PickedEntries or None, got Ring"),
], ids=["band-type", "ring-width", "entries-batch", "picks-tokens", "segments-ring",
        "segments-entries", "entries-type"])
def test_key_sources_check_that_parts_agree(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_kind_and_unusable_entries():
  band = _band()
  assert KeySources(band).kind == "sliding"
  assert KeySources(band, entries=VisibleEntries(_z(B, C, H), 4)).kind == "hca"
  assert KeySources(band, entries=PickedEntries(_z(B, C, H), _z(B, T, P, dtype=i32))).kind == "csa"
  # No entry (T below the ratio) or no slot to pick one: the same softmax as the window alone.
  for e in (VisibleEntries(_z(B, 0, H), 4), PickedEntries(_z(B, C, H), _z(B, T, 0, dtype=i32))):
    assert KeySources(band, entries=e).without_unusable_entries() == KeySources(band)
  used = KeySources(band, entries=VisibleEntries(_z(B, 1, H), 4))
  assert used.without_unusable_entries() is used


def _full_keys():
  rng = np.random.default_rng(0)
  r = lambda *s: jnp.asarray(rng.normal(size=s), f32)  # noqa: E731
  return KeySources(Band(r(B, T, H), 3), ring=Ring(r(B, S, H), jnp.arange(B * S).reshape(B, S)),
                    entries=PickedEntries(r(B, C, H), jnp.ones((B, T, P), i32),
                                          jnp.zeros((B, C), i32)))


def test_records_are_pytrees_with_static_window_and_ratio():
  keys = _full_keys()
  leaves, tree = jax.tree.flatten(keys)
  assert len(leaves) == 6  # band kv; ring kv, pos; entries kv, picks, segments (band segments None)
  back = jax.tree.unflatten(tree, leaves)
  assert back.band.window == 3 and back.kind == "csa"
  # W and m are part of the structure: a different window is a different tree (a jit retrace).
  other = KeySources(Band(keys.band.kv, 4))
  assert jax.tree.structure(other) != jax.tree.structure(KeySources(Band(keys.band.kv, 3)))
  hca = KeySources(Band(keys.band.kv, 3), entries=VisibleEntries(keys.entries.kv, 8))
  seen = jax.jit(lambda k: (k.band.window, k.entries.ratio, k.entries.kv * 2))(hca)
  assert seen[:2] == (3, 8)
  np.testing.assert_array_equal(np.asarray(seen[2]), 2 * np.asarray(keys.entries.kv))


def test_records_pass_through_transformations():
  keys = _full_keys()
  out = jax.jit(lambda k: k)(keys)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(keys)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(out) == jax.tree.structure(keys)
  # vmap over the batch axis (JAX rebuilds the records with placeholder leaves on the way).
  sums = jax.vmap(lambda k: jnp.sum(k.band.kv) + jnp.sum(k.ring.kv))(keys)
  np.testing.assert_allclose(np.asarray(sums), np.asarray(
    jnp.sum(keys.band.kv, (1, 2)) + jnp.sum(keys.ring.kv, (1, 2))), rtol=1e-6)
  # Gradients with respect to the float leaves of a record (stop_gradient passes the ints through).
  def f(band_kv, entries_kv):
    k = KeySources(Band(band_kv, 3), entries=VisibleEntries(entries_kv, 2))
    return jnp.sum(k.band.kv ** 2) + jnp.sum(k.entries.kv)

  g = jax.grad(f, argnums=(0, 1))(keys.band.kv, keys.entries.kv)
  np.testing.assert_allclose(np.asarray(g[0]), 2 * np.asarray(keys.band.kv), rtol=1e-6)
  stopped = jax.grad(lambda kv: jnp.sum(jax.lax.stop_gradient(
    PickedEntries(kv, keys.entries.picks)).kv * kv))(keys.entries.kv)
  np.testing.assert_allclose(np.asarray(stopped), np.asarray(keys.entries.kv), rtol=1e-6)
  assert sources.KeySources is KeySources
