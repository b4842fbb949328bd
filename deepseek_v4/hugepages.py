"""Transparent huge pages for XLA:CPU's buffers (Linux with glibc), set at process start.

XLA:CPU allocates an executable's buffers afresh on every call. glibc serves large blocks with
`mmap` and unmaps them on free, so each call page-faults its whole working set again, 4 KiB at a
time. Measured on 2 CPU cores, per train step of `bench_train.py --moe64`: 180,000
faults, 366 ms of kernel time, 721 ms wall. With glibc's `glibc.malloc.hugetlb=1` tunable, malloc
advises transparent huge pages for those blocks (when the kernel's THP mode is `madvise` or
`always`): 719 faults, 64 ms, 554 ms wall. The tiny preset's step: 147 -> 131 ms.

glibc reads tunables once, when the process starts, so `reexec()` restarts the current command
with the tunable added to GLIBC_TUNABLES. The command-line entry points call it for the
subcommands that run many steps (`python -m deepseek_v4 train|generate|ablate`) and the
benchmark scripts call it first thing. It never runs on import. In a notebook or your own script,
start Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` to get the same. Set
`DSV4_NO_HUGEPAGES=1` to opt out; nothing else changes.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DSV4_NO_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_MODE) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def wanted(env: dict | None = None, mode: str | None = None, libc: str | None = None) -> bool:
  """Whether restarting with the tunable would change anything: Linux with glibc, a THP mode
  that honours madvise, the tunable not yet set (which also stops a second restart), and no
  opt-out."""
  env = os.environ if env is None else env
  libc = platform.libc_ver()[0] if libc is None else libc
  mode = thp_mode() if mode is None else mode
  return (sys.platform.startswith("linux") and libc == "glibc" and mode in ("always", "madvise")
          and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", "")
          and env.get(OPT_OUT, "") in ("", "0"))


def tunables_with_hugepages(current: str) -> str:
  """GLIBC_TUNABLES with the huge-page tunable appended (tunables are colon-separated)."""
  return f"{current}:{TUNABLE}" if current else TUNABLE


def reexec() -> None:
  """Restarts this process with the huge-page tunable set, if `wanted()`; otherwise returns.
  Uses the interpreter's original command line (`sys.orig_argv`), so `python -m ...` and script
  runs restart as they were started."""
  if not wanted() or not getattr(sys, "orig_argv", None):
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = tunables_with_hugepages(env.get("GLIBC_TUNABLES", ""))
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError:  # cannot restart (e.g. a sandbox forbids exec): run on as we are
    return


def status() -> dict:
  """What a benchmark records about this: the tunables in effect and the kernel's THP mode."""
  return {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "thp_mode": thp_mode(),
          "huge_pages": TUNABLE in os.environ.get("GLIBC_TUNABLES", "")}
