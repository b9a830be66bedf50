"""Dense FP8 matmul on Hopper GPUs: the Triton kernel of triton_kernels.py called through jax-triton.

    y = matmul(x, w)          x [..., K] (bf16 / f16 / f32), w an FP8Weight [K, N] -> [..., N] in x.dtype

The activations are quantized as the reference path quantizes them (quant.quantize_activation_fp8's
float8 values and scales): first, by XLA's passes (Config.xla_quant, the default) or one Triton launch
(quantize_activation) (or, as an option for sweeps, inside the kernel as it loads
them: per-group scaling, Config.quant_a, fused_quant); then one kernel multiplies the fp8 operands on
the tensor cores with float32 accumulation and applies both scales (per k-block where they vary along K). `supports(x, w)`
says whether a weight's layout is one the kernel takes (else the dispatch uses the reference):
activations quantized per token or per group of 128 (act "token" / "group"; weight-only FP8, act
"none", stays on the reference), weight blocks (0, 0), (0, 1), (128, 1) or (128, 128) with the scale of
the local weight (under tensor parallelism a scale kept whole because the shard is not whole blocks
stays on the reference too). The weight may be stored in the param layout [K, N] or K-major [N, K]
(quant.with_layout; the fast one on Hopper: its tiles are pipelined by asynchronous copies; the
engine lays FP8 weights out K-major when they run here). Tile shapes: `pick_config` (static, by M; `config=` overrides for sweeps).
jax_triton is imported inside the functions: it cannot be imported on a CPU-only JAX.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lingjax import quant

GROUP = quant.BLOCK          # the 128-feature group of block scales
NUM_SMS = 132                # H100 / H200


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int = 128
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    quant_a: bool = False        # quantize per-group activations in the kernel (fused_quant) where it can
    swap_ab: bool = False        # compute y^T = w^T x^T: the weight tile is the 64+-row wgmma operand and
                                 # block_m (16 / 32) the activation rows (decode sizes; see the kernel)
    reduce: bool = False         # split_k > 1: the partials summed in the kernel (the tile's last program)
                                 # instead of by an XLA reduction after it
    xla_quant: bool = True       # quantize the activations by XLA's passes (jnp; they fuse into x's producer),
                                 # else by one quantize_kernel launch


def _cdiv(a, b):
    return -(-a // b)


def pick_config(M: int, N: int, K: int) -> Config:
    """Static tile choice. Decode-sized M (<= 64): one 64-row tile (the fp8 wgmma: Triton runs a
    tl.dot of fewer than 64 rows on sm_90 as mma.sync, which has no fp8 form there and converts every
    fp8 operand to f16 in registers: ~2-4x the loop's instructions; session 5's device call A measured
    the 16-row kernels at ~4x their weight bytes' time). The weight is streamed once, so the programs
    must cover the SMs: 128-wide column tiles for wide outputs (16 tiles or more; else 64-wide), and
    split-K (shares of the 128-deep k-blocks, float32 partials summed after) up to 2 programs per SM,
    the partials kept under a quarter of the weight's bytes (split <= K / (16 M)). Larger M: 64 x 128
    tiles up to 256 rows, then 128 x 128 tiles with 8 warps and 3 stages (fp8 operand tiles are half
    the bytes of bf16 ones). The activations are quantized before the kernel
    (quant.quantize_activation_fp8; quant_a, in the kernel, is an option for sweeps: every column
    tile would quantize its rows again, ~6x the 64-row loop's instructions compiled for sm_90).
    Session 6's options (swap_ab, reduce in the kernel, quantize_kernel) are off: device call A
    (flash's 4096 x 4096 at T=16 / 64, scripts/bench_notes_fp8.md) measured them no faster than these
    tiles (swap_ab, reduce with swapped tiles) or slower (reduce with 64-row tiles: 2-3x; the quantize
    launch against XLA's passes, which fuse into the producer of x). At these sizes the dispatch runs
    XLA's own FP8 dot instead (lingjax.kernels.fp8: XLA_DOT_MAX_ROWS), measured faster still."""
    if M <= 64:
        bm = 64
        nm = _cdiv(M, bm)
        bn = 128 if _cdiv(N, 128) >= 16 else 64
        return Config(bm, bn, split_k=_split_k(M, K, nm * _cdiv(N, bn)))
    if M <= 256:
        return Config(64, 128, num_warps=4, num_stages=4)
    return Config(128, 128, num_warps=8, num_stages=3)


def decode_config(M: int, N: int, K: int, block_n: int = 128, num_stages: int = 4) -> Config:
    """Decode sizes (M <= 64) as one launch that streams the weight: swapped operands (each k-step
    W^T [block_n, 128] @ x^T [128, block_m]: the weight tile is the fp8 wgmma's 64+-row operand, the
    M rows, padded to block_m = 16 / 32 / 64, its N), the activations quantized per 128-group in the
    kernel as they are loaded (quant_a: no XLA pass, no fp8 copy of x; per-token activations are
    still quantized first: fused_quant), split-K to give ~2 programs per SM with float32 partials
    [split, M, N] that XLA sums into their consumer, kept under a quarter of the weight's bytes
    (split <= K / (16 M)). Against XLA's FP8 dot (kernels.fp8: XLA_DOT_MAX_ROWS) it has no [K / 128, M,
    N] float32 partials and no quantization passes, but measured no faster in a step (kernels.fp8:
    DENSE_DECODE)."""
    bm = max(16, 1 << (max(M, 1) - 1).bit_length())
    return Config(bm, block_n, GROUP, _split_k(M, K, _cdiv(N, block_n)), 8, 4, num_stages, quant_a=True,
                  swap_ab=True)


def _split_k(M: int, K: int, tiles: int) -> int:
    """K-splits for `tiles` output tiles of M rows: up to 2 programs per SM, float32 partials [split, M, N]
    under a quarter of the weight's bytes (split <= K / (16 M)), no empty split."""
    if tiles >= 2 * NUM_SMS:
        return 1
    nkb = _cdiv(K, GROUP)
    split = max(1, min(nkb, _cdiv(2 * NUM_SMS, tiles), K // (16 * max(M, 1))))
    return _cdiv(nkb, _cdiv(nkb, split))


def supports(x, w) -> bool:
    """Whether the kernel takes this (activation, FP8 weight) pair; else the reference math runs."""
    if not quant.is_fp8(w) or w.act not in ("token", "group") or w.q.ndim != 2:
        return False
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return False
    K, N = w.shape
    bk, bn = w.block
    if bk not in (0, GROUP) or bn not in (0, 1, GROUP):
        return False
    nk = 1 if bk == 0 else _cdiv(K, bk)
    nn = 1 if bn == 0 else _cdiv(N, bn)
    return tuple(w.scale.shape) == (nk, nn)


def fused_quant(w, c: Config) -> bool:
    """Whether a call quantizes the activations in the kernel (QUANT_A): the config asks for it, the
    activations are scaled per token and 128-group over more than one group, and each k-step is one
    group (block_k 128). Otherwise quant.quantize_activation_fp8 runs first (per-token scales need
    the whole row before the first k-step)."""
    return bool(c.quant_a and w.act == "group" and w.shape[0] > GROUP and c.block_k == GROUP)


def launch(M: int, w, a_groups: int, config: Config | None = None) -> tuple[Config, tuple, dict]:
    """The static launch of one call (shared with the interpreter tests): (config, grid, constexprs)
    for M rows of activations with `a_groups` scale groups per row and the FP8 weight w [K, N] (either
    layout: B_KMAJOR); QUANT_A when fused_quant (then a_groups must be the row's 128-groups)."""
    K, N = w.shape
    c = config or pick_config(M, N, K)
    quant_a = fused_quant(w, c)
    if quant_a and a_groups != _cdiv(K, GROUP):
        raise ValueError(f"fp8 gpu matmul: in-kernel quantization needs {_cdiv(K, GROUP)} groups, got {a_groups}")
    a_per_k = int(a_groups > 1)
    b_per_k = int(w.block[0] != 0 and w.scale.shape[-2] > 1)
    if (a_per_k or b_per_k) and GROUP % c.block_k:
        raise ValueError(f"fp8 gpu matmul: block_k {c.block_k} must divide {GROUP} with per-group scales")
    grid = (_cdiv(M, c.block_m) * _cdiv(N, c.block_n), c.split_k)
    consts = dict(M=M, N=N, K=K, AS_STRIDE=a_groups, A_PER_K=a_per_k, BS_STRIDE=w.scale.shape[-1],
                  B_PER_K=b_per_k, B_BLOCK_N={0: max(N, 1), 1: 1}.get(w.block[1], w.block[1]),
                  PER_K_SCALE=bool(a_per_k or b_per_k), SPLIT_K=c.split_k, REDUCE=bool(c.reduce and c.split_k > 1),
                  SWAP_AB=bool(c.swap_ab), B_KMAJOR=bool(w.kmajor),
                  QUANT_A=quant_a, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
    return c, grid, consts


QUANT_ROWS = 16              # rows per program of the activation quantization kernel (64 above 256 rows)


def quantize_activation(x2, act: str, group: int = GROUP):
    """x2 [M, K] -> (q float8_e4m3fn [M, K], s float32 [M, G]): quant.quantize_activation_fp8 (act "token":
    G = 1; "group": G = ceil(K / 128)) in one Triton launch (quantize_kernel; XLA makes a reduction and
    an elementwise pass of it). group must be 128."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.fp8.triton_kernels import quantize_kernel
    if act not in ("token", "group") or group != GROUP:
        raise ValueError(f"fp8 quantize_activation: act {act!r} / group {group} (token, or group of {GROUP})")
    M, K = x2.shape
    G = _cdiv(K, GROUP) if act == "group" else 1
    rows = QUANT_ROWS if M <= 256 else 4 * QUANT_ROWS
    grid = (_cdiv(M, rows), G) if act == "group" else (_cdiv(M, rows),)
    sd = jax.ShapeDtypeStruct
    return jax_triton().triton_call(x2, kernel=quantize_kernel, out_shape=(sd((M, K), jnp.float8_e4m3fn),
                                                                           sd((M, G), jnp.float32)),
                                    grid=grid, num_warps=4, num_stages=1, name="fp8_quantize", M=M, K=K,
                                    PER_GROUP=act == "group", BLOCK_R=rows)


def matmul(x, w, *, config: Config | None = None):
    """x [..., K] @ w (FP8Weight [K, N]) -> [..., N] in x.dtype; see the module docstring."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.fp8.triton_kernels import fp8_matmul_kernel
    if not supports(x, w):
        raise ValueError(f"fp8 gpu matmul: unsupported weight (block {w.block}, act {w.act}, scale "
                         f"{tuple(w.scale.shape)}) or activation dtype {x.dtype}")
    K, N = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return jnp.zeros(lead + (N,), x.dtype)
    c = config or pick_config(M, N, K)
    if fused_quant(w, c):                      # the kernel quantizes x as it loads it
        xq, xs = x2, jnp.ones((1,), jnp.float32)
        groups = _cdiv(K, GROUP)
    else:
        xq, xs = (quant.quantize_activation_fp8 if c.xla_quant else quantize_activation)(x2, w.act, GROUP)
        groups = xs.shape[-1]
    c, grid, consts = launch(M, w, groups, c)
    outs, zeroed = out_shapes(M, N, x.dtype, c, grid)
    y, _, _ = jax_triton().triton_call(xq, xs, w.q, w.scale.astype(jnp.float32), kernel=fp8_matmul_kernel,
                                       out_shape=outs, zeroed_outputs=zeroed, grid=grid, num_warps=c.num_warps,
                                       num_stages=c.num_stages, name="fp8_matmul", **consts)
    if c.split_k > 1 and not c.reduce:
        y = jnp.sum(y, axis=0).astype(x.dtype)
    return y.reshape(lead + (N,))


def out_shapes(M: int, N: int, dtype, c: Config, grid):
    """The kernel's three outputs (c, ws, cnt) and which of them start zeroed: c [M, N] in dtype; with
    split_k > 1, the float32 partials, either as c [split_k, M, N] (summed after the kernel) or, under
    reduce, in ws [split_k, M, N] with a zeroed int32 arrival count per output tile in cnt (the tile's
    last program sums them into c); unused outputs are 1-element placeholders."""
    sd = jax.ShapeDtypeStruct
    none_f, none_i = sd((1,), jnp.float32), sd((1,), jnp.int32)
    if c.split_k == 1:
        return (sd((M, N), dtype), none_f, none_i), ()
    if not c.reduce:
        return (sd((c.split_k, M, N), jnp.float32), none_f, none_i), ()
    return (sd((M, N), dtype), sd((c.split_k, M, N), jnp.float32), sd((grid[0],), jnp.int32)), (2,)
