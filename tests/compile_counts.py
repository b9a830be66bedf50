"""Counting compilations in tests that assert there were none. tests/conftest.py turns JAX's persistent
compilation cache on, so a program already compiled by an earlier test is loaded from disk, not compiled:
a miss of jit's in-memory cache (the thing those tests guard against) then shows as a cache retrieval,
not as an XLA compilation. `CacheRetrievals` counts those retrievals; a test asserting "no compilation"
asserts both counts are 0."""
import jax

RETRIEVAL_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"     # one per persistent-cache hit


class CacheRetrievals:
    """with CacheRetrievals() as r: ...; r.count = executables loaded from the persistent cache inside."""

    def __init__(self):
        self.count = 0

    def _listen(self, event, secs, **_):
        self.count += event == RETRIEVAL_EVENT

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
        return False
