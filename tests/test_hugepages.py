"""deepseek_v4/hugepages.py: when the entry points restart with glibc's huge-page tunable, and
that they restart exactly once with the original command line."""

import os
import subprocess
import sys

import pytest

from deepseek_v4 import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(f)) == "madvise"
  f.write_text("[always] madvise never\n")
  assert hugepages.thp_mode(str(f)) == "always"
  f.write_text("garbage\n")
  assert hugepages.thp_mode(str(f)) is None
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tunable is glibc's (Linux)")
@pytest.mark.parametrize("env, mode, libc, expect", [
  ({}, "madvise", "glibc", True),
  ({}, "always", "glibc", True),
  ({}, "never", "glibc", False),  # the kernel ignores the advice
  ({}, "", "glibc", False),  # unknown THP mode
  ({}, "madvise", "musl", False),  # not glibc: the tunable means nothing
  ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", "glibc", False),  # already set
  ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc", False),  # the user chose
  ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", "glibc", True),
  ({"DSV4_NO_HUGEPAGES": "1"}, "madvise", "glibc", False),
  ({"DSV4_NO_HUGEPAGES": "0"}, "madvise", "glibc", True),
])
def test_wanted(env, mode, libc, expect):
  assert hugepages.wanted(env, mode, libc) is expect


def test_tunables_are_appended():
  assert hugepages.tunables_with_hugepages("") == "glibc.malloc.hugetlb=1"
  assert hugepages.tunables_with_hugepages("glibc.malloc.arena_max=2") == (
    "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from deepseek_v4 import hugepages
print("start", sys.argv[1:], os.environ.get("GLIBC_TUNABLES", ""), flush=True)
hugepages.reexec()
print("end", sys.argv[1:], os.environ.get("GLIBC_TUNABLES", ""), flush=True)
"""


@pytest.mark.parametrize("opt_out", [False, True], ids=["restart", "opt_out"])
def test_reexec_restarts_once_with_the_same_arguments(tmp_path, opt_out):
  script = tmp_path / "probe.py"
  script.write_text(_SCRIPT.format(repo=REPO))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}
  if opt_out:
    env[hugepages.OPT_OUT] = "1"
  restarts = hugepages.wanted(env)
  out = subprocess.run([sys.executable, str(script), "a b", "--flag"], env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout.splitlines()
  args = "['a b', '--flag']"
  if restarts:
    assert out == [f"start {args} ", f"start {args} glibc.malloc.hugetlb=1",
                   f"end {args} glibc.malloc.hugetlb=1"]
  else:
    assert out == [f"start {args} ", f"end {args} "]
  if not opt_out and sys.platform.startswith("linux") and hugepages.thp_mode() in (
      "always", "madvise") and os.confstr("CS_GNU_LIBC_VERSION"):
    assert restarts  # on a glibc Linux with THP available the restart must happen
