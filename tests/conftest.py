"""Test setup: 8 simulated CPU devices (before JAX starts), highest matmul precision, and shared
tiny-model fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
  import deepseek_v4

  return deepseek_v4.tiny()


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
  """Every module compiles its own programs; dropping them afterwards keeps one long pytest process
  (the whole suite runs in one) from accumulating executables until the host runs out of memory."""
  yield
  import gc

  jax.clear_caches()
  gc.collect()
  if os.environ.get("DSV4_TEST_RSS"):
    import resource
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    print(f"\n[rss {rss / 1e9:.2f} GB, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB]")
