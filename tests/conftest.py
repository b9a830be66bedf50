import os

# 8 simulated CPU devices for the sharding tests; harmless for the others. Set before jax imports.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's LLVM backend at -O0 unless the caller chose a level: the suite's time is mostly XLA compiling
# many small programs, and LLVM's optimization passes are most of that. The HLO passes (fusion, layout,
# algebraic simplification) are unchanged and LLVM at any level keeps IEEE float semantics (XLA:CPU does not
# enable fast-math), so the tests check the same programs; the tiny models run slower, compile faster.
# Measured: tests/test_tiny_model.py 127 s -> 86 s CPU. Child processes (CLI subprocess tests) inherit it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"


import gc  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# A persistent compilation cache private to this pytest process (a fresh temporary directory, removed at the
# end): a program compiled once is loaded from disk by any later module that compiles the same program
# (the same HLO, devices and options: JAX's cache key), e.g. the same engine step shapes of the tiny models,
# which the per-module jax.clear_caches() below would otherwise compile again. Set here, before any
# compilation (JAX decides once per process whether the cache is used). Not inherited by child processes
# (CLI subprocesses, the Triton interpreter children): they compile as they would anyway. The tests that
# assert "no compilation" count /jax/core/compile/backend_compile_duration events, which JAX records around
# compile-or-load (jax/_src/interpreters/pxla.py), so a load from this cache still counts: it cannot hide a
# miss of jit's own cache. Measured: tests/test_engine.py + test_engine_api.py + test_paging.py, 241 s -> 212 s CPU.
_CACHE_DIR = tempfile.mkdtemp(prefix="lingjax-test-jax-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
    """Free every compiled program when a test module ends. Each XLA:CPU executable holds its own memory
    mappings; one process running the whole suite otherwise accumulates them until it reaches the kernel's
    vm.max_map_count (65530 by default) and XLA aborts mid-compile (seen at ~88-94% of the suite; measured:
    test_engine.py alone leaves ~10k mappings, back to ~1k after this). A later module that needs the same
    program loads it from the persistent cache above instead of compiling it again."""
    yield
    jax.clear_caches()
    gc.collect()
