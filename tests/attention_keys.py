"""Test glue: the `KeySources` record of a sparse-attention call (kernels_pallas/sparse_attention/
sources.py) from the arrays the kernel tests build, named as the tests name them."""

from kernels_pallas.sparse_attention import sources


def keys(kv, window, *, prefix_kv=None, prefix_pos=None, comp=None, comp_idx=None, comp_ratio=0,
         segments=None, comp_seg=None) -> sources.KeySources:
  """Band (kv, window, segments), Ring (prefix_kv, prefix_pos) when given, and the entries: picks
  `comp_idx` (CSA) when given, else every visible entry of ratio `comp_ratio` (HCA)."""
  ring = None if prefix_kv is None else sources.Ring(prefix_kv, prefix_pos)
  entries = None
  if comp is not None:
    entries = (sources.VisibleEntries(comp, comp_ratio, comp_seg) if comp_idx is None
               else sources.PickedEntries(comp, comp_idx, comp_seg))
  return sources.KeySources(sources.Band(kv, window, segments), ring=ring, entries=entries)
