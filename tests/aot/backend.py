"""What the aot tests do when this install cannot compile for a target: skip on a developer's
machine without the `aot` extra, but fail under CI (`CI` set), whose command installs the extra, so
a missing install step can never turn these tests into silent skips."""

from __future__ import annotations

import os

import pytest

from deepseek_v4.aot import targets


def require(*names: str, module: bool = False) -> None:
  """Skip (or, under CI, fail) unless every target in `names` can be compiled for here."""
  for name in names:
    why = targets.missing_backend(targets.target(name))
    if why is None:
      continue
    if os.environ.get("CI"):
      pytest.fail(f"{why} (CI installs the aot extra: see .ci/run)", pytrace=False)
    pytest.skip(why, allow_module_level=module)
