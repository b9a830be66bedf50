"""FP8 matmuls against bf16 on one GPU: the dense projections and the routed experts of Ling-2.6-flash.

Dense rows: each distinct projection shape of the flash model (in x out, param layout [in, out]) at T tokens
(bf16 activations, bf16 out):
  bf16         jnp.dot with a bf16 weight (XLA: cuBLAS)
  fp8-block    lingjax.kernels.fp8.matmul(impl='gpu'): 128x128-block FP8 weights, activations quantized
               per token and 128-group (the block-FP8 / DeepSeek scheme), the Triton FP8 kernel
  fp8-channel  the same kernel with per-channel FP8 weights and per-token activations (compressed-tensors
               FP8_DYNAMIC)
  fp8-ref      (--methods) the reference math on the GPU: activation quantize-dequantize, the weight
               dequantized to bf16, XLA's bf16 dot (what the GPU ran before the kernel)
  fp8-block-xla, fp8-channel-xla  (--methods) XLA's own FP8 dot (lingjax.kernels.fp8.xla: cuBLASLt / XLA's
               GEMM emitter on the fp8 operands, scales after; fp8-block as a dot batched over K groups)
  fp8-block-tdec  (--methods) the Triton kernel with gpu.decode_config (what kernels.fp8.DENSE_DECODE 'triton'
               runs at <= 64 rows: swapped operands, the activations quantized in the kernel, split-K)
  fp8-block-inout, fp8-channel-inout  (--methods) the FP8 weights in the param layout [in, out] instead
               of K-major [out, in] (quant.with_layout; K-major is what the engine runs: its weight tiles
               are pipelined by cp.async, the [in, out] ones are not)
--sweep: the dense FP8 kernel (fp8-block, K-major) at each --sweep-shapes projection and --sweep-tokens
T over a grid of tiles (fp8.gpu.Config: block_n, split_k, num_stages, activations quantized in the
kernel or before it), each row timed as above against pick_config's choice (the `auto` row).
MoE rows: lingjax.kernels.moe.experts(impl='gpu') on 256 experts (d 4096, I 1024, top-8, uniform random
routing) with bf16 weights (the bf16 grouped matmul) and FP8 weights (the FP8 grouped matmul).

Correctness, on the device: `err ref` is each FP8 kernel's output against the reference math with the
same FP8 weights (impl='reference': quant.matmul / the dequantizing expert path), relative Frobenius;
it should be bf16 rounding (the reference rounds the dequantized activations to bf16: < 2e-2); `err bf16`
is against the bf16 method with the unquantized weights (the FP8 quantization error: ~3-6%).

--model-check: the shipped tiny model (checkpoints/ling-tiny) converted to each FP8 format, its logits on
200 tokens with its FP8 layers' (Dense, MoE) kernels 'gpu' (the FP8 kernels) against 'reference' (the
reference math; the attention kernels as they are), on
the same device, in float32 and bfloat16 (relative Frobenius error and the share of positions whose top-1
token agrees; float32 should agree to ~1e-5 unless a near-tie routing flips, bf16 to ~1e-2).

Timing: `--iters` calls chained in one jitted fori_loop (each call's input depends on the max of the last
output, so nothing is hoisted; the max is part of every method's time), device time per call = loop time
/ iters, median of `--reps`. Columns: us; TB/s over the weight bytes (FP8: values + scales) plus
activations in and out; TFLOP/s over 2 T in out; speed-up of each FP8 row over bf16.

    PYTHONPATH=.:scripts python3 scripts/bench_fp8.py [--tokens 1,16,64,4096] [--out $OUT/bench_fp8.json]
    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 scripts/bench_fp8.py --smoke     # CPU: tiny, reference
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("bench_fp8")

# distinct projection shapes of Ling-2.6-flash (in, out): linear attention q/k/v/g/dense and MLA dense;
# MLA q_a, q_b, kv_a; the dense layer's MLP; the shared expert
DENSE = {"attn 4096x4096": (4096, 4096), "q_a 4096x1536": (4096, 1536), "q_b 1536x6144": (1536, 6144),
         "kv_a 4096x576": (4096, 576), "mlp-up 4096x9216": (4096, 9216), "mlp-down 9216x4096": (9216, 4096),
         "shared-up 4096x1024": (4096, 1024), "shared-down 1024x4096": (1024, 4096)}
SCHEMES = {"fp8-block": ((128, 128), "group"), "fp8-channel": ((0, 1), "token")}
E, K_TOP, D, I = 256, 8, 4096, 1024


def loop_time(fn, x, rest, iters, reps, copies=1):
    """Seconds per call of fn(x, *rest) -> [T, n]: `iters` calls chained in one jitted fori_loop. copies > 1:
    each loop trip calls fn on that many device copies of `rest` (the weights) in turn (iters // copies
    trips), so that weights whose copies together outgrow the L2 cache (50 MB on H200) are read from
    memory, as in a model's step, not from L2."""
    import jax
    import jax.numpy as jnp
    sets = [rest] if copies <= 1 else [jax.tree.map(lambda a: jnp.array(a, copy=True), rest) for _ in range(copies)]

    def loop(x, sets):
        def body(i, x):
            for r in sets:
                y = fn(x, *r)
                x = x + (1e-6 * jnp.max(y.astype(jnp.float32), axis=-1, keepdims=True)).astype(x.dtype)
            return x
        return jax.lax.fori_loop(0, max(1, iters // len(sets)), body, x)
    run = jax.jit(loop)
    calls = max(1, iters // len(sets)) * len(sets)
    jax.block_until_ready(run(x, sets))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(x, sets))
        ts.append((time.perf_counter() - t) / calls)
    return statistics.median(ts)


def rel(a, b):
    import jax.numpy as jnp
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def nbytes(w):
    import jax
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w))


def dense_rows(name, K, N, T, methods, impl, iters, reps, copies=1):
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    from lingjax.kernels import fp8 as fp8_kernels
    kx, kw = jax.random.split(jax.random.key(K * 7 + N + T))
    x = jax.random.normal(kx, (T, K), jnp.bfloat16)
    w = (jax.random.normal(kw, (K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
    base = jnp.dot(x, w)
    rows, t_bf16 = [], None
    for m in methods:
        if m == "bf16":
            fn, wt = (lambda x, w: jnp.dot(x, w)), w
        elif m == "fp8-block-tdec":                 # the Triton kernel with gpu.decode_config (DENSE_DECODE 'triton')
            from lingjax.kernels.fp8 import gpu
            wt = quant.with_layout(quant.quantize_param(w, *SCHEMES["fp8-block"]), True)
            fn = lambda x, w: gpu.matmul(x, w, config=gpu.decode_config(T, N, K))     # noqa: E731
        else:
            block, act = SCHEMES["fp8-block" if m == "fp8-ref" else m.removesuffix("-inout").removesuffix("-xla")]
            wt = quant.with_layout(quant.quantize_param(w, block, act), not m.endswith("-inout"))
            use = "reference" if m == "fp8-ref" else "xla" if m.endswith("-xla") else impl
            fn = (lambda use: lambda x, w: fp8_kernels.matmul(x, w, impl=use))(use)
        row = dict(kind="dense", name=name, K=K, N=N, T=T, method=m)
        try:
            t = loop_time(fn, x, (wt,), iters, reps, copies)
            y = jax.jit(fn)(x, wt)
            if m != "bf16":
                row["err_ref"] = rel(y, jax.jit(lambda x, w: fp8_kernels.matmul(x, w, impl="reference"))(x, wt))
                row["err_bf16"] = rel(y, base)
        except Exception as e:                              # noqa: BLE001 (recorded, the run goes on)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.info("%s T=%d %s: %s", name, T, m, row["error"])
            rows.append(row)
            continue
        moved = nbytes(wt) + T * K * 2 + T * N * 2
        row.update(us=t * 1e6, tb_s=moved / t / 1e12, tflop_s=2 * T * K * N / t / 1e12)
        if m == "bf16":
            t_bf16 = t
        elif t_bf16:
            row["speedup"] = t_bf16 / t
        rows.append(row)
    return rows


def moe_rows(T, methods, impl, iters, reps, d=D, inter=I, n_exp=E, k=K_TOP):
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    from lingjax.kernels import moe as moe_kernels
    from bench_moe import make_problem
    x, idx, cw, wg, wu, wd = make_problem(T, d, inter, n_exp, k, 0, jnp.bfloat16)
    touched = n_exp * (1 - (1 - k / n_exp) ** T)
    base = jax.jit(lambda *a: moe_kernels.experts(*a, impl=impl))(x, idx, cw, wg, wu, wd)
    rows, t_bf16 = [], None
    for m in methods:
        if m == "bf16":
            ws, use = (wg, wu, wd), impl
        else:
            block, act = SCHEMES["fp8-block" if m == "fp8-ref" else m.removesuffix("-inout")]
            ws = tuple(quant.with_layout(quant.quantize_param(w, block, act), not m.endswith("-inout"))
                       for w in (wg, wu, wd))
            use = "reference" if m == "fp8-ref" else impl
        fn = (lambda use: lambda x, idx, cw, a, b, c: moe_kernels.experts(x, idx, cw, a, b, c, impl=use))(use)
        row = dict(kind="moe", name=f"experts {n_exp}x{d}x{inter} top{k}", T=T, method=m)
        try:
            t = loop_time(fn, x, (idx, cw) + ws, iters, reps)
            if m != "bf16":
                y = jax.jit(fn)(x, idx, cw, *ws)
                ref = jax.jit(lambda *a: moe_kernels.experts(*a, impl="reference"))(x, idx, cw, *ws)
                row["err_ref"], row["err_bf16"] = rel(y, ref), rel(y, base)
        except Exception as e:                              # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.info("moe T=%d %s: %s", T, m, row["error"])
            rows.append(row)
            continue
        moved = sum(nbytes(w) for w in ws) / n_exp * touched + 2 * T * d * 2
        row.update(us=t * 1e6, tb_s=moved / t / 1e12, tflop_s=2 * T * k * 3 * d * inter / t / 1e12)
        if m == "bf16":
            t_bf16 = t
        elif t_bf16:
            row["speedup"] = t_bf16 / t
        rows.append(row)
        del ws
    return rows


def sweep_configs(T: int, K: int, N: int):
    """The tile grid of --sweep for T rows of a K x N projection (fp8.gpu.Config), pick_config's first."""
    from lingjax.kernels.fp8 import gpu
    auto = gpu.pick_config(T, N, K)
    out = [("auto", auto), ("auto xq", dataclasses.replace(auto, xla_quant=True))]   # xq: XLA's quantization
    if T <= 64:
        bm_swap = max(16, 1 << (T - 1).bit_length())        # swap_ab: the activation rows as the wgmma's N
        for swap in (False, True) if bm_swap < 64 else (False,):
            for bn in ((32, 64, 128) if swap else (64, 128)):
                for split in (1, 2, 4, 8):
                    for reduce in ((False, True) if split > 1 else (False,)):
                        stages = 6 if swap else 4
                        c = gpu.Config(bm_swap if swap else 64, bn, 128, split, 8, 4, stages, False, swap, reduce)
                        if c != auto:
                            tag = f"{'swap ' if swap else ''}n{bn} s{split}{' red' if reduce else ''} st{stages}"
                            out.append((tag, c))
        dec = gpu.decode_config(T, N, K)                    # swapped, x quantized in the kernel (session 9)
        out.append(("dec", dec))
        nkb = -(-K // 128)
        for bn in (64, 128):
            for split in (1, 2, 4, 8, 16):
                for stages in (3, 6):
                    c = dataclasses.replace(dec, block_n=bn, split_k=split, num_stages=stages)
                    if split <= nkb and c != dec:
                        out.append((f"dec n{bn} s{split} st{stages}", c))
    else:
        for bm, bn, warps, stages in ((64, 128, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
                                      (64, 256, 8, 3)):
            c = gpu.Config(bm, bn, 128, 1, 8, warps, stages)
            if c != auto:
                out.append((f"m{bm} n{bn} w{warps} st{stages}", c))
    return out


def tags_for(spec: str, T: int) -> list:
    """--sweep-tags / --moe-sweep-tags: comma list of tags, each for every T or, written "T:tag", for that T."""
    out = []
    for t in (t.strip() for t in spec.split(",") if t.strip()):
        pre, sep, rest = t.partition(":")
        if not sep:
            out.append(t)
        elif int(pre) == T:
            out.append(rest)
    return out


def sweep_rows(name, K, N, T, iters, reps, tags=(), copies=1):
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    from lingjax.kernels import fp8 as fp8_kernels
    from lingjax.kernels.fp8 import gpu
    kx, kw = jax.random.split(jax.random.key(K * 7 + N + T))
    x = jax.random.normal(kx, (T, K), jnp.bfloat16)
    w = (jax.random.normal(kw, (K, N), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)
    wt = quant.with_layout(quant.quantize_param(w, *SCHEMES["fp8-block"]), True)
    ref = jax.jit(lambda x, w: fp8_kernels.matmul(x, w, impl="reference"))(x, wt)
    rows, t_auto = [], None
    for tag, c in sweep_configs(T, K, N):
        if tags and tag != "auto" and tag not in tags:
            continue
        fn = (lambda c: lambda x, w: gpu.matmul(x, w, config=c))(c)
        row = dict(kind="sweep", name=name, K=K, N=N, T=T, method=f"fp8-block {tag}", config=str(c))
        try:
            t = loop_time(fn, x, (wt,), iters, reps, copies)
            row["err_ref"] = rel(jax.jit(fn)(x, wt), ref)
        except Exception as e:                              # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            rows.append(row)
            continue
        moved = nbytes(wt) + T * K * 2 + T * N * 2
        row.update(us=t * 1e6, tb_s=moved / t / 1e12, tflop_s=2 * T * K * N / t / 1e12)
        if tag == "auto":
            t_auto = t
        elif t_auto:
            row["speedup"] = t_auto / t
        rows.append(row)
    return rows


def moe_sweep_configs():
    """(tag, rows per block or None (gpu_fp8.pick_block_m's), gate_up, down) variants of --moe-sweep; each
    kernel's entry is None (gpu_fp8.pick_config's choice for those rows) or a dict of Config fields
    changed from it. auto = the defaults (since session 6's call A: session 5's kernels, 64-row blocks at
    decode sizes, x and h quantized by XLA's passes); qk = quantize_kernel launches instead; qh = gate_up
    writes h quantized; bm16 = 16-row blocks with swapped operands; dec = the decode path (session 7); P = 8 warps
    at prefill sizes, W = w16 (session 7)."""
    xq = dict(xla_quant=True)
    qk = dict(xla_quant=False)
    return [("auto", None, None, None), ("auto xq", None, xq, xq), ("auto qk", None, qk, qk),
            ("gu qh", None, dict(block_n=128, num_warps=8, quant_h=True), None),
            ("bm16", 16, None, None), ("bm16 qh", 16, dict(block_n=128, quant_h=True, num_stages=3), None),
            ("bm16 qh qk", 16, dict(block_n=128, quant_h=True, num_stages=3, xla_quant=False), qk),
            ("bm16 gu st6", 16, dict(num_stages=6), None), ("bm16 dn st6", 16, None, dict(num_stages=6)),
            ("s5", 64, dict(block_n=64, num_warps=4, quant_h=False, xla_quant=True), xq),
            ("bm64", 64, None, None), ("bm32", 32, None, None),
            ("gu st4", None, dict(num_stages=4), None), ("gu st2", None, dict(num_stages=2), None),
            ("gu w8", None, dict(num_warps=8), None),
            ("gu n64 noqh st4", None, dict(block_n=64, quant_h=False, num_stages=4), None),
            ("dn st3", None, None, dict(num_stages=3)), ("dn st6", None, None, dict(num_stages=6)),
            ("dn n64 st6", None, None, dict(block_n=64, num_stages=6)),
            ("dn n256 st3", None, None, dict(block_n=256, num_stages=3)),
            ("dn w8", None, None, dict(num_warps=8)),
            # session 7: the decode path (bm "dec": gpu_fp8.experts_decode, no layout; its DecodeConfig fields
            # changed as given), h quantized by XLA's pass or in down (qh)
            ("dec", "dec", None, None), ("dec qh", "dec", None, dict(quant_a=True)),
            ("dec noN", "dec", dict(n_first=False), dict(n_first=False)),
            ("dec wide", "dec", dict(block_n=128, num_stages=3), dict(block_n=256)),   # bf16's bytes per program
            # session 7, prefill (128-row blocks): 8 warps instead of 4 (same tiles). Compiled for sm_90a (ptxas),
            # pick_config's 4-warp tiles spill (255 registers; down 560 bytes of spill stores, gate_up 8: a
            # [128, 128] float32 accumulator plus the per-k-step product it adds, 256 registers a thread), 8 warps
            # do not (183 / 203 registers). g16: 16 blocks per n tile, as the bf16 kernels.
            ("P", None, dict(num_warps=8), dict(num_warps=8)),
            ("P g16", None, dict(num_warps=8, group_m=16), dict(num_warps=8, group_m=16)),
            # session 7, prefill: w16 (the reference math on the bf16 tensor cores: weight tiles dequantized in the
            # kernel, activations quantize-dequantized before it), with 8 warps (W w8) or the bf16 kernels' large
            # tiles (W L: gpu_fp8.PREFILL_W16's; no spills in either, ptxas sm_90a)
            ("W w8", None, dict(w16=True, num_warps=8), dict(w16=True, num_warps=8)),
            ("W L", None, dict(w16=True, block_n=128, block_k=64, num_warps=8, group_m=16),
             dict(w16=True, block_n=256, block_k=64, num_warps=8, group_m=16))]


def moe_sweep_fn(bm, gc, dc, n_exp, n_pairs):
    """experts(x, idx, cw, w_gate, w_up, w_down) as lingjax.kernels.moe.experts runs the FP8 path, with
    bm rows per block and the gate_up / down Configs of moe_sweep_configs (see there)."""
    from lingjax.kernels import moe as moe_kernels
    from lingjax.kernels.moe import gpu_fp8

    if bm == "dec":
        def fn(x, idx, cw, a, b, c):
            T, d, inter = x.shape[0], a.shape[-2], a.shape[-1]
            g = gpu_fp8.pick_decode_config("gate_up", T, d, inter)
            dn = gpu_fp8.pick_decode_config("down", T, inter, d)
            g = dataclasses.replace(g, **gc) if gc else g
            dn = dataclasses.replace(dn, **dc) if dc else dn
            return gpu_fp8.experts_decode(x, idx, cw, a, b, c, gate_up_config=g, down_config=dn)
        return fn

    def fn(x, idx, cw, a, b, c):
        block_m = bm or gpu_fp8.pick_block_m(n_pairs, n_exp)
        lay = moe_kernels.make_layout(idx, n_exp, block_m, gpu_fp8.pick_layout_method(n_pairs))
        d, inter = a.shape[-2:]
        g = gpu_fp8.pick_config("gate_up", block_m, d, inter, a.act)
        dn = gpu_fp8.pick_config("down", block_m, inter, d, c.act)
        g = dataclasses.replace(g, **gc) if gc else g
        dn = dataclasses.replace(dn, **dc) if dc else dn
        y = gpu_fp8.grouped(x, lay, a, b, c, gate_up_config=g, down_config=dn)
        return moe_kernels.combine(y, lay, cw).astype(x.dtype)
    return fn


def moe_sweep_rows(T, iters, reps, d=D, inter=I, n_exp=E, k=K_TOP, tags=None):
    """The FP8 grouped matmuls (fp8-block, K-major) over moe_sweep_configs at T tokens: the layout, both
    kernels and the combine, as lingjax.kernels.moe.experts runs them; err ref vs the reference math."""
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    from lingjax.kernels import moe as moe_kernels
    from lingjax.kernels.moe import gpu_fp8
    from bench_moe import make_problem
    x, idx, cw, wg, wu, wd = make_problem(T, d, inter, n_exp, k, 0, jnp.bfloat16)
    ws = tuple(quant.with_layout(quant.quantize_param(w, *SCHEMES["fp8-block"]), True) for w in (wg, wu, wd))
    del wg, wu, wd
    touched = n_exp * (1 - (1 - k / n_exp) ** T)
    ref = jax.jit(lambda *a: moe_kernels.experts(*a, impl="reference"))(x, idx, cw, *ws)
    n_pairs = T * k
    rows, t_auto = [], None
    for tag, bm, gc, dc in moe_sweep_configs():
        if tags and tag not in tags:
            continue
        fn = moe_sweep_fn(bm, gc, dc, n_exp, n_pairs)
        row = dict(kind="moe-sweep", name=f"experts {n_exp}x{d}x{inter} top{k}", T=T, method=f"fp8-block {tag}",
                   config=f"block_m {bm or gpu_fp8.pick_block_m(n_pairs, n_exp)}: {gc} / {dc}")
        if bm == "dec" and T > 64 * 4:
            continue                                   # the decode path is for decode sizes
        try:
            t = loop_time(fn, x, (idx, cw) + ws, iters, reps)
            row["err_ref"] = rel(jax.jit(fn)(x, idx, cw, *ws), ref)
        except Exception as e:                              # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            log.info("moe sweep T=%d %s: %s", T, tag, row["error"])
            rows.append(row)
            continue
        moved = sum(nbytes(w) for w in ws) / n_exp * touched + 2 * T * d * 2
        row.update(us=t * 1e6, tb_s=moved / t / 1e12, tflop_s=2 * T * k * 3 * d * inter / t / 1e12)
        if tag == "auto":
            t_auto = t
        elif t_auto:
            row["speedup"] = t_auto / t
        rows.append(row)
    return rows


def model_check(smoke=False):
    """[(scheme, dtype, rel err, top-1 agreement)] of the FP8 tiny model, kernels 'gpu' vs 'reference'."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from lingjax.checkpoint import load_model
    from lingjax.convert import convert
    from lingjax.model.common import Dense
    from lingjax.model.moe import MoE
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "ling-tiny")
    impl = "gpu" if jax.default_backend() == "gpu" else "reference"
    rng = np.random.default_rng(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("fp8-block", "fp8-channel"):
            d = os.path.join(tmp, scheme)
            convert(src, d, quantize=scheme)
            for dtype in (jnp.float32, jnp.bfloat16):
                cfg, model = load_model(d, dtype)
                tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 16 if smoke else 100)), jnp.int32)
                logits = {}
                for k in (impl, "reference"):
                    for _, m in nnx.iter_modules(model):          # the FP8 layers only (attention as it is)
                        if isinstance(m, (Dense, MoE)):
                            m.kernels = k
                    logits[k] = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens), np.float64)
                a, b = logits[impl], logits["reference"]
                row = dict(kind="model", scheme=scheme, dtype=jnp.dtype(dtype).name,
                           err=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                           top1=float(np.mean(a.argmax(-1) == b.argmax(-1))))
                log.info("model check %s %s: rel err %.2e, top-1 agreement %.4f", scheme, row["dtype"], row["err"],
                         row["top1"])
                out.append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="1,16,64,4096", help="comma list of token counts T")
    p.add_argument("--methods", default="bf16,fp8-block,fp8-channel",
                   help="comma list of: bf16, fp8-block, fp8-channel, fp8-ref (bf16 first: the speed-ups use it)")
    p.add_argument("--dense", default=",".join(DENSE), help=f"comma list of projection shapes: {', '.join(DENSE)}")
    p.add_argument("--no-moe", action="store_true", help="skip the MoE rows")
    p.add_argument("--sweep", action="store_true", help="also sweep the dense FP8 kernel's tiles (see above)")
    p.add_argument("--sweep-shapes", default="attn 4096x4096", help="comma list of dense shapes to sweep")
    p.add_argument("--sweep-tokens", default="16,64", help="comma list of T to sweep at")
    p.add_argument("--moe-sweep", action="store_true",
                   help="also sweep the FP8 grouped matmuls' tiles (moe_sweep_configs; x auto = speed-up over auto)")
    p.add_argument("--moe-sweep-tokens", default="16,64", help="comma list of T for --moe-sweep")
    p.add_argument("--moe-sweep-tags", default="", help="comma list of moe_sweep_configs tags, each for every T or as T:tag for one (default all)")
    p.add_argument("--sweep-tags", default="", help="comma list of dense sweep tags, each for every T or as T:tag for one (default all; auto always)")
    p.add_argument("--iters", type=int, default=20, help="calls per timed loop (default 20)")
    p.add_argument("--copies", type=int, default=1,
                   help="dense rows and --sweep: each loop trip cycles through this many copies of the weight, so "
                        "that together they outgrow the L2 cache (50 MB on H200; e.g. 4 for a 4096 x 4096 FP8 "
                        "weight); default 1: one weight, which a loop of calls reads from L2 once it fits there")
    p.add_argument("--reps", type=int, default=3, help="timed loops; the median is reported (default 3)")
    p.add_argument("--model-check", action="store_true",
                   help="also check the FP8 tiny model's logits with the GPU kernels against the reference math")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: small shapes, reference impl")
    p.add_argument("--out", help="JSON output (default $OUT/bench_fp8.json when $OUT is set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    tokens = [int(t) for t in args.tokens.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ("bf16", "fp8-ref", "fp8-block-tdec", *SCHEMES,
                                               *(f"{k}-inout" for k in SCHEMES),
                                               *(f"{k}-xla" for k in SCHEMES))]
    if unknown:
        p.error(f"unknown methods {unknown}")
    names = [n for n in args.dense.split(",") if n]
    if [n for n in names if n not in DENSE]:
        p.error(f"unknown dense shapes {[n for n in names if n not in DENSE]}; expected some of {list(DENSE)}")
    impl = "gpu" if jax.default_backend() == "gpu" else "reference"
    iters, reps = (2, 1) if args.smoke else (args.iters, args.reps)
    report = dict(device=jax.devices()[0].device_kind, impl=impl, iters=iters, reps=reps, rows=[])
    out = args.out or (os.path.join(os.environ["OUT"], "bench_fp8.json") if os.environ.get("OUT") else None)

    def save():
        if out:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)

    if args.model_check:
        report["model_check"] = model_check(args.smoke)
        save()
    for name in names:
        K, N = DENSE[name]
        if args.smoke:
            K, N = max(K // 16, 128), max(N // 16, 64)
        for T in tokens:
            for r in dense_rows(name, K, N, T, methods, impl, iters, reps, args.copies):
                report["rows"].append(r)
                log.info("%s", _line(r))
            save()
    if args.sweep and impl == "gpu":
        for name in [n for n in args.sweep_shapes.split(",") if n]:
            if name not in DENSE:
                p.error(f"unknown sweep shape {name!r}; expected some of {list(DENSE)}")
            for T in [int(t) for t in args.sweep_tokens.split(",") if t]:
                for r in sweep_rows(name, *DENSE[name], T, iters, reps, tags_for(args.sweep_tags, T), args.copies):
                    report["rows"].append(r)
                    log.info("%s", _line(r))
                save()
    if args.moe_sweep and impl == "gpu":
        for T in [int(t) for t in args.moe_sweep_tokens.split(",") if t]:
            for r in moe_sweep_rows(T, iters, reps, tags=tags_for(args.moe_sweep_tags, T)):
                report["rows"].append(r)
                log.info("%s", _line(r))
            save()
    if not args.no_moe:
        for T in tokens:
            kw = dict(d=256, inter=128, n_exp=16, k=2) if args.smoke else {}
            for r in moe_rows(T, methods, impl, iters, reps, **kw):
                report["rows"].append(r)
                log.info("%s", _line(r))
            save()
    print(f"\n{report['device']}: FP8 vs bf16 (impl {impl}); us per call, err ref = vs the reference math with the "
          f"same FP8 weights, err bf16 = vs bf16 weights")
    print("| op | T | method | us | TB/s | TFLOP/s | x bf16 (sweeps: x auto) | err ref | err bf16 |\n|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(_line(r, table=True))
    for r in report.get("model_check", []):
        print(f"ling-tiny {r['scheme']} {r['dtype']}: kernels {impl} vs reference: rel err {r['err']:.2e}, "
              f"top-1 agreement {r['top1']:.4f}")
    return 0


def _line(r, table=False):
    if "error" in r:
        return f"| {r['name']} | {r['T']} | {r['method']} | {r['error'][:80]} |"
    f = lambda k, fmt: (fmt % r[k]) if k in r else "-"          # noqa: E731
    cells = [r["name"], str(r["T"]), r["method"], f("us", "%.1f"), f("tb_s", "%.2f"), f("tflop_s", "%.1f"),
             f("speedup", "%.2f"), f("err_ref", "%.1e"), f("err_bf16", "%.1e")]
    return "| " + " | ".join(cells) + " |" if table else "  ".join(cells)


if __name__ == "__main__":
    sys.exit(main())
