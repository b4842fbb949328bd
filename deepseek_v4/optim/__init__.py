"""Optimizers: DeepSeek-V4's Muon + AdamW hybrid (docs/architecture.md#optimizer)."""

from deepseek_v4.optim.muon import (
  ADAMW,
  HYBRID_NS_COEFFS,
  MUON,
  adamw_optimizer,
  DeepSeekMuonState,
  MatrixBlocks,
  deepseek_muon,
  deepseek_optimizer,
  describe,
  format_groups,
  matrix_blocks,
  newton_schulz,
  ns_chunk,
  orthogonalize,
  param_group,
  param_labels,
  path_name,
  scale_by_deepseek_muon,
)

__all__ = [
  "ADAMW", "HYBRID_NS_COEFFS", "MUON", "DeepSeekMuonState", "MatrixBlocks", "adamw_optimizer",
  "deepseek_muon", "deepseek_optimizer", "describe", "format_groups", "matrix_blocks", "newton_schulz",
  "ns_chunk", "orthogonalize", "param_group", "param_labels", "path_name", "scale_by_deepseek_muon",
]
