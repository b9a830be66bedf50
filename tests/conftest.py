import os

# 8 simulated CPU devices for the sharding tests; harmless for the others. Set before jax imports.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
    """Free every compiled program when a test module ends. Each XLA:CPU executable holds its own memory
    mappings; one process running the whole suite otherwise accumulates them until it reaches the kernel's
    vm.max_map_count (65530 by default) and XLA aborts mid-compile (seen at ~88-94% of the suite; measured:
    test_engine.py alone leaves ~10k mappings, back to ~1k after this). A later module that needs the same
    program compiles it again: a small cost against an abort."""
    yield
    import jax
    jax.clear_caches()
    gc.collect()
