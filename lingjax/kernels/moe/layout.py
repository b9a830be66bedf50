"""The grouped layout of a MoE step, shared by every expert-matmul implementation.

The T * k (token, expert) pairs of a routing are sorted by expert (stable: token order within an
expert) and laid out as rows of a padded matrix of P = NB * block_m rows, each expert's group
padded to a whole number of blocks of block_m rows, so that every block belongs to one expert and a
grouped matmul runs block by block against that expert's weights:

    rows  [ e0 e0 e0 pad | e2 e2 e2 e2 | e2 pad pad pad | e5 pad pad pad | pad ... (unused blocks) ]
    block [      0       |      1      |       2        |        3       |   4 ... NB-1           ]

- row_token [P]: the token of each row; T (a zero row appended to the activations) for padding rows.
- block_expert [NB]: the expert of each block, used blocks first in increasing expert order, -1 for
  the unused blocks at the end.
- pair_row [T, k]: where pair (t, j) went; P (a zero row appended to the output) for a dropped pair.
- num_used_blocks []: the number of used blocks.

Ids outside [0, num_experts) are dropped pairs (under expert parallelism: experts held by another
device). Static sizes: every used block holds at least one pair and at most min(E, T*k) experts
have pairs, so NB = ceil((T*k + min(E, T*k) * (block_m - 1)) / block_m) blocks always suffice (the
worst case over routings; for decode, T*k < E, this is far fewer than ceil((T*k + E*(block_m-1)) /
block_m)). Implementations read NB and P from the arrays' shapes.

Built with a stable argsort and scatters to distinct indices (deterministic, no atomics).
"""
import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    row_token: jax.Array          # [P] int32
    block_expert: jax.Array       # [NB] int32
    pair_row: jax.Array           # [T, k] int32
    num_used_blocks: jax.Array    # [] int32
    block_m: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]

    @property
    def num_rows(self) -> int:
        return self.row_token.shape[0]


def num_blocks(n_pairs: int, num_experts: int, block_m: int) -> int:
    """NB: the worst-case number of blocks over every routing of n_pairs pairs to num_experts experts."""
    return max(1, -(-(n_pairs + min(num_experts, n_pairs) * (block_m - 1)) // block_m))


def make_layout(idx, num_experts: int, block_m: int) -> Layout:
    """idx [T, k] int (expert ids local to this device; others are dropped) -> Layout."""
    if idx.ndim != 2:
        raise ValueError(f'make_layout: idx must be [T, k], got shape {idx.shape}')
    if block_m < 1 or num_experts < 1:
        raise ValueError(f'make_layout: block_m={block_m} and num_experts={num_experts} must be >= 1')
    T, k = idx.shape
    E, bm = num_experts, block_m
    n = T * k
    nb = num_blocks(n, E, bm)
    P = nb * bm
    e = idx.reshape(-1).astype(jnp.int32)
    key = jnp.where((e >= 0) & (e < E), e, E)                        # dropped pairs sort last, as "expert E"
    order = jnp.argsort(key, stable=True).astype(jnp.int32)          # sorted position -> pair
    key_sorted = key[order]
    counts = jnp.bincount(key, length=E + 1)[:E].astype(jnp.int32)   # pairs per expert
    padded = -(-counts // bm) * bm                                   # rows per expert (whole blocks)
    pad_end = jnp.cumsum(padded)
    first_pad = pad_end - padded                                     # first row of each expert's group
    first_pair = jnp.cumsum(counts) - counts                         # first sorted position of each expert
    e_c = jnp.minimum(key_sorted, E - 1)
    rank = jnp.arange(n, dtype=jnp.int32) - first_pair[e_c]          # position within its expert's group
    row = jnp.where(key_sorted < E, first_pad[e_c] + rank, P).astype(jnp.int32)
    row_token = jnp.full((P,), T, jnp.int32).at[row].set(order // k, mode='drop', unique_indices=True)
    pair_row = jnp.zeros((n,), jnp.int32).at[order].set(row, unique_indices=True).reshape(T, k)
    used = (pad_end[-1] // bm).astype(jnp.int32)
    start = jnp.arange(nb, dtype=jnp.int32) * bm
    expert = jnp.searchsorted(pad_end, start, side='right').astype(jnp.int32)
    block_expert = jnp.where(jnp.arange(nb) < used, expert, -1).astype(jnp.int32)
    return Layout(row_token=row_token, block_expert=block_expert, pair_row=pair_row,
                  num_used_blocks=used, block_m=bm)
