"""Grouped expert matmuls in plain jnp over a Layout (layout.py): the CPU path and the oracle of the
kernels. Differentiable (scripts/train_tiny.py trains through it).

Each block of block_m rows runs against its expert's weights, gathered per block: the work is the
number of (padded) pairs times d * I, not T * E * d * I, and only the blocks' weights are read. Exact:
float32 accumulation, SiLU and the product in float32, one rounding to the activation dtype.
"""
import jax
import jax.numpy as jnp

F32 = jnp.float32


def pick_layout_method(n_pairs: int) -> str:
    """How make_layout builds the layout: the sort (layout.py): on the CPU, the comparisons are no faster."""
    return 'sort'


def pick_block_m(n_pairs: int, num_experts: int) -> int:
    """Rows per block: 64, halved (down to 8) while there are fewer than 2 blocks' worth of pairs per
    expert (each expert's group is padded to whole blocks, so small blocks waste less)."""
    b = 64
    while b > 8 and n_pairs < 2 * b * num_experts:
        b //= 2
    return b


def _block_weights(w, layout):
    """w [E, a, b] -> [NB, a, b]: each block's expert's matrix (unused blocks: expert 0; their rows
    are zero rows of x or h, so they add nothing and get no gradient)."""
    return w[jnp.clip(layout.block_expert, 0, w.shape[0] - 1)]


def gate_up(x, layout, w_gate, w_up):
    """x [T, d]; w_gate/w_up [E, d, I] -> h [P, I] in x.dtype:
    silu(x[row_token] @ Wg[e]) * (x[row_token] @ Wu[e]) per block (row T of x is a zero row)."""
    T, d = x.shape
    nb, bm = layout.num_blocks, layout.block_m
    xe = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[layout.row_token].reshape(nb, bm, d)
    g = jnp.einsum('bnd,bdi->bni', xe, _block_weights(w_gate, layout).astype(x.dtype), preferred_element_type=F32)
    u = jnp.einsum('bnd,bdi->bni', xe, _block_weights(w_up, layout).astype(x.dtype), preferred_element_type=F32)
    return (jax.nn.silu(g) * u).astype(x.dtype).reshape(nb * bm, -1)


def down(h, layout, w_down):
    """h [P, I]; w_down [E, I, d] -> y [P, d] in h.dtype (float32 accumulation)."""
    nb, bm = layout.num_blocks, layout.block_m
    y = jnp.einsum('bni,bid->bnd', h.reshape(nb, bm, -1), _block_weights(w_down, layout).astype(h.dtype),
                   preferred_element_type=F32)
    return y.astype(h.dtype).reshape(nb * bm, -1)
