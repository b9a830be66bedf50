"""MoE grouped matmul on Hopper GPUs: the Triton kernels of triton_kernels.py called through jax-triton.

Same interface as reference.py (see lingjax/kernels/moe/__init__.py): `pick_block_m`,
`pick_layout_method`, `gate_up`, `down` over the expert-sorted row layout (layout.py). Each kernel
reads every touched expert's weight panel once per block of rows and none of the untouched experts, straight from the stored [E, d, I] /
[E, I, d] layout (no transposes, no weight copies). Tile shapes are picked per block size by
`pick_config` (measured on H200: scripts/bench_moe.py); `config=` overrides them for sweeps.
jax_triton is imported inside the functions: it cannot be imported on a CPU-only JAX.
Not used, and why: TMA loads (`tl.make_tensor_descriptor`) need a global scratch buffer per program
for the descriptors (compiled for sm_90: 256 bytes for two), which jax-triton 0.3.1's kernel call does
not allocate; `tl.range(..., warp_specialize=True)` produced no warp-specialized code for these
pointer-load loops on sm_90 (scripts/compile_moe_kernels.py's check, local Triton 3.7.1).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from lingjax.kernels.jax_triton_lib import dot_precision
from lingjax.kernels.moe.layout import COMPARE_MAX_PAIRS


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles and schedule of one kernel: [block_m (the layout's), block_n] output tiles, block_k-deep
    steps; group_m blocks per n tile in the tile order (L2 reuse); persistent 0: one program per
    (block, n tile), p > 0: p programs per SM looping over the used blocks' tiles (triton_kernels.py);
    split_k > 1: each tile's K range in split_k slices, one program each, float32 partial sums
    summed after the kernel (decode sizes: more programs than blocks x n tiles; not with persistent);
    short_blocks 1: a block whose second half is padding runs a half-height tile, 2: also quarter-height
    tiles where the last three quarters are padding (triton_kernels.py)."""
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    persistent: int = 0
    split_k: int = 1
    short_blocks: int = 0

    def tag(self) -> str:
        """Short name of the config for tables: n64k128g8w4s3 (+ p2 when persistent, x4 split in 4
        along K, h1 / h2 with short tiles for mostly-padding blocks)."""
        t = f"n{self.block_n}k{self.block_k}g{self.group_m}w{self.num_warps}s{self.num_stages}"
        return (t + (f"p{self.persistent}" if self.persistent else "")
                + (f"x{self.split_k}" if self.split_k > 1 else "")
                + (f"h{int(self.short_blocks)}" if self.short_blocks else ""))


def num_sms() -> int:
    """Streaming multiprocessors of the first device (132 on an H200; 132 if the device does not say)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _schedule(c: Config, nb: int, num_n: int):
    """(grid, PERSISTENT, NUM_PROGRAMS) of a launch over nb blocks x num_n n tiles (x split_k slices)."""
    if c.split_k > 1:
        return (nb * num_n * c.split_k,), False, 1
    if c.persistent <= 0:
        return (nb * num_n,), False, 1
    programs = max(1, min(c.persistent * num_sms(), nb * num_n))
    return (programs,), True, programs


def pick_layout_method(n_pairs: int) -> str:
    """'compare' (layout.py: comparisons and reductions, a few fused kernels) up to
    COMPARE_MAX_PAIRS pairs, where a sort and its scatters are a fixed cost larger than the work;
    'sort' above (the comparisons grow as n_pairs^2)."""
    return "compare" if n_pairs <= COMPARE_MAX_PAIRS else "sort"


def pick_block_m(n_pairs: int, n_experts: int) -> int:
    """Rows per block: about the rows an expert gets on average (16 at decode sizes, up to 128), so
    that padding stays a small share of the work and blocks are large enough for the tensor cores;
    above 8 rows on average, at least 32: with 16-row blocks about half the experts then get a second
    block (their counts spread around the mean), which streams the expert's weights again. Measured on
    H200 (session 5, scripts/profile_prefix.py, flash shapes, T = 512: 16 rows per expert on average,
    max 27): 1762 us per layer with 16-row blocks (365 blocks), 1583 us with 32 (256 blocks), 1648 with
    64; T <= 256 (<= 8 rows on average) keeps 16 (89-95% of copy bandwidth, scripts/bench_notes_moe.md)."""
    avg = n_pairs / max(n_experts, 1)
    if avg <= 8:
        return 16
    for bm in (32, 64):
        if avg <= bm:
            return bm
    return 128


# Large blocks (block_m 128: T >= ~2k tokens at E 256, k 8), 16-bit inputs: the fastest configuration of
# scripts/bench_moe.py's sweep at the flash shapes, T = 4096 (run 17, scripts/results/bench_moe_h200.json,
# `best`): 128 x 128 gate/up tiles (x2: gate and up) and 128 x 256 down tiles, 64-deep k steps, 8 warps,
# 3 stages, persistent with 1 program per SM: 2282 us for both matmuls, 361 TFLOP/s (52% of the 691
# measured dense rate), against 2368-2455 us (48-50%) for the earlier default (64 / 128-wide tiles,
# 4 warps, one program per tile). Measured at T = 4096 only; applied to every block_m >= 128 (larger T
# has more blocks per expert, so the larger tiles' reuse should help more).
# Half-height tiles for blocks whose second half is padding (short_blocks) were expected to help by
# this count: at T = 4096 an expert gets 128 +- 11 pairs, so about half the experts have a second,
# nearly empty block of 128 rows and the tensor cores run 1.46x the useful products (uniform routing,
# scripts/bench_moe.py's problem). 2282 us for 1.46 x 8.25e11 products is 527 TFLOP/s executed, 76% of
# the dense rate: the kernel is bound by the products it runs, padding included. Half-height tiles
# for the half-padding blocks cut that to 1.23x (-16%; T = 16384: 1.13x -> 1.06x). bench_moe.py --sweep
# 4096,16384 times both (the first two rows of SWEEP_LARGE), and short_blocks 2 (quarter-height tiles
# too: 1.12x at T = 4096; not the default: a 32-row tile compiles to mma.sync, not wgmma, on sm_90).
# Measured (session 4 run 2, scripts/results/bench_moe_h200.{json,log}: the sweep rows 'mm bm128 ...'), they
# do not: T = 4096: 2373 us without (p1), 2437 with (p1h1); T = 16384: 6817 us (484 TFLOP/s, 71% of the
# 681 measured dense rate; torch._grouped_mm 6852 us) without, 7390 with. So short_blocks stays 0 by default
# (an option, swept).
# Session 5 call A (T = 4096): 16 blocks per n tile in the tile order (group_m 16) 2214.1 us against 2272.3 /
# 2318.3 us for group_m 8 (two rows of the same config); 64-row blocks with the same tile widths were slower
# (2393-2719 us: more blocks, so more weight-panel reads). group_m 16 is the default since.
LARGE_GATE_UP = Config(block_n=128, block_k=64, group_m=16, num_warps=8, num_stages=3, persistent=1)
LARGE_DOWN = Config(block_n=256, block_k=64, group_m=16, num_warps=8, num_stages=3, persistent=1)


def pick_config(kind: str, block_m: int, K: int, N: int, itemsize: int = 2) -> Config:
    """Tile shapes by rows per block, the fastest of scripts/bench_moe.py's sweeps on H200:
    small blocks (decode, run 2 of scripts/bench_notes_moe.md) stream weights, 64-wide gate/up tiles
    and 128-wide down tiles with deep pipelines (T = 16: 654 us, 64: 1319 us at the flash shapes);
    64-row blocks: 64-wide gate/up and 128-wide down tiles, 64-deep k steps, 4 warps, 3 stages;
    128-row blocks of 16-bit inputs: LARGE_GATE_UP / LARGE_DOWN above (run 17 + half-height tiles).
    float32 inputs (3xTF32 products) take the 64-row blocks' tiles (the large tiles would not fit shared memory at
    4 bytes) with 64-deep k steps and at most 3 stages, inside the 227 KiB of shared memory."""
    if block_m <= 32:
        c = Config(block_n=128 if kind == "down" else 64, block_k=64 if kind == "down" else 128, group_m=1,
                   num_warps=4, num_stages=4)
    elif block_m >= 128 and itemsize <= 2:
        c = LARGE_DOWN if kind == "down" else LARGE_GATE_UP
    else:
        c = Config(block_n=128 if kind == "down" else 64, block_k=64, group_m=8, num_warps=4, num_stages=3)
    if itemsize >= 4:
        c = dataclasses.replace(c, block_k=min(c.block_k, 64), num_stages=min(c.num_stages, 3))
    return _fit(c, K, N)


def _fit(c: Config, K: int, N: int) -> Config:
    """Shrink tiles to small dims (tiny test models); dims must be multiples of 16, K of split_k k steps."""
    bn, bk = min(c.block_n, N), min(c.block_k, K)
    if N % bn or K % bk or bn < 16 or bk < 16:
        raise ValueError(f"MoE GPU kernel: dims K={K}, N={N} must be multiples of 16 and of the tile "
                         f"({c.block_k}, {c.block_n})")
    if c.split_k < 1 or (K // bk) % c.split_k:
        raise ValueError(f"MoE GPU kernel: split_k={c.split_k} must divide the K={K} dim's {K // bk} k steps "
                         f"of {bk}")
    if c.split_k > 1 and (c.persistent or c.short_blocks):
        raise ValueError("MoE GPU kernel: split_k > 1 has no persistent schedule or half-height tiles "
                         "(persistent and short_blocks must be 0)")
    return dataclasses.replace(c, block_n=bn, block_k=bk)


def _check_short(c: Config, block_m: int):
    """Short tiles must keep >= 16 rows (tl.dot): block_m >= 32 for short_blocks 1, >= 64 for 2."""
    if c.short_blocks not in (0, 1, 2) or block_m < 16 << int(c.short_blocks):
        raise ValueError(f"MoE GPU kernel: short_blocks={c.short_blocks} (0, 1 or 2) needs blocks of >= "
                         f"{16 << int(c.short_blocks)} rows, got block_m={block_m}")


def gate_up(x, layout, w_gate, w_up, *, config: Config | None = None, f32_dot: str = "tf32x3"):
    """h [P, I] = silu(x[row_token] @ Wg[e]) * (x[row_token] @ Wu[e]), float32 accumulation, x.dtype.
    split_k > 1: the kernel writes float32 partial sums [split_k, P, I] of the gate and up products;
    their sum (in slice order: deterministic) and silu(g) * u follow here (one fused XLA kernel)."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    jt = jax_triton()
    from lingjax.kernels.moe import triton_kernels as tk
    T, d = x.shape
    I = w_gate.shape[-1]
    nb, bm = layout.block_expert.shape[0], layout.block_m
    c = _fit(config, d, I) if config else pick_config("gate_up", bm, d, I, x.dtype.itemsize)
    _check_short(c, bm)
    grid, persistent, programs = _schedule(c, nb, I // c.block_n)
    common = dict(grid=grid, num_warps=c.num_warps, num_stages=c.num_stages, N_TOKENS=T, K=d, N=I, NUM_BLOCKS=nb,
                  BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
                  PRECISION=dot_precision(x.dtype, f32_dot))
    wg, wu = w_gate.astype(x.dtype), w_up.astype(x.dtype)
    if c.split_k > 1:
        part = jax.ShapeDtypeStruct((c.split_k, nb * bm, I), jnp.float32)
        g, u = jt.triton_call(x, layout.row_token, layout.block_expert, wg, wu, kernel=tk.gate_up_split_kernel,
                              out_shape=(part, part), name="moe_gate_up_split", SPLIT_K=c.split_k, **common)
        g, u = g.sum(0), u.sum(0)
        return (jax.nn.silu(g) * u).astype(x.dtype)
    return jt.triton_call(
        x, layout.row_token, layout.block_expert, layout.num_used_blocks.reshape(1), wg, wu,
        kernel=tk.gate_up_kernel, out_shape=jax.ShapeDtypeStruct((nb * bm, I), x.dtype), name="moe_gate_up",
        PERSISTENT=persistent, NUM_PROGRAMS=programs, SHORT=int(c.short_blocks), **common)


def down(h, layout, w_down, *, config: Config | None = None, f32_dot: str = "tf32x3"):
    """y [P, d] = h @ Wd[e] per block, float32 accumulation, h.dtype. split_k > 1: float32 partial
    sums [split_k, P, d] from the kernel, summed here in slice order."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    jt = jax_triton()
    from lingjax.kernels.moe import triton_kernels as tk
    P, I = h.shape
    d = w_down.shape[-1]
    nb, bm = layout.block_expert.shape[0], layout.block_m
    c = _fit(config, I, d) if config else pick_config("down", bm, I, d, h.dtype.itemsize)
    _check_short(c, bm)
    grid, persistent, programs = _schedule(c, nb, d // c.block_n)
    common = dict(grid=grid, num_warps=c.num_warps, num_stages=c.num_stages, K=I, N=d, NUM_BLOCKS=nb, BLOCK_M=bm,
                  BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m, PRECISION=dot_precision(h.dtype, f32_dot))
    wd = w_down.astype(h.dtype)
    if c.split_k > 1:
        y = jt.triton_call(h, layout.block_expert, wd, kernel=tk.down_split_kernel,
                           out_shape=jax.ShapeDtypeStruct((c.split_k, P, d), jnp.float32), name="moe_down_split",
                           SPLIT_K=c.split_k, **common)
        return y.sum(0).astype(h.dtype)
    return jt.triton_call(
        h, layout.row_token, layout.block_expert, layout.num_used_blocks.reshape(1), wd, kernel=tk.down_kernel,
        out_shape=jax.ShapeDtypeStruct((P, d), h.dtype), name="moe_down", PERSISTENT=persistent,
        NUM_PROGRAMS=programs, SHORT=int(c.short_blocks), N_TOKENS=layout.pair_row.shape[0], **common)


# ------------------------------------------------------------------------------------------ decode path
# Token counts up to which experts() runs the decode path (experts_decode: triton_decode.py's kernels on the pairs,
# no layout) instead of the grouped matmul. Session 5 call A (flash shapes, whole layer, scripts/bench_notes_moe.md):
# T = 1 95.0 us (multiply-add form, split gate/up) against 107.4 us for the grouped path; T = 4 275.8 us against
# 225.6 us: so one token only then. Session 6: the dot form with h fused into the gate/up kernel (see
# pick_decode_config) runs the grouped kernels' tiles without their layout. Session 6 call A (flash shapes, CUPTI
# device time / wall clock per layer call, scripts/results/session6_callA_moe/, scripts/bench_notes_moe.md):
#   T        1            2             3             4             8             16
#   decode   53.5 / 86.0  95.8 / 123.4  147.5 / 165.0 177.9 / 236.8 360.8 / 416.1 610.1 / 660.3
#   grouped  61.5 / 93.1  107.9 / 128.0 155.5 / 191.0 186.9 / 235.6 359.5 / 408.0 600.7 / 639.8
# so the decode path up to 4 tokens then (T = 4: 5% less device time, the same wall clock; 4 ops against 11).
# Session 6 call B: with the n tiles of a pair launched first from T = 4 (pick_decode_config), T = 8: 335.4 / 371.4
# against the grouped path's 351.0 / 385.4 (T = 32: 938.2 / 973.1 against 956.8 / 999.4; T = 16 not measured with
# it: call A's 610.1 / 660.3 without it against 600.7 / 639.8), so up to 8 tokens.
DECODE_MAX_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """One decode kernel's launch (triton_decode.py): [BLOCK_K, block_n] weight tiles, each program's K range
    cut into split_k slices (one program each, float32 partials summed in order; gate/up split_k 1: h written
    by the gate/up kernel itself); dot True: one program per touched expert with tl.dot over its pairs'
    rows, False: one per pair, float32 multiply-adds; num_stages: the launch's (dot) or the k loop's
    (multiply-add; 1: loads not pipelined) stages; n_first: launch order, the n tiles of one pair consecutive
    (False: one n tile of every pair consecutive)."""
    block_n: int
    block_k: int
    split_k: int = 1
    dot: bool = True
    num_warps: int = 4
    num_stages: int = 3
    n_first: bool = False

    def tag(self) -> str:
        """n128k32x8fw4s4: 128-wide, 32-deep tiles, K in 8 slices, f(ma) or d(ot), 4 warps, 4 stages (+ 'N':
        the n tiles of a pair first in the launch order)."""
        return (f"n{self.block_n}k{self.block_k}x{self.split_k}{'d' if self.dot else 'f'}"
                f"w{self.num_warps}s{self.num_stages}" + ("N" if self.n_first else ""))

    def grid(self, n_pairs: int, N: int) -> tuple:
        """The launch grid over n_pairs pairs and N output columns (triton_decode.py's N_FIRST order)."""
        return ((N // self.block_n, n_pairs, self.split_k) if self.n_first else
                (n_pairs, N // self.block_n, self.split_k))


def pick_decode_config(kind: str, n_tokens: int, n_pairs: int, K: int, N: int, sms: int = 132,
                       itemsize: int = 2) -> DecodeConfig:
    """Rule (session 6): the dot form, K unsplit, h fused into the gate/up kernel, and the grouped path's
    decode tiles (pick_config at block_m 16): gate/up 64-wide, 128-deep, down 128-wide, 64-deep, 4 warps, 4
    stages. At T = 1 these are the grouped matmul's own launches (8 experts x 16 gate/up / 32 down tiles,
    one real row of 16), whose CUPTI device times in session 5 call B were 32.3 us (gate/up, 134 MB: 97% of
    copy) and 18.1 us (down, 67 MB: 87%), against 38.3 / 31.8 us for the then decode kernels (multiply-add,
    gate/up split 4 into float32 partials, down re-forming h from them every k step: 49% of copy). The
    decode path drops the layout's XLA kernels around them (10 launches -> 3). Session 6 call A, T = 1: gate/up
    32.8 us (95%), down 17.7 us (88%), the layer 53.5 us of device time (87.5% of copy); every other tile of
    bench_moe.py's SWEEP_DECODE_T1 was as fast or slower (scripts/bench_notes_moe.md). From 4 tokens the n tiles
    of a pair are launched first (n_first; session 6 call B, device us: T = 4 169.7 vs 172.6, T = 8 335.4 vs
    347.8, T = 32 938.2 vs 972.8; T = 2 95.4 vs 93.6; T = 1 runs every program at once, the order does not
    matter there). float32 inputs: 64-deep k steps and 3 stages (as pick_config), inside the 227 KiB of
    shared memory."""
    del n_pairs, sms
    bn, bk = (min(128, N), min(64, K)) if kind == "down" else (min(64, N), min(128, K))
    n_first = n_tokens >= 4
    if itemsize >= 4:
        return DecodeConfig(block_n=bn, block_k=min(bk, 64), split_k=1, dot=True, num_warps=4, num_stages=3,
                            n_first=n_first)
    return DecodeConfig(block_n=bn, block_k=bk, split_k=1, dot=True, num_warps=4, num_stages=4, n_first=n_first)


def decode_fits(d: int, I: int) -> bool:
    """Whether the decode kernels' default tiles fit the dims (powers of 2, >= 16: every real model's);
    experts() runs the grouped matmul otherwise."""
    return all(v >= 16 and v & (v - 1) == 0 for v in (d, I))


def _fit_decode(c: DecodeConfig, K: int, N: int) -> DecodeConfig:
    bn, bk = min(c.block_n, N), min(c.block_k, K)
    least = 16 if c.dot else 1                                        # tl.dot tiles: >= 16 x 16
    if N % bn or K % bk or (K // bk) % c.split_k or min(bn, bk) < least or bn & (bn - 1) or bk & (bk - 1):
        raise ValueError(f"MoE decode kernel: dims K={K}, N={N} must be multiples of the tile ({c.block_k}, "
                         f"{c.block_n}) (powers of 2, >= {least}), and K's {K // bk} k steps of split_k={c.split_k}")
    return dataclasses.replace(c, block_n=bn, block_k=bk)


def experts_decode(x, idx, weights, w_gate, w_up, w_down, *, gate_up_config: DecodeConfig | None = None,
                   down_config: DecodeConfig | None = None, f32_dot: str = "tf32x3"):
    """The routed experts of a few tokens (experts() takes it for T <= DECODE_MAX_TOKENS) without the layout: x [T, d]; idx
    [T, k] int32 local expert ids (others dropped); weights [T, k] float32; w_gate/w_up [E, d, I], w_down
    [E, I, d] in x.dtype -> [T, d] in x.dtype: sum_j weights[t, j] * y[t, j] in float32 (j in order), y
    in float32 (triton_decode.py's kernels; two launches plus one XLA fusion for the combine). Gate/up
    split_k 1: the gate/up kernel writes h [T * k, I] in x.dtype; > 1: float32 partials, h formed in down."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    jt = jax_triton()
    from lingjax.kernels.moe import triton_decode as td
    T, d = x.shape
    k = idx.shape[1]
    E, _, I = w_gate.shape
    n = T * k
    sms = num_sms()
    sz = x.dtype.itemsize
    cg = _fit_decode(gate_up_config or pick_decode_config("gate_up", T, n, d, I, sms, sz), d, I)
    cd = _fit_decode(down_config or pick_decode_config("down", T, n, I, d, sms, sz), I, d)
    M = max(16, 1 << max(T - 1, 0).bit_length())    # tl.dot rows: an expert's pairs (<= T with top-k routing)
    Q = 1 << max(n - 1, 0).bit_length()             # the routing ids' scan width
    flat = idx.reshape(-1).astype(jnp.int32)
    prec = dot_precision(x.dtype, f32_dot)
    gu = dict(num_warps=cg.num_warps, num_stages=cg.num_stages, PAIRS=n, TOP_K=k, E=E, K=d, N=I, M=M, Q=Q,
              BLOCK_N=cg.block_n, BLOCK_K=cg.block_k, DOT=cg.dot, PRECISION=prec, STAGES=cg.num_stages,
              N_FIRST=cg.n_first, grid=cg.grid(n, I))
    dn = dict(grid=cd.grid(n, d), num_warps=cd.num_warps, num_stages=cd.num_stages, PAIRS=n, E=E,
              K=I, N=d, M=M, Q=Q, BLOCK_N=cd.block_n, BLOCK_K=cd.block_k, SPLIT_K=cd.split_k, DOT=cd.dot,
              PRECISION=prec, STAGES=cd.num_stages, N_FIRST=cd.n_first)
    y_part = jax.ShapeDtypeStruct((cd.split_k, n, d), jnp.float32)
    if cg.split_k == 1:
        h = jt.triton_call(x, flat, w_gate, w_up, kernel=td.gate_up_h_decode_kernel,
                           out_shape=jax.ShapeDtypeStruct((n, I), x.dtype), name="moe_gate_up_decode", **gu)
        y = jt.triton_call(h, flat, w_down, kernel=td.down_h_decode_kernel, out_shape=y_part,
                           name="moe_down_decode", **dn)
    else:
        part = jax.ShapeDtypeStruct((cg.split_k, n, I), jnp.float32)
        g, u = jt.triton_call(x, flat, w_gate, w_up, kernel=td.gate_up_decode_kernel, out_shape=(part, part),
                              name="moe_gate_up_decode", SPLIT_K=cg.split_k, **gu)
        y = jt.triton_call(g, u, flat, w_down, kernel=td.down_decode_kernel, out_shape=y_part,
                           name="moe_down_decode", SPLIT_GU=cg.split_k, **dn)
    return combine_pairs(y, idx, weights, E).astype(x.dtype)


def combine_pairs(y_part, idx, weights, num_experts: int):
    """y_part [S, T * k, d] float32 partial sums (rows of dropped pairs unwritten) -> [T, d] float32:
    sum over j in order of weights[t, j] * sum_s y_part[s, t * k + j], dropped pairs (ids outside
    [0, num_experts)) adding zero."""
    T, k = idx.shape
    y = y_part[0]
    for s in range(1, y_part.shape[0]):
        y = y + y_part[s]
    y = y.reshape(T, k, -1)
    valid = (idx >= 0) & (idx < num_experts)
    out = None
    for j in range(k):
        term = jnp.where(valid[:, j, None], y[:, j] * weights[:, j, None].astype(jnp.float32), 0.0)
        out = term if out is None else out + term
    return out
