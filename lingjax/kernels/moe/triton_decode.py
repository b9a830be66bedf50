"""Triton kernels of the MoE decode path: the routed experts of a few tokens (experts() takes it for T <=
gpu.DECODE_MAX_TOKENS) without the expert-sorted layout (layout.py): the kernels read the routing ids
idx [T * k] (flat, pair q = token q // TOP_K) themselves, one launch per matrix, no XLA kernels for a layout.

  gate_up_h_decode_kernel  grid (PAIRS, N / BLOCK_N): h[q] = silu(x[q // TOP_K] @ Wg[e]) * (x[q // TOP_K] @ Wu[e])
                           rounded to the weights' dtype (as the grouped path rounds h)           [PAIRS, I]
  down_h_decode_kernel     grid (PAIRS, N / BLOCK_N, SPLIT_K): y_part[s, q] = h[q, ks] @ Wd[e][ks],
                           float32, one K slice each                                        [SPLIT_K, PAIRS, d]
Split gate/up (more programs when there are few pairs): gate_up_decode_kernel writes float32 partial sums of
x Wg and x Wu over one K slice each [SPLIT_K, PAIRS, I], and down_decode_kernel sums the slices in order and
forms h itself (SPLIT_GU slices) before its product. The caller (gpu.experts_decode) sums y_part's slices and
combines the pairs with the routing weights (one small XLA fusion). N_FIRST (compile-time): the grid's first two
axes swapped, (N / BLOCK_N, PAIRS, SPLIT_K), so that consecutive programs take the n tiles of one pair (one
expert's weight rows side by side) rather than one n tile of every pair. Every output element has one writer and
every sum a fixed order: deterministic.

Two forms of a program (DOT, compile-time):
  True   one program per expert per M pairs (tl.dot on the tensor cores): the pairs routed to expert e =
         idx[p] are ranked in flat order; program p leads if its rank is a multiple of M and takes the pairs
         of ranks rank_p .. rank_p + M - 1 as the rows of an [M, BLOCK_K] tile (masked), the others exit.
         With top-k routing an expert gets at most T pairs, so M = max(16, pow2 >= T) gives one program per
         touched expert, each reading that expert's weights once; a repeated id within a token (not from
         top-k, but allowed) only adds leaders. Triton software-pipelines these loads (they feed tl.dot).
  False  one program per pair, float32 multiply-adds into a [BLOCK_K, BLOCK_N] accumulator reduced over K
         once at the end (no tensor cores, no padding rows): reads an expert once per pair routed to it.
         Its loads are not software-pipelined by default (Triton pipelines loads that feed tl.dot);
         STAGES > 1 asks for it (tl.range num_stages: cp.async into shared memory).
Ids outside [0, E) (another device's experts) are dropped: no program runs for them and their output rows
stay unwritten (the combine masks them out). This module imports only triton and triton_kernels.py's
shared pieces (_dot, gate_up_steps), so it runs in the interpreter tests.
PRECISION as in triton_kernels.py ("" for 16-bit inputs; a tl.dot input_precision for float32). Q: the
scan width of the routing ids, a power of 2 >= PAIRS.
"""
import triton
import triton.language as tl

from lingjax.kernels.moe.triton_kernels import _dot, gate_up_steps


@triton.jit
def _expert_rows(idx_ptr, p, E: tl.constexpr, PAIRS: tl.constexpr, M: tl.constexpr, Q: tl.constexpr):
    """The dot form's rows: (rows [M]: pair ids, ok [M]: real rows, lead: whether program p runs). The pairs
    routed to e = idx[p], ranked in flat order; p leads if its rank is a multiple of M, with the pairs of
    ranks rank_p .. rank_p + M - 1 as its rows."""
    e = tl.load(idx_ptr + p)
    qs = tl.arange(0, Q)
    ids = tl.load(idx_ptr + qs, mask=qs < PAIRS, other=-1)
    mine = ((ids == e) & (qs < PAIRS)).to(tl.int32)
    rank = tl.cumsum(mine, axis=0) - mine                      # exclusive: pairs of e before q
    rank_p = tl.sum(tl.where(qs == p, rank, 0), axis=0)
    want = rank_p + tl.arange(0, M)
    sel = (mine[None, :] != 0) & (rank[None, :] == want[:, None])
    rows = tl.sum(tl.where(sel, qs[None, :], 0), axis=1)
    ok = tl.sum(sel.to(tl.int32), axis=1) > 0
    lead = (rank_p % M == 0) & (e >= 0) & (e < E)
    return rows, ok, lead


@triton.jit
def _pair_and_n_tile(N_FIRST: tl.constexpr):
    """(pair p, n tile) of this program: grid (PAIRS, N / BLOCK_N, SPLIT_K), or (N / BLOCK_N, PAIRS, SPLIT_K) when
    N_FIRST (consecutive programs then take the n tiles of one pair: one expert's weight rows, side by side)."""
    if N_FIRST:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(0), tl.program_id(1)


@triton.jit
def _h_rows(g_ptr, u_ptr, off, mask, SLICE: tl.constexpr, SPLIT_GU: tl.constexpr, dtype: tl.constexpr):
    """h at offsets off: SPLIT_GU 0: read from h (g_ptr); else silu(g) * u of the gate/up partials (summed
    over SPLIT_GU slices of SLICE elements each, in order), rounded to dtype."""
    if SPLIT_GU == 0:
        return tl.load(g_ptr + off, mask=mask, other=0.0).to(dtype)
    else:
        g = tl.load(g_ptr + off, mask=mask, other=0.0)
        u = tl.load(u_ptr + off, mask=mask, other=0.0)
        for s in tl.static_range(1, SPLIT_GU):
            g += tl.load(g_ptr + s * SLICE + off, mask=mask, other=0.0)
            u += tl.load(u_ptr + s * SLICE + off, mask=mask, other=0.0)
        return (g * tl.sigmoid(g) * u).to(dtype)


@triton.jit
def _gate_up(x_ptr, idx_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, H_OUT: tl.constexpr, PAIRS: tl.constexpr,
             TOP_K: tl.constexpr, E: tl.constexpr, K: tl.constexpr, N: tl.constexpr, M: tl.constexpr,
             Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
             DOT: tl.constexpr, PRECISION: tl.constexpr, STAGES: tl.constexpr, N_FIRST: tl.constexpr):
    """Both gate/up kernels: H_OUT: h = silu(g) * u into g_ptr (its dtype; SPLIT_K 1), else the float32
    partials of slice s into g_ptr, u_ptr [SPLIT_K, PAIRS, N]."""
    p, nt = _pair_and_n_tile(N_FIRST)
    s = tl.program_id(2)
    e = tl.load(idx_ptr + p)
    STEPS: tl.constexpr = K // BLOCK_K // SPLIT_K
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = s * (STEPS * BLOCK_K) + tl.arange(0, BLOCK_K)
    w_off = e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    out = s.to(tl.int64) * PAIRS * N + cols
    if DOT:
        rows, ok, lead = _expert_rows(idx_ptr, p, E, PAIRS, M, Q)
        if lead:
            a_ptrs = x_ptr + (rows // TOP_K)[:, None] * K + ks[None, :]
            acc_g, acc_u = gate_up_steps(a_ptrs, ok, wg_ptr + w_off, wu_ptr + w_off, M, BLOCK_N, BLOCK_K, N, STEPS,
                                         PRECISION)
            o = out[None, :] + rows[:, None] * N
            if H_OUT:
                tl.store(g_ptr + o, (acc_g * tl.sigmoid(acc_g) * acc_u).to(g_ptr.dtype.element_ty), mask=ok[:, None])
            else:
                tl.store(g_ptr + o, acc_g, mask=ok[:, None])
                tl.store(u_ptr + o, acc_u, mask=ok[:, None])
    else:
        if (e >= 0) & (e < E):
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
            g = tl.sum(acc_g, axis=0)
            u = tl.sum(acc_u, axis=0)
            if H_OUT:
                tl.store(g_ptr + out + p * N, (g * tl.sigmoid(g) * u).to(g_ptr.dtype.element_ty))
            else:
                tl.store(g_ptr + out + p * N, g)
                tl.store(u_ptr + out + p * N, u)


@triton.jit
def gate_up_decode_kernel(x_ptr, idx_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, PAIRS: tl.constexpr, TOP_K: tl.constexpr,
                          E: tl.constexpr, K: tl.constexpr, N: tl.constexpr, M: tl.constexpr, Q: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr,
                          PRECISION: tl.constexpr, STAGES: tl.constexpr = 1, N_FIRST: tl.constexpr = False):
    """x [T, K]; idx [PAIRS]; Wg, Wu [E, K, N] -> g_part, u_part [SPLIT_K, PAIRS, N] float32."""
    _gate_up(x_ptr, idx_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, False, PAIRS, TOP_K, E, K, N, M, Q, BLOCK_N, BLOCK_K,
             SPLIT_K, DOT, PRECISION, STAGES, N_FIRST)


@triton.jit
def gate_up_h_decode_kernel(x_ptr, idx_ptr, wg_ptr, wu_ptr, h_ptr, PAIRS: tl.constexpr, TOP_K: tl.constexpr,
                            E: tl.constexpr, K: tl.constexpr, N: tl.constexpr, M: tl.constexpr, Q: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                            PRECISION: tl.constexpr, STAGES: tl.constexpr = 1, N_FIRST: tl.constexpr = False):
    """x [T, K]; idx [PAIRS]; Wg, Wu [E, K, N] -> h [PAIRS, N] = silu(x Wg) * (x Wu) in h's dtype."""
    _gate_up(x_ptr, idx_ptr, wg_ptr, wu_ptr, h_ptr, h_ptr, True, PAIRS, TOP_K, E, K, N, M, Q, BLOCK_N, BLOCK_K,
             1, DOT, PRECISION, STAGES, N_FIRST)


@triton.jit
def _down(g_ptr, u_ptr, idx_ptr, wd_ptr, y_ptr, PAIRS: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
          N: tl.constexpr, M: tl.constexpr, Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          SPLIT_K: tl.constexpr, SPLIT_GU: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
          STAGES: tl.constexpr, N_FIRST: tl.constexpr):
    """Both down kernels: h from g_ptr (SPLIT_GU 0) or from the gate/up partials (SPLIT_GU slices)."""
    p, nt = _pair_and_n_tile(N_FIRST)
    s = tl.program_id(2)
    e = tl.load(idx_ptr + p)
    STEPS: tl.constexpr = K // BLOCK_K // SPLIT_K
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = s * (STEPS * BLOCK_K) + tl.arange(0, BLOCK_K)
    w_ptrs = wd_ptr + e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    out = s.to(tl.int64) * PAIRS * N + cols
    dtype: tl.constexpr = wd_ptr.dtype.element_ty
    if DOT:
        rows, ok, lead = _expert_rows(idx_ptr, p, E, PAIRS, M, Q)
        if lead:
            h_off = rows[:, None] * K + ks[None, :]
            acc = tl.zeros((M, BLOCK_N), dtype=tl.float32)
            for _ in range(0, STEPS):
                h = _h_rows(g_ptr, u_ptr, h_off, ok[:, None], PAIRS * K, SPLIT_GU, dtype)
                acc = _dot(h, tl.load(w_ptrs), acc, PRECISION)
                h_off += BLOCK_K
                w_ptrs += BLOCK_K * N
            tl.store(y_ptr + out[None, :] + rows[:, None] * N, acc, mask=ok[:, None])
    else:
        if (e >= 0) & (e < E):
            h_off = p * K + ks
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for _ in tl.range(0, STEPS, num_stages=STAGES):
                h = _h_rows(g_ptr, u_ptr, h_off, ks >= 0, PAIRS * K, SPLIT_GU, dtype).to(tl.float32)
                acc += h[:, None] * tl.load(w_ptrs).to(tl.float32)
                h_off += BLOCK_K
                w_ptrs += BLOCK_K * N
            tl.store(y_ptr + out + p * N, tl.sum(acc, axis=0))


@triton.jit
def down_decode_kernel(g_ptr, u_ptr, idx_ptr, wd_ptr, y_ptr, PAIRS: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
                       N: tl.constexpr, M: tl.constexpr, Q: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT_GU: tl.constexpr, DOT: tl.constexpr,
                       PRECISION: tl.constexpr, STAGES: tl.constexpr = 1, N_FIRST: tl.constexpr = False):
    """g_part, u_part [SPLIT_GU, PAIRS, K] float32; idx [PAIRS]; Wd [E, K, N] -> y_part [SPLIT_K, PAIRS, N]
    float32, h = silu(g) * u rounded to Wd's dtype."""
    _down(g_ptr, u_ptr, idx_ptr, wd_ptr, y_ptr, PAIRS, E, K, N, M, Q, BLOCK_N, BLOCK_K, SPLIT_K, SPLIT_GU, DOT,
          PRECISION, STAGES, N_FIRST)


@triton.jit
def down_h_decode_kernel(h_ptr, idx_ptr, wd_ptr, y_ptr, PAIRS: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
                         N: tl.constexpr, M: tl.constexpr, Q: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                         STAGES: tl.constexpr = 1, N_FIRST: tl.constexpr = False):
    """h [PAIRS, K] in Wd's dtype; idx [PAIRS]; Wd [E, K, N] -> y_part [SPLIT_K, PAIRS, N] float32."""
    _down(h_ptr, h_ptr, idx_ptr, wd_ptr, y_ptr, PAIRS, E, K, N, M, Q, BLOCK_N, BLOCK_K, SPLIT_K, 0, DOT,
          PRECISION, STAGES, N_FIRST)
