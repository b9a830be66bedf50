"""Where the time of one decode step goes: FP8 against bf16, per kernel, on the device (issue 18).

Model: a preset of scripts/shapes.py (default flash8) with random weights made on device. Modes (--modes,
run in turn on one GPU, one model in memory at a time):
  bf16          the bf16 model (shapes.random_model)
  fp8           the FP8 model (shapes.random_fp8_model, --scheme), weights K-major (quant.with_layout:
                the layout the engine gives FP8 weights that run on the GPU kernels)
  fp8-inout     the same FP8 weights laid out [in, out] again (quant.to_kernel_layout(kmajor=False)):
                the layout before K-major weights (the weight tiles loaded unpipelined)
  fp8-dec       fp8 with the MoE decode path (gpu_fp8.experts_decode: no layout, kernels over the routing
                ids; session 7) at every profiled batch, h quantized by XLA's pass before down
  fp8-decqh     the same with down quantizing h itself (gpu_fp8.DECODE_QUANT_H)
  fp8-dt        fp8 with the dense projections of <= 64 rows on the Triton kernel with gpu.decode_config
                (kernels.fp8.DENSE_DECODE 'triton'; session 9) instead of XLA's FP8 dot
For each mode: first a correctness check on the device (FP8: one projection of each kind and one
MoE layer through the GPU kernels against the reference math, quant.matmul / the dequantized
experts (each grouped matmul, and whole), at B tokens: within 1e-2 relative (whole experts 5e-2; the
error model is in check_fp8)),
then --steps decode steps of B requests at context C (bench_e2e.decode_setup: the engine's step and
greedy sampling, paged MLA cache) timed (median of --reps) and traced under the XLA profiler
(bench_linear_attention.device_trace). Per mode it prints the step time, the floor (bytes a step must
touch, bench_e2e.step_bytes, over --bandwidth), the busy time and the gaps between kernels, the
device time per step by kernel category (FP8 dense matmul, FP8 MoE, bf16 MoE, cuBLAS/XLA matmuls,
linear attention, MLA, activation quantization and other XLA fusions) and the top kernels (each mode
as soon as it is done, then one table of all). --prefill L adds, per mode, one prefill step of L tokens (the
engine's generate of one token, wall time median of --reps, traced the same way; session 8: FP8 against bf16).

    . scripts/gpu_env.sh; PYTHONPATH=.:scripts python3 scripts/profile_fp8.py --out scripts/results
    # ~60-90 s on nvidia-h200: flash8, B=16 at 1k context, bf16 / fp8 / fp8-inout
    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 scripts/profile_fp8.py --smoke   # CPU: the plumbing only
Writes profile_fp8.json (and the printed tables) under --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("profile_fp8")

# kernel name substrings -> category (first match wins; names are the device kernels' own). The MoE decode
# path's kernels (gate_up_h_decode_kernel, down_h_decode_kernel, ...) end in "decode_kernel" too: they are
# matched first (until session 7 they fell under "MLA"). The MLA and the linear-attention Triton kernels share
# the names decode_kernel / prefill_kernel, so one category holds both.
CATEGORIES = [
    ("fp8 dense (Triton)", ("fp8_matmul",)),
    ("fp8 MoE (Triton)", ("gate_up_fp8", "down_fp8")),
    ("bf16 MoE (Triton)", ("gate_up", "down_kernel", "down_h_decode", "down_decode", "down_split", "moe_gate_up",
                           "moe_down")),
    ("linear attention", ("linear", "chunk", "recurrent", "la_", "lightning")),
    ("attention (MLA + linear Triton)", ("mla", "decode_kernel", "decode_stream", "prefill_kernel", "paged")),
    ("cuBLAS / XLA matmul", ("gemm", "gemv", "cutlass", "xmma", "cublas", "matmul", "triton_dot", "dot")),
    ("XLA fusions (incl. activation quant, split-K sums)", ("fusion", "loop_", "input_", "reduce", "convert",
                                                           "transpose", "concatenate", "copy", "select", "wrapped")),
]


MODES = ("bf16", "fp8", "fp8-inout", "fp8-dec", "fp8-decqh", "fp8-dt")


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def per_step_kernels(trace, steps, top=25):
    """A device trace (bench_linear_attention.device_trace) of `steps` steps, per step: busy_us, span_us,
    gap_us, the streams, the device time and launches by category(), the `top` kernels by time and
    kernels_per_step."""
    streams = {k: v for k, v in trace.items() if not k.startswith("_")}
    kernels, busy, span, gaps = {}, 0.0, 0.0, 0.0
    for v in streams.values():
        busy += v["busy_us"]
        span = max(span, v["span_us"])
        gaps += v["gap_sum_us"]
        for name, k in v["kernels"].items():
            e = kernels.setdefault(name, dict(n=0, sum_us=0.0))
            e["n"] += k["n"]
            e["sum_us"] += k["sum_us"]
    cats = {}
    for name, k in kernels.items():
        c = cats.setdefault(category(name), dict(n=0, us=0.0))
        c["n"] += k["n"] / steps
        c["us"] += k["sum_us"] / steps
    ranked = sorted(((k["sum_us"] / steps, k["n"] / steps, name) for name, k in kernels.items()), reverse=True)
    return dict(busy_us=busy / steps, span_us=span / steps, gap_us=gaps / steps, streams=sorted(streams),
                categories=cats, top=[dict(us=u, n=n, name=name) for u, n, name in ranked[:top]],
                kernels_per_step=sum(k["n"] for k in kernels.values()) / steps)


def check_fp8(model, B, tol=1e-2, moe_only=False):
    """The GPU kernels against the reference math on the device, at B tokens: one projection of each
    FP8 kind (linear-attention q, MLA q_b / kv_a, the dense MLP's down, a shared expert's gate), one
    MoE layer's two grouped matmuls each on the same input (gate_up on x, down on the kernel's h;
    bound tol) and the whole experts (bound 5 tol: see below). Returns
    ({name: relative error}, {name: the activation quantization's size}); raises if any error exceeds
    its bound or if the reference does not quantize its activations.

    Error model. Both sides multiply the same float8_e4m3fn operands (activations quantized per token
    group, round to nearest even: quant.round_e4m3 / the kernels' _round_e4m3). They differ by the
    reference's bf16 roundings (dequantized activations and weights, 2^-9 relative each, RMS ~1.6e-3),
    the bf16 outputs (~1.6e-3 each) and float32 sums in another order: ~3e-3 relative in all (device
    call A: 4.1-4.9e-3), bound 1e-2. The whole experts quantize h, which the two sides computed with
    those ~5e-3 differences: an element of h within that distance of an fp8 rounding boundary
    (~5e-3 / 2^-4, ~8% of them) rounds the other way, off by one fp8 step (~9%): sqrt(0.08) * 0.09
    = ~2.5% (device call A: 2.0e-2), bound 5e-2; the per-matmul checks are the sharp ones.
    The fp8 rounding itself (3 mantissa bits: at most 2^-4 relative per element, RMS 2^-3 / sqrt(12) /
    sqrt(2) = 2.55% for values spread over a binade) is common to both and cancels. Session 4 measured
    2.6% here (4.4% for the experts) because XLA's GPU pipeline had removed the reference's
    float32 -> fp8 -> float32 round trip (SimplifyFPConversions), so that reference multiplied
    unquantized activations: 2.55% is exactly the activation rounding. `act_quant` reports the
    reference against unquantized activations, which must be that size (1-10%: 2.6%, experts 4.4%)."""
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    from lingjax.kernels import fp8 as fp8_kernels
    from lingjax.kernels import moe as moe_kernels
    cfg = model.cfg
    rng = np.random.default_rng(0)
    errs, act_quant = {}, {}

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    def weight_only(w):
        return quant.FP8Weight(w.q, w.scale, w.block, "none", w.kmajor)

    dense = {}
    for i, layer in enumerate(model.layers):
        att = layer.attention
        for name in ("q_proj", "q_b_proj", "kv_a_proj_with_mqa", "dense"):
            m = getattr(att, name, None)
            if m is not None and quant.is_fp8(m.kernel.get_value()):
                dense.setdefault(f"{type(att).__name__}.{name}", m.kernel.get_value())
        mlp = layer.mlp
        if getattr(mlp, "down_proj", None) is not None and quant.is_fp8(mlp.down_proj.kernel.get_value()):
            dense.setdefault("mlp.down_proj", mlp.down_proj.kernel.get_value())
        shared = getattr(mlp, "shared_experts", None)
        if shared is not None and quant.is_fp8(shared.gate_proj.kernel.get_value()):
            dense.setdefault("shared.gate_proj", shared.gate_proj.kernel.get_value())
    for name, w in ({} if moe_only else dense).items():     # moe_only: the MoE path changed, the rest did not
        x = jnp.asarray(rng.standard_normal((B, w.shape[0])), model.dtype)
        got = jax.jit(lambda x, w: fp8_kernels.matmul(x, w, impl="gpu"))(x, w)
        want = jax.jit(lambda x, w: fp8_kernels.matmul(x, w, impl="reference"))(x, w)
        plain = jax.jit(lambda x, w: fp8_kernels.matmul(x, w, impl="reference"))(x, weight_only(w))
        errs[name], act_quant[name] = rel(got, want), rel(want, plain)
    moe = next((l.mlp for l in model.layers if l.is_moe), None)
    if moe is not None and quant.is_fp8(moe.w_gate.get_value()):
        from lingjax.kernels.moe import gpu_fp8, make_layout, reference as moe_ref
        x = jnp.asarray(rng.standard_normal((B, cfg.hidden_size)), model.dtype)
        idx, w = moe.route(x)
        ws = (moe.w_gate.get_value(), moe.w_up.get_value(), moe.w_down.get_value())
        got = jax.jit(lambda *a: moe_kernels.experts(*a, impl="gpu"))(x, idx, w, *ws)
        want = jax.jit(lambda *a: moe_kernels.experts(*a, impl="reference"))(x, idx, w, *ws)
        plain = jax.jit(lambda *a: moe_kernels.experts(*a, impl="reference"))(x, idx, w, *map(weight_only, ws))
        errs["moe.experts"], act_quant["moe.experts"] = rel(got, want), rel(want, plain)
        # each grouped matmul on the same input (gate_up on x; down on the kernel's own h), so that an
        # fp8 rounding of h moved by the bf16 differences of gate_up does not count twice
        E, n_pairs = cfg.num_experts, idx.size
        lay = make_layout(idx.astype(jnp.int32), E, gpu_fp8.pick_block_m(n_pairs, E), gpu_fp8.pick_layout_method(n_pairs))
        used = np.repeat(np.asarray(lay.block_expert) >= 0, lay.block_m)
        real = used & (np.asarray(lay.row_token) < B)            # down leaves padding rows unwritten
        act = ws[0].act
        deq = [quant.dequantize(v, x.dtype) for v in ws]
        # gate_up's h unquantized (quant_h off: the same loop, h stored in x.dtype) against the reference;
        # the default launch (h quantized in gate_up where pick_config says so) against quantizing that h
        # (a bf16 rounding difference of the two tilings may move an fp8 rounding: bound 5 tol); down on
        # the default launch's own h
        gcfg = gpu_fp8.pick_config("gate_up", lay.block_m, cfg.hidden_size, ws[0].shape[-1], act)
        plain = dataclasses.replace(gcfg, quant_h=False)
        h = jax.jit(lambda x, a, b: gpu_fp8.gate_up(x, lay, a, b, x.dtype, config=plain))(x, ws[0], ws[1])
        h_ref = jax.jit(lambda x, a, b: moe_ref.gate_up(quant.quantize_activation(x, act), lay, a, b))(x, deq[0], deq[1])
        hk = jax.jit(lambda x, a, b: gpu_fp8.gate_up(x, lay, a, b, x.dtype))(x, ws[0], ws[1])
        y = jax.jit(lambda h, c: gpu_fp8.down(h, lay, c, x.dtype, B))(hk, ws[2])
        if isinstance(hk, tuple):                      # (h_q, h_s): what down multiplied
            hq, hs = (np.asarray(v, np.float32) for v in hk)
            h_in = jnp.asarray(hq * np.repeat(hs, 128, axis=-1)[:, :hq.shape[-1]], x.dtype)
            errs["moe.h_quant"] = rel(np.asarray(h_in)[real],
                                      np.asarray(quant.quantize_activation(h, act))[real])
        else:
            h_in = quant.quantize_activation(hk, act)
        y_ref = jax.jit(lambda h, c: moe_ref.down(h, lay, c))(h_in, deq[2])
        errs["moe.gate_up"] = rel(np.asarray(h)[used], np.asarray(h_ref)[used])
        errs["moe.down"] = rel(np.asarray(y)[real], np.asarray(y_ref)[real])
    bound = {k: 5 * tol if k in ("moe.experts", "moe.h_quant") else tol for k in errs}
    bad = {k: v for k, v in errs.items() if not v < bound[k]}
    if bad:
        raise SystemExit(f"FP8 GPU kernels differ from the reference math beyond {tol} (whole experts {5 * tol}): {bad}")
    noq = {k: v for k, v in act_quant.items() if not 0.01 < v < 0.1}
    if noq:
        raise SystemExit(f"the reference's activation quantization is not the fp8 rounding's size (1-10%): {noq}")
    return errs, act_quant


def xla_fp8_round_trip_rounds() -> bool:
    """Whether XLA on this backend rounds x.astype(float8_e4m3fn).astype(float32) inside one jit (the
    round trip the reference math used before quant.round_e4m3: XLA's GPU pipeline removes it)."""
    import jax
    import jax.numpy as jnp
    x = jnp.float32(1.0 + 2.0 ** -6)                      # not an e4m3 value: rounds to 1.0
    y = jax.jit(lambda v: v.astype(jnp.float8_e4m3fn).astype(jnp.float32))(x)
    return float(y) != float(x)


def profile_mode(model, cfg, B, C, steps, reps, page_size, smoke):
    import jax
    from bench_e2e import decode_setup, time_steps
    from bench_linear_attention import device_trace
    f, state, caches, batch = decode_setup(model, cfg, None, B, C, page_size)
    step_ms, compile_s, caches = time_steps(f, state, caches, batch, steps, reps)
    out = dict(step_ms=step_ms, compile_s=compile_s)
    if smoke or jax.default_backend() != "gpu":
        return out

    box = {}

    def run():
        c = caches
        for _ in range(steps):
            tk, c = f(state, c, batch)
        jax.block_until_ready((tk, c))
        box["c"] = c
    tr = device_trace(run, steps)
    out.update(per_step_kernels(tr, steps, top=25))
    return out


def profile_prefill(model, cfg, L, reps, smoke):
    """One prefill step of a prompt of L tokens (bench_e2e.prefill_ms: Engine.generate, one token), its wall time
    (median of reps after a warm-up) and, on a GPU, its kernels traced as profile_mode's."""
    import jax
    from bench_e2e import prefill_engine, prefill_ms
    from bench_linear_attention import device_trace
    from lingjax.engine import SamplingParams
    eng = prefill_engine(model, None, 1, L)
    out = dict(step_ms=prefill_ms(model, None, cfg, 1, L, reps, eng=eng), compile_s=0.0)
    if smoke or jax.default_backend() != "gpu":
        return out
    prompt = np.random.default_rng(L).integers(2, cfg.vocab_size, L).tolist()
    sp = SamplingParams(max_new_tokens=1, ignore_eos=True)
    eng.generate([prompt], sp)
    out.update(per_step_kernels(device_trace(lambda: eng.generate([prompt], sp), 1), 1, top=25))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash8", help="model shapes (scripts/shapes.py; default flash8)")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--batch", default="16", help="decode batch B, or a comma list (each profiled on the same model; "
                                              "default 16)")
    p.add_argument("--context", type=int, default=1024, help="context C of every request (default 1024)")
    p.add_argument("--modes", default="bf16,fp8,fp8-inout", help=f"comma list of {', '.join(MODES)} (see above)")
    p.add_argument("--scheme", choices=("fp8-block", "fp8-channel"), default="fp8-block",
                   help="FP8 format of the fp8 modes (default fp8-block: 128x128 weight blocks, per-token-group "
                        "activations)")
    p.add_argument("--steps", type=int, default=5, help="decode steps per timed / traced run (default 5)")
    p.add_argument("--reps", type=int, default=3, help="timed runs, median reported (default 3)")
    p.add_argument("--page-size", type=int, default=64, help="MLA latent positions per page (default 64)")
    p.add_argument("--bandwidth", type=float, default=4.3e12,
                   help="copy bandwidth for the floor in bytes/s (default 4.3e12, the H200 measured)")
    p.add_argument("--fp8-moe-decode", type=int, default=None, metavar="N",
                   help="FP8 MoE: the decode path (no layout; gpu_fp8.experts_decode) up to N tokens per step, in the "
                        "steps and the check's moe.experts (default: the library's, 0 = the grouped path always)")
    p.add_argument("--fp8-moe-quant-h", action="store_true",
                   help="FP8 MoE decode path: down quantizes h itself (gpu_fp8.DECODE_QUANT_H)")
    p.add_argument("--prefill", type=int, default=0, metavar="L",
                   help="also profile, per mode, one prefill step of a prompt of L tokens (rows '<mode> prefill L'; "
                        "their floor column is left empty); default 0: none")
    p.add_argument("--check-only", action="store_true",
                   help="FP8 modes: only the device check of the kernels against the reference math (no timing)")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny preset, no trace")
    p.add_argument("--out", default=os.environ.get("OUT", "scripts/results"),
                   help="directory of profile_fp8.json (default $OUT or scripts/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from lingjax import quant
    from bench_e2e import fp8_moe_options, step_bytes
    from lingjax.kernels import fp8 as fp8_kernels
    from lingjax.kernels.moe import gpu_fp8
    from shapes import preset, random_fp8_model, random_model, weight_bytes
    dense_decode = fp8_kernels.DENSE_DECODE
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r} ({', '.join(MODES)})")
    cfg = preset("tiny" if args.smoke else args.preset, args.layers)
    batches = [2] if args.smoke else [int(b) for b in args.batch.split(",") if b]
    B, C = batches[0], (8 if args.smoke else args.context)
    steps, reps = (2, 1) if args.smoke else (args.steps, args.reps)
    name = "tiny" if args.smoke else args.preset
    report = dict(device=jax.devices()[0].device_kind, preset=name, layers=cfg.num_hidden_layers,
                  vocab=cfg.vocab_size, batch=batches, context=C, scheme=args.scheme, steps=steps, modes={},
                  fp8_moe_decode=args.fp8_moe_decode, fp8_moe_quant_h=args.fp8_moe_quant_h)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "profile_fp8.json")
    t_all = time.perf_counter()
    model = None
    for mode in modes:
        t0 = time.perf_counter()
        if mode.startswith("fp8-dec"):          # read when the mode's steps are traced
            gpu_fp8.DECODE_MAX_TOKENS, gpu_fp8.DECODE_QUANT_H = max(batches), mode == "fp8-decqh"
        else:
            fp8_moe_options(args.fp8_moe_decode, args.fp8_moe_quant_h)
        fp8_kernels.DENSE_DECODE = "triton" if mode == "fp8-dt" else dense_decode
        if mode == "bf16":
            model = None
            gc.collect()
            model = random_model(cfg, None, jnp.bfloat16)
        elif model is None or not quant.is_fp8(model.layers[0].attention.dense.kernel.get_value()):
            model = None
            gc.collect()
            model = random_fp8_model(cfg, jnp.bfloat16, args.scheme, kmajor=(mode != "fp8-inout"))
        else:
            quant.to_kernel_layout(model, kmajor=(mode != "fp8-inout"))
        jax.block_until_ready(jax.tree.leaves(model))
        init_s = time.perf_counter() - t0
        check = {}
        if mode != "bf16" and jax.default_backend() == "gpu":
            report["xla_fp8_round_trip_rounds"] = xla_fp8_round_trip_rounds()
            log.info("XLA rounds a float32 -> fp8 -> float32 round trip in one jit: %s",
                     report["xla_fp8_round_trip_rounds"])
            check["check"], check["act_quant"] = check_fp8(model, B, moe_only=mode.startswith("fp8-dec"))
            log.info("%s: kernels vs reference %s (ok); the reference's activation quantization %s", mode,
                     {k: f"{v:.1e}" for k, v in check["check"].items()},
                     {k: f"{v:.1e}" for k, v in check["act_quant"].items()})
        if args.check_only:
            report["modes"][mode] = dict(init_s=init_s, **check)
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
            continue
        for b in batches:
            key = mode if len(batches) == 1 else f"{mode} B={b}"
            row = dict(batch=b, init_s=init_s, weight_bytes=weight_bytes(model), **check)
            nbytes, _ = step_bytes(cfg, model, b, C, 1)
            row["floor_ms"] = nbytes / args.bandwidth * 1e3
            row["bytes"] = nbytes
            row.update(profile_mode(model, cfg, b, C, steps, reps, args.page_size, args.smoke))
            report["modes"][key] = row
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
            log.info("%s: step %.2f ms (floor %.2f ms), compile %.0f s, %.0f s so far", key, row["step_ms"],
                     row["floor_ms"], row["compile_s"], time.perf_counter() - t_all)
            for c, v in sorted(row.get("categories", {}).items(), key=lambda kv: -kv[1]["us"]):
                log.info("  %-50s %8.1f us/step  %5.0f launches/step", c, v["us"], v["n"])
            for k in row.get("top", [])[:12]:
                log.info("  %8.1f us (%.0f)  %s", k["us"], k["n"], k["name"])
        if args.prefill:
            L = 16 if args.smoke else args.prefill
            key = f"{mode} prefill {L}"
            row = dict(batch=1, prefill=L, init_s=init_s, weight_bytes=weight_bytes(model), floor_ms=None,
                       **profile_prefill(model, cfg, L, reps, args.smoke))
            report["modes"][key] = row
            with open(path, "w") as f:
                json.dump(report, f, indent=1)
            log.info("%s: %.2f ms, %.0f s so far", key, row["step_ms"], time.perf_counter() - t_all)
            for c, v in sorted(row.get("categories", {}).items(), key=lambda kv: -kv[1]["us"]):
                log.info("  %-50s %8.1f us/step  %5.0f launches/step", c, v["us"], v["n"])
            for k in row.get("top", [])[:16]:
                log.info("  %8.1f us (%.0f)  %s", k["us"], k["n"], k["name"])
    if args.check_only:
        print("FP8 kernels vs the reference math on the device:", {m: r.get("check") for m, r in report["modes"].items()})
        return 0
    print(f"\n{report['device']}, {name} ({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}), "
          f"decode B={','.join(map(str, batches))} C={C}, {args.scheme}")
    print("| mode | step ms | floor ms | busy us | gaps us | kernels/step | GiB weights |\n|---|---|---|---|---|---|---|")
    for mode, r in report["modes"].items():
        floor = "-" if r["floor_ms"] is None else f"{r['floor_ms']:.2f}"
        print(f"| {mode} | {r['step_ms']:.2f} | {floor} | {r.get('busy_us', 0):.0f} | "
              f"{r.get('gap_us', 0):.0f} | {r.get('kernels_per_step', 0):.0f} | {r['weight_bytes'] / 2**30:.1f} |")
    cats = sorted({c for r in report["modes"].values() for c in r.get("categories", {})})
    if cats:
        print("\ndevice us per step by category (launches per step)")
        print("| category | " + " | ".join(report["modes"]) + " |\n|---|" + "---|" * len(report["modes"]))
        for c in cats:
            cells = []
            for r in report["modes"].values():
                v = r.get("categories", {}).get(c)
                cells.append(f"{v['us']:.0f} ({v['n']:.0f})" if v else "-")
            print(f"| {c} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
