"""Grouped expert matmuls for TPU (Pallas Mosaic TPU), megablox-style, over a Layout (layout.py).

Checked on the CPU with ``interpret=True`` (Pallas TPU interpret mode); not yet run on TPU hardware.

One kernel, ``_gmm``, multiplies the padded, expert-sorted rows by their block's expert matrix:
    out[rows of block b] = epilogue(lhs[rows of block b] @ W_i[block_expert[b]] for each weight stack i)
Grid (block, N tile, K tile), K innermost; float32 accumulators in VMEM scratch, zeroed at the first
K tile and turned into the output at the last. block_expert and num_used_blocks come in by scalar
prefetch: the weight BlockSpec's index_map reads the block's expert, so only the used experts' tiles
are DMA'd. Unused blocks (all at the end) compute nothing and write zeros; their index_maps repeat the
last used block's last tiles, so the pipeline issues no DMA for them (Pallas skips a copy whose block
index is unchanged from the previous grid step). Consecutive blocks of one expert re-read its tiles
(as megablox does), so a decode step reads each touched expert once.

gate_up runs it with two weight stacks (w_gate, w_up) and the epilogue silu(g) * u (in float32);
down with one (w_down) and the identity. The activations are gathered into layout order first
(x[row_token], one [P, d] copy in XLA; row T is a zero row).

Tiles: block_m rows (pick_block_m: 16..512, a multiple of the bf16 sublane tile), N and K tiles of
512, 256 or 128 columns (the largest that divides the dimension; the whole dimension otherwise). At
the largest, block_m 512 and 512 x 512 tiles, gate_up's double-buffered inputs and output plus its two
float32 accumulators take 6 MiB of VMEM in bf16 and 10 MiB in float32 (below the 16 MiB default scoped
limit of v5e; 32 MiB on v6e).
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32


def pick_layout_method(n_pairs: int) -> str:
    """How make_layout builds the layout: the sort (layout.py); the comparison-built layout is not yet measured on a TPU."""
    return 'sort'


def pick_block_m(n_pairs: int, num_experts: int) -> int:
    """Rows per block: 512, halved (down to 16: bf16 packs 16 rows per sublane tile) while there are
    fewer than two blocks' worth of pairs per expert, which bounds the padding (< 1 block per expert,
    on average under a third of the rows). Large blocks matter: each block reads its expert's whole
    weight matrices, so a block of block_m rows does block_m flops per weight byte, and a TPU's MXU
    needs ~240 (v5e) to ~570 (v6e) of them to be compute-bound."""
    b = 512
    while b > 16 and n_pairs < 2 * b * num_experts:
        b //= 2
    return b


def _tile(dim: int) -> int:
    for t in (512, 256, 128):
        if dim % t == 0:
            return t
    return dim


def _like(x, shape, dtype):
    """Output struct varying over the same shard_map axes as x (needed under check_vma)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).manual_axis_type)


def _kernel(be_ref, nu_ref, x_ref, *refs, n_w, n_k, epilogue, exact):
    del be_ref
    w_refs, o_ref, acc_refs = refs[:n_w], refs[n_w], refs[n_w + 1:]
    b, kk = pl.program_id(0), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        for acc in acc_refs:
            acc[...] = jnp.zeros_like(acc)

    @pl.when(b < nu_ref[0])
    def _():
        x = x_ref[...]
        for w, acc in zip(w_refs, acc_refs):
            acc[...] += jax.lax.dot_general(x, w[...], (((1,), (0,)), ((), ())), preferred_element_type=F32,
                                            precision=jax.lax.Precision.HIGHEST if exact else None)

    @pl.when(kk == n_k - 1)
    def _():
        o_ref[...] = epilogue(*(acc[...] for acc in acc_refs)).astype(o_ref.dtype)


def _gmm(lhs, ws, layout, epilogue, interpret):
    """lhs [P, K] in layout order; ws: weight stacks [E, K, N] -> [P, N] in lhs.dtype."""
    P, K = lhs.shape
    N = ws[0].shape[2]
    bm, nb = layout.block_m, layout.num_blocks
    tk, tn = _tile(K), _tile(N)
    n_k, n_n = K // tk, N // tn

    def last_if_unused(b, n, kk, nu):
        """(block, n tile, k tile) to fetch at grid step (b, n, kk): unused blocks repeat the last
        used block's last step, so that nothing is copied for them."""
        last = jnp.maximum(nu[0] - 1, 0)
        used = b < nu[0]
        return (jnp.where(used, b, last), jnp.where(used, n, n_n - 1), jnp.where(used, kk, n_k - 1))

    def x_map(b, n, kk, be, nu):
        bb, _, kq = last_if_unused(b, n, kk, nu)
        return bb, kq

    def w_map(b, n, kk, be, nu):
        bb, nq, kq = last_if_unused(b, n, kk, nu)
        return jnp.maximum(be[bb], 0), kq, nq

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(nb, n_n, n_k),
        in_specs=[pl.BlockSpec((bm, tk), x_map)] + [pl.BlockSpec((None, tk, tn), w_map) for _ in ws],
        out_specs=pl.BlockSpec((bm, tn), lambda b, n, kk, be, nu: (b, n)),
        scratch_shapes=[pltpu.VMEM((bm, tn), F32) for _ in ws],
    )
    kernel = functools.partial(_kernel, n_w=len(ws), n_k=n_k, epilogue=epilogue, exact=lhs.dtype == F32)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=_like(lhs, (P, N), lhs.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
        interpret=pltpu.InterpretParams() if interpret else False,
        name='lingjax_moe_gmm_tpu',
    )(layout.block_expert, layout.num_used_blocks.reshape(1), lhs, *ws)


def _silu_mul(g, u):
    return jax.nn.silu(g) * u


def gate_up(x, layout, w_gate, w_up, *, interpret=False):
    """x [T, d]; w_gate/w_up [E, d, I] -> h [P, I] in x.dtype (see reference.gate_up)."""
    xs = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[layout.row_token]
    return _gmm(xs, (w_gate, w_up), layout, _silu_mul, interpret)


def down(h, layout, w_down, *, interpret=False):
    """h [P, I]; w_down [E, I, d] -> y [P, d] in h.dtype (see reference.down)."""
    return _gmm(h, (w_down,), layout, lambda y: y, interpret)
