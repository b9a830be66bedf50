"""Triton kernel of the dense FP8 matmul (Hopper GPU; called from JAX by gpu.py through jax-triton).

This module imports only triton, so the kernel body also runs in Triton's CPU interpreter
(TRITON_INTERPRET=1, torch tensors; float8_e4m3fn loads and fp8 tl.dot work there) in the tests.

    c [M, N] = sum over k-blocks kb of (a_q[:, kb] @ b_q[kb, :]) * a_s[:, g(kb)] * b_s[g(kb), n]

a_q float8_e4m3fn [M, K] (activations quantized per token or per token and group of 128 features),
a_s float32 [M, GA] (GA = 1 per token, ceil(K / 128) per group); b_q float8_e4m3fn [K, N] (the param
layout [in, out]) or, B_KMAJOR, [N, K] (K-major: what Hopper's fp8 wgmma reads its B operand as, so
the weight tiles go global -> shared by asynchronous copies, pipelined; an [in, out] weight's tiles are
loaded into registers and transposed into shared memory, unpipelined), b_s float32 [NK, NN] (NK = 1 or ceil(K / 128); NN = 1 per tensor, N per column,
ceil(N / 128) per 128 block). g(kb) is the 128-group of the k-block. Products of fp8 values on the
tensor cores, float32 accumulation:
  PER_K_SCALE (some scale varies along K): each k-block's [BLOCK_M, BLOCK_N] product is multiplied by
      its scales before it is added to the float32 accumulator (BLOCK_K divides 128), as DeepSeek's
      block-FP8 GEMMs do; this also keeps Hopper's fp8 tensor-core sums short.
  otherwise (per-token activations, per-channel / per-tensor weights): one accumulator over all of K,
      scaled once at the end; max_num_imprecise_acc=BLOCK_K adds each k-block's tensor-core sum into it
      in float32 (Hopper's fp8 wgmma accumulates with ~14 bits, which Triton's sm_90 default keeps for
      the whole K: DeepSeek-V3 reports up to ~2% relative error at K = 4096).
Scale addressing: a_s[m, g * A_PER_K] (row stride AS_STRIDE), b_s[g * B_PER_K, n // B_BLOCK_N] (row
stride BS_STRIDE), so the same body serves every layout (A_PER_K / B_PER_K = 0: one scale row).
SPLIT_K > 1 (small M, few output tiles): program (tile, s) sums the s-th share of the k-blocks and writes
float32 partials c [SPLIT_K, M, N] that the wrapper adds; SPLIT_K = 1 writes c [M, N] in its dtype.
Tiles are ordered GROUP_M row blocks at a time per column tile (weight tiles reused from L2).
QUANT_A (per-group activations, BLOCK_K = 128; with or without SWAP_AB): a_ptr holds the activations
unquantized (float32 / bfloat16 / float16 [M, K]) and the kernel quantizes each [BLOCK_M, 128] tile as it
loads it (under SWAP_AB, then transposes it for the product), exactly as
lingjax.quant.quantize_activation_fp8 does (s = max|x| / 448 per row and group, 1 for an all-zero group;
q = float8_e4m3fn(x / s), round to nearest even; _quantize_rows): no separate pass over the
activations and no fp8 copy of them in memory (as_ptr is then unused).
"""
import triton
import triton.language as tl


@triton.jit
def _round_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), as float32. The
    value is exact in float8_e4m3fn, so the cast after it does not round (the same bits on every
    target: Triton's CPU interpreter rounds some values across a power of two wrongly). Normal range
    (|v| >= 2^-6): keep 3 of float32's 23 mantissa bits; subnormals: multiples of 2^-9, rounded by
    the float32 addition of 1.5 * 2^23 to the magnitude (ties to even), the sign put back."""
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    mag = tl.abs(v)
    sub = ((mag * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    sub = (sub.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)  # v's sign (-0 too)
    return tl.where(mag < 0.015625, sub, normal)


@triton.jit
def _quantize_rows(x):
    """x float32 [R, 128] (one group of each row) -> (float8_e4m3fn [R, 128], float32 scales [R]):
    s = max|x| / 448 per row (1 for an all-zero row), q = fp8(x / s), IEEE divisions."""
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
    v = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    return _round_e4m3(v).to(tl.float8e4nv), s


@triton.jit
def _outer(u_rows, v_cols, SWAP_AB: tl.constexpr):
    """The [rows, cols] outer product u v^T in the accumulator's orientation ([cols, rows] under SWAP_AB)."""
    if SWAP_AB:
        return v_cols[:, None] * u_rows[None, :]
    else:
        return u_rows[:, None] * v_cols[None, :]


@triton.jit
def fp8_matmul_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ws_ptr, cnt_ptr,
                      M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                      AS_STRIDE: tl.constexpr, A_PER_K: tl.constexpr,
                      BS_STRIDE: tl.constexpr, B_PER_K: tl.constexpr, B_BLOCK_N: tl.constexpr,
                      PER_K_SCALE: tl.constexpr, SPLIT_K: tl.constexpr, REDUCE: tl.constexpr,
                      SWAP_AB: tl.constexpr, B_KMAJOR: tl.constexpr,
                      QUANT_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M
    num_n: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    per_group: tl.constexpr = GROUP_M * num_n
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(num_m - first, GROUP_M)
    pid_m = first + (pid % per_group) % size
    pid_n = (pid % per_group) // size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    rows_l = tl.where(rmask, rows, 0).to(tl.int64)
    cols_c = tl.where(cmask, cols, 0)
    ks = tl.arange(0, BLOCK_K)

    NKB: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    PER_SPLIT: tl.constexpr = (NKB + SPLIT_K - 1) // SPLIT_K
    kb0 = split * PER_SPLIT
    kb1 = tl.minimum(kb0 + PER_SPLIT, NKB)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k = kb * BLOCK_K + ks
        kmask = k < K
        if SWAP_AB:       # acc^T [BLOCK_N, BLOCK_M] += b^T [BLOCK_N, BLOCK_K] @ a^T [BLOCK_K, BLOCK_M]
            if QUANT_A:   # quantized as loaded ([BLOCK_M, 128] rows), then transposed for the product
                a = tl.load(a_ptr + rows_l[:, None] * K + k[None, :], mask=rmask[:, None] & kmask[None, :],
                            other=0.0)
                a, sa_q = _quantize_rows(a.to(tl.float32))
                a = tl.trans(a)
            else:
                a = tl.load(a_ptr + rows_l[None, :] * K + k[:, None], mask=kmask[:, None] & rmask[None, :],
                            other=0.0)
            if B_KMAJOR:
                b_off = cols_c.to(tl.int64)[:, None] * K + k[None, :]
            else:
                b_off = k.to(tl.int64)[None, :] * N + cols_c[:, None]
            b = tl.load(b_ptr + b_off, mask=cmask[:, None] & kmask[None, :], other=0.0)
        else:
            a = tl.load(a_ptr + rows_l[:, None] * K + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            if QUANT_A:
                a, sa_q = _quantize_rows(a.to(tl.float32))
            if B_KMAJOR:
                b_off = cols_c.to(tl.int64)[None, :] * K + k[:, None]
            else:
                b_off = k.to(tl.int64)[:, None] * N + cols_c[None, :]
            b = tl.load(b_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if PER_K_SCALE:
            g = (kb * BLOCK_K) // 128
            if QUANT_A:
                sa = sa_q
            else:
                sa = tl.load(as_ptr + rows_l * AS_STRIDE + g * A_PER_K)
            sb = tl.load(bs_ptr + g * B_PER_K * BS_STRIDE + cols_c // B_BLOCK_N)
            if SWAP_AB:
                acc += tl.dot(b, a) * _outer(sa, sb, SWAP_AB)
            else:
                acc += tl.dot(a, b) * _outer(sa, sb, SWAP_AB)
        else:
            if SWAP_AB:
                acc = tl.dot(b, a, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)     # float32 sums per k-block (Hopper)
    if not PER_K_SCALE:
        sa = tl.load(as_ptr + rows_l * AS_STRIDE)
        sb = tl.load(bs_ptr + cols_c // B_BLOCK_N)
        acc = acc * _outer(sa, sb, SWAP_AB)
    if SWAP_AB:
        off = rows_l[None, :] * N + cols_c[:, None]
        omask = cmask[:, None] & rmask[None, :]
    else:
        off = rows_l[:, None] * N + cols_c[None, :]
        omask = rmask[:, None] & cmask[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptr + off, acc.to(c_ptr.dtype.element_ty), mask=omask)
    elif not REDUCE:                      # float32 partials c [SPLIT_K, M, N], summed by the caller
        tl.store(c_ptr + split.to(tl.int64) * M * N + off, acc, mask=omask)
    else:                                 # partials in ws; the tile's last program to finish sums them
        tl.store(ws_ptr + split.to(tl.int64) * M * N + off, acc, mask=omask)
        tl.debug_barrier()                # every thread's partial stored before the arrival is counted
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            tot = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT_K):          # in split order: the same sum whoever is last
                tot += tl.load(ws_ptr + s * M * N + off, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(c_ptr + off, tot.to(c_ptr.dtype.element_ty), mask=omask)


@triton.jit
def quantize_kernel(x_ptr, q_ptr, s_ptr, M: tl.constexpr, K: tl.constexpr, PER_GROUP: tl.constexpr,
                    BLOCK_R: tl.constexpr):
    """Dynamic activation quantization in one launch (what lingjax.quant.quantize_activation_fp8 computes):
    x [M, K] (float32 / bfloat16 / float16) -> q float8_e4m3fn [M, K] and float32 scales s = max|x| / 448
    (1 for an all-zero group), q = fp8(x / s) rounded to nearest even (_quantize_rows).
    PER_GROUP: program (r, g) quantizes rows r*BLOCK_R.. over the 128 features of group g, s [M, ceil(K/128)].
    Otherwise (per token): program r finds each row's max over all of K, then quantizes it, s [M, 1]."""
    r = tl.program_id(0)
    rows = r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < M
    rows_l = tl.where(rmask, rows, 0).to(tl.int64)
    ks = tl.arange(0, 128)
    if PER_GROUP:
        g = tl.program_id(1)
        k = g * 128 + ks
        mask = rmask[:, None] & (k < K)[None, :]
        off = rows_l[:, None] * K + k[None, :]
        q, s = _quantize_rows(tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32))
        tl.store(q_ptr + off, q, mask=mask)
        tl.store(s_ptr + rows_l * ((K + 127) // 128) + g, s, mask=rmask)
    else:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, 128):
            k = k0 + ks
            mask = rmask[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + rows_l[:, None] * K + k[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        s = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        for k0 in range(0, K, 128):
            k = k0 + ks
            mask = rmask[:, None] & (k < K)[None, :]
            off = rows_l[:, None] * K + k[None, :]
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
            tl.store(q_ptr + off, _round_e4m3(v).to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + rows_l, s, mask=rmask)
