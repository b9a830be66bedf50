"""Linear attention (simple GLA) as Pallas kernels lowered through Pallas' *Triton* backend: the
former GPU default, kept as an explicit fallback (impl='pallas_triton'; 'pallas_triton_interpret'
runs it in Pallas' interpret mode on the CPU). Not the default: JAX 0.11 deprecates this lowering
(every call warns, and a later JAX removes it). The default GPU kernels (triton_gpu.py) are the
same algorithm written directly in Triton and launched through jax-triton; triton_gpu.py's
docstring describes it (chunked prefill over slot-indexed states, the segment split, the fused
decode). This module is kept so that the benchmark can compare the two on the device
(scripts/bench_linear_attention.py) and as a fallback where jax-triton is not installed; the CI
does not run it (its interpret tests run only with LINGJAX_TEST_PALLAS_TRITON=1).

Same interface and semantics as ``reference.prefill`` / ``reference.decode`` (SPEC §2.4, §2.8,
§2.9), same options as triton_gpu.py's functions (plus interpret=).
"""
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from lingjax.kernels.linear_attention.gpu_common import like as _like, pick_segment, pick_stages

log = logging.getLogger(__name__)
F32 = jnp.float32


# How float32 q/k/v are multiplied (bf16/f16 inputs: one tensor-core product, f32 sum):
# 'ieee': fp32 FMAs, no tensor cores; 'tf32x3': three tf32 tensor-core products with error
# correction, about fp32 accuracy; 'tf32': one tf32 product (10-bit mantissa), what Triton
# kernels given fp32 inputs do by default (vLLM's, SGLang's, fla's). Only 'ieee' and 'tf32x3'
# meet the f32 path's 1e-5 relative bound.
_F32_DOTS = {'ieee': jax.lax.Precision.HIGHEST,
             'tf32x3': jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
             'tf32': jax.lax.DotAlgorithmPreset.TF32_TF32_F32}


def _dot(a, b, prec, trans_a=False, trans_b=False):
    # prec: None (bf16/f16 inputs) or a value of _F32_DOTS.
    return pltr.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


# --------------------------------------------------------------------------------------------
# Prefill

def _flag(ref, i):
    """Element i of a bool or integer flag vector as a bool scalar. A bool ref is read as is
    (Pallas-Triton loads it through an i8 pointer), so no XLA convert kernel runs before the call."""
    f = ref[i]
    return f if f.dtype == jnp.bool_ else f != 0


def _seg_rows(pid, NSEG):
    return pid // NSEG, pid % NSEG


def _grid_ids(tiles_first):
    """(row, head, value block) program ids; tiles_first: the value-block axis is grid axis 0."""
    if tiles_first:
        return pl.program_id(1), pl.program_id(2), pl.program_id(0)
    return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def _increment_kernel(cu_ref, slots_ref, fresh_ref, g_ref, k_ref, v_ref, pool_ref, x_ref,
                      *, NSEG, L, C, BV, prec, tiles_first):
    """Pass 1 of the segment split. Program (r, i): i = 0 copies the initial state (pool tile or
    zero) to x[r, 0]; i >= 1 writes x[r, i] = the zero-start state of full segment i-1,
    sum_t gamma^(L-1-t) k_t v_t^T (exponents <= 0), if segment i-1 is not the sequence's last."""
    row, h, jv = _grid_ids(tiles_first)
    r, i = _seg_rows(row, NSEG)
    vcols = pl.ds(jv * BV, BV)
    s, e = cu_ref[r], cu_ref[r + 1]
    slot = slots_ref[r]
    valid = (e > s) & (slot >= 0)
    n_r = (e - s + L - 1) // L
    D = k_ref.shape[-1]
    x_at = x_ref.at[r, i, h, :, vcols]

    fresh = _flag(fresh_ref, r)

    @pl.when(valid & (i == 0) & fresh)
    def _():
        pltr.store(x_at, jnp.zeros((D, BV), F32))

    @pl.when(valid & (i == 0) & ~fresh)
    def _():
        pltr.store(x_at, pltr.load(pool_ref.at[slot, h, :, vcols]).astype(F32))

    @pl.when(valid & (i >= 1) & (i < n_r))
    def _():
        g = g_ref[h]
        fi = jnp.arange(C, dtype=jnp.int32).astype(F32)
        t_begin = s + (i - 1) * L

        def body(c, S):
            t0 = t_begin + c * C
            kb = pltr.load(k_ref.at[pl.ds(t0, C), h, :])
            vb = pltr.load(v_ref.at[pl.ds(t0, C), h, vcols])
            w = jnp.exp(g * ((L - 1 - c * C) - fi))                       # gamma^(L-1-t) <= 1
            kd = (kb.astype(F32) * w[:, None]).astype(kb.dtype)
            return S + _dot(kd, vb, prec, trans_a=True)

        S = jax.lax.fori_loop(0, L // C, body, jnp.zeros((D, BV), F32))
        pltr.store(x_at, S)


def _prefill_kernel(cu_ref, slots_ref, fresh_ref, g_ref, q_ref, k_ref, v_ref, pool_ref, *rest,
                    R, T, C, BV, scale, prec, L, NSEG, tiles_first):
    """Output pass. Unsplit (L None): program (r, h, vblock) walks sequence r from its slot's
    state. Split: program (r*NSEG + j, h, vblock) walks segment j of sequence r, starting from
    x[r, 0] (initial state) folded with the increments x[r, 1..j] (S = gamma^L S + x[r, i])."""
    if L is None:
        o_ref, pool_out_ref = rest
        x_ref = None
    else:
        x_ref, o_ref, pool_out_ref = rest
    del pool_out_ref  # aliased with pool_ref: read and write through pool_ref
    row, h, jv = _grid_ids(tiles_first)
    r, j = _seg_rows(row, NSEG)
    vcols = pl.ds(jv * BV, BV)
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
    if L is not None:                       # this program's segment [s, e) of the row's tokens
        s, e, e_row = s + j * L, jnp.minimum(e, s + (j + 1) * L), e
    slot = slots_ref[r_c]
    valid = (~is_pad_row) & (e > s) & (slot >= 0)

    @pl.when(~valid)
    def _():
        zero_fill(s, e)

    @pl.when(valid)
    def _():
        g = g_ref[h]
        if L is None:
            fresh = _flag(fresh_ref, r_c)
            S0 = pltr.load(pool_ref.at[slot, h, :, vcols]).astype(F32)
            S0 = jnp.where(fresh, jnp.zeros_like(S0), S0)
        else:
            gL = jnp.exp(g * float(L))
            S0 = jax.lax.fori_loop(     # i = 0 adds the initial state to zeros
                0, j + 1, lambda i, S: gL * S + pltr.load(x_ref.at[r_c, i, h, :, vcols]),
                jnp.zeros((q_ref.shape[-1], BV), F32))
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
            a = _dot(qb, kb, prec, trans_b=True) * intra                                          # f32 [C, C]
            o = _dot(a.astype(vb.dtype), vb, prec)
            o = o + q_decay[:, None] * _dot(qb, S.astype(qb.dtype), prec)
            pltr.store(o_ref.at[pl.ds(t0, C), h, vcols], (o * scale).astype(io_dtype),
                       mask=rows[:, None])
            mf = m.astype(F32)
            k_decay = jnp.where(rows, jnp.exp(g * jnp.maximum(mf - 1.0 - fi, 0.0)), 0.0)
            kd = (kb.astype(F32) * k_decay[:, None]).astype(kb.dtype)
            return jnp.exp(g * mf) * S + _dot(kd, vb, prec, trans_a=True)

        n = (e - s + C - 1) // C
        S = jax.lax.fori_loop(0, n, body, S0)
        if L is None:
            pltr.store(pool_ref.at[slot, h, :, vcols], S.astype(pool_ref.dtype))
        else:
            @pl.when(e == e_row)            # the sequence's last segment writes the final state
            def _():
                pltr.store(pool_ref.at[slot, h, :, vcols], S.astype(pool_ref.dtype))


@functools.partial(jax.jit, static_argnames=('scale', 'chunk', 'block_v', 'num_warps',
                                             'num_stages', 'segment', 'tiles_first', 'f32_dot', 'interpret'))
def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, chunk=64,
            block_v=64, num_warps=4, num_stages=None, segment=None, tiles_first=True,
            f32_dot='tf32x3', interpret=False):
    """See reference.prefill. cu_seqlens[0] must be 0.

    segment: None = split long sequences automatically when the grid would be small (see the
    module docstring); 0 = never split; L (a multiple of chunk) = split into L-token segments.
    num_stages: None = 3 for bf16/f16 unsplit with at most 132 programs, else 2 (pick_stages).
    tiles_first: the value-block axis is the first (fastest-launched) grid axis, so the D/BV
    programs of one (segment, head), which read the same q and k, run side by side (H200, one
    32k sequence, H=32, split: 899 vs 968 us; H=64 unsplit at 2 stages: 1856 vs 1994 us).
    f32_dot: how float32 q/k/v are multiplied, 'ieee', 'tf32x3' or 'tf32' (see _F32_DOTS). The
    CPU interpreter has no tf32 products, so there every mode runs as 'ieee'.
    fresh may be bool or integer (read in the kernel as is)."""
    T, H, D = q.shape
    R = slots.shape[0]
    BV = min(block_v, D)
    if D % BV:
        raise ValueError(f'head dim {D} is not a multiple of block_v={BV}')
    NV = D // BV
    if f32_dot not in _F32_DOTS:
        raise ValueError(f'f32_dot={f32_dot!r}: expected one of {sorted(_F32_DOTS)}')
    prec = None
    if q.dtype == jnp.float32:
        prec = _F32_DOTS['ieee' if interpret else f32_dot]
    L = pick_segment(T, R, H, NV, chunk, segment)
    NSEG = 1 if L is None else -(-T // L)
    if num_stages is None:
        num_stages = pick_stages(L, R * H * NV, f32=prec is not None)
    cu = cu_seqlens.astype(jnp.int32)
    slots = slots.astype(jnp.int32)
    g = log_decay.astype(F32)
    params = pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    extra = ()
    if L is not None:
        x = pl.pallas_call(
            functools.partial(_increment_kernel, NSEG=NSEG, L=L, C=chunk, BV=BV, prec=prec,
                              tiles_first=tiles_first),
            grid=(NV, R * NSEG, H) if tiles_first else (R * NSEG, H, NV),
            out_shape=_like(k, (R, NSEG, H, D, v.shape[-1]), F32),
            compiler_params=params,
            interpret=interpret,
            name='lingjax_linear_attention_prefill_increments',
        )(cu, slots, fresh, g, k, v, state_pool)
        extra = (x,)
    kernel = functools.partial(_prefill_kernel, R=R, T=T, C=chunk, BV=BV, scale=float(scale),
                               prec=prec, L=L, NSEG=NSEG, tiles_first=tiles_first)
    o, pool = pl.pallas_call(
        kernel,
        grid=(NV, (R + 1) * NSEG, H) if tiles_first else ((R + 1) * NSEG, H, NV),
        out_shape=(_like(q), _like(state_pool)),
        input_output_aliases={7: 1},
        compiler_params=params,
        interpret=interpret,
        name='lingjax_linear_attention_prefill',
    )(cu, slots, fresh, g, q, k, v, state_pool, *extra)
    return o, pool


# --------------------------------------------------------------------------------------------
# Decode


def _decode_kernel(slots_ref, fresh_ref, g_ref, q_ref, k_ref, v_ref, pool_ref, o_ref,
                   pool_out_ref, *, BK, BV, NV, scale, split, tiles_first):
    del pool_out_ref
    b = pl.program_id(2 if tiles_first else 0)
    h = pl.program_id(1)
    tile = pl.program_id(0 if tiles_first else 2)
    kb = tile // NV
    j = tile % NV
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
        fresh = _flag(fresh_ref, b)
        gamma = jnp.exp(g_ref[h])
        vv = v_ref[b, h, vcols].astype(F32)
        qv = q_ref[b, h, krows].astype(F32)
        kv = k_ref[b, h, krows].astype(F32)
        S = pltr.load(pool_ref.at[slot, h, krows, vcols]).astype(F32)
        S = jnp.where(fresh, 0.0, gamma * S) + kv[:, None] * vv[None, :]
        pltr.store(pool_ref.at[slot, h, krows, vcols], S.astype(pool_ref.dtype))
        o_at[...] = (scale * jnp.sum(qv[:, None] * S, axis=0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=('scale', 'block_k', 'block_v', 'num_warps',
                                             'tiles_first', 'interpret'))
def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale, block_k=None, block_v=64,
           num_warps=4, tiles_first=True, interpret=False):
    """See reference.decode. block_k < D splits the key dim over programs (f32 partial outputs
    summed afterwards), for more programs in flight at small batch.
    tiles_first: grid (tiles, H, B), so that programs launched together sweep one slot's
    [H, D, D] state in address order (as fla's grid does); False: grid (B, H, tiles).
    fresh may be bool or integer (read in the kernel as is; no conversion kernel)."""
    B, H, D = q.shape
    BV = min(block_v, D)
    BK = min(block_k or D, D)
    if D % BV or D % BK:
        raise ValueError(f'head dim {D} is not a multiple of block_v={BV} / block_k={BK}')
    NV, NK = D // BV, D // BK
    split = NK > 1
    kernel = functools.partial(_decode_kernel, BK=BK, BV=BV, NV=NV, scale=float(scale),
                               split=split, tiles_first=tiles_first)
    o_struct = _like(q, (NK,) + q.shape, F32) if split else _like(q)
    o, pool = pl.pallas_call(
        kernel,
        grid=(NK * NV, H, B) if tiles_first else (B, H, NK * NV),
        out_shape=(o_struct, _like(state_pool)),
        input_output_aliases={6: 1},
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name='lingjax_linear_attention_decode',
    )(slots.astype(jnp.int32), fresh, log_decay.astype(F32), q, k, v, state_pool)
    if split:
        o = o.sum(0).astype(q.dtype)
    return o, pool
