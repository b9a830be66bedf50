"""State caches: functional pytrees of per-layer buffers (DESIGN.md "Data flow").

linear: one array per linear-attention layer, [rows, H, D, D] recurrent states (float32 by default).
        Rows 0..num_slots-1 are the running requests' slots; the engine's prefix cache keeps its saved
        states in further rows (lingjax/prefix_cache.py). One buffer per layer (not one stacked array),
        so that a donated step updates each layer's rows in place: the kernels scatter the rows of the
        slots in the batch, and nothing copies a layer's whole pool out and back.
mla:    one array per MLA layer, [num_pages, page_size, kv_lora_rank + qk_rope_head_dim] pages of
        absorbed-MLA latents (the format of lingjax/kernels/mla). Page id p is page p of every MLA
        layer's pool; which pages a request holds is the engine's page table (lingjax/paging.py),
        passed to each step as StepBatch.page_table.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lingjax.config import BailingConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Caches:
    linear: tuple        # per linear layer [rows, H, D, D]
    mla: tuple           # per MLA layer [num_pages, page_size, r + rope]

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @property
    def page_size(self) -> int:
        return self.mla[0].shape[1] if self.mla else 0


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold `tokens` positions."""
    return -(-tokens // page_size)


def state_bytes(cfg: BailingConfig, state_dtype=jnp.float32, num_heads: int | None = None) -> int:
    """Bytes of one request's linear-attention states (all linear layers)."""
    H = num_heads or cfg.num_attention_heads
    return len(cfg.linear_layers) * H * cfg.head_dim ** 2 * jnp.dtype(state_dtype).itemsize


def page_bytes(cfg: BailingConfig, page_size: int, latent_dtype=jnp.bfloat16) -> int:
    """Bytes of one page id (that page in every MLA layer's pool)."""
    return len(cfg.mla_layers) * page_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(latent_dtype).itemsize


def init_caches(cfg: BailingConfig, num_rows: int, num_pages: int, page_size: int, *, state_dtype=jnp.float32,
                latent_dtype=jnp.bfloat16, num_heads: int | None = None) -> Caches:
    """Zeroed caches: `num_rows` linear-state rows per linear layer, `num_pages` latent pages per MLA layer."""
    H = num_heads or cfg.num_attention_heads
    D = cfg.head_dim
    lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return Caches(linear=tuple(jnp.zeros((num_rows, H, D, D), state_dtype) for _ in cfg.linear_layers),
                  mla=tuple(jnp.zeros((num_pages, page_size, lat), latent_dtype) for _ in cfg.mla_layers))


def contiguous_page_table(num_slots: int, max_len: int, page_size: int) -> np.ndarray:
    """[num_slots, max_pages] int32: slot s owns pages s * max_pages ... (s + 1) * max_pages - 1, the
    layout of a per-slot `max_len` cache (for callers that drive model.step without an engine)."""
    m = pages_for(max_len, page_size)
    return np.arange(num_slots * m, dtype=np.int32).reshape(num_slots, m)


class SlotAllocator:
    """Hands out cache slots 0..num_slots-1, lowest free slot first (deterministic).

    A slot carries no promise about its contents: the engine marks a request's first step `fresh`,
    which starts the linear state from zero (or copies a prefix-cache state into the slot first), and
    MLA reads go through the request's own pages up to positions it has written, so whatever the
    slot's last user left there is never read.
    """

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots))      # kept sorted

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """The lowest free slot, or None when all are taken."""
        return self._free.pop(0) if self._free else None

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)
        self._free.sort()
