"""Pages of the paged MLA latent cache: who holds which page (lingjax/kernels/mla holds the format).

A page id p names page p of every MLA layer's pool (lingjax/cache.py), `page_size` token positions.
`PageAllocator` hands out free ids and counts references: a request holds a reference to each page in
its page-table row, and the prefix cache (lingjax/prefix_cache.py) one to each page it keeps; a page
returns to the free list when its last reference goes. The engine takes pages as a request's pieces are
dispatched (the positions they write) and drops its references when the request ends or is aborted.

`shuffle_seed` hands free pages out in a seeded random order instead of from the top of the free stack: tests use it so
that a request's pages are scattered over the pool and reused across requests.
"""
from __future__ import annotations

import numpy as np


class PageAllocator:
    def __init__(self, num_pages: int, *, shuffle_seed: int | None = None):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._refs = np.zeros(num_pages, np.int32)
        self._free = list(range(num_pages - 1, -1, -1))        # a stack: lowest id first, then last freed first
        self._rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def refs(self, page: int) -> int:
        return int(self._refs[page])

    def alloc(self) -> int | None:
        """A free page with one reference, or None when none is free."""
        if not self._free:
            return None
        if self._rng is not None:
            i = int(self._rng.integers(len(self._free)))
            self._free[i], self._free[-1] = self._free[-1], self._free[i]
        p = self._free.pop()
        self._refs[p] = 1
        return p

    def ref(self, page: int) -> None:
        if self._refs[page] < 1:
            raise ValueError(f"page {page} is free; only a held page can gain a reference")
        self._refs[page] += 1

    def unref(self, page: int) -> None:
        """Drop one reference; the page is free again when none is left."""
        if self._refs[page] < 1:
            raise ValueError(f"page {page} is not held")
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)         # last freed, first reused (deterministic)
