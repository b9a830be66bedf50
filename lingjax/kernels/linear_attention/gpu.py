"""Linear attention (simple GLA) Pallas kernels for NVIDIA Hopper, Pallas *Triton* lowering.

Same interface and semantics as ``reference.prefill`` / ``reference.decode`` (SPEC §2.4, §2.8, §2.9).

Why the Triton lowering and not Mosaic GPU: both kernels are built on masked, ragged accesses at
run-time offsets -- a chunk starts wherever its sequence starts in the packed token array and ends
at the sequence's true length, and the state tile lives at a run-time slot of the pool. In Triton
these are one masked load each; in Mosaic GPU every copy is a TMA descriptor with a static tile
shape (a ragged tail needs a ladder of descriptors, see jax's ragged_dot_mgpu) and every register
array lives in a WGMMA fragment layout, which turns the per-token decay masks and the kᵀv / qS
products into layout bookkeeping. The Triton lowering is deprecated in JAX 0.11 but still ships,
runs on the CPU in Pallas' generic interpret mode (which is how the tests check these kernels), and
compiles through Triton's own Hopper backend (wgmma for the chunk products).

Prefill: one program per (sequence, head, block of BV value columns); it walks its sequence in
chunks of C tokens starting at the sequence's first token, carrying the f32 state tile
S[:, vblock] (D x BV) in registers, and writes the final tile to the sequence's slot. The grid has
R + 1 rows: row R zero-fills the padding tokens past cu_seqlens[-1]; a skipped sequence (length
0 or negative slot) zero-fills its own tokens and touches no slot.

Decode: one program per (request, head, value block): gather the slot's tile, S = e^g S + k vᵀ,
o = scale qᵀ S, scatter back. The pool is aliased input->output, so under donation a step moves
only the touched slots' bytes.
"""
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

log = logging.getLogger(__name__)
F32 = jnp.float32


def _like(x, shape=None, dtype=None):
    """Output struct varying over the same shard_map axes as x (needed under check_vma)."""
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape if shape is None else shape,
                                aval.dtype if dtype is None else dtype,
                                manual_axis_type=aval.manual_axis_type)


def _dot(a, b, exact, trans_a=False, trans_b=False):
    # exact=True: full-f32 products (the f32 path must meet 1e-5 relative; tf32 would not).
    return pltr.dot(a, b, trans_a=trans_a, trans_b=trans_b,
                  precision=jax.lax.Precision.HIGHEST if exact else None)


# --------------------------------------------------------------------------------------------
# Prefill


def _prefill_kernel(cu_ref, slots_ref, fresh_ref, g_ref, q_ref, k_ref, v_ref, pool_ref,
                    o_ref, pool_out_ref, *, R, T, C, BV, scale, exact):
    del pool_out_ref  # aliased with pool_ref: read and write through pool_ref
    r = pl.program_id(0)
    h = pl.program_id(1)
    j = pl.program_id(2)
    vcols = pl.ds(j * BV, BV)
    io_dtype = o_ref.dtype
    ar = jnp.arange(C, dtype=jnp.int32)

    def zero_fill(t_begin, t_end):
        def body(c, carry):
            t0 = t_begin + c * C
            rows = (t0 + ar) < t_end
            pltr.store(o_ref.at[pl.ds(t0, C), h, vcols], jnp.zeros((C, BV), io_dtype),
                       mask=rows[:, None])
            return carry
        n = jnp.maximum(t_end - t_begin + C - 1, 0) // C
        jax.lax.fori_loop(0, n, body, 0)

    is_pad_row = r == R
    r_c = jnp.minimum(r, R - 1)
    s = jnp.where(is_pad_row, cu_ref[R], cu_ref[r_c])
    e = jnp.where(is_pad_row, T, cu_ref[r_c + 1])
    slot = slots_ref[r_c]
    valid = (~is_pad_row) & (e > s) & (slot >= 0)

    @pl.when(~valid)
    def _():
        zero_fill(s, e)

    @pl.when(valid)
    def _():
        g = g_ref[h]
        fresh = fresh_ref[r_c] != 0
        S0 = pltr.load(pool_ref.at[slot, h, :, vcols]).astype(F32)
        S0 = jnp.where(fresh, jnp.zeros_like(S0), S0)
        fi = ar.astype(F32)
        diff = fi[:, None] - fi[None, :]
        causal = diff >= 0
        intra = jnp.where(causal, jnp.exp(g * jnp.where(causal, diff, 0.0)), 0.0)   # [C, C]
        q_decay = jnp.exp(g * (fi + 1.0))                                              # gamma^(i+1)

        def body(c, S):
            t0 = s + c * C
            m = jnp.minimum(e - t0, C)
            rows = ar < m
            qb = pltr.load(q_ref.at[pl.ds(t0, C), h, :], mask=rows[:, None], other=0.0)
            kb = pltr.load(k_ref.at[pl.ds(t0, C), h, :], mask=rows[:, None], other=0.0)
            vb = pltr.load(v_ref.at[pl.ds(t0, C), h, vcols], mask=rows[:, None], other=0.0)
            a = _dot(qb, kb, exact, trans_b=True) * intra                                          # f32 [C, C]
            o = _dot(a.astype(vb.dtype), vb, exact)
            o = o + q_decay[:, None] * _dot(qb, S.astype(qb.dtype), exact)
            pltr.store(o_ref.at[pl.ds(t0, C), h, vcols], (o * scale).astype(io_dtype),
                       mask=rows[:, None])
            mf = m.astype(F32)
            k_decay = jnp.where(rows, jnp.exp(g * jnp.maximum(mf - 1.0 - fi, 0.0)), 0.0)
            kd = (kb.astype(F32) * k_decay[:, None]).astype(kb.dtype)
            return jnp.exp(g * mf) * S + _dot(kd, vb, exact, trans_a=True)

        n = (e - s + C - 1) // C
        S = jax.lax.fori_loop(0, n, body, S0)
        pltr.store(pool_ref.at[slot, h, :, vcols], S.astype(pool_ref.dtype))


@functools.partial(jax.jit, static_argnames=('scale', 'chunk', 'block_v', 'num_warps',
                                             'num_stages', 'interpret'))
def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, chunk=64,
            block_v=64, num_warps=4, num_stages=2, interpret=False):
    """See reference.prefill. cu_seqlens[0] must be 0."""
    T, H, D = q.shape
    R = slots.shape[0]
    BV = min(block_v, D)
    if D % BV:
        raise ValueError(f'head dim {D} is not a multiple of block_v={BV}')
    exact = q.dtype == jnp.float32
    kernel = functools.partial(_prefill_kernel, R=R, T=T, C=chunk, BV=BV, scale=float(scale),
                               exact=exact)
    o, pool = pl.pallas_call(
        kernel,
        grid=(R + 1, H, D // BV),
        out_shape=(_like(q), _like(state_pool)),
        input_output_aliases={7: 1},
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name='lingjax_linear_attention_prefill',
    )(cu_seqlens.astype(jnp.int32), slots.astype(jnp.int32), fresh.astype(jnp.int32),
      log_decay.astype(F32), q, k, v, state_pool)
    return o, pool


# --------------------------------------------------------------------------------------------
# Decode


def _decode_kernel(slots_ref, fresh_ref, g_ref, q_ref, k_ref, v_ref, pool_ref, o_ref,
                   pool_out_ref, *, BK, BV, NV, scale, split):
    del pool_out_ref
    b = pl.program_id(0)
    h = pl.program_id(1)
    kb = pl.program_id(2) // NV
    j = pl.program_id(2) % NV
    vcols = pl.ds(j * BV, BV)
    krows = pl.ds(kb * BK, BK)
    slot = slots_ref[b]
    # split (BK < D): o_ref is an f32 [NK, B, H, D] buffer of partial sums over key blocks
    o_at = o_ref.at[kb, b, h, vcols] if split else o_ref.at[b, h, vcols]

    @pl.when(slot < 0)
    def _():
        o_at[...] = jnp.zeros((BV,), o_ref.dtype)

    @pl.when(slot >= 0)
    def _():
        qv = q_ref[b, h, krows].astype(F32)
        kv = k_ref[b, h, krows].astype(F32)
        vv = v_ref[b, h, vcols].astype(F32)
        S = pltr.load(pool_ref.at[slot, h, krows, vcols]).astype(F32)
        S = jnp.where(fresh_ref[b] != 0, 0.0, jnp.exp(g_ref[h]) * S) + kv[:, None] * vv[None, :]
        pltr.store(pool_ref.at[slot, h, krows, vcols], S.astype(pool_ref.dtype))
        o_at[...] = (scale * jnp.sum(qv[:, None] * S, axis=0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=('scale', 'block_k', 'block_v', 'num_warps',
                                             'interpret'))
def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale, block_k=None, block_v=64,
           num_warps=4, interpret=False):
    """See reference.decode. block_k < D splits the key dim over programs (f32 partial outputs
    summed afterwards), for more programs in flight at small batch."""
    B, H, D = q.shape
    BV = min(block_v, D)
    BK = min(block_k or D, D)
    if D % BV or D % BK:
        raise ValueError(f'head dim {D} is not a multiple of block_v={BV} / block_k={BK}')
    NV, NK = D // BV, D // BK
    split = NK > 1
    kernel = functools.partial(_decode_kernel, BK=BK, BV=BV, NV=NV, scale=float(scale),
                               split=split)
    o_struct = _like(q, (NK,) + q.shape, F32) if split else _like(q)
    o, pool = pl.pallas_call(
        kernel,
        grid=(B, H, NK * NV),
        out_shape=(o_struct, _like(state_pool)),
        input_output_aliases={6: 1},
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name='lingjax_linear_attention_decode',
    )(slots.astype(jnp.int32), fresh.astype(jnp.int32), log_decay.astype(F32), q, k, v,
      state_pool)
    if split:
        o = o.sum(0).astype(q.dtype)
    return o, pool
