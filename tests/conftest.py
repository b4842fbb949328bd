"""Test setup: 8 simulated CPU devices (before JAX starts), highest matmul precision, and shared
tiny-model fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for this test session, fresh each run (nothing carries over
# between runs) and shared with the subprocesses the tests start (CLI runs, notebook kernels,
# multihost workers) through the environment: the same tiny programs compiled by several modules,
# processes and notebooks are compiled once. DSV4_TEST_NO_CACHE=1 turns it off.
if not os.environ.get("DSV4_TEST_NO_CACHE") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _cache_dir = tempfile.mkdtemp(prefix="dsv4-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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


@pytest.fixture
def no_compilation_cache():
  """For a test that reads what XLA prints while compiling: a program loaded from the persistent
  cache is not compiled, so it would print nothing and the test could not fail."""
  jax.config.update("jax_enable_compilation_cache", False)
  yield
  jax.config.update("jax_enable_compilation_cache", True)
