"""The packed, ragged batch that one engine step consumes (DESIGN.md "Data flow").

Tokens of all requests in the step are packed back to back: request r owns tokens
[cu_seqlens[r], cu_seqlens[r+1]); tokens at or past cu_seqlens[-1] are bucket padding. A request
row with slot < 0 is padding. Every array has a bucketed static shape; `decode_only` (static) says
every request has exactly one token, which selects the decode kernels. `page_table` row r lists the
MLA latent pages of request row r in order (lingjax/kernels/mla format, indexed by row, not by slot);
padding rows' entries are never read.
"""
import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    tokens: jax.Array       # [T] int32
    positions: jax.Array    # [T] int32, absolute position of each token in its sequence
    token_seq: jax.Array    # [T] int32, request row of each token; R for padding tokens
    slots: jax.Array        # [R] int32, cache slot of each request; -1 for padding rows
    cu_seqlens: jax.Array   # [R+1] int32
    fresh: jax.Array        # [R] bool, the request starts here (its linear state starts from zero)
    page_table: jax.Array | None = None   # [R, max_pages] int32, MLA pages of each request row
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def token_slots(self):
        """[T] slot of each token; -1 for padding tokens."""
        padded = jnp.concatenate([self.slots, jnp.full((1,), -1, self.slots.dtype)])
        return padded[self.token_seq]

    @property
    def token_rows(self):
        """[T] request row of each token (its page_table row); -1 for padding tokens."""
        return jnp.where(self.token_slots >= 0, self.token_seq, -1)
