"""The FP8 Triton kernel bodies (dense: lingjax/kernels/fp8/triton_kernels.py; MoE grouped:
lingjax/kernels/moe/triton_fp8.py, its W16 option too; the MoE decode path: lingjax/kernels/moe/triton_fp8_decode.py)
in Triton's CPU interpreter.

jax-triton cannot run on a CPU-only JAX, so this process builds each case's operands with lingjax's own
code (quant.quantize_block / quantize_channel / quantize_tensor + from_hf for the weights,
quant.quantize_activation_fp8 for the activations, kernels.moe.make_layout for the expert layout), saves
them, and a child process (TRITON_INTERPRET=1 set before triton is imported) launches the kernels on torch
CPU tensors with the launch parameters the jax-triton wrappers compute (fp8.gpu.launch,
moe.gpu_fp8.pick_config / scale_args). float8_e4m3fn loads and fp8 tl.dot work in the interpreter
(checked here: the kernels read the stored fp8 bytes), so no decoding is needed; the outputs are float32
(bfloat16 stores are wrong in the interpreter: bf16 is checked on the device by scripts/bench_fp8.py)
and float16 once.

Tolerances. Against float64 numpy of the same fp8 operands and scales (the kernels' exact math):
float32 outputs within 1e-5 relative (float32 accumulation over <= 384 terms and float32 scale
products: ~1e-7 relative per step), float16 outputs within 1e-3 (float16 rounding, 2^-11). Against the
unquantized float64 product: within 0.08 relative, the float8_e4m3fn rounding of both operands (at
most 2^-4 relative each, RMS about 2^-4/sqrt(3) = 3.6%, so ~5% for a product; measured 3-5%), which
checks that the scales were chosen and applied per the right blocks. The dense path is also checked
against lingjax's reference FP8 matmul (quant.matmul, float32) within 1e-5: the GPU path computes what
the CPU path does. MoE: gate_up's padding rows give zeros, down leaves them unwritten (combine never
reads them), unused blocks stay unwritten."""
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.triton_interpreter import run_child

pytest.importorskip("torch")
pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lingjax.kernels.fp8.triton_kernels import _round_e4m3  # noqa: E402


# dense: (name, weight strategy, act, M, K, N, config (block_m, block_n, block_k, split_k) or None, out dtype)
DENSE = [
    ("block-decode", "block", "group", 1, 384, 200, None, "float32"),
    ("block-split3", "block", "group", 5, 384, 96, (16, 32, 128, 3), "float32"),
    ("block-k64-tail", "block", "group", 40, 320, 136, (16, 64, 64, 1), "float32"),
    ("column-group", "column", "group", 17, 256, 96, (16, 32, 128, 2), "float32"),
    ("channel-token", "channel", "token", 33, 320, 96, (32, 64, 64, 1), "float32"),
    ("channel-group", "channel", "group", 3, 256, 64, (16, 32, 128, 1), "float32"),
    ("tensor-token-f16", "tensor", "token", 20, 256, 80, (16, 32, 128, 1), "float16"),
    ("channel-group-fused", "channel", "group", 17, 256, 96, (16, 32, 128, 2, 8, 4, 4, True), "float32"),
    ("block-fused-f16", "block", "group", 6, 320, 136, (16, 64, 128, 1, 8, 4, 4, True), "float16"),
    # swap_ab (y^T = w^T x^T: the weight tile is the wgmma's 64-row operand) and split-K summed in the kernel
    ("block-swap-reduce3", "block", "group", 5, 384, 200, (16, 64, 128, 3, 8, 4, 4, False, True, True), "float32"),
    ("channel-swap-f16", "channel", "token", 20, 256, 96, (32, 32, 128, 1, 8, 4, 4, False, True), "float16"),
    ("column-reduce2", "column", "group", 17, 256, 96, (16, 32, 128, 2, 8, 4, 4, False, False, True), "float32"),
    # the decode config (gpu.decode_config): swapped operands with the activations quantized in the kernel
    ("block-swap-fused3", "block", "group", 5, 384, 200, (16, 64, 128, 3, 8, 4, 4, True, True), "float32"),
]
# MoE: (name, weight strategy, act, T, k, E, block_m, out dtype)
MOE = [
    ("block-decode", "block", "group", 1, 2, 4, 16, "float32"),
    ("block-many", "block", "group", 40, 2, 4, 16, "float32"),
    ("channel-token", "channel", "token", 24, 2, 4, 16, "float32"),
    ("channel-token-bm32", "channel", "token", 33, 3, 4, 32, "float16"),
]
D, I = 256, 256                     # MoE dims: two 128-groups each
# the activation quantization kernel (quantize_kernel): (name, act, M, K, input dtype)
QUANT = [("group", "group", 21, 384, "float32"), ("group-tail-f16", "group", 5, 200, "float16"),
         ("token", "token", 18, 320, "float32"), ("token-one-group", "group", 3, 96, "float32")]
# cases also run with the weights stored K-major ([N, K] / [E, N, K], quant.with_layout: B_KMAJOR)
KMAJOR_DENSE = ("block-decode", "block-k64-tail", "column-group", "channel-token", "tensor-token-f16",
                "block-fused-f16", "block-swap-reduce3", "channel-swap-f16", "block-swap-fused3")
KMAJOR_MOE = ("block-many", "channel-token-bm32")
# cases whose launch quantizes the activations in the kernel (gpu.fused_quant: per-group scales, 128-deep
# k-steps, a config with quant_a: an option, not pick_config's default): the kernel reads x itself
FUSED_DENSE = ("channel-group-fused", "block-fused-f16", "block-swap-fused3")
FUSED_MOE = ("block-decode", "block-many")       # also run with QUANT_A (gpu_fp8.fused_quant), K-major
# gate_up also run with QUANT_H (h quantized in its epilogue: 128-wide tiles; K-major), H_ROUND of the dtype
QUANT_H_MOE = {"block-decode": "float16", "block-many": "float32"}
# both kernels also run with W16 (the reference math on 16-bit products: x / h quantize-dequantized in float16, the
# weight tiles dequantized in the kernel; K-major; float16 outputs)
W16_MOE = ("block-many",)

# the MoE decode path (triton_fp8_decode.py, launched as gpu_fp8.decode_launch says): (name, weight strategy, act, T,
# k, E, swap_ab, quant_a (down quantizes h), K-major, out dtype); per pair q (token q // k, expert idx[q]): gate_up's
# h[q] and down's y[q] (fed an independent h); ids outside [0, E) (another device's experts) dropped
DECODE = [
    ("block-swap-quant-h", "block", "group", 3, 2, 4, True, True, True, "float32"),
    ("block-swap-param", "block", "group", 4, 2, 4, True, False, False, "float32"),
    ("block-plain-param", "block", "group", 5, 2, 4, False, False, False, "float32"),
    ("block-plain-quant-h", "block", "group", 5, 2, 4, False, True, True, "float32"),
    ("block-two-leaders", "block", "group", 18, 2, 2, True, False, True, "float32"),
    ("channel-token-f16", "channel", "token", 4, 2, 4, True, False, True, "float16"),
]


@functools.lru_cache(maxsize=None)
def _dec_weights(strategy, act, E=4):
    """E experts' gate / up / down FP8 weights of one format (built once per format: the cases share them)."""
    rng = np.random.default_rng(len(strategy) + len(act))
    return {n: [_weight(rng, o, i, strategy, act) for _ in range(E)] for n, (o, i) in
            dict(g=(I, D), u=(I, D), d=(D, I)).items()}


DEC_ROWS = 64                                          # activation rows per case: x <= T, h <= T * k


@functools.lru_cache(maxsize=None)
def _dec_acts(act):
    """2 * DEC_ROWS activation rows of varied magnitude and their quantization (per row, or per row and
    128-group): x and h of every case are rows of these."""
    rng = np.random.default_rng(len(act))
    a = rng.standard_normal((2 * DEC_ROWS, D)) * np.exp(rng.uniform(-1, 1, (2 * DEC_ROWS, 1)))
    return (a,) + _act_parts(a, act)


def _decode_inputs(case):
    name, strategy, act, T, k, E, *_ = case
    rng = np.random.default_rng(len(name) * 13 + T)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    idx[0, 1] = -1                                   # dropped pairs: another device's experts
    idx[-1, 0] = E
    ws = {n: lst[:E] for n, lst in _dec_weights(strategy, act).items()}
    a, aq, as_ = _dec_acts(act)                      # per-row quantization: rows of one quantized array
    x, h = slice(0, T), slice(DEC_ROWS, DEC_ROWS + T * k)
    out = dict(idx=idx, x=a[x], h=a[h], xq=aq[x], xs=as_[x], hq=aq[h], hs=as_[h])
    return _with_weights(out, ws)


def _with_weights(out, ws):
    """out (activations) + the experts' weights ws {name: [(FP8 param, float weight)]}: quantized values (as
    uint8, also K-major), scales, float64 dequantized and the float originals, for a child case."""
    for n, lst in ws.items():
        out[f"w{n}q"] = np.stack([p.q for p, _ in lst])
        out[f"w{n}s"] = np.stack([np.asarray(p.scale, np.float32) for p, _ in lst])
        out[f"w{n}64"] = np.stack([_dequant(p) for p, _ in lst])
        out[f"w{n}full"] = np.stack([w for _, w in lst])
        out["block"] = np.array(lst[0][0].block)
    for key in ("xq", "hq", "wgq", "wuq", "wdq"):
        out[key] = _u8(out[key])
    for key in ("wgq", "wuq", "wdq"):
        out[key + "_k"] = _u8(np.swapaxes(out[key], 1, 2))
    return out


def _fmt(strategy, act):
    from lingjax import quant
    if strategy == "column":                 # a block tensor split at a non-multiple of 128: per-row scales
        return quant.Format("fp8", "block", act)
    return quant.Format("fp8" if strategy == "block" else "compressed-tensors", strategy, act)


def _weight(rng, n_out, n_in, strategy, act):
    """(FP8Weight in the param layout [in, out] (numpy), float64 weight before quantization)."""
    from lingjax import quant
    fmt = _fmt(strategy, act)
    if strategy == "column":                 # a fused tensor split at a non-multiple of 128 (n_out rows)
        w = rng.standard_normal((2 * n_out, n_in)) / np.sqrt(n_in)
        q, s = quant.quantize_block(w.astype(np.float32))
        p = quant.from_hf("splitT", [q], [s], fmt, n_parts=2)[0]
        assert p.block == (128, 1), p.block
        return p, w[:n_out].T
    w = rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
    q, s = fmt.quantize(w.astype(np.float32))
    [p] = quant.from_hf("T", [q], [s], fmt)
    return p, w.T


def _dequant(p):
    from lingjax import quant
    import jax
    return np.asarray(quant.dequantize(jax.tree.map(np.asarray, p)), np.float64)


def _act_parts(x, act):
    import jax.numpy as jnp
    from lingjax import quant
    q, s = quant.quantize_activation_fp8(jnp.asarray(x, jnp.float32), act)
    return np.asarray(q), np.asarray(s, np.float32)


def _act_dequant(q, s):
    G = s.shape[-1]
    size = 128 if G > 1 else q.shape[-1]
    return q.astype(np.float64) * np.repeat(s.astype(np.float64), size, axis=-1)[..., : q.shape[-1]]


def _u8(a):
    return np.ascontiguousarray(a).view(np.uint8)


def _dense_inputs(case):
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    name, strategy, act, M, K, N, cfg, out = case
    rng = np.random.default_rng(len(name) * 31 + M)
    x = rng.standard_normal((M, K)) * np.exp(rng.uniform(-2, 2, (M, 1)))
    if name in FUSED_DENSE:                 # the kernel reads x in the output dtype (float32 / float16)
        x = x.astype(out).astype(np.float64)
    p, w64 = _weight(rng, N, K, strategy, act)
    xq, xs = _act_parts(x, act)
    ref = np.asarray(quant.matmul(jnp.asarray(x, jnp.float32), jax.tree.map(jnp.asarray, p)), np.float64)
    exact = _act_dequant(xq, xs) @ _dequant(p)
    return dict(x=x.astype(np.float32), xq=_u8(xq), xs=xs, wq=_u8(p.q), wq_k=_u8(p.q.T),
                ws=np.asarray(p.scale, np.float32), block=np.array(p.block), act=np.array(act), exact=exact, ref=ref, full=x @ w64)


def _moe_inputs(case):
    import jax.numpy as jnp
    from lingjax.kernels.moe import make_layout
    name, strategy, act, T, k, E, bm, out = case
    rng = np.random.default_rng(len(name) * 17 + T)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    lay = make_layout(jnp.asarray(idx), E, bm)
    ws = {n: [_weight(rng, o, i, strategy, act) for _ in range(E)] for n, (o, i) in
          dict(g=(I, D), u=(I, D), d=(D, I)).items()}
    x = rng.standard_normal((T, D))
    h = rng.standard_normal((len(lay.row_token), I))
    h[np.asarray(lay.row_token) == T] = 0.0          # padding rows of h are zero (as gate_up writes them)
    out = dict(row_token=np.asarray(lay.row_token), block_expert=np.asarray(lay.block_expert), x=x, h=h)
    out["xq"], out["xs"] = _act_parts(x, act)
    out["hq"], out["hs"] = _act_parts(h, act)
    return _with_weights(out, ws)


# ------------------------------------------------------------------------------------------ child
def _child(workdir):
    """Runs with TRITON_INTERPRET=1: launches the kernels on the saved operands, saves the outputs."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from lingjax import quant
    from lingjax.kernels.fp8 import gpu
    from lingjax.kernels.fp8.triton_kernels import fp8_matmul_kernel
    from lingjax.kernels.moe import gpu_fp8
    from lingjax.kernels.moe.triton_fp8 import down_fp8_kernel, gate_up_fp8_kernel
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))                      # noqa: E731
    f8 = lambda a: tt(a).view(torch.float8_e4m3fn)                                # noqa: E731
    sentinel = 1027.0
    _round_check(workdir)
    from lingjax.kernels.fp8.triton_kernels import quantize_kernel
    for name, act, M, K, dt in QUANT:
        x = np.load(Path(workdir) / f"quant-{name}.npy")
        G = -(-K // 128) if act == "group" else 1
        q = torch.zeros((M, K), dtype=torch.uint8).view(torch.float8_e4m3fn)
        sc = torch.full((M, G), sentinel, dtype=torch.float32)
        grid = (-(-M // gpu.QUANT_ROWS), G) if act == "group" else (-(-M // gpu.QUANT_ROWS),)
        quantize_kernel[grid](tt(x).to(getattr(torch, dt)), q, sc, M=M, K=K, PER_GROUP=act == "group",
                              BLOCK_R=gpu.QUANT_ROWS)
        np.savez(Path(workdir) / f"quant-{name}-out.npz", q=q.view(torch.uint8).numpy(), s=sc.numpy())
    for case in DENSE:
        name, _, _, M, K, N, cfg, out = case
        z = np.load(Path(workdir) / f"dense-{name}.npz")
        for kmajor in (False, True) if name in KMAJOR_DENSE else (False,):
            wq = z["wq_k"] if kmajor else z["wq"]
            w = quant.FP8Weight(wq.view(quant.FP8_NP), z["ws"], tuple(int(b) for b in z["block"]), str(z["act"]),
                                kmajor)
            N = w.shape[1]
            config = gpu.Config(*cfg) if cfg else None
            c, grid, consts = gpu.launch(M, w, z["xs"].shape[-1], config)
            assert consts["B_KMAJOR"] == kmajor
            assert consts["QUANT_A"] == (name in FUSED_DENSE), name
            outs, zeroed = gpu.out_shapes(M, N, out, c, grid)
            bufs = [torch.zeros(o.shape, dtype=getattr(torch, str(o.dtype))) if i in zeroed else
                    torch.full(o.shape, sentinel, dtype=getattr(torch, str(o.dtype))) for i, o in enumerate(outs)]
            a = tt(z["x"]).to(getattr(torch, out)) if consts["QUANT_A"] else f8(z["xq"])   # the kernel quantizes x
            fp8_matmul_kernel[grid](a, tt(z["xs"]), f8(wq), tt(z["ws"]), *bufs, **consts)
            y = bufs[0].double()
            if c.split_k > 1 and not c.reduce:
                y = y.sum(0)
            if consts["REDUCE"]:
                assert np.all(bufs[2].numpy() == c.split_k), "every split must arrive once per tile"
            np.save(Path(workdir) / f"dense-{name}-out{'-kmajor' if kmajor else ''}.npy", y.numpy())
    for case in MOE:
        name, _, act, T, k, E, bm, out = case
        z = np.load(Path(workdir) / f"moe-{name}.npz")
        blk = tuple(int(b) for b in z["block"])
        # (K-major, QUANT_A, swap_ab: None = pick_config's, which swaps for blocks of < 64 rows)
        variants = ([(False, False, None)] + [(True, False, None), (True, False, False)] * (name in KMAJOR_MOE)
                    + [(True, True, False)] * (name in FUSED_MOE))
        for kmajor, fused, swap in variants:
            sw = {} if swap is None else dict(swap_ab=swap)
            sfx = "_k" if kmajor else ""
            wg = quant.FP8Weight(z["wgq" + sfx].view(quant.FP8_NP), z["wgs"], blk, act, kmajor)
            wd = quant.FP8Weight(z["wdq" + sfx].view(quant.FP8_NP), z["wds"], blk, act, kmajor)
            nb, P = len(z["block_expert"]), len(z["row_token"])
            dt = getattr(torch, out)
            h = torch.full((P, I), sentinel, dtype=dt)
            y = torch.full((P, D), sentinel, dtype=dt)
            c = dataclass_replace(gpu_fp8.pick_config("gate_up", bm, D, I), block_n=32, group_m=2, quant_a=fused, **sw)
            assert c.swap_ab == (bm < 64 if swap is None else swap)
            assert gpu_fp8.fused_quant(act, D, c) == fused
            # under QUANT_A the kernels read x / h unquantized (float32 here) and quantize them themselves
            xa, ha = (tt(z["x"]).float(), tt(z["h"]).float()) if fused else (f8(z["xq"]), f8(z["hq"]))
            sa = gpu_fp8.scale_args(z["xs"].shape[-1], wg, I, c.block_k, fused)
            assert sa["B_KMAJOR"] == kmajor and sa["QUANT_A"] == fused
            gate_up_fp8_kernel[(nb * (I // c.block_n),)](
                xa, tt(z["xs"]), tt(z["row_token"]), tt(z["block_expert"]), f8(z["wgq" + sfx]),
                tt(z["wgs"]), f8(z["wuq" + sfx]), tt(z["wus"]), h, torch.zeros(1), N_TOKENS=T, K=D, N=I,
                NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
                QUANT_H=False, H_ROUND=0, SWAP_AB=c.swap_ab, **sa)
            c = dataclass_replace(gpu_fp8.pick_config("down", bm, I, D), block_n=64, block_k=128 if fused else 64,
                                  group_m=2, quant_a=fused, **sw)
            assert gpu_fp8.fused_quant(act, I, c) == fused
            down_fp8_kernel[(nb * (D // c.block_n),)](
                ha, tt(z["hs"]), tt(z["row_token"]), tt(z["block_expert"]), f8(z["wdq" + sfx]), tt(z["wds"]), y,
                N_TOKENS=T, K=I, N=D,
                NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
                SWAP_AB=c.swap_ab, **gpu_fp8.scale_args(z["hs"].shape[-1], wd, D, c.block_k, fused))
            tag = ("-kmajor" if kmajor else "") + ("-fused" if fused else "-noswap" if swap is False else "")
            np.savez(Path(workdir) / f"moe-{name}-out{tag}.npz", h=h.double().numpy(), y=y.double().numpy())
        if name in W16_MOE:
            wg = quant.FP8Weight(z["wgq_k"].view(quant.FP8_NP), z["wgs"], blk, act, True)
            wd = quant.FP8Weight(z["wdq_k"].view(quant.FP8_NP), z["wds"], blk, act, True)
            nb, P = len(z["block_expert"]), len(z["row_token"])
            xa = tt(_act_dequant(z["xq"].view(_f8()), z["xs"])).half()
            ha = tt(_act_dequant(z["hq"].view(_f8()), z["hs"])).half()
            h = torch.full((P, I), sentinel, dtype=torch.float16)
            y = torch.full((P, D), sentinel, dtype=torch.float16)
            c = dataclass_replace(gpu_fp8.pick_config("gate_up", 64, D, I), block_n=64, block_k=64, group_m=2, w16=True)
            gate_up_fp8_kernel[(nb * (I // c.block_n),)](
                xa, torch.ones(1), tt(z["row_token"]), tt(z["block_expert"]), f8(z["wgq_k"]), tt(z["wgs"]),
                f8(z["wuq_k"]), tt(z["wus"]), h, torch.zeros(1), N_TOKENS=T, K=D, N=I, NUM_BLOCKS=nb, BLOCK_M=bm,
                BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m, QUANT_H=False, H_ROUND=0, SWAP_AB=False,
                W16=True, **gpu_fp8.scale_args(1, wg, I, c.block_k))
            c = dataclass_replace(gpu_fp8.pick_config("down", 64, I, D), block_n=64, block_k=128, group_m=2, w16=True)
            down_fp8_kernel[(nb * (D // c.block_n),)](
                ha, torch.ones(1), tt(z["row_token"]), tt(z["block_expert"]), f8(z["wdq_k"]), tt(z["wds"]), y,
                N_TOKENS=T, K=I, N=D, NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                GROUP_M=c.group_m, SWAP_AB=False, W16=True, **gpu_fp8.scale_args(1, wd, D, c.block_k))
            np.savez(Path(workdir) / f"moe-{name}-out-w16.npz", h=h.double().numpy(), y=y.double().numpy())
        if name in QUANT_H_MOE:
            hdt = QUANT_H_MOE[name]
            wg = quant.FP8Weight(z["wgq_k"].view(quant.FP8_NP), z["wgs"], blk, act, True)
            c = dataclass_replace(gpu_fp8.pick_config("gate_up", bm, D, I, act), block_n=128, quant_h=True)
            assert gpu_fp8.fused_quant_h(act, I, c)
            nb, P = len(z["block_expert"]), len(z["row_token"])
            hq = torch.full((P, I), 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)     # NaN: unwritten
            hs = torch.full((P, I // 128), sentinel, dtype=torch.float32)
            gate_up_fp8_kernel[(nb * (I // c.block_n),)](
                f8(z["xq"]), tt(z["xs"]), tt(z["row_token"]), tt(z["block_expert"]), f8(z["wgq_k"]),
                tt(z["wgs"]), f8(z["wuq_k"]), tt(z["wus"]), hq, hs, N_TOKENS=T, K=D, N=I, NUM_BLOCKS=nb,
                BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m, QUANT_H=True,
                H_ROUND=gpu_fp8.H_ROUND[np.dtype(hdt)], SWAP_AB=c.swap_ab, **gpu_fp8.scale_args(z["xs"].shape[-1], wg, I, c.block_k))
            np.savez(Path(workdir) / f"moe-{name}-quant-h.npz", hq=hq.view(torch.uint8).numpy(), hs=hs.numpy())
    import dataclasses
    from lingjax.kernels.moe.triton_fp8_decode import down_fp8_decode_kernel, gate_up_fp8_decode_kernel
    for name, _, act, T, k, E, swap, qa, kmajor, out in DECODE:
        z = np.load(Path(workdir) / f"dec-{name}.npz")
        blk = tuple(int(b) for b in z["block"])
        sfx = "_k" if kmajor else ""
        wg = quant.FP8Weight(z["wgq" + sfx].view(quant.FP8_NP), z["wgs"], blk, act, kmajor)
        wd = quant.FP8Weight(z["wdq" + sfx].view(quant.FP8_NP), z["wds"], blk, act, kmajor)
        cg = dataclasses.replace(gpu_fp8.pick_decode_config("gate_up", T, D, I), block_n=128, swap_ab=swap)
        cd = dataclasses.replace(gpu_fp8.pick_decode_config("down", T, I, D), block_n=128, swap_ab=swap, quant_a=qa)
        assert gpu_fp8.decode_quant_a(wd, cd) == qa
        dt = getattr(torch, out)
        flat = tt(z["idx"].reshape(-1))
        h = torch.full((T * k, I), sentinel, dtype=dt)
        y = torch.full((T * k, D), sentinel, dtype=dt)
        launch, consts = gpu_fp8.decode_launch("gate_up", T, k, wg, z["xs"].shape[-1], cg)
        assert consts["M"] == 16 and consts["B_KMAJOR"] == kmajor
        gate_up_fp8_decode_kernel[launch["grid"]](
            f8(z["xq"]), tt(z["xs"]), flat, f8(z["wgq" + sfx]), tt(z["wgs"]), f8(z["wuq" + sfx]), tt(z["wus"]), h,
            **consts)
        groups = I // 128 if qa else z["hs"].shape[-1]
        launch, consts = gpu_fp8.decode_launch("down", T, k, wd, groups, cd)
        assert consts["QUANT_A"] == qa
        ha = tt(z["h"]).float() if qa else f8(z["hq"])
        down_fp8_decode_kernel[launch["grid"]](ha, tt(z["hs"]), flat, f8(z["wdq" + sfx]), tt(z["wds"]), y, **consts)
        np.savez(Path(workdir) / f"dec-{name}-out.npz", h=h.double().numpy(), y=y.double().numpy())
    _decode_path_end_to_end(workdir)


def _interpreter_triton_call(*args, kernel, out_shape, grid, num_warps=None, num_stages=None, name=None, **consts):
    """jax_triton.triton_call's interface on the CPU: the kernel runs in Triton's interpreter inside a
    jax.pure_callback on torch copies of the arguments (float8 through uint8 views); outputs start as 1027."""
    import jax
    import torch
    outs = out_shape if isinstance(out_shape, (tuple, list)) else (out_shape,)

    def to_torch(a):
        a = np.asarray(a)
        if a.dtype == _f8():
            return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)
        return torch.from_numpy(np.ascontiguousarray(a))

    def host(*arrs):
        bufs = [torch.full(o.shape, 1027.0, dtype=getattr(torch, np.dtype(o.dtype).name)) for o in outs]
        kernel[grid](*[to_torch(a) for a in arrs], *bufs, **consts)
        return tuple(b.numpy() for b in bufs)
    res = jax.pure_callback(host, tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in outs), *args)
    return res if isinstance(out_shape, (tuple, list)) else res[0]


def _decode_path_end_to_end(workdir):
    """experts(impl='gpu', decode=True) on float16 tokens (gpu_fp8.experts_decode: its quantization passes, launch
    parameters and combine) with the kernels run by _interpreter_triton_call, on FP8 weights laid out K-major (as
    the engine lays them out), saved for the parent."""
    import types
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    from lingjax.kernels import jax_triton_lib
    from lingjax.kernels import moe as moe_kernels
    jax_triton_lib.jax_triton = lambda: types.SimpleNamespace(triton_call=_interpreter_triton_call)
    T, k, E = 6, 2, 4
    z = _decode_inputs(("e2e", "block", "group", T, k, E))
    rng = np.random.default_rng(3)
    x = jnp.asarray(z["x"], jnp.float16)
    idx = jnp.asarray(z["idx"])
    cw = jnp.asarray(rng.uniform(0.1, 1.0, (T, k)), jnp.float32)
    blk = tuple(int(b) for b in z["block"])
    ws = [quant.with_layout(quant.FP8Weight(jnp.asarray(z[f"w{n}q"].view(quant.FP8_NP)), jnp.asarray(z[f"w{n}s"]),
                                            blk, "group", False), True) for n in "gud"]
    got = jax.jit(lambda *a: moe_kernels.experts(*a, impl="gpu", decode=True))(x, idx, cw, *ws)
    np.savez(Path(workdir) / "dec-e2e-out.npz", got=np.asarray(got, np.float64), x=np.asarray(x, np.float64),
             cw=np.asarray(cw, np.float64))
    # the dense decode path (kernels.fp8.DENSE_DECODE 'triton': gpu.decode_config, split-K summed after the kernel)
    from lingjax.kernels import fp8 as fp8_kernels
    fp8_kernels.DENSE_DECODE = "triton"
    xd = jnp.asarray(rng.standard_normal((5, 384)) * np.exp(rng.uniform(-2, 2, (5, 1))), jnp.float32)
    p, _ = _weight(rng, 200, 384, "block", "group")
    wd = quant.with_layout(jax.tree.map(jnp.asarray, p), True)
    got = jax.jit(lambda x, w: fp8_kernels.matmul(x, w, impl="gpu"))(xd, wd)
    np.savez(Path(workdir) / "dense-e2e-out.npz", got=np.asarray(got, np.float64),
             want=np.asarray(quant.matmul(xd, wd), np.float64), split=fp8_kernels.gpu.decode_config(5, 200, 384).split_k)


@triton.jit
def _round_kernel(x_ptr, y_ptr):
    i = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    tl.store(y_ptr + i, _round_e4m3(tl.load(x_ptr + i)).to(tl.float8e4nv))


def _round_values():
    """float32 values in [-448, 448]: every finite float8_e4m3fn value, every midpoint of two neighbours
    (ties: to even), their float32 neighbours (just below / above a tie), and random magnitudes over the
    whole range (subnormals included)."""
    import ml_dtypes
    f8 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    f8 = np.unique(f8[np.isfinite(f8)])
    mid = ((f8[:-1].astype(np.float64) + f8[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(5)
    rand = (rng.choice([-1, 1], 4096) * np.exp(rng.uniform(np.log(1e-4), np.log(448), 4096))).astype(np.float32)
    v = np.concatenate([f8, mid, np.nextafter(mid, np.float32(-np.inf)), np.nextafter(mid, np.float32(np.inf)), rand])
    v = np.clip(v, -448, 448).astype(np.float32)
    return np.pad(v, (0, -len(v) % 1024))


def _round_check(workdir):
    import torch
    v = _round_values()
    y = torch.zeros(len(v), dtype=torch.float8_e4m3fn)
    _round_kernel[(len(v) // 1024,)](torch.from_numpy(v), y)
    np.save(Path(workdir) / "round-out.npy", y.view(torch.uint8).numpy())


def dataclass_replace(c, **kw):
    import dataclasses
    return dataclasses.replace(c, **kw)


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8_interp")
    for case in DENSE:
        np.savez(d / f"dense-{case[0]}.npz", **_dense_inputs(case))
    for case in MOE:
        np.savez(d / f"moe-{case[0]}.npz", **_moe_inputs(case))
    for case in DECODE:
        np.savez(d / f"dec-{case[0]}.npz", **_decode_inputs(case))
    rng = np.random.default_rng(9)
    for name, act, M, K, dt in QUANT:
        x = (rng.standard_normal((M, K)) * np.exp(rng.uniform(-3, 3, (M, 1)))).astype(dt).astype(np.float32)
        x[1] = 0.0                                   # an all-zero row: scale 1
        np.save(d / f"quant-{name}.npy", x)
    run_child(__file__, d, JAX_PLATFORMS="cpu")
    return d


def test_in_kernel_fp8_rounding_is_round_to_nearest_even(workdir):
    """The kernels' float32 -> float8_e4m3fn rounding (triton_kernels._round_e4m3, then an exact cast)
    gives ml_dtypes' (round to nearest, ties to even) bits for every fp8 value, every tie between two
    neighbours, the float32 values either side of each tie, and random magnitudes down to subnormals."""
    import ml_dtypes
    v = _round_values()
    got = np.load(workdir / "round-out.npy")
    want = v.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    bad = np.nonzero(got != want)[0]
    assert not len(bad), [(float(v[i]), int(got[i]), int(want[i])) for i in bad[:5]]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


DENSE_RUNS = [(c, False) for c in DENSE] + [(c, True) for c in DENSE if c[0] in KMAJOR_DENSE]
MOE_RUNS = ([(c, "") for c in MOE] + [(c, "-kmajor") for c in MOE if c[0] in KMAJOR_MOE]
            + [(c, "-kmajor-noswap") for c in MOE if c[0] in KMAJOR_MOE]
            + [(c, "-kmajor-fused") for c in MOE if c[0] in FUSED_MOE])


@pytest.mark.parametrize("case,kmajor", DENSE_RUNS, ids=[c[0] + ("-kmajor" if k else "") for c, k in DENSE_RUNS])
def test_dense_fp8_kernel_matches_float64(workdir, case, kmajor):
    """Either weight layout (the param layout [K, N] or K-major [N, K]) gives the same products."""
    z = np.load(workdir / f"dense-{case[0]}.npz")
    y = np.load(workdir / f"dense-{case[0]}-out{'-kmajor' if kmajor else ''}.npy")
    tol = 1e-5 if case[7] == "float32" else 1e-3
    r = dict(exact=_rel(y, z["exact"]), ref=_rel(y, z["ref"]), full=_rel(y, z["full"]))
    assert r["exact"] < tol and r["ref"] < max(tol, 1e-5), r
    assert 0.005 < r["full"] < 0.08, r             # the fp8 rounding is there, and bounded


@pytest.mark.parametrize("case,variant", MOE_RUNS, ids=[c[0] + v for c, v in MOE_RUNS])
def test_moe_fp8_kernels_match_float64(workdir, case, variant):
    """Each weight layout, and the activations quantized before the kernels or inside them (-fused:
    the same values, so the same bound), give the float64 products of the same fp8 operands."""
    name, _, _, T, k, E, bm, out = case
    z = np.load(workdir / f"moe-{name}.npz")
    o = np.load(workdir / f"moe-{name}-out{variant}.npz")
    xd, hd = _act_dequant(z["xq"].view(_f8()), z["xs"]), _act_dequant(z["hq"].view(_f8()), z["hs"])
    row_token, block_expert = z["row_token"], z["block_expert"]
    xe = np.concatenate([xd, np.zeros((1, D))])
    xf = np.concatenate([z["x"], np.zeros((1, D))])
    want_h, want_y, full_h, rows = [], [], [], []
    for b, e in enumerate(block_expert):
        if e < 0:
            continue
        r = np.arange(b * bm, (b + 1) * bm)
        a = xe[row_token[r]]
        g, u = a @ z["wg64"][e], a @ z["wu64"][e]
        want_h.append(g / (1 + np.exp(-g)) * u)
        want_y.append(hd[r] @ z["wd64"][e])
        af = xf[row_token[r]]
        g, u = af @ z["wgfull"][e], af @ z["wufull"][e]
        full_h.append(g / (1 + np.exp(-g)) * u)
        rows.append(r)
    rows = np.concatenate(rows)
    want_h, want_y, full_h = np.concatenate(want_h), np.concatenate(want_y), np.concatenate(full_h)
    tol = 1e-5 if out == "float32" else 1e-3
    real = row_token[rows] < T
    assert _rel(o["h"][rows], want_h) < tol and _rel(o["y"][rows[real]], want_y[real]) < tol
    assert 0.005 < _rel(o["h"][rows], full_h) < 0.08
    pad = rows[row_token[rows] == T]
    unused = np.setdiff1d(np.arange(len(row_token)), rows)
    assert np.all(o["h"][pad] == 0), "gate_up's padding rows must be zero"
    assert np.all(o["y"][pad] == 1027.0), "down must not write padding rows (combine never reads them)"
    assert np.all(o["h"][unused] == 1027.0) and np.all(o["y"][unused] == 1027.0), "unused blocks written"
    if T == 1:
        assert len(pad)                            # a decode block is mostly padding


@pytest.mark.parametrize("name", W16_MOE)
def test_moe_fp8_kernels_w16_are_the_reference_math(workdir, name):
    """W16: the activations quantize-dequantized in float16 (what quant.quantize_activation gives the reference
    path) times the weights dequantized to float16 in the kernel (quant.dequantize's q * s, rounded to float16),
    float32 sums: the float64 products of those float16 operands within 1e-3 (float16 outputs: 2^-11; a weight
    whose float32 product q * s rounds to float16 the other way than its exact value moves one element by one
    float16 ulp); padding rows of gate_up zero, of down unwritten, unused blocks unwritten."""
    case = next(c for c in MOE if c[0] == name)
    T, bm = case[3], case[6]
    z = np.load(workdir / f"moe-{name}.npz")
    o = np.load(workdir / f"moe-{name}-out-w16.npz")
    f16 = lambda a: a.astype(np.float16).astype(np.float64)                     # noqa: E731
    xd = f16(_act_dequant(z["xq"].view(_f8()), z["xs"]))
    hd = f16(_act_dequant(z["hq"].view(_f8()), z["hs"]))
    xe = np.concatenate([xd, np.zeros((1, D))])
    row_token, block_expert = z["row_token"], z["block_expert"]
    rows, want_h, want_y = [], [], []
    for b, e in enumerate(block_expert):
        if e < 0:
            continue
        r = np.arange(b * bm, (b + 1) * bm)
        a = xe[row_token[r]]
        g, u = a @ f16(z["wg64"][e]), a @ f16(z["wu64"][e])
        want_h.append(g / (1 + np.exp(-g)) * u)
        want_y.append(hd[r] @ f16(z["wd64"][e]))
        rows.append(r)
    rows, want_h, want_y = np.concatenate(rows), np.concatenate(want_h), np.concatenate(want_y)
    real = row_token[rows] < T
    assert _rel(o["h"][rows], want_h) < 1e-3 and _rel(o["y"][rows[real]], want_y[real]) < 1e-3
    assert np.all(o["h"][rows[~real]] == 0) and np.all(o["y"][rows[~real]] == 1027.0)
    unused = np.setdiff1d(np.arange(len(row_token)), rows)
    assert np.all(o["h"][unused] == 1027.0) and np.all(o["y"][unused] == 1027.0)


@pytest.mark.parametrize("name,act", [(c[0], c[1]) for c in QUANT])
def test_activation_quantization_kernel_is_quantize_activation_fp8(workdir, name, act):
    """quantize_kernel (one launch: the GPU path's activation quantization) gives
    quant.quantize_activation_fp8's fp8 bits and scales per 128-group (a short last group; one group for
    K <= 128) or per token; an all-zero row gets scale 1 and zeros. The scales agree to float32 rounding
    (XLA's CPU compiler divides by 448 as a multiplication by its reciprocal, the kernel divides): where
    that last bit differs, an x / s on an fp8 rounding tie may round to the neighbouring fp8 value (one
    code apart; float16 inputs, few mantissa bits, meet ties most)."""
    import jax.numpy as jnp
    from lingjax import quant
    x = np.load(workdir / f"quant-{name}.npy")
    o = np.load(workdir / f"quant-{name}-out.npz")
    wq, ws = quant.quantize_activation_fp8(jnp.asarray(x), act)
    np.testing.assert_allclose(o["s"], np.asarray(ws), rtol=2e-7)
    assert np.all(o["s"][1] == 1.0)
    ref = np.asarray(wq).view(np.uint8)
    ws = np.asarray(ws)
    for r, c in np.argwhere(o["q"] != ref):          # only where the scale's last bit differs: x / s on a tie
        g = c // 128 if act == "group" else 0
        assert o["s"][r, g] != ws[r, g] and abs(int(o["q"][r, c]) - int(ref[r, c])) == 1, (r, c)
    assert (o["q"] == ref).mean() > 0.995


@pytest.mark.parametrize("name", list(QUANT_H_MOE))
def test_moe_gate_up_quantizes_h_in_its_epilogue(workdir, name):
    """QUANT_H: gate_up's h rounded to the activation dtype and quantized per row and 128-group in the
    kernel is what quant.quantize_activation_fp8 makes of the same h (the float64 h of the same fp8
    operands, rounded to that dtype): scales to float32 rounding, fp8 values equal (an element within
    float32 rounding of an fp8 tie may round the other way: < 0.1% of them, one fp8 step); padding rows
    and unused blocks unwritten (down reads neither)."""
    import jax.numpy as jnp
    from lingjax import quant
    case = next(c for c in MOE if c[0] == name)
    T, bm = case[3], case[6]
    z = np.load(workdir / f"moe-{name}.npz")
    o = np.load(workdir / f"moe-{name}-quant-h.npz")
    xd = _act_dequant(z["xq"].view(_f8()), z["xs"])
    xe = np.concatenate([xd, np.zeros((1, D))])
    row_token, block_expert = z["row_token"], z["block_expert"]
    rows, want = [], []
    for b, e in enumerate(block_expert):
        if e < 0:
            continue
        r = np.arange(b * bm, (b + 1) * bm)
        a = xe[row_token[r]]
        g, u = a @ z["wg64"][e], a @ z["wu64"][e]
        rows.append(r)
        want.append(g / (1 + np.exp(-g)) * u)
    rows, want = np.concatenate(rows), np.concatenate(want)
    real = row_token[rows] < T
    rows, want = rows[real], want[real].astype(QUANT_H_MOE[name]).astype(np.float32)
    wq, ws = quant.quantize_activation_fp8(jnp.asarray(want), "group")
    hq, hs = o["hq"][rows].view(_f8()), o["hs"][rows]
    np.testing.assert_allclose(hs, np.asarray(ws), rtol=1e-5)
    same = hq.astype(np.float32) == np.asarray(wq).astype(np.float32)
    assert same.mean() > 0.999, same.mean()
    unwritten = np.setdiff1d(np.arange(len(row_token)), rows)
    assert np.all(np.isnan(o["hq"][unwritten].view(_f8()).astype(np.float32)))
    assert np.all(o["hs"][unwritten] == 1027.0)


@pytest.mark.parametrize("case", DECODE, ids=[c[0] for c in DECODE])
def test_moe_fp8_decode_kernels_match_float64(workdir, case):
    """The decode path's kernels: swapped and plain operands, both weight layouts, per-token and per-128-group
    scales, an expert with more pairs than a program's 16 rows (two leaders), h quantized in down (QUANT_A):
    the float64 products of the same fp8 operands (bounds as the grouped kernels'); dropped pairs' rows
    unwritten."""
    name, _, act, T, k, E, swap, qa, kmajor, out = case
    z = np.load(workdir / f"dec-{name}.npz")
    o = np.load(workdir / f"dec-{name}-out.npz")
    flat = z["idx"].reshape(-1)
    real = (flat >= 0) & (flat < E)
    q = np.nonzero(real)[0]
    e = flat[q]
    xd = _act_dequant(z["xq"].view(_f8()), z["xs"])[q // k]
    hd = _act_dequant(z["hq"].view(_f8()), z["hs"])[q]
    g, u = np.einsum("qk,qkn->qn", xd, z["wg64"][e]), np.einsum("qk,qkn->qn", xd, z["wu64"][e])
    want_h = g / (1 + np.exp(-g)) * u
    want_y = np.einsum("qk,qkn->qn", hd, z["wd64"][e])
    xf = z["x"][q // k]
    g, u = np.einsum("qk,qkn->qn", xf, z["wgfull"][e]), np.einsum("qk,qkn->qn", xf, z["wufull"][e])
    full_h = g / (1 + np.exp(-g)) * u
    tol = 1e-5 if out == "float32" else 1e-3
    assert _rel(o["h"][q], want_h) < tol, _rel(o["h"][q], want_h)
    assert _rel(o["y"][q], want_y) < tol, _rel(o["y"][q], want_y)
    assert 0.005 < _rel(o["h"][q], full_h) < 0.08
    dropped = np.nonzero(~real)[0]
    assert len(dropped) == 2
    assert np.all(o["h"][dropped] == 1027.0) and np.all(o["y"][dropped] == 1027.0), "dropped pairs written"
    if name == "block-two-leaders":                  # an expert with more pairs than a program's 16 rows
        assert np.bincount(e, minlength=E).max() > 16


def test_moe_fp8_decode_path_is_the_fp8_math(workdir):
    """experts(impl='gpu', decode=True) end to end (gpu_fp8.experts_decode: x and h quantized per 128-group as the
    reference path quantizes them, gate_up / down over the routing ids, the pairs combined with the routing
    weights, two dropped ids among them), its kernels run in the interpreter, on float16 tokens, against float64
    of the same fp8 math (h and y rounded to float16 where the path stores them): within 1e-3 (float16 outputs,
    2^-11; measured 2.0e-4). (experts(impl='reference') on the same weights differs from both by 2.3e-3: it
    rounds the dequantized weights and activations to float16 before a float16 product, which moves h by float16
    ulps and, where one moves a 128-group's largest value, every fp8 code of the group's h.)"""
    import jax.numpy as jnp
    from lingjax import quant
    o = np.load(workdir / "dec-e2e-out.npz")
    T, k, E = 6, 2, 4
    z = _decode_inputs(("e2e", "block", "group", T, k, E))
    xq, xs = quant.quantize_activation_fp8(jnp.asarray(o["x"], jnp.float16), "group")
    xd = _act_dequant(np.asarray(xq), np.asarray(xs))
    flat = z["idx"].reshape(-1)
    q = np.nonzero((flat >= 0) & (flat < E))[0]
    e = flat[q]
    g = np.einsum("qk,qkn->qn", xd[q // k], z["wg64"][e])
    u = np.einsum("qk,qkn->qn", xd[q // k], z["wu64"][e])
    h = (g / (1 + np.exp(-g)) * u).astype(np.float16)
    hq, hs = quant.quantize_activation_fp8(jnp.asarray(h), "group")
    y = np.einsum("qk,qkn->qn", _act_dequant(np.asarray(hq), np.asarray(hs)), z["wd64"][e]).astype(np.float16)
    want = np.zeros((T, D))
    np.add.at(want, q // k, o["cw"].reshape(-1)[q, None] * y)
    assert np.all(np.isfinite(o["got"])) and len(q) == T * k - 2
    assert _rel(o["got"], want) < 1e-3, _rel(o["got"], want)

def test_dense_fp8_decode_path_is_the_reference_math(workdir):
    """kernels.fp8.matmul(impl='gpu') with DENSE_DECODE 'triton' end to end (gpu.matmul with gpu.decode_config:
    x quantized in the kernel, swapped operands, three k-splits summed after the kernel), its kernel run in the
    interpreter, float32, against the reference FP8 matmul (quant.matmul): within 1e-5 (float32 sums in
    another order)."""
    o = np.load(workdir / "dense-e2e-out.npz")
    assert int(o["split"]) == 3 and np.all(np.isfinite(o["got"]))
    assert _rel(o["got"], o["want"]) < 1e-5, _rel(o["got"], o["want"])


def _f8():
    import ml_dtypes
    return np.dtype(ml_dtypes.float8_e4m3fn)


if __name__ == "__main__":          # the child process
    _child(sys.argv[1])
