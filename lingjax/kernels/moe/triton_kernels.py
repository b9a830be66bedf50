"""Triton kernels of the MoE grouped matmul (Hopper GPU; called from JAX by gpu.py through jax-triton).

This module imports only triton, so the kernel bodies can also run in Triton's CPU interpreter
(TRITON_INTERPRET=1, torch tensors) in the tests; jax_triton itself cannot be imported on a CPU-only JAX.

Both kernels work on the padded, expert-sorted row layout of lingjax/kernels/moe/layout.py: rows come
in blocks of BLOCK_M, every block belongs to one expert (`block_expert[b]`, -1: unused block, skipped),
and row r of the layout holds token `row_token[r]` (== n_tokens for a padding row, which reads zeros).
A program computes one [BLOCK_M, BLOCK_N] output tile of one block, streaming its expert's weight
panel [K, BLOCK_N] once, with float32 accumulation:
  gate_up: h[r] = silu(x[tok] @ Wg[e]) * (x[tok] @ Wu[e])      x [T, d], Wg/Wu [E, d, I] -> h [P, I]
  down:    y[r] = h[r] @ Wd[e]                                  h [P, I], Wd [E, I, d]    -> y [P, d]
Rows of unused blocks are left unwritten (the combine step never reads them); padding rows are zeros.
Tiles (block, n tile)
are ordered GROUP_M blocks at a time per n tile, so that the GROUP_M blocks' activation rows and the
weight panel of an expert with several blocks are reused from L2 (_tile).
Two schedules (PERSISTENT, a compile-time choice):
  False  one program per (block, n tile) over all NUM_BLOCKS blocks (the static worst case); programs
         of unused blocks exit at once
  True   NUM_PROGRAMS programs (a few per SM) loop over the tiles of the used blocks only
         (num_used_blocks read on the device), in the same order: no launch of empty programs, and
         the programs resident on the SMs move through the tiles together, keeping the L2 reuse.
Short tiles (SHORT, compile-time 0, 1 or 2): an expert's last block is often mostly padding (T = 4096
at the flash shapes: 128 +- 11 pairs per expert in blocks of 128, so about half the experts have a
second block of a few rows: 1.46x the useful products). SHORT 1: a block whose row BLOCK_M/2 is
padding (then so is every row after it: a group's padding is at its end) runs a [BLOCK_M/2, BLOCK_N]
tile and stores zeros to the rest (1.23x at T = 4096); SHORT 2: also [BLOCK_M/4, BLOCK_N] tiles where
row BLOCK_M/4 is padding (1.12x). The row tokens tell it, so down_kernel takes row_token too.
Split K (the *_split_kernel variants, SPLIT_K > 1): for decode sizes, where the used blocks x n tiles are
fewer programs than the GPU has SMs (T = 1 at the flash shapes: 8 experts x 16 gate/up or 32 down
tiles, on 132 SMs), each tile's K range is cut into SPLIT_K slices, one program each, and every
program writes its float32 partial sums to its own slice of an [SPLIT_K, P, N] output (no atomics:
the caller sums the slices in a fixed order, so the result is deterministic). gate_up's split writes
the gate and up partials; silu(g) * u is taken after the sum (gpu.py). One program per (tile, slice);
no persistent variant.
PRECISION: "" for 16-bit inputs (tensor cores, bf16/f16 products), or a tl.dot input_precision for
float32 inputs ("tf32x3": float32-accurate, the default; "ieee"; "tf32").
"""
import triton
import triton.language as tl


@triton.jit
def _tile(pid, n_blocks, N: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile index -> (block, n tile) over n_blocks blocks: GROUP_M consecutive blocks share each n tile."""
    num_n = N // BLOCK_N
    per_group = GROUP_M * num_n
    group = pid // per_group
    first = group * GROUP_M
    size = tl.minimum(n_blocks - first, GROUP_M)
    pid_m = first + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gate_up_acc(x_ptr, row_token_ptr, wg_ptr, wu_ptr, row0, pid_n, e, k0, N_TOKENS: tl.constexpr,
                 K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, PRECISION: tl.constexpr):
    """float32 (x[tok] @ Wg[e], x[tok] @ Wu[e]) of rows row0.. (BLOCK_M) over K_STEPS k steps from column k0."""
    rows = row0 + tl.arange(0, BLOCK_M)
    tok = tl.load(row_token_ptr + rows)
    real = tok < N_TOKENS
    tok = tl.where(real, tok, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * K + ks[None, :]
    w_off = e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    return gate_up_steps(a_ptrs, real, wg_ptr + w_off, wu_ptr + w_off, BLOCK_M, BLOCK_N, BLOCK_K, N, K_STEPS,
                         PRECISION)


@triton.jit
def gate_up_steps(a_ptrs, real, g_ptrs, u_ptrs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, N: tl.constexpr, STEPS: tl.constexpr, PRECISION: tl.constexpr):
    """The gate/up products' k loop: STEPS steps of BLOCK_K from the activation rows at a_ptrs (rows where
    `real` is False load zeros) and the weight tiles at g_ptrs / u_ptrs (row stride N) -> float32
    (acc_g, acc_u) [BLOCK_M, BLOCK_N]. Shared by the grouped kernels and the decode path's dot form."""
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, STEPS):
        a = tl.load(a_ptrs, mask=real[:, None], other=0.0)
        acc_g = _dot(a, tl.load(g_ptrs), acc_g, PRECISION)
        acc_u = _dot(a, tl.load(u_ptrs), acc_u, PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * N
        u_ptrs += BLOCK_K * N
    return acc_g, acc_u


@triton.jit
def _gate_up_tile(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, row0, pid_n, e, N_TOKENS: tl.constexpr,
                  K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    acc_g, acc_u = _gate_up_acc(x_ptr, row_token_ptr, wg_ptr, wu_ptr, row0, pid_n, e, 0, N_TOKENS, K, N,
                                BLOCK_M, BLOCK_N, BLOCK_K, K // BLOCK_K, PRECISION)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = h_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty))


@triton.jit
def _store_zeros(out_ptr, row0, pid_n, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty))


@triton.jit
def _padding_from(row_token_ptr, row, N_TOKENS: tl.constexpr):
    """Whether row (and so every later row of its block: a group's padding is at its end) is padding."""
    return tl.load(row_token_ptr + row) >= N_TOKENS


@triton.jit
def _gate_up_block(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, pid_m, pid_n, e, N_TOKENS: tl.constexpr,
                   K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, SHORT: tl.constexpr):
    """One output tile; SHORT 1 (2): the real rows of a block whose second half (last three quarters)
    is padding in a half- (quarter-) height tile, zeros stored to the padding rows."""
    row0 = pid_m * BLOCK_M
    if SHORT == 0:
        _gate_up_tile(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, row0, pid_n, e, N_TOKENS, K, N,
                      BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    elif SHORT == 1:
        if _padding_from(row_token_ptr, row0 + BLOCK_M // 2, N_TOKENS):
            _gate_up_tile(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, row0, pid_n, e, N_TOKENS, K, N,
                          BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION)
            _store_zeros(h_ptr, row0 + BLOCK_M // 2, pid_n, N, BLOCK_M // 2, BLOCK_N)
        else:
            _gate_up_tile(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, row0, pid_n, e, N_TOKENS, K, N,
                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        if _padding_from(row_token_ptr, row0 + BLOCK_M // 4, N_TOKENS):
            _gate_up_tile(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, row0, pid_n, e, N_TOKENS, K, N,
                          BLOCK_M // 4, BLOCK_N, BLOCK_K, PRECISION)
            _store_zeros(h_ptr, row0 + BLOCK_M // 4, pid_n, N, BLOCK_M // 4, BLOCK_N)
            _store_zeros(h_ptr, row0 + BLOCK_M // 2, pid_n, N, BLOCK_M // 2, BLOCK_N)
        elif _padding_from(row_token_ptr, row0 + BLOCK_M // 2, N_TOKENS):
            _gate_up_tile(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, row0, pid_n, e, N_TOKENS, K, N,
                          BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION)
            _store_zeros(h_ptr, row0 + BLOCK_M // 2, pid_n, N, BLOCK_M // 2, BLOCK_N)
        else:
            _gate_up_tile(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, row0, pid_n, e, N_TOKENS, K, N,
                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def gate_up_kernel(x_ptr, row_token_ptr, block_expert_ptr, num_used_ptr, wg_ptr, wu_ptr, h_ptr,
                   N_TOKENS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   PRECISION: tl.constexpr, PERSISTENT: tl.constexpr = False, NUM_PROGRAMS: tl.constexpr = 1,
                   SHORT: tl.constexpr = 0):
    if PERSISTENT:
        n_used = tl.load(num_used_ptr)
        for t in range(tl.program_id(0), n_used * (N // BLOCK_N), NUM_PROGRAMS):
            pid_m, pid_n = _tile(t, n_used, N, BLOCK_N, GROUP_M)
            e = tl.load(block_expert_ptr + pid_m)
            _gate_up_block(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, pid_m, pid_n, e, N_TOKENS, K, N,
                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, SHORT)
    else:
        pid_m, pid_n = _tile(tl.program_id(0), NUM_BLOCKS, N, BLOCK_N, GROUP_M)
        e = tl.load(block_expert_ptr + pid_m)
        if e >= 0:
            _gate_up_block(x_ptr, row_token_ptr, wg_ptr, wu_ptr, h_ptr, pid_m, pid_n, e, N_TOKENS, K, N,
                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, SHORT)


@triton.jit
def _down_acc(h_ptr, w_ptr, row0, pid_n, e, k0, K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr, PRECISION: tl.constexpr):
    """float32 h[rows] @ Wd[e] of rows row0.. (BLOCK_M) over K_STEPS k steps from column k0."""
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * K + ks[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * K * N + ks[:, None] * N + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_STEPS):
        acc = _dot(tl.load(a_ptrs), tl.load(w_ptrs), acc, PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * N
    return acc


@triton.jit
def _down_tile(h_ptr, w_ptr, y_ptr, row0, pid_n, e, K: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    acc = _down_acc(h_ptr, w_ptr, row0, pid_n, e, 0, K, N, BLOCK_M, BLOCK_N, BLOCK_K, K // BLOCK_K, PRECISION)
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _down_block(h_ptr, row_token_ptr, w_ptr, y_ptr, pid_m, pid_n, e, N_TOKENS: tl.constexpr, K: tl.constexpr,
                N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, SHORT: tl.constexpr):
    """One output tile; SHORT: short tiles for mostly-padding blocks, as _gate_up_block."""
    row0 = pid_m * BLOCK_M
    if SHORT == 0:
        _down_tile(h_ptr, w_ptr, y_ptr, row0, pid_n, e, K, N, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    elif SHORT == 1:
        if _padding_from(row_token_ptr, row0 + BLOCK_M // 2, N_TOKENS):
            _down_tile(h_ptr, w_ptr, y_ptr, row0, pid_n, e, K, N, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION)
            _store_zeros(y_ptr, row0 + BLOCK_M // 2, pid_n, N, BLOCK_M // 2, BLOCK_N)
        else:
            _down_tile(h_ptr, w_ptr, y_ptr, row0, pid_n, e, K, N, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        if _padding_from(row_token_ptr, row0 + BLOCK_M // 4, N_TOKENS):
            _down_tile(h_ptr, w_ptr, y_ptr, row0, pid_n, e, K, N, BLOCK_M // 4, BLOCK_N, BLOCK_K, PRECISION)
            _store_zeros(y_ptr, row0 + BLOCK_M // 4, pid_n, N, BLOCK_M // 4, BLOCK_N)
            _store_zeros(y_ptr, row0 + BLOCK_M // 2, pid_n, N, BLOCK_M // 2, BLOCK_N)
        elif _padding_from(row_token_ptr, row0 + BLOCK_M // 2, N_TOKENS):
            _down_tile(h_ptr, w_ptr, y_ptr, row0, pid_n, e, K, N, BLOCK_M // 2, BLOCK_N, BLOCK_K, PRECISION)
            _store_zeros(y_ptr, row0 + BLOCK_M // 2, pid_n, N, BLOCK_M // 2, BLOCK_N)
        else:
            _down_tile(h_ptr, w_ptr, y_ptr, row0, pid_n, e, K, N, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


@triton.jit
def down_kernel(h_ptr, row_token_ptr, block_expert_ptr, num_used_ptr, w_ptr, y_ptr,
                N_TOKENS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                PRECISION: tl.constexpr, PERSISTENT: tl.constexpr = False, NUM_PROGRAMS: tl.constexpr = 1,
                SHORT: tl.constexpr = 0):
    if PERSISTENT:
        n_used = tl.load(num_used_ptr)
        for t in range(tl.program_id(0), n_used * (N // BLOCK_N), NUM_PROGRAMS):
            pid_m, pid_n = _tile(t, n_used, N, BLOCK_N, GROUP_M)
            e = tl.load(block_expert_ptr + pid_m)
            _down_block(h_ptr, row_token_ptr, w_ptr, y_ptr, pid_m, pid_n, e, N_TOKENS, K, N, BLOCK_M, BLOCK_N,
                        BLOCK_K, PRECISION, SHORT)
    else:
        pid_m, pid_n = _tile(tl.program_id(0), NUM_BLOCKS, N, BLOCK_N, GROUP_M)
        e = tl.load(block_expert_ptr + pid_m)
        if e >= 0:
            _down_block(h_ptr, row_token_ptr, w_ptr, y_ptr, pid_m, pid_n, e, N_TOKENS, K, N, BLOCK_M, BLOCK_N,
                        BLOCK_K, PRECISION, SHORT)


@triton.jit
def _split_tile(NUM_BLOCKS: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                SPLIT_K: tl.constexpr):
    """This program's (block, n tile, k slice): the slices of one tile are neighbouring programs."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tile(pid // SPLIT_K, NUM_BLOCKS, N, BLOCK_N, GROUP_M)
    return pid_m, pid_n, pid % SPLIT_K


@triton.jit
def gate_up_split_kernel(x_ptr, row_token_ptr, block_expert_ptr, wg_ptr, wu_ptr, g_part_ptr, u_part_ptr,
                         N_TOKENS: tl.constexpr, K: tl.constexpr, N: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr):
    """Split-K gate/up: g_part, u_part [SPLIT_K, P, N] float32, slice s = the products over K columns
    [s K / SPLIT_K, (s + 1) K / SPLIT_K) (K a multiple of SPLIT_K * BLOCK_K)."""
    pid_m, pid_n, pid_k = _split_tile(NUM_BLOCKS, N, BLOCK_N, GROUP_M, SPLIT_K)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        steps: tl.constexpr = K // BLOCK_K // SPLIT_K
        acc_g, acc_u = _gate_up_acc(x_ptr, row_token_ptr, wg_ptr, wu_ptr, pid_m * BLOCK_M, pid_n, e,
                                    pid_k * steps * BLOCK_K,
                                    N_TOKENS, K, N, BLOCK_M, BLOCK_N, BLOCK_K, steps, PRECISION)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        off = pid_k.to(tl.int64) * (NUM_BLOCKS * BLOCK_M * N) + rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(g_part_ptr + off, acc_g)
        tl.store(u_part_ptr + off, acc_u)


@triton.jit
def down_split_kernel(h_ptr, block_expert_ptr, w_ptr, y_part_ptr, K: tl.constexpr, N: tl.constexpr,
                      NUM_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
                      SPLIT_K: tl.constexpr):
    """Split-K down: y_part [SPLIT_K, P, N] float32, slice s = h's K columns [s K / SPLIT_K, ...) @ Wd."""
    pid_m, pid_n, pid_k = _split_tile(NUM_BLOCKS, N, BLOCK_N, GROUP_M, SPLIT_K)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= 0:
        steps: tl.constexpr = K // BLOCK_K // SPLIT_K
        acc = _down_acc(h_ptr, w_ptr, pid_m * BLOCK_M, pid_n, e, pid_k * steps * BLOCK_K, K, N, BLOCK_M, BLOCK_N,
                        BLOCK_K,
                        steps, PRECISION)
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        off = pid_k.to(tl.int64) * (NUM_BLOCKS * BLOCK_M * N) + rows[:, None] * N + cols[None, :]
        tl.store(y_part_ptr + off, acc)
