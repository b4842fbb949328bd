"""Shared helpers of the kernels: query blocking for linear-memory scans, the platform traced for,
and the one `impl=` vocabulary with its once-only INFO log of what "auto" runs."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax
import jax.numpy as jnp

# Position given to padding slots: far outside every window, so every mask rejects it.
PAD_POSITION = -(2**30)


def pad_to_blocks(x: jax.Array, block: int, axis: int, value) -> tuple[jax.Array, int]:
  """Pads `axis` of x up to a multiple of `block`; returns (padded, number of blocks)."""
  n = x.shape[axis]
  nb = -(-n // block)
  pad = nb * block - n
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths, constant_values=value)
  return x, nb


def to_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, nb*block, ...] -> [nb, B, block, ...] (the scanned axis first)."""
  B, T = x.shape[:2]
  return jnp.moveaxis(x.reshape(B, T // block, block, *x.shape[2:]), 1, 0)


def from_blocks(x: jax.Array) -> jax.Array:
  """[nb, B, block, ...] -> [B, nb*block, ...]."""
  nb, B, block = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(B, nb * block, *x.shape[3:])


# ----- the platform code paths are chosen for ---------------------------------------------------
_target_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kernels_pallas_target_platform", default=None)
PLATFORMS = ("cpu", "gpu", "tpu")


def platform() -> str:
  """The platform the traced program will run on: "cpu", "gpu" or "tpu".

  `jax.default_backend()` unless a `target_platform(...)` block says otherwise: compiling ahead of
  time for an H100 or a TPU on a CPU host (deepseek_v4.aot) traces the GPU/TPU code paths although
  the host's backend is "cpu". Every platform-dependent choice in the project reads this function.
  """
  override = _target_platform.get()
  if override is not None:
    return override
  backend = jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


@contextlib.contextmanager
def target_platform(name: str):
  """Within the block, `platform()` answers `name` (one of PLATFORMS) instead of the host's."""
  if name not in PLATFORMS:
    raise ValueError(f"target_platform: platform must be one of {PLATFORMS}, got {name!r}")
  token = _target_platform.set(name)
  try:
    yield
  finally:
    _target_platform.reset(token)


# ----- impl= dispatch (STYLE.md §6) ---------------------------------------------------------------
IMPLS = ("auto", "reference", "pallas")
_logged: set[tuple[str, str]] = set()


def resolve_impl(op: str, impl: str, *, choices: tuple[str, ...] = IMPLS[1:],
                 auto: Callable[[str], str] | None = None) -> str:
  """The concrete path for `impl`: one of `choices` (the op's own paths), or "auto" resolved for
  the platform traced for (`platform()`) and logged once (`log_choice`).

  The one vocabulary of every op: "auto" plus the op's paths, "reference" and "pallas" unless the
  op names others (moe_gmm: "tiled", "ragged_dot", "reference"). `auto(target)` picks among them;
  by default "pallas" on GPU/TPU when this JAX has the backend's Pallas module, the reference
  elsewhere.
  """
  vocabulary = ("auto", *choices)
  if impl not in vocabulary:
    raise ValueError(f"{op}: impl must be one of {vocabulary}, got {impl!r}")
  if impl != "auto":
    return impl
  target = platform()
  choice = (auto or _pallas_if_available)(target)
  log_choice(op, choice, target)
  return choice


def _pallas_if_available(target: str) -> str:
  if target not in ("gpu", "tpu"):
    return "reference"
  try:
    if target == "tpu":
      from jax.experimental.pallas import tpu  # noqa: F401
    else:
      from jax.experimental.pallas import triton  # noqa: F401
  except ImportError:
    return "reference"
  return "pallas"


def log_choice(op: str, choice: str, target: str, why: str | None = None) -> None:
  """Says once, at INFO, which path impl="auto" runs for `op` on `target` (and why, when a
  call's shapes or dtype send it to the reference): every op's choice line goes through here."""
  _log_once(op, f"impl='auto' runs {choice} on {target}" + (f": {why}" if why else ""))


def forget_logged() -> None:
  """Lets every once-only message of this module be logged again (tests that capture them)."""
  _logged.clear()


def _log_once(op: str, message: str) -> None:
  """Logs `op: message` at INFO, once per (op, message): which path runs is information, not a
  problem, so not a WARNING; `logging.getLogger("kernels_pallas").setLevel(logging.INFO)` shows
  it."""
  if (op, message) in _logged:
    return
  _logged.add((op, message))
  import logging

  logging.getLogger("kernels_pallas").info("%s: %s", op, message)


def pallas_backend(interpret: bool, op: str = "pallas") -> tuple[str, bool]:
  """(body, interpret) for impl="pallas": the TPU body on TPU, else the Triton-style GPU body.

  On CPU the GPU body can only be interpreted, so impl="pallas" there always interprets (the model
  can then select the kernels on the tiny preset in tests without an `interpret` flag of its own),
  and says so once per `op` (INFO on the "kernels_pallas" logger), so a CPU timing of "pallas" is
  never mistaken for a compiled kernel's.
  """
  target = platform()
  if target == "tpu":
    return "tpu", interpret
  if target == "cpu" and not interpret:
    _log_once(op, "impl='pallas' on cpu interprets the GPU kernel body (no compiled kernel)")
  return "gpu", interpret or target == "cpu"
