"""Linear attention (simple GLA) GPU kernels written directly in Triton (``@triton.jit``).

The kernel bodies only: this module imports nothing but triton, so the tests can run the same
functions in Triton's CPU interpreter. The JAX wrappers that launch them (jax-triton, grids,
static choices) are in triton_gpu.py, which documents the algorithm; semantics as
``reference.prefill`` / ``reference.decode`` (SPEC §2.4, §2.8, §2.9).

Memory layouts (all arrays contiguous, row-major, as JAX hands them over):
  q, k, v, o   [T or B, H, D]          state pool, pool_out [num_slots, H, D, D] (f32)
  log_decay    [H] f32                 cu_seqlens [R + 1] i32, slots [R] i32, fresh [R] bool or int
  x (split)    [R, NSEG, H, D, D] f32  o_part (decode key split) [NK, B, H, D] f32
Each access is a scalar int64 base (slot * H * D * D, token * H * D: can pass 2^31) plus an
int32 tile of offsets.
The pool is read through pool_ptr and written through pool_out_ptr: the wrappers alias the two
(jax-triton input_output_aliases), so they are one buffer on the GPU, and the untouched slots of
pool_out keep the input's contents.

Every kernel is self-contained: it calls no @triton.jit function, of its own or of
triton.language's (tl.sum and tl.zeros are such functions: tl.full stands for tl.zeros, and
decode's column sum is tl.reduce with tl.sum's own combine function, the same reduction), so that
the kernels run in Triton's interpreter without TRITON_INTERPRET set before triton is imported
(triton_gpu.py's interpret=True).

Dot products: DOT_PREC is Triton's input_precision, used for float32 q/k/v ('tf32x3', 'ieee',
'tf32'); for bf16/f16 inputs it is 'tf32' (Triton's default, meaningless for 16-bit operands).
"""
import triton
import triton.language as tl


@triton.jit
def prefill_increments_kernel(cu_ptr, slots_ptr, fresh_ptr, g_ptr, k_ptr, v_ptr, pool_ptr, x_ptr,
                              H: tl.constexpr, D: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                              L: tl.constexpr, NSEG: tl.constexpr, TILES_FIRST: tl.constexpr,
                              DOT_PREC: tl.constexpr, DECAY_V: tl.constexpr):
    """Pass 1 of the segment split. Program (r * NSEG + i, h, value block): i = 0 copies the
    initial state (pool tile, or zero if fresh) to x[r, 0]; 1 <= i < n_r writes x[r, i] = the
    zero-start state of full segment i-1, sum_t gamma^(L-1-t) k_t v_t^T (exponents <= 0)."""
    if TILES_FIRST:
        row = tl.program_id(1)
        h = tl.program_id(2)
        jv = tl.program_id(0)
    else:
        row = tl.program_id(0)
        h = tl.program_id(1)
        jv = tl.program_id(2)
    r = row // NSEG
    i = row % NSEG
    s = tl.load(cu_ptr + r)
    e = tl.load(cu_ptr + r + 1)
    slot = tl.load(slots_ptr + r)
    valid = (e > s) & (slot >= 0)
    n_r = (e - s + L - 1) // L
    fresh = tl.load(fresh_ptr + r) != 0
    dk = tl.arange(0, D)
    cols = jv * BV + tl.arange(0, BV)
    tile = dk[:, None] * D + cols[None, :]                                  # [D, BV] in a [D, D]
    x_at = x_ptr + ((r * NSEG + i).to(tl.int64) * H + h) * D * D + tile
    if valid & (i == 0):
        if fresh:
            tl.store(x_at, tl.full((D, BV), 0.0, tl.float32))
        else:
            pool_at = pool_ptr + (slot.to(tl.int64) * H + h) * D * D + tile
            tl.store(x_at, tl.load(pool_at).to(tl.float32))
    if valid & (i >= 1) & (i < n_r):
        g = tl.load(g_ptr + h)
        fi = tl.arange(0, C).to(tl.float32)
        ar = tl.arange(0, C)
        t_begin = s + (i - 1) * L
        k_off = ar[:, None] * (H * D) + dk[None, :]                          # [C, D] in [T, H, D]
        v_off = ar[:, None] * (H * D) + cols[None, :]                        # [C, BV]
        S = tl.full((D, BV), 0.0, tl.float32)
        for c in range(0, L // C):
            base = ((t_begin + c * C).to(tl.int64) * H + h) * D
            kb = tl.load(k_ptr + base + k_off)
            vb = tl.load(v_ptr + base + v_off)
            w = tl.exp(g * ((L - 1 - c * C) - fi))                               # gamma^(L-1-t) <= 1
            if DECAY_V:                                    # k^T (w * v), as the output pass's DECAY_V
                vd = (vb.to(tl.float32) * w[:, None]).to(vb.dtype)
                S += tl.dot(tl.trans(kb), vd, input_precision=DOT_PREC)
            else:
                kd = (kb.to(tl.float32) * w[:, None]).to(kb.dtype)
                S += tl.dot(tl.trans(kd), vb, input_precision=DOT_PREC)
        tl.store(x_at, S)


@triton.jit
def prefill_kernel(cu_ptr, slots_ptr, fresh_ptr, g_ptr, q_ptr, k_ptr, v_ptr, pool_ptr, x_ptr,
                   o_ptr, pool_out_ptr,
                   R: tl.constexpr, T: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                   BV: tl.constexpr, C: tl.constexpr, SCALE: tl.constexpr, L: tl.constexpr,
                   NSEG: tl.constexpr, SPLIT: tl.constexpr, TILES_FIRST: tl.constexpr,
                   DOT_PREC: tl.constexpr, DECAY_V: tl.constexpr,
                   INTRA_IN_LOOP: tl.constexpr):
    """Output pass. Unsplit (SPLIT False, NSEG 1, x_ptr unused): program (r, h, value block)
    walks sequence r from its slot's state. Split: program (r * NSEG + j, h, value block) walks
    segment j of sequence r from x[r, 0] folded with x[r, 1..j] (S = gamma^L S + x[r, i]); only
    the sequence's last segment writes the slot. Row R zero-fills the padding tokens past
    cu_seqlens[R]; a skipped sequence (length 0 or slot < 0) zero-fills its own tokens."""
    if TILES_FIRST:
        row = tl.program_id(1)
        h = tl.program_id(2)
        jv = tl.program_id(0)
    else:
        row = tl.program_id(0)
        h = tl.program_id(1)
        jv = tl.program_id(2)
    r = row // NSEG
    j = row % NSEG
    is_pad_row = r == R                         # the padding row
    r_c = tl.minimum(r, R - 1)
    s = tl.where(is_pad_row, tl.load(cu_ptr + R), tl.load(cu_ptr + r_c))
    e = tl.where(is_pad_row, T, tl.load(cu_ptr + r_c + 1))
    e_row = e
    if SPLIT:                                   # this program's segment [s, e) of the row's tokens
        e = tl.minimum(e, s + (j + 1) * L)
        s = s + j * L
    slot = tl.load(slots_ptr + r_c)
    valid = (r < R) & (e > s) & (slot >= 0)
    ar = tl.arange(0, C)
    dk = tl.arange(0, D)
    cols = jv * BV + tl.arange(0, BV)
    tile = dk[:, None] * D + cols[None, :]
    if valid:
        g = tl.load(g_ptr + h)
        pool_base = (slot.to(tl.int64) * H + h) * D * D     # scalar; + tile stays int32 per element
        if SPLIT:
            gL = tl.exp(g * L)
            S = tl.full((D, BV), 0.0, tl.float32)
            for i in range(0, j + 1):           # i = 0 adds the initial state to zeros
                S = gL * S + tl.load(x_ptr + ((r_c * NSEG + i).to(tl.int64) * H + h) * D * D + tile)
        else:
            fresh = tl.load(fresh_ptr + r_c) != 0
            S = tl.load(pool_ptr + pool_base + tile).to(tl.float32)
            S = tl.where(fresh, tl.full((D, BV), 0.0, tl.float32), S)
        fi = ar.to(tl.float32)
        diff = fi[:, None] - fi[None, :]
        causal = diff >= 0
        if not INTRA_IN_LOOP:
            intra = tl.where(causal, tl.exp(g * tl.where(causal, diff, 0.0)), 0.0)   # [C, C]
        q_decay = tl.exp(g * (fi + 1.0))                                          # gamma^(i+1)
        qk_off = ar[:, None] * (H * D) + dk[None, :]                         # [C, D] in [T, H, D]
        v_off = ar[:, None] * (H * D) + cols[None, :]                        # [C, BV]
        n = (e - s + C - 1) // C
        for c in range(0, n):
            t0 = s + c * C
            m = tl.minimum(e - t0, C)
            rows = ar < m
            base = (t0.to(tl.int64) * H + h) * D
            qb = tl.load(q_ptr + base + qk_off, mask=rows[:, None], other=0.0)
            kb = tl.load(k_ptr + base + qk_off, mask=rows[:, None], other=0.0)
            vb = tl.load(v_ptr + base + v_off, mask=rows[:, None], other=0.0)
            if INTRA_IN_LOOP:       # recomputed per chunk (loop-variant through m): 32 fewer live registers
                keep = causal & (ar < m)[None, :]
                intra = tl.where(keep, tl.exp(g * tl.where(keep, diff, 0.0)), 0.0)
            a = tl.dot(qb, tl.trans(kb), input_precision=DOT_PREC) * intra           # f32 [C, C]
            o = tl.dot(a.to(vb.dtype), vb, input_precision=DOT_PREC)
            o = o + q_decay[:, None] * tl.dot(qb, S.to(qb.dtype), input_precision=DOT_PREC)
            tl.store(o_ptr + base + v_off, (o * SCALE).to(o_ptr.dtype.element_ty), mask=rows[:, None])
            mf = m.to(tl.float32)
            k_decay = tl.where(rows, tl.exp(g * tl.maximum(mf - 1.0 - fi, 0.0)), 0.0)
            if DECAY_V:             # k^T (decay * v): the [C, BV] v tile scaled, k^T straight from shared memory
                vd = (vb.to(tl.float32) * k_decay[:, None]).to(vb.dtype)
                S = tl.exp(g * mf) * S + tl.dot(tl.trans(kb), vd, input_precision=DOT_PREC)
            else:                   # (decay * k)^T v: the [C, D] k tile scaled
                kd = (kb.to(tl.float32) * k_decay[:, None]).to(kb.dtype)
                S = tl.exp(g * mf) * S + tl.dot(tl.trans(kd), vb, input_precision=DOT_PREC)
        if SPLIT:
            if e == e_row:                      # the sequence's last segment writes the final state
                tl.store(pool_out_ptr + pool_base + tile, S.to(pool_out_ptr.dtype.element_ty))
        else:
            tl.store(pool_out_ptr + pool_base + tile, S.to(pool_out_ptr.dtype.element_ty))
    else:
        n = tl.maximum(e - s + C - 1, 0) // C
        o_off = ar[:, None] * (H * D) + cols[None, :]
        for c in range(0, n):
            t0 = s + c * C
            tl.store(o_ptr + (t0.to(tl.int64) * H + h) * D + o_off,
                     tl.full((C, BV), 0.0, o_ptr.dtype.element_ty), mask=(t0 + ar < e)[:, None])


@triton.jit
def decode_kernel(slots_ptr, fresh_ptr, g_ptr, q_ptr, k_ptr, v_ptr, pool_ptr, o_ptr, pool_out_ptr,
                  B: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, NV: tl.constexpr, SCALE: tl.constexpr, SPLIT: tl.constexpr,
                  TILES_FIRST: tl.constexpr):
    """Program (request b, head h, tile): gather the slot's [BK, BV] state tile, S = e^g S + k v^T
    (S = k v^T if fresh), o = scale q^T S, scatter S back. SPLIT (BK < D): o_ptr is an f32
    [NK, B, H, D] buffer of partial sums over key blocks, summed by the caller. slot < 0: a
    padding row, output 0, no slot touched."""
    if TILES_FIRST:
        b = tl.program_id(2)
        tile_id = tl.program_id(0)
    else:
        b = tl.program_id(0)
        tile_id = tl.program_id(2)
    h = tl.program_id(1)
    kb = tile_id // NV
    jv = tile_id % NV
    rows = kb * BK + tl.arange(0, BK)
    cols = jv * BV + tl.arange(0, BV)
    slot = tl.load(slots_ptr + b)
    if SPLIT:
        o_at = o_ptr + ((kb * B + b) * H + h) * D + cols
    else:
        o_at = o_ptr + (b * H + h) * D + cols
    if slot < 0:
        tl.store(o_at, tl.full((BV,), 0.0, o_ptr.dtype.element_ty))
    else:
        fresh = tl.load(fresh_ptr + b) != 0
        gamma = tl.exp(tl.load(g_ptr + h))
        base = (b * H + h) * D
        vv = tl.load(v_ptr + base + cols).to(tl.float32)
        qv = tl.load(q_ptr + base + rows).to(tl.float32)
        kv = tl.load(k_ptr + base + rows).to(tl.float32)
        st = (slot.to(tl.int64) * H + h) * D * D + rows[:, None] * D + cols[None, :]
        S = tl.load(pool_ptr + st).to(tl.float32)
        S = tl.where(fresh, 0.0, gamma * S) + kv[:, None] * vv[None, :]
        tl.store(pool_out_ptr + st, S.to(pool_out_ptr.dtype.element_ty))
        o = tl.reduce(qv[:, None] * S, 0, tl.standard._sum_combine)     # = tl.sum(..., axis=0)
        tl.store(o_at, (SCALE * o).to(o_ptr.dtype.element_ty))
