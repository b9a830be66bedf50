"""Triton kernels of the FP8 MoE decode path (Hopper GPU; called from JAX by gpu_fp8.experts_decode through
jax-triton): the routed experts of a few tokens with FP8 weights, without the expert-sorted layout. The FP8
counterpart of triton_decode.py's dot form: the kernels read the routing ids idx [PAIRS] (flat, pair q =
token q // TOP_K) themselves, one program per touched expert (per M of its pairs) and n tile, the pairs of
expert e = idx[p] ranked in flat order (triton_decode._expert_rows: program p leads if its rank is a
multiple of M and takes the pairs of ranks rank_p .. rank_p + M - 1 as its rows; the others exit). Each
leader reads its expert's weight panel once. Ids outside [0, E) (another device's experts) are dropped: no
program runs for them and their rows stay unwritten (the combine masks them out).

  gate_up_fp8_decode_kernel  grid (PAIRS, N / BLOCK_N): h[q] = silu(x[q // TOP_K] Wg[e]) * (x[q // TOP_K] Wu[e])
                             with x quantized (x_q, x_s: quant.quantize_activation_fp8), fp8 products, float32
                             sums, stored in h's dtype (the activation dtype, as the grouped path's gate_up)
                                                                                            -> h [PAIRS, N]
  down_fp8_decode_kernel     grid (PAIRS, N / BLOCK_N): y[q] = h[q] Wd[e], h quantized per the weights' format:
                             given (h_q, h_s) or, QUANT_A (per-128-group activations, BLOCK_K = 128), h in its
                             16-bit dtype quantized per [rows, 128] tile as it is loaded (fp8.triton_kernels.
                             _quantize_rows: quant.quantize_activation_fp8's values; no XLA pass over h)
                                                                                            -> y [PAIRS, N]
The fp8 products and scales are the grouped kernels' (triton_fp8.py: _gate_up_swapped / _gate_up_loop, the
same scale addressing; see there): SWAP_AB (M < 64) multiplies W^T [BLOCK_N, BLOCK_K] by the rows
transposed, so the weight tile is the fp8 wgmma's 64+-row operand. N_FIRST (compile-time): the grid's axes
swapped, (N / BLOCK_N, PAIRS), so that consecutive programs take the n tiles of one pair (one expert's weight
rows side by side). Every output element has one writer and every sum a fixed order: deterministic.
This module imports only triton and its sibling kernel modules, so it runs in the interpreter tests.
"""
import triton
import triton.language as tl

from lingjax.kernels.fp8.triton_kernels import _quantize_rows
from lingjax.kernels.moe.triton_decode import _expert_rows, _pair_and_n_tile
from lingjax.kernels.moe.triton_fp8 import _gate_up_loop, _gate_up_swapped, _w_scale, _w_tile


@triton.jit
def gate_up_fp8_decode_kernel(x_ptr, xs_ptr, idx_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, h_ptr,
                              PAIRS: tl.constexpr, TOP_K: tl.constexpr, E: tl.constexpr, K: tl.constexpr,
                              N: tl.constexpr, M: tl.constexpr, Q: tl.constexpr, GA: tl.constexpr,
                              A_PER_K: tl.constexpr, NK: tl.constexpr, NN: tl.constexpr, B_PER_K: tl.constexpr,
                              B_BLOCK_N: tl.constexpr, PER_K_SCALE: tl.constexpr, B_KMAJOR: tl.constexpr,
                              SWAP_AB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              N_FIRST: tl.constexpr):
    """x_q [T, K] fp8, x_s [T, GA]; idx [PAIRS]; Wg, Wu fp8 [E, K, N] (or K-major [E, N, K]) with scales
    [E, NK, NN] -> h [PAIRS, N] in h's dtype (rows of dropped pairs unwritten)."""
    p, nt = _pair_and_n_tile(N_FIRST)
    rows, ok, lead = _expert_rows(idx_ptr, p, E, PAIRS, M, Q)
    if lead:
        e = tl.load(idx_ptr + p)
        tok = (rows // TOP_K).to(tl.int64)
        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        if SWAP_AB:
            acc_g, acc_u = _gate_up_swapped(x_ptr, xs_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, e, tok, ok, cols, ks,
                                            K, N, GA, A_PER_K, NK, NN, B_PER_K, B_BLOCK_N, PER_K_SCALE, B_KMAJOR,
                                            M, BLOCK_N, BLOCK_K)
        else:
            acc_g, acc_u = _gate_up_loop(x_ptr, xs_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, e, tok, ok, cols, ks,
                                         K, N, GA, A_PER_K, NK, NN, B_PER_K, B_BLOCK_N, PER_K_SCALE, B_KMAJOR,
                                         False, M, BLOCK_N, BLOCK_K)
        if not PER_K_SCALE:
            sa = tl.load(xs_ptr + tok * GA, mask=ok, other=0.0)[:, None]
            acc_g = acc_g * (sa * _w_scale(wgs_ptr, e, 0, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :])
            acc_u = acc_u * (sa * _w_scale(wus_ptr, e, 0, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :])
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        out = h_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(out, h.to(h_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def down_fp8_decode_kernel(h_ptr, hs_ptr, idx_ptr, w_ptr, ws_ptr, y_ptr, PAIRS: tl.constexpr, E: tl.constexpr,
                           K: tl.constexpr, N: tl.constexpr, M: tl.constexpr, Q: tl.constexpr, GA: tl.constexpr,
                           A_PER_K: tl.constexpr, NK: tl.constexpr, NN: tl.constexpr, B_PER_K: tl.constexpr,
                           B_BLOCK_N: tl.constexpr, PER_K_SCALE: tl.constexpr, B_KMAJOR: tl.constexpr,
                           QUANT_A: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, N_FIRST: tl.constexpr):
    """h [PAIRS, K]: fp8 with h_s [PAIRS, GA], or (QUANT_A) 16-bit / float32, quantized here; idx [PAIRS];
    Wd fp8 [E, K, N] (or K-major [E, N, K]) with scales [E, NK, NN] -> y [PAIRS, N] in y's dtype (rows of
    dropped pairs unwritten)."""
    p, nt = _pair_and_n_tile(N_FIRST)
    rows, ok, lead = _expert_rows(idx_ptr, p, E, PAIRS, M, Q)
    if lead:
        e = tl.load(idx_ptr + p)
        r64 = rows.to(tl.int64)
        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        w_off = e.to(tl.int64) * K * N + _w_tile(ks, cols, K, N, B_KMAJOR)            # [BLOCK_K, BLOCK_N]
        if SWAP_AB:               # acc^T [BLOCK_N, M] += W^T [BLOCK_N, BLOCK_K] @ h^T [BLOCK_K, M]
            w_ptrs = w_ptr + tl.trans(w_off)
            acc = tl.zeros((BLOCK_N, M), dtype=tl.float32)
        else:
            w_ptrs = w_ptr + w_off
            acc = tl.zeros((M, BLOCK_N), dtype=tl.float32)
        a_ptrs = h_ptr + r64[:, None] * K + ks[None, :]                                 # [M, BLOCK_K]
        at_ptrs = h_ptr + r64[None, :] * K + ks[:, None]                                # [BLOCK_K, M]
        for kb in range(0, K // BLOCK_K):
            if QUANT_A:
                a, sa = _quantize_rows(tl.load(a_ptrs, mask=ok[:, None], other=0.0).to(tl.float32))
                if SWAP_AB:
                    a = tl.trans(a)
            elif SWAP_AB:
                a = tl.load(at_ptrs, mask=ok[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=ok[:, None], other=0.0)
            if PER_K_SCALE:
                grp = (kb * BLOCK_K) // 128
                if not QUANT_A:
                    sa = tl.load(hs_ptr + r64 * GA + grp * A_PER_K, mask=ok, other=0.0)
                sw = _w_scale(ws_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)
                if SWAP_AB:
                    acc += tl.dot(tl.load(w_ptrs), a) * (sw[:, None] * sa[None, :])
                else:
                    acc += tl.dot(a, tl.load(w_ptrs)) * (sa[:, None] * sw[None, :])
            else:
                if SWAP_AB:
                    acc = tl.dot(tl.load(w_ptrs), a, acc, max_num_imprecise_acc=BLOCK_K)
                else:
                    acc = tl.dot(a, tl.load(w_ptrs), acc, max_num_imprecise_acc=BLOCK_K)
            a_ptrs += BLOCK_K
            at_ptrs += BLOCK_K
            w_ptrs += BLOCK_K if B_KMAJOR else BLOCK_K * N
        if SWAP_AB:
            acc = tl.trans(acc)
        if not PER_K_SCALE:
            acc = acc * (tl.load(hs_ptr + r64 * GA, mask=ok, other=0.0)[:, None]
                         * _w_scale(ws_ptr, e, 0, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :])
        tl.store(y_ptr + r64[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok[:, None])
