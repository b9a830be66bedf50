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

Two constructions of the same Layout (equal arrays for every routing; tests/test_moe_kernels.py):
- 'sort': a stable argsort of the pairs by expert, bincount, cumsums and scatters to distinct
  indices (deterministic, no atomics). Work O(n log n); on a GPU, a sort and several scatters are
  each their own kernel(s), a fixed cost that dominates a decode step's layout.
- 'compare': no sort, no scatter: counts, ranks, group offsets, the row of each pair, the token of
  each row and the expert of each block are each one comparison of two index vectors reduced along
  one axis ([n, E], [n, n], [E, E], [P, n], [NB, E] booleans), elementwise work XLA fuses into a few
  kernels. Work O(n (n + E + P)): the choice at decode sizes (n <= COMPARE_MAX_PAIRS).
Each implementation picks one by the number of pairs (its `pick_layout_method`): the GPU path
'compare' up to COMPARE_MAX_PAIRS pairs (fewer kernel launches), the others 'sort' (on the CPU the
comparisons are no faster).
"""
import dataclasses

import jax
import jax.numpy as jnp

METHODS = ('sort', 'compare')
COMPARE_MAX_PAIRS = 2048    # T * k up to which the GPU path builds the layout by comparisons (T <= 256 at k 8)


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


def make_layout(idx, num_experts: int, block_m: int, method: str = 'sort') -> Layout:
    """idx [T, k] int (expert ids local to this device; others are dropped) -> Layout.
    method: 'sort' or 'compare' (the same Layout; see the module docstring)."""
    if idx.ndim != 2:
        raise ValueError(f'make_layout: idx must be [T, k], got shape {idx.shape}')
    if block_m < 1 or num_experts < 1:
        raise ValueError(f'make_layout: block_m={block_m} and num_experts={num_experts} must be >= 1')
    if method not in METHODS:
        raise ValueError(f'make_layout: unknown method {method!r}; expected one of {METHODS}')
    return (_layout_compare if method == 'compare' else _layout_sort)(idx, num_experts, block_m)


def _layout_sort(idx, num_experts: int, block_m: int) -> Layout:
    T, k = idx.shape
    E, bm = num_experts, block_m
    n = T * k
    nb = num_blocks(n, E, bm)
    P = nb * bm
    e = idx.reshape(-1).astype(jnp.int32)
    key = jnp.where((e >= 0) & (e < E), e, E)                        # dropped pairs sort last, as "expert E"
    order, key_sorted = _sort_by_expert(key, E, packed=(E + 1) * n <= jnp.iinfo(jnp.int32).max)
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
    # compare_all: one fused comparison; the default binary search is a loop of small kernels
    expert = jnp.searchsorted(pad_end, start, side='right', method='compare_all').astype(jnp.int32)
    block_expert = jnp.where(jnp.arange(nb) < used, expert, -1).astype(jnp.int32)
    return Layout(row_token=row_token, block_expert=block_expert, pair_row=pair_row,
                  num_used_blocks=used, block_m=bm)


def _sort_by_expert(key, E: int, packed: bool):
    """key [n] in [0, E] -> (order: sorted position -> pair, key_sorted), stable (pair order within a key).
    packed: one sort of the unique int32 keys key * n + pair (needs (E + 1) * n < 2^31): no second
    (index) operand to carry and no gather of the sorted keys (on the GPU a single-operand sort moves
    half the data per step); else a stable argsort and a gather."""
    n = key.shape[0]
    if packed:
        s = jnp.sort(key * n + jnp.arange(n, dtype=jnp.int32))
        return s % n, s // n
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    return order, key[order]


def _layout_compare(idx, num_experts: int, block_m: int) -> Layout:
    """The Layout of _layout_sort built from comparisons and reductions only (no sort, no scatter)."""
    T, k = idx.shape
    E, bm = num_experts, block_m
    n = T * k
    nb = num_blocks(n, E, bm)
    P = nb * bm
    i32 = jnp.int32
    e = idx.reshape(-1).astype(i32)
    valid = (e >= 0) & (e < E)
    key = jnp.where(valid, e, E)                                        # dropped pairs: "expert E"
    pairs = jnp.arange(n, dtype=i32)
    experts = jnp.arange(E, dtype=i32)
    counts = jnp.sum(key[:, None] == experts[None, :], axis=0, dtype=i32)            # [E] pairs per expert
    padded = -(-counts // bm) * bm                                                   # rows per expert
    pad_end = jnp.sum(jnp.where(experts[None, :] <= experts[:, None], padded[None, :], 0), axis=1, dtype=i32)
    first_pad = pad_end - padded                                                     # first row of each group
    # rank of a pair in its expert's group: earlier pairs (flat order t * k + j) with the same expert
    rank = jnp.sum((key[None, :] == key[:, None]) & (pairs[None, :] < pairs[:, None]), axis=1, dtype=i32)
    row = jnp.where(valid, first_pad[jnp.minimum(key, E - 1)] + rank, P).astype(i32)     # [n]
    # the token of each row: the pair whose row it is (at most one), else T (padding)
    rows = jnp.arange(P, dtype=i32)
    row_token = jnp.min(jnp.where(row[None, :] == rows[:, None], pairs[None, :] // k, T), axis=1).astype(i32)
    used = (pad_end[-1] // bm).astype(i32)
    start = jnp.arange(nb, dtype=i32) * bm
    expert = jnp.sum(pad_end[None, :] <= start[:, None], axis=1, dtype=i32)
    block_expert = jnp.where(jnp.arange(nb) < used, expert, -1).astype(i32)
    return Layout(row_token=row_token, block_expert=block_expert, pair_row=row.reshape(T, k),
                  num_used_blocks=used, block_m=bm)
