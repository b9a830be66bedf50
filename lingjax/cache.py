"""State caches: functional pytrees indexed by request slot (DESIGN.md "Data flow").

linear: [n_linear_layers, num_slots, H, D, D] recurrent states (float32 by default)
mla:    [n_mla_layers, num_slots, max_len, kv_lora_rank + qk_rope_head_dim] absorbed-MLA latents
"""
import dataclasses

import jax
import jax.numpy as jnp

from lingjax.config import BailingConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Caches:
    linear: jax.Array
    mla: jax.Array

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def init_caches(cfg: BailingConfig, num_slots: int, max_len: int, *, state_dtype=jnp.float32,
                latent_dtype=jnp.bfloat16, num_heads: int | None = None) -> Caches:
    H = num_heads or cfg.num_attention_heads
    D = cfg.head_dim
    n_lin, n_mla = len(cfg.linear_layers), len(cfg.mla_layers)
    return Caches(
        linear=jnp.zeros((n_lin, num_slots, H, D, D), state_dtype),
        mla=jnp.zeros((n_mla, num_slots, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim), latent_dtype),
    )


class SlotAllocator:
    """Hands out cache slots 0..num_slots-1, lowest free slot first (deterministic).

    A slot carries no promise about its contents: the engine marks a request's first step `fresh`,
    which starts the linear state from zero, and MLA reads of a slot are masked to positions the
    current request has written, so whatever the slot's last user left there is never read.
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
