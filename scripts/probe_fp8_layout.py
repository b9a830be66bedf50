"""The FP8 reference matmul with a K-major weight and its consumer: which form gives XLA a row-major product.

Session 8 (issue 18): in the FP8 prefill of flash8 (4096 tokens) the shared expert's down projection, quant.matmul's
reference math (activations quantize-dequantized, the K-major weight dequantized, a bf16 dot), came out of cuBLAS
column-major (bf16[4096,4096]{0,1}, scripts/results/session8/call4), and the fusion that adds it to the routed
experts' combine read it transposed: 12.1 ms of the 52.5 ms step (7 layers). This times, at T tokens, the projection
in [in, out] x [K-major out, in] form followed by the same kind of consumer (the product added to a row-major bf16
array in float32), per form of the dot:

  dot        jnp.dot(x, dequantize(w)): quant.matmul as of session 7
  wxt        (W x^T)^T: the weight [out, in] as the left operand, the product transposed back
  f32out     the dot with a float32 result (preferred_element_type), rounded to bf16 after

and prints the layout XLA gave the product (the cuBLAS custom call's result) and the time of the whole function
(median of --reps loops of --iters calls), beside the bf16 [in, out] weight's plain dot. Values must agree (max
relative difference to 'dot' printed; identical math). --model PRESET: also the engine's prefill of one prompt of
--prefill tokens on that preset's FP8 model (shapes.random_fp8_model, fp8-block) with quant.matmul replaced by each
form in turn (this script only; compiled steps cleared in between; since call 5 the 'dot' form only), then with the routed experts' combine behind an
optimization barrier (FP8 and bf16 models): its time (bench_e2e.prefill_ms) and its first token's logprob against
the first row of the same model's.

    . scripts/gpu_env.sh; python3 scripts/probe_fp8_layout.py --out $OUT/probe_fp8_layout.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("probe_fp8_layout")

SHAPES = {"shared-down 1024x4096": (1024, 4096), "attn 4096x4096": (4096, 4096), "shared-up 4096x1024": (4096, 1024)}


def forms():
    import jax
    import jax.numpy as jnp
    from lingjax import quant

    def dot(x, w):
        return jnp.dot(quant.quantize_activation(x, w.act, quant.BLOCK), quant.dequantize(w, x.dtype))

    def wxt(x, w):
        xq = quant.quantize_activation(x, w.act, quant.BLOCK)
        wk = quant.dequantize(w, x.dtype).T                  # [out, in]
        return jnp.dot(wk, xq.T).T

    def f32out(x, w):
        xq = quant.quantize_activation(x, w.act, quant.BLOCK)
        return jnp.dot(xq, quant.dequantize(w, x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)

    def bf16(x, w):
        return jnp.dot(x, w)
    return {"dot": dot, "wxt": wxt, "f32out": f32out, "bf16": bf16}


def product_layouts(hlo: str) -> list[str]:
    return re.findall(r"= \(?(\w+\[[\d,]+\]\{[\d,]+\})[^=]*custom_call_target=\"__cublas", hlo)


def run(T, K, N, iters, reps):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lingjax import quant
    key = jax.random.PRNGKey(0)
    kx, kw, kr = jax.random.split(key, 3)
    x = jax.random.normal(kx, (T, K), jnp.bfloat16)
    w16 = (jax.random.normal(kw, (K, N), jnp.float32) / np.sqrt(K)).astype(jnp.bfloat16)
    w8 = quant.with_layout(quant.quantize_param(w16), True)          # K-major, as the engine lays it out
    r = jax.random.normal(kr, (T, N), jnp.bfloat16)
    rows, ref = [], None
    for name, f in forms().items():
        w = w16 if name == "bf16" else w8

        def loop(x, r, w=w, f=f):
            def body(i, c):
                y = f(c, w)                                     # [T, N] then back to [T, K] through a slice
                z = (y.astype(jnp.float32) + r.astype(jnp.float32)).astype(jnp.bfloat16)
                return c + z[:, :K] * 1e-3 if N >= K else c + jnp.tile(z, (1, K // N)) * 1e-3
            return jax.lax.fori_loop(0, iters, body, x)
        jf = jax.jit(loop)
        hlo = jf.lower(x, r).compile().as_text()
        out = jax.block_until_ready(jf(x, r))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(jf(x, r))
            ts.append((time.perf_counter() - t) / iters * 1e6)
        y = np.asarray(jax.jit(f)(x, w), np.float32)
        if name == "dot":
            ref = y
        diff = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30)) if name != "bf16" else float("nan")
        rows.append(dict(form=name, us=statistics.median(ts), layouts=product_layouts(hlo), max_rel_diff_vs_dot=diff,
                         finite=bool(np.isfinite(np.asarray(out, np.float32)).all())))
        log.info("T=%d %dx%d %-6s %8.1f us  product %s  diff vs dot %.1e", T, K, N, name, rows[-1]["us"],
                 rows[-1]["layouts"], diff)
    return rows


def model_rows(preset, L, reps):
    """The prefill of one prompt of L tokens on the preset's FP8 model per form of quant.matmul, then on its FP8
    and bf16 models with the routed experts' combine behind an optimization barrier (moe.combine replaced, this
    script only: the combine's gathers then fuse with nothing after them)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_e2e import prefill_engine, prefill_ms
    from lingjax import engine as engine_mod, quant
    from lingjax.engine import SamplingParams
    from lingjax.kernels import moe as moe_kernels
    from shapes import preset as get_preset, random_fp8_model, random_model
    cfg = get_preset(preset)
    prompt = np.random.default_rng(L).integers(2, cfg.vocab_size, L).tolist()
    matmul, combine, rows, ref = quant.matmul, moe_kernels.combine, [], {}
    fp = forms()
    # session 8 call 5 timed the three forms on the FP8 model alone: 54.9 / 54.1 / 54.2 ms, the same logprob
    variants = [("fp8", "dot", False), ("fp8", "dot", True), ("bf16", "dot", False), ("bf16", "dot", True)]
    model, kind = None, None
    try:
        for mk, form, barrier in variants:
            if mk != kind:
                model = None
                model = (random_fp8_model(cfg, jnp.bfloat16, "fp8-block") if mk == "fp8" else
                         random_model(cfg, None, jnp.bfloat16))
                kind = mk
            quant.matmul = (lambda x, w, f=fp[form]: f(x, w) if quant.is_fp8(w) else matmul(x, w))
            moe_kernels.combine = ((lambda *a: jax.lax.optimization_barrier(combine(*a))) if barrier else combine)
            engine_mod.clear_compiled()
            eng = prefill_engine(model, None, 1, L)
            ms = prefill_ms(model, None, cfg, 1, L, reps, eng=eng)
            out = eng.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=0))[0]
            lp = float(out.logprobs[0])
            ref.setdefault(mk, lp)
            name = f"{mk} {form}" + (" barrier" if barrier else "")
            rows.append(dict(form=name, prefill_ms=ms, token=int(out.token_ids[0]), logprob=lp, dlogprob=abs(lp - ref[mk])))
            log.info("%s prefill 1x%d, %s: %.1f ms, token %d logprob %.6f", preset, L, name, ms, rows[-1]["token"], lp)
    finally:
        quant.matmul, moe_kernels.combine = matmul, combine
        engine_mod.clear_compiled()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="4096", help="comma list of T (default 4096)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--iters", type=int, default=20, help="calls per timed loop (default 20)")
    p.add_argument("--reps", type=int, default=3, help="timed loops, median reported (default 3)")
    p.add_argument("--model", default="", help="also time the prefill of this preset's FP8 model per form (see above)")
    p.add_argument("--prefill", type=int, default=4096, help="--model: prompt tokens (default 4096)")
    p.add_argument("--out", help="JSON output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    report = dict(device=jax.devices()[0].device_kind, rows=[])
    for T in (int(t) for t in args.tokens.split(",")):
        for s in (s for s in args.shapes.split(",") if s):
            K, N = SHAPES[s]
            for row in run(T, K, N, args.iters, args.reps):
                report["rows"].append(dict(T=T, shape=s, **row))
    print(f"\n{report['device']}: FP8 reference matmul (K-major weight) + a row-major consumer, us per call")
    print("| T | shape | form | us | product layout | max rel diff vs dot |\n|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['T']} | {r['shape']} | {r['form']} | {r['us']:.1f} | {' '.join(r['layouts']) or '-'} | "
              f"{r['max_rel_diff_vs_dot']:.1e} |")
    if args.model:
        report["model"] = model_rows(args.model, args.prefill, args.reps)
        print(f"\n{args.model} prefill 1x{args.prefill} per form of quant.matmul / the combine")
        print("| model, form | prefill ms | token | logprob | diff vs the model's first row |\n|---|---|---|---|---|")
        for r in report["model"]:
            print(f"| {r['form']} | {r['prefill_ms']:.1f} | {r['token']} | {r['logprob']:.6f} | {r['dlogprob']:.1e} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
