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
0 or negative slot) zero-fills its own tokens and touches no slot. Grid order (value blocks, rows,
H) by default (tiles_first): the D/BV programs that read the same q/k tokens launch side by side,
so the second one finds them in L2. Pipelining depth auto (_pick_stages).

Segment split (few, long sequences). With R * H * D/BV programs well under the GPU's width (one
32k-token sequence at H=32: 64 programs for 132 SMs, each walking 512 chunks in series; the
auto rule splits at <= _SPLIT_MAX_PROGRAMS = 64 programs) each sequence is cut into segments of
L tokens (L static, a power-of-two multiple of C, chosen from the static shapes T, R, H so that
about _TARGET_PROGRAMS programs run; `segment=` overrides, 0 disables). NSEG = ceil(T / L)
bounds the segment count of any sequence; sequence r has n_r = ceil(len_r / L) segments at run
time, programs past it do nothing. Two launches:
  1. increments, grid (R * NSEG, H, D/BV): program (r, 0) copies the initial state (slot tile,
     or 0 if fresh) to x[r, 0]; program (r, i), 1 <= i < n_r, writes the zero-start state of the
     full segment i-1, x[r, i] = sum_t gamma^(L-1-t) k_t v_tᵀ (one accumulating product, all
     exponents <= 0, f32).
  2. output pass, grid ((R + 1) * NSEG, H, D/BV): program (r, j) folds its start state
     S = x[r, 0]; S = gamma^L S + x[r, i] for i = 1..j (exact: every segment before the last
     is exactly L tokens, so each fold step decays by exactly gamma^L), then runs the unsplit
     chunk loop over [s_r + jL, min(e_r, s_r + (j+1)L)) (exact gamma^(i+1) inter-chunk rule as
     above) and, only for the sequence's last segment, writes the final state to the slot.
     Pad row / skipped sequences zero-fill their segments' tokens.
The pool is read only by launch 1 and written only by launch 2 (aliased in -> out), so no slot is
read after being written. x is a scratch output of R * NSEG * H * D * D f32 (33 MB for one 32k
sequence at H=32); the fold re-reads at most NSEG tiles per program, mostly from L2. Extra cost:
one more read of k and v, and the fold.

Decode: one program per (request, head, value block): gather the slot's tile, S = e^g S + k vᵀ,
o = scale qᵀ S, scatter back. The pool is aliased input->output, so under donation a step moves
only the touched slots' bytes. Grid (value blocks, H, B) by default (tiles_first): programs
launched together sweep one slot's [H, D, D] block in address order, as fla's grid does
(H200, H=32: 304 vs 323 us at B=256, 95 vs 98 us at B=64 against grid (B, H, value blocks)).
`fresh` is read in the kernel as given (bool or int), so a call launches this one kernel and no
XLA conversion before it (block_k < D adds one XLA sum after it).
"""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
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

# Auto segment split (segment=None), for H100/H200 (132 SMs): split only when at most
# _SPLIT_MAX_PROGRAMS (sequence, head, value-block) programs would run (at most ~half the SMs
# busy), into segments giving about _TARGET_PROGRAMS programs. Measured on H200 (notes file):
# H=32, one 32k sequence (64 programs): 1092 us unsplit -> 846-892 us split (L=2048); H=64, one
# 32k sequence (128 programs): 1140 us unsplit vs 1566 us split (L=4096): with the SMs already
# mostly busy, the split's extra pass costs more than its parallelism gains. Segments are at least
# 16 chunks (1024 tokens): each output program folds every earlier segment's increment, so short
# segments cost more in the fold than they gain (H=32, one 4096-token sequence, device time, run 8:
# L=256 140.8 us, 512 112.6, 1024 101.0, unsplit 116.3; fla 106.6).
_SPLIT_MAX_PROGRAMS = 64
_TARGET_PROGRAMS = 1024
_MIN_SEGMENT_CHUNKS = 16


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


def _pick_stages(L, programs, f32=False):
    """Pipelining depth of the prefill passes (num_stages=None). float32 inputs: 2 (their tiles
    are twice the bytes; tf32x3 at 3 stages asked for 256 KiB of shared memory on H200, over its
    227 KiB). bf16/f16, measured on H200 (notes file): unsplit with at most one wave of programs
    (few long sequences), 3 stages: H=64 one 32k sequence (128 programs) 1152 us vs 1994 at 2,
    H=32 1195 vs 1343; split, or a full grid, 2 stages: H=32 one 32k sequence split 899 vs
    1045 us, 16 sequences unsplit 645 vs 762."""
    return 3 if not f32 and L is None and programs <= 132 else 2


def _pick_segment(T, R, H, NV, C, segment):
    """Static segment length (tokens, a multiple of C) or None for no split."""
    if segment is not None:
        if segment <= 0:
            return None
        if segment % C:
            raise ValueError(f'segment={segment} is not a multiple of chunk={C}')
        return segment if segment < T else None
    programs = R * H * NV
    if programs > _SPLIT_MAX_PROGRAMS:
        return None
    per_seq = -(-_TARGET_PROGRAMS // programs)                  # segments wanted per sequence
    L = max(_MIN_SEGMENT_CHUNKS * C, C * 2 ** int(np.ceil(np.log2(max(T / (R * per_seq * C), 1)))))
    return L if 2 * L <= T else None


@functools.partial(jax.jit, static_argnames=('scale', 'chunk', 'block_v', 'num_warps',
                                             'num_stages', 'segment', 'tiles_first', 'f32_dot', 'interpret'))
def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, chunk=64,
            block_v=64, num_warps=4, num_stages=None, segment=None, tiles_first=True,
            f32_dot='tf32x3', interpret=False):
    """See reference.prefill. cu_seqlens[0] must be 0.

    segment: None = split long sequences automatically when the grid would be small (see the
    module docstring); 0 = never split; L (a multiple of chunk) = split into L-token segments.
    num_stages: None = 3 for bf16/f16 unsplit with at most 132 programs, else 2 (_pick_stages).
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
    L = _pick_segment(T, R, H, NV, chunk, segment)
    NSEG = 1 if L is None else -(-T // L)
    if num_stages is None:
        num_stages = _pick_stages(L, R * H * NV, f32=prec is not None)
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
