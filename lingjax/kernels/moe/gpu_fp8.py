"""MoE experts with FP8 weights on Hopper GPUs: the Triton kernels of triton_fp8.py through jax-triton.

    y = grouped(x, layout, w_gate, w_up, w_down)     FP8Weight experts [E, d, I] / [E, I, d] -> [P, d]

lingjax.kernels.moe.experts runs it between make_layout (rows per block: pick_block_m) and combine.
The same steps as the bf16 path (gate_up with SiLU fused, then down),
with the activations quantized as the weights' format says (quant.quantize_activation_fp8's values:
per token or per token and 128-group; x for gate_up, h for down, exactly where the reference path
quantizes; inside the kernels as they load them as an option, fused_quant) and fp8 x fp8 products on the tensor cores with float32 accumulation. `supports` says
whether the kernels take the weights (activations quantized, weight blocks (0, 0), (0, 1), (128, 1) or
(128, 128) with local scales, dims multiples of the tiles); otherwise the dispatch dequantizes
(reference math). Weights in the param layout [E, K, N] or K-major [E, N, K] (quant.with_layout; the
fast one: pipelined weight tiles). The layout of the rows is built as the bf16 GPU path builds it
(pick_layout_method: sort-free at decode sizes). Tiles: `pick_config` by rows per block, as the bf16
kernels (gpu.py); `config=` overrides them. jax_triton is imported inside the functions: it cannot be imported on a CPU-only JAX.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lingjax import quant
from lingjax.kernels.moe.layout import COMPARE_MAX_PAIRS

GROUP = quant.BLOCK


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    quant_a: bool = False        # quantize per-group activations in the kernel (fused_quant) where it can
    quant_h: bool = False        # gate_up: write h quantized (fp8 + per-128-group scales; fused_quant_h)
    xla_quant: bool = True       # quantize the activations by XLA's passes (jnp), else one quantize_kernel launch
    swap_ab: bool = False        # W^T x^T per k-step: the weight tile is the wgmma's 64-row operand (blocks < 64 rows)
    w16: bool = False            # 16-bit products: weight tiles dequantized in the kernel, activations quantize-
                                 # dequantized before it (the reference math; prefill option, session 7)


# Whether pick_config gives blocks of >= 128 rows (prefill sizes) w16 (the reference math on the 16-bit tensor cores,
# the weight tiles dequantized in the kernel). Off until a device measurement says it wins (session 7: prepared, not
# measured; bench_e2e's --fp8-moe-prefill-w16 sets it).
PREFILL_W16 = False


def pick_layout_method(n_pairs: int) -> str:
    """The bf16 GPU path's choice (gpu.py): 'compare' (no sort, a few fused kernels) up to
    COMPARE_MAX_PAIRS pairs, 'sort' above."""
    return "compare" if n_pairs <= COMPARE_MAX_PAIRS else "sort"


def pick_block_m(n_pairs: int, n_experts: int) -> int:
    """Rows per block: at least 64 (about the rows an expert gets on average above that, up to 128).
    Why not 16 at decode sizes as the bf16 path: Triton runs a tl.dot of fewer than 64 rows on sm_90
    as mma.sync, which has no fp8 form there: every fp8 operand is converted to f16 in registers
    (cvt.rn.f16x2.e4m3x2) before an f16 mma. Compiled for sm_90 (flash's experts, T=16), the 16-row
    kernels' loop runs ~90 warp-instructions per KiB of weights (160 with the activations quantized
    in the kernel) against the bf16 kernels' ~20; session 5's device call A measured them at 1.33 TB/s
    (31% of the copy bandwidth; the bf16 ones stream at ~100%). 64-row blocks run the fp8 wgmma, which
    reads both fp8 operands from shared memory (~60-80 per KiB). The padding rows cost no weight bytes
    (an expert's weights are read once per block either way); gate_up writes their h rows (zeros),
    down skips them. Session 6: blocks of 16 rows where an expert gets <= 16 rows on average (decode
    sizes, T <= 512 at flash's top-8 of 256), run with the operands swapped (pick_config's swap_ab for
    blocks < 64 rows: the weight tile is the wgmma's 64+-row operand, the block's rows its N): device
    call B (bench_fp8.py --moe-sweep, flash's experts, T=16) 429.4 us per call against 505.9 with
    64-row blocks (1.18x; other T not measured yet)."""
    avg = n_pairs / max(n_experts, 1)
    return 16 if avg <= 16 else 64 if avg <= 64 else 128


def pick_config(kind: str, block_m: int, K: int, N: int, act: str = "none", dtype=None) -> Config:
    """Static tiles: k-steps of 128 (one scale group; fp8 tiles are half the bytes of bf16 ones, so
    128-deep steps cost what the bf16 kernels' 64-deep ones do), 64-wide gate/up tiles (two weight
    panels each) and 128-wide down tiles; deep pipelines for blocks of <= 32 rows, 3 stages for larger
    blocks. Shrunk to small dims (tiny test models). The activations are quantized before the kernels
    (quant.quantize_activation_fp8, one small XLA pass each): quant_a (in the kernel) is an option for
    sweeps, not the default: every n tile would quantize its rows again, and compiled for sm_90 it
    doubles the 16-row loop's instructions (64-row blocks: x6). Options measured in session 6's call A
    at flash's experts (bench_fp8.py --moe-sweep, T=16 / 64) and left off: gate_up writing h quantized
    (quant_h: 128-wide tiles, 8 warps) 535.6 / 1029.8 us per call against 502.6 / 1002.9 without it
    (the XLA pass over h it saves is smaller than what the wider tiles cost); the quantize_kernel
    launch for x against XLA's passes (xla_quant) 535.6 against 508.1 at T=16. Session 7 (CPU, ptxas for
    sm_90a): at 128-row blocks these 4-warp tiles spill registers (gate_up 8, down 560 bytes of spill stores: a
    [128, 128] float32 accumulator plus the per-k-step product it scales and adds); 8 warps do not, so 128-row
    blocks take 8 warps (bench_fp8's tag P; session 8 call 1, flash's experts at T=4096: 2513.6 us per call
    against 3260.3 with 4 warps, scripts/results/session8/call1/fp8). PREFILL_W16 (16-bit dtype only) gives
    128-row blocks w16 with the bf16 kernels' tiles."""
    bn = 128 if kind == "down" else 64
    c = Config(block_n=bn, block_k=128, group_m=1 if block_m <= 32 else 8, num_warps=4,
               num_stages=4 if block_m <= 32 else 3, quant_a=False)
    if block_m >= 128:        # 8 warps: no register spills (see above)
        c = dataclasses.replace(c, num_warps=8)
    if block_m < 64:          # swapped operands: small accumulators ([BLOCK_N, block_m]), 4 warps, 3-4 stages
        c = dataclasses.replace(c, swap_ab=True, num_warps=4, num_stages=3 if c.block_n * (1 + (kind == "gate_up")) > 128 else 4)
    if block_m >= 128 and PREFILL_W16 and dtype in (jnp.bfloat16, jnp.float16):
        # w16 with the bf16 kernels' large tiles (gpu.LARGE_*; no register spills: ptxas for sm_90a)
        c = Config(block_n=256 if kind == "down" else 128, block_k=64, group_m=16, num_warps=8, num_stages=3,
                   w16=True)
    bn, bk = min(c.block_n, N), min(c.block_k, K)
    if N % bn or K % bk or bn < 16 or bk < 32:
        raise ValueError(f"MoE FP8 GPU kernel: dims K={K}, N={N} must be multiples of the tile ({bk}, {bn}), "
                         f"K >= 32, N >= 16")
    return dataclasses.replace(c, block_n=bn, block_k=bk)


def _weight_ok(w, K: int, N: int) -> bool:
    bk, bn = w.block
    if bk not in (0, GROUP) or bn not in (0, 1, GROUP) or w.q.ndim != 3:
        return False
    nk = 1 if bk == 0 else -(-K // bk)
    nn = 1 if bn == 0 else -(-N // bn)
    return tuple(w.scale.shape[-2:]) == (nk, nn)


def supports(x, w_gate, w_up, w_down) -> bool:
    """Whether the FP8 kernels take these experts (see the module docstring)."""
    E, d, I = w_gate.shape
    if w_gate.act not in ("token", "group") or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return False
    if not (_weight_ok(w_gate, d, I) and _weight_ok(w_up, d, I) and _weight_ok(w_down, I, d)):
        return False
    if w_gate.kmajor != w_up.kmajor:             # one gate_up launch reads both in one layout
        return False
    try:
        pick_config("gate_up", 16, d, I)
        pick_config("down", 16, I, d)
    except ValueError:
        return False
    return True


def fused_quant(act: str, K: int, c: Config) -> bool:
    """Whether a kernel over K input features quantizes its activations itself (QUANT_A): the config
    asks for it, per-group scaling over more than one group, 128-deep k steps."""
    return bool(c.quant_a and not c.swap_ab and act == "group" and K > GROUP and c.block_k == GROUP)


def fused_quant_h(act: str, I: int, c: Config) -> bool:
    """Whether gate_up writes h quantized for down (QUANT_H): the config asks for it, per-group scaling,
    128-wide column tiles (each program holds whole 128-groups of its rows)."""
    return bool(c.quant_h and act == "group" and c.block_n == GROUP and I % GROUP == 0)


H_ROUND = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}


def _check_w16(a, c: Config):
    if c.w16 and (c.swap_ab or c.quant_a or c.quant_h or a.dtype not in (jnp.bfloat16, jnp.float16)):
        raise ValueError(f"MoE FP8 GPU kernel: w16 takes 16-bit activations (got {a.dtype}) and no swap_ab, "
                         f"quant_a or quant_h")


def _act_parts(a, act: str, K: int, c: Config):
    """(activations, scales, groups) a kernel call takes: a itself and a dummy scale under QUANT_A; under w16
    a quantize-dequantized in its dtype (quant.quantize_activation) and a dummy scale."""
    _check_w16(a, c)
    if c.w16:
        return quant.quantize_activation(a, act, GROUP), jnp.ones((1,), jnp.float32), 1
    if fused_quant(act, K, c):
        return a, jnp.ones((1,), jnp.float32), -(-K // GROUP)
    from lingjax.kernels.fp8.gpu import quantize_activation        # one Triton launch, the same values
    aq, s = (quant.quantize_activation_fp8 if c.xla_quant else quantize_activation)(a, act, GROUP)
    return aq, s, s.shape[-1]


def scale_args(a_groups: int, w, N: int, block_k: int, quant_a: bool = False) -> dict:
    """The scale constexprs of a kernel call (shared with the interpreter tests); quant_a: QUANT_A
    (a_groups must then be the 128-groups of the input features)."""
    nk, nn = w.scale.shape[-2:]
    a_per_k = int(a_groups > 1)
    b_per_k = int(w.block[0] != 0 and nk > 1)
    if (a_per_k or b_per_k) and GROUP % block_k:
        raise ValueError(f"MoE FP8 GPU kernel: block_k {block_k} must divide {GROUP} with per-group scales")
    return dict(GA=a_groups, A_PER_K=a_per_k, NK=nk, NN=nn, B_PER_K=b_per_k,
                B_BLOCK_N={0: N, 1: 1}.get(w.block[1], w.block[1]), PER_K_SCALE=bool(a_per_k or b_per_k),
                B_KMAJOR=bool(w.kmajor), QUANT_A=bool(quant_a))


def gate_up(x, layout, w_gate, w_up, out_dtype, *, config: Config | None = None):
    """h [P, I] = silu(x Wg[e]) * (x Wu[e]) over the layout's rows, fp8 products, float32 sums, out_dtype;
    x [T, d] unquantized, quantized per the weights' format (in the kernel under fused_quant). Under
    fused_quant_h: (h_q float8_e4m3fn [P, I], h_s float32 [P, I / 128]), h rounded to out_dtype and
    quantized per 128-group in the kernel (padding rows unwritten)."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.moe.triton_fp8 import gate_up_fp8_kernel
    jt = jax_triton()
    T, d = x.shape
    I = w_gate.shape[-1]
    nb, bm = layout.block_expert.shape[0], layout.block_m
    c = config or pick_config("gate_up", bm, d, I, w_gate.act, out_dtype)
    xq, xs, groups = _act_parts(x, w_gate.act, d, c)
    sa = scale_args(groups, w_gate, I, c.block_k, fused_quant(w_gate.act, d, c))
    qh = fused_quant_h(w_gate.act, I, c)
    sd = jax.ShapeDtypeStruct
    outs = ((sd((nb * bm, I), jnp.float8_e4m3fn), sd((nb * bm, I // GROUP), jnp.float32)) if qh else
            (sd((nb * bm, I), out_dtype), sd((1,), jnp.float32)))
    h, hs = jt.triton_call(
        xq, xs, layout.row_token, layout.block_expert, w_gate.q, w_gate.scale.astype(jnp.float32),
        w_up.q, w_up.scale.astype(jnp.float32), kernel=gate_up_fp8_kernel,
        out_shape=outs, grid=(nb * (I // c.block_n),),
        num_warps=c.num_warps, num_stages=c.num_stages, name="moe_gate_up_fp8",
        N_TOKENS=T, K=d, N=I, NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=c.group_m, QUANT_H=qh, H_ROUND=H_ROUND[jnp.dtype(out_dtype)], SWAP_AB=c.swap_ab, W16=c.w16, **sa)
    return (h, hs) if qh else h


def down(h, layout, w_down, out_dtype, n_tokens: int, *, config: Config | None = None):
    """y [P, d] = h Wd[e] per block, fp8 products, float32 sums, out_dtype; h [P, I] unquantized,
    quantized per the weights' format (in the kernel under fused_quant), or gate_up's quantized
    (h_q, h_s) (QUANT_H). Rows of the layout's padding
    (row_token == n_tokens, the T of gate_up's x) are not read and stay unwritten in y."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.moe.triton_fp8 import down_fp8_kernel
    jt = jax_triton()
    P, I = (h[0] if isinstance(h, tuple) else h).shape
    d = w_down.shape[-1]
    nb, bm = layout.block_expert.shape[0], layout.block_m
    c = config or pick_config("down", bm, I, d, w_down.act, out_dtype)
    if isinstance(h, tuple):                   # gate_up's QUANT_H output: already quantized per 128-group
        (hq, hs), groups = h, h[1].shape[-1]
        if fused_quant(w_down.act, I, c):
            raise ValueError("MoE FP8 down: quant_a with an already quantized h")
    else:
        hq, hs, groups = _act_parts(h, w_down.act, I, c)
    sa = scale_args(groups, w_down, d, c.block_k, fused_quant(w_down.act, I, c))
    return jt.triton_call(
        hq, hs, layout.row_token, layout.block_expert, w_down.q, w_down.scale.astype(jnp.float32),
        kernel=down_fp8_kernel, out_shape=jax.ShapeDtypeStruct((P, d), out_dtype), grid=(nb * (d // c.block_n),),
        num_warps=c.num_warps, num_stages=c.num_stages, name="moe_down_fp8",
        N_TOKENS=n_tokens, K=I, N=d, NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        SWAP_AB=c.swap_ab, W16=c.w16, **sa)


def grouped(x, layout, w_gate, w_up, w_down, *, gate_up_config: Config | None = None,
            down_config: Config | None = None):
    """The two FP8 grouped matmuls over a layout (make_layout with pick_block_m's rows per block):
    x [T, d] -> y [P, d] in x.dtype, the activations quantized per the weights' format for each
    (before it; inside it where a config asks for it: fused_quant)."""
    h = gate_up(x, layout, w_gate, w_up, x.dtype, config=gate_up_config)
    return down(h, layout, w_down, x.dtype, x.shape[0], config=down_config)


# ---------------------------------------------------------------------------------------------- decode path
# Token counts up to which experts() runs experts_decode (no layout: triton_fp8_decode.py's kernels over the
# pairs) for FP8 weights by default. 0: never, until a device measurement says it wins over the grouped path
# (session 7: prepared, not measured; experts(decode=True) and the benchmarks' --fp8-moe-decode run it).
DECODE_MAX_TOKENS = 0
# Whether pick_decode_config's down quantizes h itself (quant_a) rather than one XLA pass before it. Off until
# measured (session 7: prepared, not measured; the benchmarks' --fp8-moe-quant-h sets it).
DECODE_QUANT_H = False


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """One FP8 decode kernel's launch (triton_fp8_decode.py): [BLOCK_K, block_n] weight tiles; swap_ab: the
    weight tile as the wgmma's 64+-row operand (rows per program < 64); quant_a (down, per-128-group
    activations): h quantized in the kernel as it is loaded, else by one XLA pass before it; n_first: the n
    tiles of one pair consecutive in the launch order."""
    block_n: int
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = True
    quant_a: bool = False
    n_first: bool = False

    def grid(self, n_pairs: int, N: int) -> tuple:
        """The launch grid over n_pairs pairs and N output columns (triton_fp8_decode.py's N_FIRST order)."""
        return (N // self.block_n, n_pairs) if self.n_first else (n_pairs, N // self.block_n)


def decode_rows(n_tokens: int) -> int:
    """Rows per program (M): 16 (the least tl.dot takes; swapped operands, the weight tile the wgmma's 64+-row
    operand). An expert with more than 16 pairs gets one program per 16 of them (each reads its weights again:
    at decode sizes an expert gets ~T * k / E pairs, 2 at flash's T=64). Why not M = the expert's most pairs
    (<= T), as the bf16 decode path: the programs find their rows by an [M, PAIRS] comparison of the routing ids
    (triton_decode._expert_rows), which at T=64 with M=64 ([64, 512]) takes every register and spills (ptxas
    for sm_90a: 255 registers, 572 / 3048 bytes of spill stores in gate_up / down; M=16: none)."""
    del n_tokens
    return 16


def pick_decode_config(kind: str, n_tokens: int, K: int, N: int) -> DecodeConfig:
    """The grouped path's decode tiles at M rows (pick_config: gate/up 64-wide, down 128-wide, 128-deep k
    steps, swapped operands under 64 rows, 4 warps, 3-4 stages), h quantized by XLA's pass (down's quant_a:
    DECODE_QUANT_H), and the bf16 decode path's launch order (n tiles of a pair first from 4 tokens:
    gpu.pick_decode_config). Not measured on a device yet (session 7)."""
    c = pick_config(kind, decode_rows(n_tokens), K, N)
    return DecodeConfig(block_n=c.block_n, block_k=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages,
                        swap_ab=c.swap_ab, quant_a=kind == "down" and DECODE_QUANT_H, n_first=n_tokens >= 4)


def experts_decode(x, idx, weights, w_gate, w_up, w_down, *, gate_up_config: DecodeConfig | None = None,
                   down_config: DecodeConfig | None = None):
    """The routed experts of a few tokens with FP8 weights, without the layout: x [T, d]; idx [T, k] int32
    local expert ids (others dropped); weights [T, k] float32; FP8Weight experts [E, d, I] / [E, I, d] that
    `supports` takes -> [T, d] in x.dtype. The grouped path's math (gpu_fp8.grouped + combine): x quantized
    per the weights' format (one XLA pass), gate_up writes h [T * k, I] in x.dtype, h quantized (one XLA pass,
    or in down: quant_a), down writes y [T * k, d] in x.dtype, the pairs combined with the routing weights in
    float32 (gpu.combine_pairs: one XLA fusion). Three or four launches, no layout."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.moe import triton_fp8_decode as tk
    from lingjax.kernels.moe.gpu import combine_pairs
    jt = jax_triton()
    T, d = x.shape
    k = idx.shape[1]
    E, _, I = w_gate.shape
    n = T * k
    cg = gate_up_config or pick_decode_config("gate_up", T, d, I)
    cd = down_config or pick_decode_config("down", T, I, d)
    flat = idx.reshape(-1).astype(jnp.int32)
    xq, xs = quant.quantize_activation_fp8(x, w_gate.act, GROUP)
    launch, consts = decode_launch("gate_up", T, k, w_gate, xs.shape[-1], cg)
    h = jt.triton_call(
        xq, xs, flat, w_gate.q, w_gate.scale.astype(jnp.float32), w_up.q, w_up.scale.astype(jnp.float32),
        kernel=tk.gate_up_fp8_decode_kernel, out_shape=jax.ShapeDtypeStruct((n, I), x.dtype),
        name="moe_gate_up_fp8_decode", **launch, **consts)
    if decode_quant_a(w_down, cd):
        hq, hs, groups = h, jnp.ones((1,), jnp.float32), I // GROUP
    else:
        hq, hs = quant.quantize_activation_fp8(h, w_down.act, GROUP)
        groups = hs.shape[-1]
    launch, consts = decode_launch("down", T, k, w_down, groups, cd)
    y = jt.triton_call(
        hq, hs, flat, w_down.q, w_down.scale.astype(jnp.float32), kernel=tk.down_fp8_decode_kernel,
        out_shape=jax.ShapeDtypeStruct((n, d), x.dtype), name="moe_down_fp8_decode", **launch, **consts)
    return combine_pairs(y[None], idx, weights, E).astype(x.dtype)


def decode_quant_a(w_down, c: DecodeConfig) -> bool:
    """Whether down quantizes h itself (QUANT_A): the config asks for it, per-128-group activations over more
    than one group, 128-deep k steps."""
    I = w_down.shape[-2]
    return bool(c.quant_a and w_down.act == "group" and I > GROUP and c.block_k == GROUP)


def decode_launch(kind: str, n_tokens: int, top_k: int, w, a_groups: int, c: DecodeConfig):
    """(launch kwargs: grid, num_warps, num_stages; the kernel's constexprs) of one decode kernel (kind
    'gate_up' or 'down') over n_tokens x top_k pairs with weight w (FP8Weight [E, K, N]) and activations of
    a_groups scale groups (shared with the interpreter tests)."""
    E, K, N = w.shape
    n = n_tokens * top_k
    if N % c.block_n or K % c.block_k or c.block_n < 16 or c.block_k < 32:
        raise ValueError(f"MoE FP8 decode kernel: dims K={K}, N={N} must be multiples of the tile "
                         f"({c.block_k}, {c.block_n}), tiles >= (32, 16)")
    qa = kind == "down" and decode_quant_a(w, c)
    consts = {key: v for key, v in scale_args(a_groups, w, N, c.block_k, qa).items() if key != "QUANT_A"}
    consts.update(PAIRS=n, E=E, K=K, N=N, M=decode_rows(n_tokens), Q=1 << max(n - 1, 0).bit_length(),
                  BLOCK_N=c.block_n, BLOCK_K=c.block_k, SWAP_AB=c.swap_ab, N_FIRST=c.n_first)
    if kind == "gate_up":
        consts["TOP_K"] = top_k
    else:
        consts["QUANT_A"] = qa
    return dict(grid=c.grid(n, N), num_warps=c.num_warps, num_stages=c.num_stages), consts
