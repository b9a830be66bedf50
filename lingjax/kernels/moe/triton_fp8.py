"""Triton kernels of the MoE grouped matmul with FP8 weights (Hopper GPU; called from JAX by gpu_fp8.py
through jax-triton). The FP8 variant of triton_kernels.py: the same expert-sorted row layout
(layout.py: blocks of BLOCK_M rows of one expert, `block_expert[b]` = -1 for an unused block, which is
skipped and left unwritten; row r holds token `row_token[r]`, == N_TOKENS for a padding row, which
reads zeros), one [BLOCK_M, BLOCK_N] output tile of one block per program, its expert's weight panel
streamed once, programs ordered GROUP_M blocks at a time per weight tile.

This module imports only triton, so the kernel bodies also run in Triton's CPU interpreter
(TRITON_INTERPRET=1, torch tensors; float8_e4m3fn loads and fp8 tl.dot work there) in the tests.

Operands: activations quantized to float8_e4m3fn with float32 scales per row (GA = 1) or per row and
128-group (GA = ceil(K / 128)): x_q [T, K], x_s [T, GA] (gate_up, rows gathered by row_token) and
h_q [P, K], h_s [P, GA] (down); weights float8_e4m3fn [E, K, N] or, B_KMAJOR, K-major [E, N, K]
(the layout Hopper's fp8 wgmma reads its B operand in: weight tiles copied to shared memory
asynchronously, pipelined; see lingjax/kernels/fp8/triton_kernels.py) with float32 scales [E, NK, NN] (NK = 1
or ceil(K / 128); NN = 1, N, or ceil(N / 128)). fp8 products on the tensor cores, float32
accumulation; with PER_K_SCALE each k-block's product is scaled before it is added (BLOCK_K divides
128), else the sum over K is scaled once at the end (each k-block's tensor-core sum added in float32:
max_num_imprecise_acc, see lingjax/kernels/fp8/triton_kernels.py) (see lingjax/kernels/fp8/triton_kernels.py for the
scale addressing: x_s[r, g * A_PER_K], w_s[e, g * B_PER_K, n // B_BLOCK_N]).
  gate_up: h[r] = silu(x[tok] Wg[e]) * (x[tok] Wu[e])      -> h [P, N] in h's dtype, or QUANT_H (per-group
           activations, BLOCK_N = 128: one program holds whole 128-groups of its rows): h rounded to the
           activation dtype (H_ROUND: 0 float32, 1 bfloat16, 2 float16) and quantized as down takes it
           (_quantize_rows, what quant.quantize_activation_fp8 computes) -> h_q float8_e4m3fn [P, N] and
           h_s float32 [P, N / 128]; padding rows neither (down does not read them). No XLA pass over h.
  down:    y[r] = h[r] Wd[e]                                -> y [P, N] in y's dtype; padding rows
           (row_token[r] == N_TOKENS) are neither read nor written (combine never reads them; at
           decode sizes most rows of a 64-row block are padding)
SWAP_AB (decode sizes: blocks of 16 / 32 rows): each k-step multiplies W^T [BLOCK_N, BLOCK_K] by the rows'
activations transposed [BLOCK_K, BLOCK_M], so the weight tile is the fp8 wgmma's 64+-row operand and the
block's few rows its N (a tl.dot of fewer than 64 rows runs as mma.sync on sm_90, which has no fp8 form:
every operand converted to f16 in registers); the accumulators are transposed back for the epilogue.
W16 (prefill option, not with SWAP_AB, QUANT_A or QUANT_H; session 7): the reference math on the 16-bit tensor
cores: x / h passed quantize-dequantized in their 16-bit dtype (quant.quantize_activation; x_s / h_s unused),
each fp8 weight tile dequantized as it is loaded (q * its block scale in float32, rounded to that dtype:
quant.dequantize's values) and 16-bit products accumulated in float32 (no per-k-step product to scale: the
wgmma accumulates in place, as the bf16 kernels; no dequantized copy of the weights in memory).
QUANT_A (per-group activations, BLOCK_K = 128, not with SWAP_AB): x / h are passed unquantized (float32 / bfloat16 /
float16) and each [BLOCK_M, 128] tile is quantized as it is loaded, exactly as
lingjax.quant.quantize_activation_fp8 does (lingjax/kernels/fp8/triton_kernels.py _quantize_rows;
x_s / h_s unused): no separate pass over the activations.
"""
import triton
import triton.language as tl

from lingjax.kernels.fp8.triton_kernels import _quantize_rows


@triton.jit
def _tile(pid, NUM_BLOCKS: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (block, n tile): GROUP_M consecutive blocks share each n tile."""
    num_n = N // BLOCK_N
    per_group = GROUP_M * num_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(NUM_BLOCKS - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _w_tile(ks, cols, K: tl.constexpr, N: tl.constexpr, B_KMAJOR: tl.constexpr):
    """Offsets of a [BLOCK_K, BLOCK_N] weight tile within one expert's [K, N] (or K-major [N, K]) matrix."""
    if B_KMAJOR:
        return cols[None, :] * K + ks[:, None]
    else:
        return ks[:, None] * N + cols[None, :]


@triton.jit
def _w_scale(ws_ptr, e, g, cols, NK: tl.constexpr, NN: tl.constexpr, B_PER_K: tl.constexpr,
             B_BLOCK_N: tl.constexpr):
    return tl.load(ws_ptr + e.to(tl.int64) * NK * NN + g * B_PER_K * NN + cols // B_BLOCK_N)


@triton.jit
def gate_up_fp8_kernel(x_ptr, xs_ptr, row_token_ptr, block_expert_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, h_ptr,
                       hs_ptr, N_TOKENS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                       GA: tl.constexpr, A_PER_K: tl.constexpr, NK: tl.constexpr, NN: tl.constexpr,
                       B_PER_K: tl.constexpr, B_BLOCK_N: tl.constexpr, PER_K_SCALE: tl.constexpr,
                       B_KMAJOR: tl.constexpr, QUANT_A: tl.constexpr, QUANT_H: tl.constexpr, H_ROUND: tl.constexpr,
                       SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, W16: tl.constexpr = False):
    pid_m, pid_n = _tile(tl.program_id(0), NUM_BLOCKS, N, BLOCK_N, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = tl.load(row_token_ptr + rows)
        real = tok < N_TOKENS
        tok = tl.where(real, tok, 0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        if SWAP_AB:
            acc_g, acc_u = _gate_up_swapped(x_ptr, xs_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, e, tok, real, cols, ks,
                                            K, N, GA, A_PER_K, NK, NN, B_PER_K, B_BLOCK_N, PER_K_SCALE, B_KMAJOR,
                                            BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc_g, acc_u = _gate_up_loop(x_ptr, xs_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, e, tok, real, cols, ks,
                                         K, N, GA, A_PER_K, NK, NN, B_PER_K, B_BLOCK_N, PER_K_SCALE, B_KMAJOR,
                                         QUANT_A, BLOCK_M, BLOCK_N, BLOCK_K, W16)
        if not PER_K_SCALE and not W16:
            sa = tl.load(xs_ptr + tok * GA, mask=real, other=0.0)[:, None]
            acc_g = acc_g * (sa * _w_scale(wgs_ptr, e, 0, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :])
            acc_u = acc_u * (sa * _w_scale(wus_ptr, e, 0, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :])
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        out = h_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
        if QUANT_H:       # h as down consumes it: rounded to the activation dtype, then fp8 per 128-group
            if H_ROUND == 1:
                h = h.to(tl.bfloat16).to(tl.float32)
            elif H_ROUND == 2:
                h = h.to(tl.float16).to(tl.float32)
            hq, hs = _quantize_rows(h)
            tl.store(out, hq, mask=real[:, None])
            tl.store(hs_ptr + rows.to(tl.int64) * (N // 128) + pid_n, hs, mask=real)
        else:
            tl.store(out, h.to(h_ptr.dtype.element_ty))


@triton.jit
def _gate_up_swapped(x_ptr, xs_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, e, tok, real, cols, ks,
                     K: tl.constexpr, N: tl.constexpr, GA: tl.constexpr, A_PER_K: tl.constexpr, NK: tl.constexpr,
                     NN: tl.constexpr, B_PER_K: tl.constexpr, B_BLOCK_N: tl.constexpr, PER_K_SCALE: tl.constexpr,
                     B_KMAJOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """SWAP_AB: acc^T [BLOCK_N, BLOCK_M] += W^T [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M] (the weight tile
    is the wgmma's 64+-row operand, the block's rows its N: small blocks at decode sizes stay on the fp8
    wgmma); returns the two accumulators transposed back, [BLOCK_M, BLOCK_N]."""
    at_ptrs = x_ptr + tok[None, :] * K + ks[:, None]
    w_off = e.to(tl.int64) * K * N + tl.trans(_w_tile(ks, cols, K, N, B_KMAJOR))
    g_ptrs = wg_ptr + w_off
    u_ptrs = wu_ptr + w_off
    acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        at = tl.load(at_ptrs, mask=real[None, :], other=0.0)
        if PER_K_SCALE:
            grp = (kb * BLOCK_K) // 128
            sa = tl.load(xs_ptr + tok * GA + grp * A_PER_K, mask=real, other=0.0)[None, :]
            sg = _w_scale(wgs_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[:, None]
            su = _w_scale(wus_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[:, None]
            acc_g += tl.dot(tl.load(g_ptrs), at) * (sg * sa)
            acc_u += tl.dot(tl.load(u_ptrs), at) * (su * sa)
        else:
            acc_g = tl.dot(tl.load(g_ptrs), at, acc_g, max_num_imprecise_acc=BLOCK_K)
            acc_u = tl.dot(tl.load(u_ptrs), at, acc_u, max_num_imprecise_acc=BLOCK_K)
        at_ptrs += BLOCK_K
        g_ptrs += BLOCK_K if B_KMAJOR else BLOCK_K * N
        u_ptrs += BLOCK_K if B_KMAJOR else BLOCK_K * N
    return tl.trans(acc_g), tl.trans(acc_u)


@triton.jit
def _gate_up_loop(x_ptr, xs_ptr, wg_ptr, wgs_ptr, wu_ptr, wus_ptr, e, tok, real, cols, ks,
                  K: tl.constexpr, N: tl.constexpr, GA: tl.constexpr, A_PER_K: tl.constexpr, NK: tl.constexpr,
                  NN: tl.constexpr, B_PER_K: tl.constexpr, B_BLOCK_N: tl.constexpr, PER_K_SCALE: tl.constexpr,
                  B_KMAJOR: tl.constexpr, QUANT_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, W16: tl.constexpr = False):
    a_ptrs = x_ptr + tok[:, None] * K + ks[None, :]
    w_off = e.to(tl.int64) * K * N + _w_tile(ks, cols, K, N, B_KMAJOR)
    g_ptrs = wg_ptr + w_off
    u_ptrs = wu_ptr + w_off
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // BLOCK_K):
        a = tl.load(a_ptrs, mask=real[:, None], other=0.0)
        if QUANT_A:
            a, sa_q = _quantize_rows(a.to(tl.float32))
        if W16:           # x quantize-dequantized (16-bit); the weight tiles dequantized here: 16-bit products
            grp = (kb * BLOCK_K) // 128
            sg = _w_scale(wgs_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :]
            su = _w_scale(wus_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :]
            acc_g = tl.dot(a, (tl.load(g_ptrs).to(tl.float32) * sg).to(a.dtype), acc_g)
            acc_u = tl.dot(a, (tl.load(u_ptrs).to(tl.float32) * su).to(a.dtype), acc_u)
        elif PER_K_SCALE:
            grp = (kb * BLOCK_K) // 128
            if QUANT_A:
                sa = sa_q[:, None]
            else:
                sa = tl.load(xs_ptr + tok * GA + grp * A_PER_K, mask=real, other=0.0)[:, None]
            sg = _w_scale(wgs_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :]
            su = _w_scale(wus_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :]
            acc_g += tl.dot(a, tl.load(g_ptrs)) * (sa * sg)
            acc_u += tl.dot(a, tl.load(u_ptrs)) * (sa * su)
        else:
            acc_g = tl.dot(a, tl.load(g_ptrs), acc_g, max_num_imprecise_acc=BLOCK_K)
            acc_u = tl.dot(a, tl.load(u_ptrs), acc_u, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K if B_KMAJOR else BLOCK_K * N
        u_ptrs += BLOCK_K if B_KMAJOR else BLOCK_K * N
    return acc_g, acc_u


@triton.jit
def down_fp8_kernel(h_ptr, hs_ptr, row_token_ptr, block_expert_ptr, w_ptr, ws_ptr, y_ptr,
                    N_TOKENS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                    GA: tl.constexpr, A_PER_K: tl.constexpr, NK: tl.constexpr, NN: tl.constexpr,
                    B_PER_K: tl.constexpr, B_BLOCK_N: tl.constexpr, PER_K_SCALE: tl.constexpr,
                    B_KMAJOR: tl.constexpr, QUANT_A: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, W16: tl.constexpr = False):
    pid_m, pid_n = _tile(tl.program_id(0), NUM_BLOCKS, N, BLOCK_N, GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if SWAP_AB:                     # acc^T [BLOCK_N, BLOCK_M] += W^T @ h^T (see _gate_up_swapped)
        if e >= 0:
            rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            real = tl.load(row_token_ptr + rows) < N_TOKENS        # padding rows: not read, not written
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK_K)
            at_ptrs = h_ptr + rows[None, :] * K + ks[:, None]
            w_ptrs = w_ptr + e.to(tl.int64) * K * N + tl.trans(_w_tile(ks, cols, K, N, B_KMAJOR))
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for kb in range(0, K // BLOCK_K):
                at = tl.load(at_ptrs, mask=real[None, :], other=0.0)
                if PER_K_SCALE:
                    grp = (kb * BLOCK_K) // 128
                    sa = tl.load(hs_ptr + rows * GA + grp * A_PER_K, mask=real, other=0.0)[None, :]
                    sw = _w_scale(ws_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[:, None]
                    acc += tl.dot(tl.load(w_ptrs), at) * (sw * sa)
                else:
                    acc = tl.dot(tl.load(w_ptrs), at, acc, max_num_imprecise_acc=BLOCK_K)
                at_ptrs += BLOCK_K
                w_ptrs += BLOCK_K if B_KMAJOR else BLOCK_K * N
            if not PER_K_SCALE:
                acc = acc * (_w_scale(ws_ptr, e, 0, cols, NK, NN, B_PER_K, B_BLOCK_N)[:, None]
                             * tl.load(hs_ptr + rows * GA, mask=real, other=0.0)[None, :])
            tl.store(y_ptr + rows[None, :] * N + cols[:, None], acc.to(y_ptr.dtype.element_ty), mask=real[None, :])
    else:
        if e >= 0:
            rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            real = tl.load(row_token_ptr + rows) < N_TOKENS        # padding rows: not read, not written
            cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            ks = tl.arange(0, BLOCK_K)
            a_ptrs = h_ptr + rows[:, None] * K + ks[None, :]
            w_ptrs = w_ptr + e.to(tl.int64) * K * N + _w_tile(ks, cols, K, N, B_KMAJOR)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kb in range(0, K // BLOCK_K):
                a = tl.load(a_ptrs, mask=real[:, None], other=0.0)
                if QUANT_A:
                    a, sa_q = _quantize_rows(a.to(tl.float32))
                if W16:       # h quantize-dequantized (16-bit); the weight tile dequantized here
                    grp = (kb * BLOCK_K) // 128
                    sw = _w_scale(ws_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :]
                    acc = tl.dot(a, (tl.load(w_ptrs).to(tl.float32) * sw).to(a.dtype), acc)
                elif PER_K_SCALE:
                    grp = (kb * BLOCK_K) // 128
                    if QUANT_A:
                        sa = sa_q[:, None]
                    else:
                        sa = tl.load(hs_ptr + rows * GA + grp * A_PER_K, mask=real, other=0.0)[:, None]
                    sw = _w_scale(ws_ptr, e, grp, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :]
                    acc += tl.dot(a, tl.load(w_ptrs)) * (sa * sw)
                else:
                    acc = tl.dot(a, tl.load(w_ptrs), acc, max_num_imprecise_acc=BLOCK_K)
                a_ptrs += BLOCK_K
                w_ptrs += BLOCK_K if B_KMAJOR else BLOCK_K * N
            if not PER_K_SCALE and not W16:
                acc = acc * (tl.load(hs_ptr + rows * GA, mask=real, other=0.0)[:, None]
                             * _w_scale(ws_ptr, e, 0, cols, NK, NN, B_PER_K, B_BLOCK_N)[None, :])
            tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=real[:, None])
