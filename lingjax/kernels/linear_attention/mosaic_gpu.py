"""Linear attention (simple GLA) as Pallas *Mosaic GPU* kernels for Hopper, the GPU backend JAX
supports natively (the default GPU kernels, triton_gpu.py, are raw Triton through jax-triton).

Same interface and semantics as ``reference.prefill`` / ``reference.decode`` (SPEC §2.4, §2.8,
§2.9). Opt-in (kernels='mosaic_gpu'; measured correct but slower on H200); the tests run them in Pallas'
Mosaic GPU interpret mode on the CPU against the float64 recurrence, and lower them for an H100 (on
the CPU too: layouts, swizzles, TMA shapes and shared-memory size are all checked at lowering).

Both kernels run one warpgroup (128 threads) per program, over a named grid whose value-block axis
is the fastest, so the programs launched together read the same q/k rows and sweep one slot's
[H, D, D] state in address order. Copies between global and shared memory are TMA copies (static
box shapes, run-time offsets); register arrays are in the WGMMA fragment layout; the state pool is
aliased input -> output, so under donation a call moves only the touched slots' bytes.

Decode, grid (D/BV, H, B): read the request's slot and fresh flag (scalars from global memory; a
bool flag is read as is, no XLA conversion); slot < 0 writes zeros and touches no slot; else TMA
q/k/v[b, h] and the f32 state tile pool[slot, h, :, vblock] in (not read for a fresh slot: S = 0),
S = e^g S + k vᵀ, o = scale qᵀ S (a cross-warp column sum), TMA S and o out.

Prefill, grid (D/BV, H, R + 1), chunks of C = 64 tokens, BV = 64: program (v, h, r < R) walks
sequence r from its slot's state (or zero), carrying the f32 state tile S [D, BV] in registers:
  qk = q kᵀ, a = qk ⊙ γ^(i-j) on lo <= j <= i;   o = scale (γ^(i-lo+1) ⊙ q S + a v);
  S = γ^(hi-lo) S + (k ⊙ γ^(hi-1-t))ᵀ v over the chunk's rows [lo, hi)
(the exact γ^(i+1) inter-chunk rule of SPEC §2.8, counted from the sequence's first row in the
chunk). The four products run on the tensor cores (wgmma) from bf16/f16 operands in swizzled
shared memory, accumulating in f32; S enters q S as bf16, as in fla's chunk kernels. q/k/v of the
next chunk are fetched (TMA, double-buffered) while the current one computes. TMA copies into the
swizzled layout must start on its 8-row tiles, so chunks start on multiples of 8 tokens: chunk c
covers [s8 + cC, s8 + (c+1)C), s8 = the sequence's first token rounded down to a multiple of 8, and
its rows [lo, hi) are the sequence's (lo > 0 only in the first chunk). Output rows go out through
TMA stores of 64, 32, ..., 1 rows (one per set bit of hi - lo: a store box is static, the rows are
ragged). Row r = R zero-fills the tokens past cu_seqlens[-1]; a skipped sequence (length 0, slot <
0) zero-fills its tokens and touches no slot. The token count must be a multiple of 8 for the tiled
TMA (the wrapper pads q/k/v otherwise). f32 inputs are not taken (tf32 products would miss the f32
tolerance): the dispatch sends them to triton_gpu.py.

Segment split for a few long sequences, as triton_gpu.py's (same static rule,
gpu_common.pick_segment): pass 1, grid (D/BV, H, R * NSEG), writes x[r, 0] = the initial state
and x[r, i] = the zero-start state of full segment i-1 (the chunk walk above from zero, no
outputs); pass 2, grid (D/BV, H, (R+1) NSEG),
starts segment j from x[r, 0] folded with x[r, 1..j] (S = γ^L S + x[r, i]), walks it writing its
outputs, and only the sequence's last segment writes the slot. Not yet here: warp specialization
(a producer warpgroup issuing the TMA copies, as jax's attention_mgpu does).
"""
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas import mpmd as _mpmd

from lingjax.kernels.linear_attention.gpu_common import like as _like, pick_segment as _pick_segment

F32 = jnp.float32


def _decode_kernel(slots_g, fresh_g, g_g, q_g, k_g, v_g, pool_g, o_g, pool_out_g,
                   s_smem, qkv_smem, o_smem, bars, *, BV, scale):
    jv, h, b = lax.axis_index('v'), lax.axis_index('h'), lax.axis_index('b')
    vcols = pl.ds(jv * BV, BV)
    D = s_smem.shape[0]
    rows, cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)   # 1-D: along D / BV
    slot = slots_g[b]

    def write_o(o):
        o_smem[...] = o.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_g.at[b, h, vcols])

    @pl.when(slot < 0)
    def _():
        write_o(plgpu.layout_cast(jnp.zeros((BV,), F32), cols))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(slot >= 0)
    def _():
        fresh = fresh_g[b] != 0

        @pl.when(~fresh)                # a fresh slot's old contents are never read (may be NaN)
        def _():
            plgpu.copy_gmem_to_smem(pool_g.at[slot, h, :, vcols], s_smem, bars.at[0])

        @pl.when(fresh)
        def _():
            s_smem[...] = plgpu.layout_cast(jnp.zeros((D, BV), F32), plgpu.Layout.WGMMA)

        plgpu.copy_gmem_to_smem(q_g.at[b, h], qkv_smem.at[0], bars.at[1])
        plgpu.copy_gmem_to_smem(k_g.at[b, h], qkv_smem.at[1], bars.at[2])
        plgpu.copy_gmem_to_smem(v_g.at[b, h, vcols], qkv_smem.at[2, pl.ds(0, BV)], bars.at[3])
        gamma = jnp.exp(g_g[h])
        for i in (1, 2, 3):
            plgpu.barrier_wait(bars.at[i])
        q = plgpu.load(qkv_smem.at[0], layout=rows).astype(F32)
        k = plgpu.load(qkv_smem.at[1], layout=rows).astype(F32)
        v = plgpu.load(qkv_smem.at[2, pl.ds(0, BV)], layout=cols).astype(F32)

        @pl.when(~fresh)
        def _():
            plgpu.barrier_wait(bars.at[0])

        S = plgpu.load(s_smem, layout=plgpu.Layout.WGMMA)
        S = gamma * S + lax.broadcast_in_dim(k, (D, BV), [0]) * lax.broadcast_in_dim(v, (D, BV), [1])
        s_smem[...] = S
        write_o(scale * jnp.sum(lax.broadcast_in_dim(q, (D, BV), [0]) * S, axis=0))
        plgpu.copy_smem_to_gmem(s_smem, pool_out_g.at[slot, h, :, vcols])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=('scale', 'block_v', 'interpret'))
def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale, block_v=64, interpret=False):
    """See reference.decode. q, k, v [B, H, D] (D a multiple of 64); state_pool [P, H, D, D] f32
    (pass it donated for the in-place update); fresh bool or integer."""
    B, H, D = q.shape
    BV = min(block_v, D)
    if D % 64 or D % BV or BV % 32:
        raise ValueError(f'Mosaic GPU decode needs the head dim ({D}) a multiple of 64 and of '
                         f'block_v ({BV}), and block_v a multiple of 32')
    if state_pool.dtype != F32:
        raise ValueError(f'the state pool must be float32, got {state_pool.dtype}')
    scratch = [
        plgpu.SMEM((D, BV), F32, transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
        plgpu.SMEM((3, D), q.dtype),
        plgpu.SMEM((BV,), q.dtype),
        plgpu.Barrier(num_arrivals=1, num_barriers=4),
    ]
    body = functools.partial(_scoped, _decode_kernel, scratch=scratch, BV=BV, scale=float(scale))
    # plgpu.kernel (the public entry point over a named grid) takes no input_output_aliases, and
    # its other way to update in place, a mutable ref (jax.new_ref), is refused inside shard_map
    # (a ref varying over a manual axis). So: the mpmd_map under it, with the pool aliased
    # (input 6 -> output 1). A named grid (not pallas_call's) because Pallas' Mosaic GPU interpret
    # mode, which the tests use, gives program_id 0 everywhere but knows the axis_index of a mesh.
    mesh = plgpu.Mesh(grid=(D // BV, H, B), grid_names=('v', 'h', 'b'))
    o, pool = _mpmd._mpmd_map(
        [(mesh, body)], out_types=(_like(q), _like(state_pool)), input_output_aliases={6: 1},
        interpret=_interpret_params() if interpret else False,
        name='lingjax_linear_attention_decode_mgpu',
    )(slots.astype(jnp.int32), fresh, log_decay.astype(F32), q, k, v, state_pool)
    return o, pool


# --------------------------------------------------------------------------------------------
# Prefill


def _mma(a, b):
    """a @ b on the tensor cores (wgmma), f32 result in registers (WGMMA layout). a: [M, K] in
    shared memory or registers, b: [K, N] in shared memory (either may be a transposed view)."""
    def scope(acc):
        plgpu.wgmma(acc, a, b)
        return acc[...]
    return pl.run_scoped(scope, plgpu.ACC((a.shape[0], b.shape[1]), F32))


class _Bufs(NamedTuple):
    """Shared memory of the prefill kernels (see prefill() for the shapes) and their barriers:
    0-5 q/k/v of the two chunk buffers, 6 state tiles."""
    q: Any
    k: Any
    v: Any
    kd: Any
    a: Any
    sb: Any
    s: Any
    o: Any
    bars: Any


def _store_rows(bufs, o_g, h, vcols, base, lo, hi, C):
    """o rows [lo, hi) of shared memory -> o[base + lo : base + hi, h, vcols]. A TMA copy has a
    static box, so the n = hi - lo rows go out as one copy per set bit of n (C, C/2, ..., 1 rows)."""
    plgpu.commit_smem()
    n, off, p = hi - lo, lo, C
    while p >= 1:
        @pl.when((n & p) != 0)
        def _(off=off, p=p):
            plgpu.copy_smem_to_gmem(bufs.o.at[pl.ds(off, p)], o_g.at[pl.ds(base + off, p), h, vcols])
        off = off + (n & p)
        p //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _chunks(s, e, C):
    """Chunks start at multiples of 8 tokens (the row tile of the swizzled shared-memory layout,
    which a TMA copy into it must start on): chunk c of tokens [s, e) covers [base, base + C),
    base = s8 + c*C with s8 = s rounded down to a multiple of 8, and its rows [lo, hi) are in
    [s, e) (lo > 0 only in chunk 0, hi < C only in the last). Returns (count, span(c))."""
    s8 = (s // 8) * 8

    def span(c):
        base = s8 + c * C
        return base, jnp.maximum(s - base, 0), jnp.minimum(e - base, C)
    return jnp.maximum(e - s8 + C - 1, 0) // C, span


def _zero_fill(bufs, o_g, h, vcols, s, e, C):
    """o[s:e, h, vcols] = 0."""
    BV = bufs.o.shape[1]
    bufs.o[...] = plgpu.layout_cast(jnp.zeros((C, BV), bufs.o.dtype), plgpu.Layout.WGMMA)
    n, span = _chunks(s, e, C)

    def body(c, carry):
        _store_rows(bufs, o_g, h, vcols, *span(c), C)
        return carry
    lax.fori_loop(0, n, body, 0)
    plgpu.wait_smem_to_gmem(0)


def _load_state(bufs, src):
    """An f32 [D, BV] tile of global memory -> registers (WGMMA layout), through bufs.s."""
    plgpu.copy_gmem_to_smem(src, bufs.s, bufs.bars.at[6])
    plgpu.barrier_wait(bufs.bars.at[6])
    return plgpu.load(bufs.s, layout=plgpu.Layout.WGMMA)


def _store_state(bufs, S, dst):
    bufs.s[...] = S
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(bufs.s, dst)
    plgpu.wait_smem_to_gmem(0)


def _walk(bufs, g, h, vcols, q_g, k_g, v_g, o_g, s, e, S, *, C, scale):
    """Tokens [s, e) of head h from state S (f32 [D, BV] registers): writes their outputs
    o[s:e, h, vcols] (unless q_g is None: then only the state is wanted) and returns the state
    after them. Chunk by chunk, the next one's q/k/v fetched while the current one computes."""
    mma = plgpu.Layout.WGMMA
    n_chunks, span = _chunks(s, e, C)
    with_o = q_g is not None

    def load_chunk(c, buf):
        t = pl.ds(span(c)[0], C)                   # the chunk's first token, a multiple of 8
        if with_o:
            plgpu.copy_gmem_to_smem(q_g.at[t, h], bufs.q.at[buf], bufs.bars.at[buf])
        plgpu.copy_gmem_to_smem(k_g.at[t, h], bufs.k.at[buf], bufs.bars.at[2 + buf])
        plgpu.copy_gmem_to_smem(v_g.at[t, h, vcols], bufs.v.at[buf], bufs.bars.at[4 + buf])

    @pl.when(n_chunks > 0)
    def _():
        load_chunk(0, 0)

    BV = S.shape[1]

    def body(c, S):
        buf = c % 2
        # index arrays made here, not carried through the loop: registers are scarce (S alone
        # holds 64 per thread)
        fi = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=mma.reduce(1))   # row index, 1-D

        @pl.when(c + 1 < n_chunks)                 # prefetch the next chunk into the other buffer
        def _():
            load_chunk(c + 1, 1 - buf)

        for i in (0, 2, 4) if with_o else (2, 4):
            plgpu.barrier_wait(bufs.bars.at[i + buf])
        base, lo, hi = span(c)
        if with_o:
            bufs.sb[...] = S.astype(bufs.sb.dtype)     # the state as a 16-bit MMA operand
            plgpu.commit_smem()
            qk = _mma(bufs.q.at[buf], bufs.k.at[buf].transpose((1, 0)))
            i_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=mma)
            j_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=mma)
            diff = (i_idx - j_idx).astype(F32)
            keep = (diff >= 0) & (j_idx >= lo)         # lo <= j <= i (rows >= hi are not stored)
            a = jnp.where(keep, qk * jnp.exp(g * jnp.where(keep, diff, 0.0)), 0.0)
            o = _mma(bufs.q.at[buf], bufs.sb)
            # gamma^(i - lo + 1): the exact inter-chunk decay of SPEC 2.8 (exponent <= 0 for i >= lo)
            q_decay = jnp.exp(g * jnp.maximum(fi - lo + 1, 0).astype(F32))
            o = o * lax.broadcast_in_dim(q_decay, (C, BV), [0])
            bufs.a[...] = a.astype(bufs.a.dtype)       # (Mosaic GPU interpret mode takes MMA
            plgpu.commit_smem()                        # operands from shared memory only)
            o = o + _mma(bufs.a, bufs.v.at[buf])
            bufs.o[...] = (scale * o).astype(bufs.o.dtype)
            _store_rows(bufs, o_g, h, vcols, base, lo, hi, C)

        k = plgpu.load(bufs.k.at[buf], layout=mma).astype(F32)
        live = (fi >= lo) & (fi < hi)
        w = jnp.exp(g * jnp.where(live, hi - 1 - fi, 0).astype(F32))     # gamma^(hi-1-t)
        kd = jnp.where(lax.broadcast_in_dim(live, k.shape, [0]), k * lax.broadcast_in_dim(w, k.shape, [0]), 0.0)
        bufs.kd[...] = kd.astype(bufs.kd.dtype)
        plgpu.commit_smem()
        return jnp.exp(g * (hi - lo).astype(F32)) * S + _mma(bufs.kd.transpose((1, 0)), bufs.v.at[buf])

    return lax.fori_loop(0, n_chunks, body, S)


def _sequence(cu_g, slots_g, r, R, T):
    """Row r's tokens [s, e), slot, and whether it is a real sequence to run (row R = the padding
    tokens past cu[R]; a zero-length sequence or a negative slot is skipped)."""
    is_pad = r == R
    rc = jnp.minimum(r, R - 1)
    s = jnp.where(is_pad, cu_g[R], cu_g[rc])
    e = jnp.where(is_pad, T, cu_g[rc + 1])
    slot = slots_g[rc]
    return rc, s, e, slot, (~is_pad) & (e > s) & (slot >= 0)


def _initial_state(bufs, fresh_g, pool_g, rc, slot, h, vcols):
    """The sequence's starting state in registers: zero if fresh, else its slot's tile."""
    fresh = fresh_g[rc] != 0

    @pl.when(fresh)
    def _():
        bufs.s[...] = plgpu.layout_cast(jnp.zeros(bufs.s.shape, F32), plgpu.Layout.WGMMA)

    @pl.when(~fresh)
    def _():
        plgpu.copy_gmem_to_smem(pool_g.at[slot, h, :, vcols], bufs.s, bufs.bars.at[6])
        plgpu.barrier_wait(bufs.bars.at[6])
    return plgpu.load(bufs.s, layout=plgpu.Layout.WGMMA)


def _increment_kernel(cu_g, slots_g, fresh_g, g_g, k_g, v_g, pool_g, x_g, *scratch, R, T, C, BV, L, NSEG):
    """Pass 1 of the segment split, program (value block, head, r * NSEG + i): i = 0 copies the
    initial state (slot tile or zero) to x[r, 0]; 1 <= i < n_r writes x[r, i] = the zero-start
    state of full segment i-1, sum_t gamma^(L-1-t) k_t v_tᵀ (all exponents <= 0, f32)."""
    bufs = _Bufs(*scratch)
    jv, h, ri = lax.axis_index('v'), lax.axis_index('h'), lax.axis_index('r')
    vcols = pl.ds(jv * BV, BV)
    r, i = ri // NSEG, ri % NSEG
    rc, s, e, slot, valid = _sequence(cu_g, slots_g, r, R, T)
    n_r = (e - s + L - 1) // L
    x_at = x_g.at[r, i, h, :, vcols]

    @pl.when(valid & (i == 0))
    def _():
        _store_state(bufs, _initial_state(bufs, fresh_g, pool_g, rc, slot, h, vcols), x_at)

    @pl.when(valid & (i >= 1) & (i < n_r))
    def _():
        a = s + (i - 1) * L
        zero = plgpu.layout_cast(jnp.zeros(bufs.s.shape, F32), plgpu.Layout.WGMMA)
        S = _walk(bufs, g_g[h], h, vcols, None, k_g, v_g, None, a, a + L, zero, C=C, scale=1.0)
        _store_state(bufs, S, x_at)


def _prefill_kernel(cu_g, slots_g, fresh_g, g_g, q_g, k_g, v_g, pool_g, *rest, R, T, C, BV, L, NSEG, scale):
    """Program (value block, head, r * NSEG + j): row r < R runs segment j of sequence r (the whole
    sequence when L is None) from its start state -- the slot's state (or zero), or with the split
    x[r, 0] folded with the increments x[r, 1..j] (S = gamma^L S + x[r, i]) -- writes its outputs,
    and the last segment writes the final state to the slot. Row R zero-fills the padding tokens
    past cu[R]; a skipped sequence zero-fills its tokens and touches no slot."""
    if L is None:
        x_g, (o_g, pool_out_g), scratch = None, rest[:2], rest[2:]
    else:
        x_g, (o_g, pool_out_g), scratch = rest[0], rest[1:3], rest[3:]
    bufs = _Bufs(*scratch)
    jv, h, rj = lax.axis_index('v'), lax.axis_index('h'), lax.axis_index('r')
    vcols = pl.ds(jv * BV, BV)
    r, j = rj // NSEG, rj % NSEG
    rc, s, e, slot, valid = _sequence(cu_g, slots_g, r, R, T)
    seg_s, seg_e = (s, e) if L is None else (s + j * L, jnp.minimum(e, s + (j + 1) * L))
    valid = valid & (seg_e > seg_s)

    @pl.when(~valid)
    def _():
        _zero_fill(bufs, o_g, h, vcols, seg_s, seg_e, C)

    @pl.when(valid)
    def _():
        g = g_g[h]
        if L is None:
            S = _initial_state(bufs, fresh_g, pool_g, rc, slot, h, vcols)
        else:
            gL = jnp.exp(g * float(L))
            S = lax.fori_loop(1, j + 1, lambda i, S: gL * S + _load_state(bufs, x_g.at[r, i, h, :, vcols]),
                              _load_state(bufs, x_g.at[r, 0, h, :, vcols]))
        S = _walk(bufs, g, h, vcols, q_g, k_g, v_g, o_g, seg_s, seg_e, S, C=C, scale=scale)

        @pl.when(seg_e == e)                           # the sequence's last segment
        def _():
            _store_state(bufs, S, pool_out_g.at[slot, h, :, vcols])


@functools.partial(jax.jit, static_argnames=('scale', 'block_v', 'segment', 'interpret'))
def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, block_v=64, segment=None,
            interpret=False):
    """See reference.prefill (cu_seqlens[0] must be 0). q, k, v bf16 or f16 [T, H, D] with D a
    multiple of 64; chunks of 64 tokens; state_pool f32 (pass it donated). segment: as in
    gpu.prefill (None = split a few long sequences into segments run in parallel, by the same
    static rule; 0 = never; L = segments of L tokens, a multiple of 64)."""
    T, H, D = q.shape
    R = slots.shape[0]
    BV, C = min(block_v, D), 64
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f'Mosaic GPU prefill takes bfloat16/float16 q, k, v (tensor-core operands), '
                         f'got {q.dtype}')
    if D % 64 or BV != 64:
        raise ValueError(f'Mosaic GPU prefill needs the head dim ({D}) a multiple of 64 and block_v '
                         f'64 (got {BV}; 128 would need 237 KB of shared memory, over the 227 KB of an SM)')
    if state_pool.dtype != F32:
        raise ValueError(f'the state pool must be float32, got {state_pool.dtype}')
    dt = q.dtype
    sw = lambda n: (plgpu.TilingTransform((8, n)), plgpu.SwizzleTransform(128))   # noqa: E731
    scratch = _Bufs(
        q=plgpu.SMEM((2, C, D), dt, transforms=sw(64)),      # double-buffered chunk inputs
        k=plgpu.SMEM((2, C, D), dt, transforms=sw(64)),
        v=plgpu.SMEM((2, C, BV), dt, transforms=sw(64)),
        kd=plgpu.SMEM((C, D), dt, transforms=sw(64)),        # decayed k
        a=plgpu.SMEM((C, C), dt, transforms=sw(64)),         # masked, decayed q kᵀ
        sb=plgpu.SMEM((D, BV), dt, transforms=sw(64)),       # state, as an MMA operand
        s=plgpu.SMEM((D, BV), F32, transforms=sw(32)),       # state tiles in / out, f32
        o=plgpu.SMEM((C, BV), dt),                           # output rows
        bars=plgpu.Barrier(num_arrivals=1, num_barriers=7),
    )
    # TMA into the swizzled tiles needs the token count a multiple of 8: pad (a copy of q, k, v;
    # only for such odd T, never for the engine's power-of-two token budgets)
    Tp = -(-T // 8) * 8
    if Tp != T:
        q, k, v = (jnp.pad(x, ((0, Tp - T), (0, 0), (0, 0))) for x in (q, k, v))
    L = _pick_segment(Tp, R, H, D // BV, C, segment)
    NSEG = 1 if L is None else -(-Tp // L)
    kw = dict(R=R, T=Tp, C=C, BV=BV, L=L, NSEG=NSEG)
    ints = (cu_seqlens.astype(jnp.int32), slots.astype(jnp.int32), fresh, log_decay.astype(F32))
    interp = _interpret_params() if interpret else False
    extra = ()
    if L is not None:
        x = _mpmd._mpmd_map(
            [(plgpu.Mesh(grid=(D // BV, H, R * NSEG), grid_names=('v', 'h', 'r')),
              functools.partial(_scoped, _increment_kernel, scratch=scratch, **kw))],
            out_types=_like(k, (R, NSEG, H, D, D), F32), interpret=interp,
            name='lingjax_linear_attention_prefill_increments_mgpu',
        )(*ints, k, v, state_pool)
        extra = (x,)
    o, pool = _mpmd._mpmd_map(
        [(plgpu.Mesh(grid=(D // BV, H, (R + 1) * NSEG), grid_names=('v', 'h', 'r')),
          functools.partial(_scoped, _prefill_kernel, scratch=scratch, scale=float(scale), **kw))],
        out_types=(_like(q), _like(state_pool)), input_output_aliases={7: 1}, interpret=interp,
        name='lingjax_linear_attention_prefill_mgpu',
    )(*ints, q, k, v, state_pool, *extra)
    return o[:T], pool


def _scoped(kernel, *refs, scratch, **kw):
    pl.run_scoped(functools.partial(kernel, *refs, **kw), *scratch)


def _interpret_params():
    # uninitialized_memory='zero' also for the barriers' sake (the interpreter cannot make NaN ones);
    # out-of-bounds reads return that fill, as the TMA engine does on hardware (the last chunk of
    # a prefill may run past the token array).
    return plgpu.InterpretGPUParams(uninitialized_memory='zero', out_of_bounds_reads='uninitialized')
