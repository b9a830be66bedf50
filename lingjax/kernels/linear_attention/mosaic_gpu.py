"""Linear attention (simple GLA) as Pallas *Mosaic GPU* kernels for Hopper, the GPU backend JAX
supports (gpu.py's kernels use the deprecated Pallas-Triton lowering).

Same interface and semantics as ``reference.prefill`` / ``reference.decode`` (SPEC §2.4, §2.8,
§2.9). Opt-in (LINGJAX_KERNELS=mosaic_gpu) until measured on hardware; the tests run them in Pallas'
Mosaic GPU interpret mode on the CPU against the float64 recurrence, and lower them for an H100 (on
the CPU too: layouts, swizzles, TMA shapes and shared-memory size are all checked at lowering).

Both kernels run one warpgroup (128 threads) per program, over a named grid whose value-block axis
is the fastest, so the programs launched together read the same q/k rows and sweep one slot's
[H, D, D] state in address order. Copies between global and shared memory are TMA copies (static
box shapes, run-time offsets); register arrays are in the WGMMA fragment layout; the state pool is
aliased input -> output, so under donation a call moves only the touched slots' bytes.

Decode, grid (D/BV, H, B): read the request's slot and fresh flag (scalars from global memory; a
bool flag is read as is, no XLA conversion); slot < 0 writes zeros and touches no slot; else TMA
the f32 state tile pool[slot, h, :, vblock] and q/k/v[b, h] in, S = a S + k vᵀ (a = 0 if fresh
else e^g), o = scale qᵀ S (a cross-warp column sum), TMA S and o out.

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
tolerance): the dispatch sends them to gpu.py. Not yet here: gpu.py's segment split for a few long
sequences, and warp specialization.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas import mpmd as _mpmd

from lingjax.kernels.linear_attention.gpu import _like

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
        plgpu.copy_gmem_to_smem(pool_g.at[slot, h, :, vcols], s_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(q_g.at[b, h], qkv_smem.at[0], bars.at[1])
        plgpu.copy_gmem_to_smem(k_g.at[b, h], qkv_smem.at[1], bars.at[2])
        plgpu.copy_gmem_to_smem(v_g.at[b, h, vcols], qkv_smem.at[2, pl.ds(0, BV)], bars.at[3])
        a = jnp.where(fresh_g[b] != 0, jnp.float32(0.0), jnp.exp(g_g[h]))
        for i in (1, 2, 3):
            plgpu.barrier_wait(bars.at[i])
        q = plgpu.load(qkv_smem.at[0], layout=rows).astype(F32)
        k = plgpu.load(qkv_smem.at[1], layout=rows).astype(F32)
        v = plgpu.load(qkv_smem.at[2, pl.ds(0, BV)], layout=cols).astype(F32)
        plgpu.barrier_wait(bars.at[0])
        S = plgpu.load(s_smem, layout=plgpu.Layout.WGMMA)
        S = a * S + lax.broadcast_in_dim(k, (D, BV), [0]) * lax.broadcast_in_dim(v, (D, BV), [1])
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

    def body(*refs):
        pl.run_scoped(functools.partial(_decode_kernel, *refs, BV=BV, scale=float(scale)), *scratch)

    # plgpu.kernel (the public entry point over a named grid) takes no input_output_aliases, and
    # its other way to update in place, a mutable ref (jax.new_ref), is refused inside shard_map
    # (a ref varying over a manual axis). So: the mpmd_map under it, with the pool aliased
    # (input 6 -> output 1). A named grid (not pallas_call's) because Pallas' Mosaic GPU interpret
    # mode, which the tests use, gives program_id 0 everywhere but knows the axis_index of a mesh.
    mesh = plgpu.Mesh(grid=(D // BV, H, B), grid_names=('v', 'h', 'b'))
    o, pool = _mpmd._mpmd_map(
        [(mesh, body)], out_types=(_like(q), _like(state_pool)), input_output_aliases={6: 1},
        interpret=plgpu.InterpretGPUParams(uninitialized_memory='zero') if interpret else False,
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


def _prefill_kernel(cu_g, slots_g, fresh_g, g_g, q_g, k_g, v_g, pool_g, o_g, pool_out_g,
                    q_smem, k_smem, v_smem, kd_smem, a_smem, sb_smem, s_smem, o_smem, bars,
                    *, R, T, C, BV, scale):
    """Program (value block, head, row r): row r < R walks sequence r in chunks of C tokens from
    its slot's state (or zero), row R zero-fills the padding tokens past cu[R]; a skipped sequence
    (length 0 or slot < 0) zero-fills its tokens and touches no slot."""
    jv, h, r = lax.axis_index('v'), lax.axis_index('h'), lax.axis_index('r')
    vcols = pl.ds(jv * BV, BV)
    D = q_smem.shape[-1]
    mma = plgpu.Layout.WGMMA
    rows_1d = mma.reduce(1)                          # 1-D along the C rows of a [C, *] fragment
    is_pad = r == R
    rc = jnp.minimum(r, R - 1)
    s = jnp.where(is_pad, cu_g[R], cu_g[rc])
    e = jnp.where(is_pad, T, cu_g[rc + 1])
    slot = slots_g[rc]
    valid = (~is_pad) & (e > s) & (slot >= 0)
    # Chunks start at multiples of 8 tokens (the row tile of the swizzled shared-memory layout,
    # which every TMA copy into it must start on): chunk c covers tokens [base, base + C) with
    # base = s8 + c*C, s8 = s rounded down to a multiple of 8; its rows [lo, hi) are this
    # sequence's (lo > 0 only in chunk 0, hi < C only in the last).
    s8 = (s // 8) * 8
    n_chunks = jnp.maximum(e - s8 + C - 1, 0) // C

    def span(c):
        base = s8 + c * C
        return base, jnp.maximum(s - base, 0), jnp.minimum(e - base, C)

    def store_rows(base, lo, hi):
        """o_smem rows [lo, hi) -> o[base + lo : base + hi, h, vcols]. A TMA copy has a static
        box, so the n = hi - lo rows go out as one copy per set bit of n (C, C/2, ..., 1 rows)."""
        plgpu.commit_smem()
        n, off, p = hi - lo, lo, C
        while p >= 1:
            @pl.when((n & p) != 0)
            def _(off=off, p=p):
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(off, p)], o_g.at[pl.ds(base + off, p), h, vcols])
            off = off + (n & p)
            p //= 2
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(~valid)
    def _():
        o_smem[...] = plgpu.layout_cast(jnp.zeros((C, BV), o_smem.dtype), mma)

        def zero_chunk(c, carry):
            store_rows(*span(c))
            return carry
        lax.fori_loop(0, n_chunks, zero_chunk, 0)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(valid)
    def _():
        g = g_g[h]

        def load_chunk(c, buf):
            t = pl.ds(s8 + c * C, C)
            plgpu.copy_gmem_to_smem(q_g.at[t, h], q_smem.at[buf], bars.at[buf])
            plgpu.copy_gmem_to_smem(k_g.at[t, h], k_smem.at[buf], bars.at[2 + buf])
            plgpu.copy_gmem_to_smem(v_g.at[t, h, vcols], v_smem.at[buf], bars.at[4 + buf])

        load_chunk(0, 0)
        fresh = fresh_g[rc] != 0

        @pl.when(fresh)
        def _():
            s_smem[...] = plgpu.layout_cast(jnp.zeros((D, BV), F32), mma)

        @pl.when(~fresh)
        def _():
            plgpu.copy_gmem_to_smem(pool_g.at[slot, h, :, vcols], s_smem, bars.at[6])
            plgpu.barrier_wait(bars.at[6])

        S0 = plgpu.load(s_smem, layout=mma)
        i_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 0, layout=mma)
        j_idx = plgpu.broadcasted_iota(jnp.int32, (C, C), 1, layout=mma)
        diff = (i_idx - j_idx).astype(F32)
        fi = plgpu.broadcasted_iota(jnp.int32, (C,), 0, layout=rows_1d)

        def body(c, S):
            buf = c % 2

            @pl.when(c + 1 < n_chunks)                 # prefetch the next chunk into the other buffer
            def _():
                load_chunk(c + 1, 1 - buf)

            for i in (0, 2, 4):
                plgpu.barrier_wait(bars.at[i + buf])
            base, lo, hi = span(c)
            sb_smem[...] = S.astype(sb_smem.dtype)     # the state as a bf16 MMA operand
            plgpu.commit_smem()

            qk = _mma(q_smem.at[buf], k_smem.at[buf].transpose((1, 0)))
            keep = (diff >= 0) & (j_idx >= lo)         # lo <= j <= i (rows >= hi are not stored)
            a = jnp.where(keep, qk * jnp.exp(g * jnp.where(keep, diff, 0.0)), 0.0)

            o = _mma(q_smem.at[buf], sb_smem)
            # gamma^(i - lo + 1): the exact inter-chunk decay of SPEC 2.8 (exponent <= 0 for i >= lo)
            q_decay = jnp.exp(g * jnp.maximum(fi - lo + 1, 0).astype(F32))
            o = o * lax.broadcast_in_dim(q_decay, (C, BV), [0])
            a_smem[...] = a.astype(a_smem.dtype)       # (Mosaic GPU interpret mode takes MMA
            plgpu.commit_smem()                        # operands from shared memory only)
            o = o + _mma(a_smem, v_smem.at[buf])
            o_smem[...] = (scale * o).astype(o_smem.dtype)
            store_rows(base, lo, hi)

            k = plgpu.load(k_smem.at[buf], layout=mma).astype(F32)
            live = (fi >= lo) & (fi < hi)
            w = jnp.exp(g * jnp.where(live, hi - 1 - fi, 0).astype(F32))     # gamma^(hi-1-t)
            kd = jnp.where(lax.broadcast_in_dim(live, k.shape, [0]), k * lax.broadcast_in_dim(w, k.shape, [0]), 0.0)
            kd_smem[...] = kd.astype(kd_smem.dtype)
            plgpu.commit_smem()
            return jnp.exp(g * (hi - lo).astype(F32)) * S + _mma(kd_smem.transpose((1, 0)), v_smem.at[buf])

        S = lax.fori_loop(0, n_chunks, body, S0)
        s_smem[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_smem, pool_out_g.at[slot, h, :, vcols])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=('scale', 'block_v', 'interpret'))
def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, block_v=64,
            interpret=False):
    """See reference.prefill (cu_seqlens[0] must be 0). q, k, v bf16 or f16 [T, H, D] with D a
    multiple of 64; chunks of 64 tokens; state_pool f32 (pass it donated)."""
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
    scratch = [
        plgpu.SMEM((2, C, D), dt, transforms=sw(64)),        # q, double-buffered
        plgpu.SMEM((2, C, D), dt, transforms=sw(64)),        # k
        plgpu.SMEM((2, C, BV), dt, transforms=sw(64)),       # v
        plgpu.SMEM((C, D), dt, transforms=sw(64)),           # decayed k
        plgpu.SMEM((C, C), dt, transforms=sw(64)),           # masked, decayed q kᵀ
        plgpu.SMEM((D, BV), dt, transforms=sw(64)),          # state, as an MMA operand
        plgpu.SMEM((D, BV), F32, transforms=sw(32)),         # state, f32 (initial / final)
        plgpu.SMEM((C, BV), dt),                             # output rows
        plgpu.Barrier(num_arrivals=1, num_barriers=7),
    ]

    # TMA into the swizzled tiles needs the token count a multiple of 8: pad (a copy of q, k, v;
    # only for such odd T, never for the engine's power-of-two token budgets)
    Tp = -(-T // 8) * 8
    if Tp != T:
        q, k, v = (jnp.pad(x, ((0, Tp - T), (0, 0), (0, 0))) for x in (q, k, v))
    body = functools.partial(_prefill_body, scratch=scratch, R=R, T=Tp, C=C, BV=BV, scale=float(scale))
    mesh = plgpu.Mesh(grid=(D // BV, H, R + 1), grid_names=('v', 'h', 'r'))
    o, pool = _mpmd._mpmd_map(
        [(mesh, body)], out_types=(_like(q), _like(state_pool)), input_output_aliases={7: 1},
        interpret=_interpret_params() if interpret else False,
        name='lingjax_linear_attention_prefill_mgpu',
    )(cu_seqlens.astype(jnp.int32), slots.astype(jnp.int32), fresh, log_decay.astype(F32), q, k, v,
      state_pool)
    return o[:T], pool


def _prefill_body(*refs, scratch, **kw):
    pl.run_scoped(functools.partial(_prefill_kernel, *refs, **kw), *scratch)


def _interpret_params():
    # uninitialized_memory='zero' also for the barriers' sake (the interpreter cannot make NaN ones);
    # out-of-bounds reads return that fill, as the TMA engine does on hardware (the last chunk of
    # a prefill may run past the token array).
    return plgpu.InterpretGPUParams(uninitialized_memory='zero', out_of_bounds_reads='uninitialized')
