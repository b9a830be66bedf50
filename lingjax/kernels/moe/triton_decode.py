"""Triton kernels of the MoE decode path: the routed experts of a few tokens (experts() takes it for T <=
gpu.DECODE_MAX_TOKENS) as weight-streaming matrix-vector products, without the expert-sorted layout (layout.py).

At decode sizes the grouped matmul of triton_kernels.py runs one real row in a 16-row block, one program per
(block, n tile): at T = 1 (flash shapes) 128 gate/up and 256 down programs on 132 SMs, each streaming a
narrow weight panel, plus the layout's and the combine's XLA kernels around it. Here the pairs themselves
are the rows, read straight from the routing ids idx [T * k] (flat, pair q = token q // TOP_K):

  gate_up_decode_kernel  grid (PAIRS, N / BLOCK_N, SPLIT_K): float32 partial sums over one K slice
                         g_part[s, q] = x[q // TOP_K, ks] @ Wg[e][ks], u_part likewise     [SPLIT_K, PAIRS, I]
  down_decode_kernel     grid (PAIRS, N / BLOCK_N, SPLIT_K): h = silu(sum_s g_part) * sum_s u_part (summed in
                         slice order, rounded to the weights' dtype, as the grouped path rounds h), then
                         y_part[s, q] = h[q, ks] @ Wd[e][ks]                                 [SPLIT_K, PAIRS, d]
The caller (gpu.experts_decode) sums y_part's slices and combines the pairs with the routing weights (one
small XLA fusion). Every partial sum has one writer and is summed in a fixed order: deterministic.

Two forms of a program (DOT, compile-time):
  True   one program per expert (the program of an expert's first pair, in flat order; the others exit):
         its rows are every pair routed to that expert (an [M, BLOCK_K] tile of up to M = pow2 >= PAIRS
         rows, masked), tl.dot on the tensor cores: each touched expert's weights are read once.
  False  one program per pair, float32 multiply-adds into a [BLOCK_K, BLOCK_N] accumulator reduced over
         K once at the end (no tensor cores, no padding rows): reads an expert once per pair routed to it, so once per
         step when T = 1 (a token's k experts are distinct) and the choice there. Its loads are not
         software-pipelined by default (Triton pipelines loads that feed tl.dot); STAGES > 1 asks for
         it (tl.range num_stages: cp.async into shared memory, STAGES - 1 tiles in flight); STAGES 1
         leaves latency hiding to the many resident programs (small register and shared footprint).
Ids outside [0, E) (another device's experts) are dropped: no program runs for them and their partial
rows stay unwritten (the combine masks them out). This module imports only triton (interpreter tests).
PRECISION as in triton_kernels.py ("" for 16-bit inputs; a tl.dot input_precision for float32).
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _expert_pairs(idx_ptr, e, p, PAIRS: tl.constexpr, M: tl.constexpr):
    """(pairs [M], mine [M]: the pairs routed to expert e, first: whether p is the first of them)."""
    qs = tl.arange(0, M)
    ids = tl.load(idx_ptr + qs, mask=qs < PAIRS, other=-1)
    mine = (ids == e) & (qs < PAIRS)
    first = tl.sum((mine & (qs < p)).to(tl.int32), axis=0) == 0
    return qs, mine, first


@triton.jit
def _h_rows(g_ptr, u_ptr, off, mask, SLICE: tl.constexpr, SPLIT_GU: tl.constexpr, dtype: tl.constexpr):
    """h = silu(g) * u at offsets off of the gate/up partials (summed over SPLIT_GU slices of SLICE elements
    each, in order), rounded to dtype."""
    g = tl.load(g_ptr + off, mask=mask, other=0.0)
    u = tl.load(u_ptr + off, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_GU):
        g += tl.load(g_ptr + s * SLICE + off, mask=mask, other=0.0)
        u += tl.load(u_ptr + s * SLICE + off, mask=mask, other=0.0)
    return (g * tl.sigmoid(g) * u).to(dtype)


@triton.jit
def gate_up_decode_kernel(x_ptr, idx_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, PAIRS: tl.constexpr, TOP_K: tl.constexpr,
                          E: tl.constexpr, K: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr,
                          PRECISION: tl.constexpr, STAGES: tl.constexpr = 1):
    """x [T, K]; idx [PAIRS]; Wg, Wu [E, K, N] -> g_part, u_part [SPLIT_K, PAIRS, N] float32."""
    p = tl.program_id(0)
    s = tl.program_id(2)
    e = tl.load(idx_ptr + p)
    STEPS: tl.constexpr = K // BLOCK_K // SPLIT_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = s * (STEPS * BLOCK_K) + tl.arange(0, BLOCK_K)
    w_off = e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    out = s.to(tl.int64) * PAIRS * N + cols
    valid = (e >= 0) & (e < E)
    if DOT:
        qs, mine, first = _expert_pairs(idx_ptr, e, p, PAIRS, M)
        if valid & first:
            a_ptrs = x_ptr + (qs // TOP_K)[:, None] * K + ks[None, :]
            g_ptrs = wg_ptr + w_off
            u_ptrs = wu_ptr + w_off
            acc_g = tl.zeros((M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((M, BLOCK_N), dtype=tl.float32)
            for _ in range(0, STEPS):
                a = tl.load(a_ptrs, mask=mine[:, None], other=0.0)
                acc_g = _dot(a, tl.load(g_ptrs), acc_g, PRECISION)
                acc_u = _dot(a, tl.load(u_ptrs), acc_u, PRECISION)
                a_ptrs += BLOCK_K
                g_ptrs += BLOCK_K * N
                u_ptrs += BLOCK_K * N
            o = out[None, :] + qs[:, None] * N
            tl.store(g_ptr + o, acc_g, mask=mine[:, None])
            tl.store(u_ptr + o, acc_u, mask=mine[:, None])
    else:
        if valid:
            a_ptrs = x_ptr + (p // TOP_K) * K + ks
            g_ptrs = wg_ptr + w_off
            u_ptrs = wu_ptr + w_off
            acc_g = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)      # elementwise; reduced once at the end
            acc_u = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for _ in tl.range(0, STEPS, num_stages=STAGES):
                a = tl.load(a_ptrs).to(tl.float32)[:, None]
                acc_g += a * tl.load(g_ptrs).to(tl.float32)
                acc_u += a * tl.load(u_ptrs).to(tl.float32)
                a_ptrs += BLOCK_K
                g_ptrs += BLOCK_K * N
                u_ptrs += BLOCK_K * N
            tl.store(g_ptr + out + p * N, tl.sum(acc_g, axis=0))
            tl.store(u_ptr + out + p * N, tl.sum(acc_u, axis=0))


@triton.jit
def down_decode_kernel(g_ptr, u_ptr, idx_ptr, wd_ptr, y_ptr, PAIRS: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
                       N: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, SPLIT_GU: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                       STAGES: tl.constexpr = 1):
    """g_part, u_part [SPLIT_GU, PAIRS, K] float32; idx [PAIRS]; Wd [E, K, N] -> y_part [SPLIT_K, PAIRS, N]
    float32, h = silu(g) * u rounded to Wd's dtype."""
    p = tl.program_id(0)
    s = tl.program_id(2)
    e = tl.load(idx_ptr + p)
    STEPS: tl.constexpr = K // BLOCK_K // SPLIT_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = s * (STEPS * BLOCK_K) + tl.arange(0, BLOCK_K)
    w_ptrs = wd_ptr + e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    out = s.to(tl.int64) * PAIRS * N + cols
    valid = (e >= 0) & (e < E)
    dtype: tl.constexpr = wd_ptr.dtype.element_ty
    if DOT:
        qs, mine, first = _expert_pairs(idx_ptr, e, p, PAIRS, M)
        if valid & first:
            h_off = qs[:, None] * K + ks[None, :]
            acc = tl.zeros((M, BLOCK_N), dtype=tl.float32)
            for _ in range(0, STEPS):
                h = _h_rows(g_ptr, u_ptr, h_off, mine[:, None], PAIRS * K, SPLIT_GU, dtype)
                acc = _dot(h, tl.load(w_ptrs), acc, PRECISION)
                h_off += BLOCK_K
                w_ptrs += BLOCK_K * N
            tl.store(y_ptr + out[None, :] + qs[:, None] * N, acc, mask=mine[:, None])
    else:
        if valid:
            h_off = p * K + ks
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for _ in tl.range(0, STEPS, num_stages=STAGES):
                h = _h_rows(g_ptr, u_ptr, h_off, ks >= 0, PAIRS * K, SPLIT_GU, dtype).to(tl.float32)
                acc += h[:, None] * tl.load(w_ptrs).to(tl.float32)
                h_off += BLOCK_K
                w_ptrs += BLOCK_K * N
            tl.store(y_ptr + out + p * N, tl.sum(acc, axis=0))
