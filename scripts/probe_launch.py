"""Why does enqueueing a step's kernels cost the host ~11 us per kernel? (issue 17, host launch overhead)

Two parts, each compiled under several XLA command-buffer settings in one process: every executable is
compiled from the same lowered module with `Lowered.compile(compiler_options=...)` (XLA debug options set
per executable, not through XLA_FLAGS), so one process compares them.

 1. micro: K chained tiny ops in one jitted call, K = --k (default 64):
      xla     K elementwise XLA kernels (optimization barriers between them: no fusion)
      jt0     K jax-triton calls of a one-block kernel (GPU only)
      jt16k / jt64k   the same with 16 / 64 KiB of incompressible serialized_metadata in each call's
              opaque: jaxlib's triton_kernel_call looks every launch up in a hash map keyed by the whole
              opaque (zlib(proto: PTX + TTIR + metadata)), so its cost may grow with the opaque's size
      mixed   K/2 XLA ops and K/2 jax-triton calls alternating (command buffers cut at each custom call)
    per variant: host us per op (the call's return, device idle before: enqueueing), device us per op
    (back to back), and equality of the result with the default variant's.
 2. steps (flash8 random weights, one request): a 512-token prefill step after 8192 cached positions (the
    prefix-cache hit's step: same shapes, mode and kernels) and the decode step at B=1, recorded from an
    engine run (prefill_chunk 512) and replayed: host ms (the jitted call's return from an idle device),
    alone ms (return + device), back-to-back ms per step, args ms (a no-op jitted call taking the same
    arguments: argument handling and transfers), the compiled HLO's counts (fusions, custom calls by
    target, whiles; the jax-triton opaques' total and largest size), compile seconds, and a check that
    each variant's token and logprob equal the default's on the same saved caches (bit for bit: the same
    HLO, only how the thunks are launched differs).
Variants (--variants): default (XLA's own settings), cb_off (xla_gpu_enable_command_buffer=''),
cb_min1 (the default command types, graphs from 1 kernel: xla_gpu_graph_min_graph_size=1), cb_all (every
command type incl. WHILE / CONDITIONAL / DYNAMIC_SLICE_FUSION, min size 1).
A trace of one hit step under the XLA profiler (default variant; XLA turns command buffers off while
profiling unless xla_enable_command_buffers_during_profiling) adds the host events' names by total time
(what the host does while it enqueues), unless --no-trace.

    . scripts/gpu_env.sh; python3 scripts/probe_launch.py --out $OUT          # nvidia-h200, ~2 min
    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 scripts/probe_launch.py --smoke   # CPU plumbing
Writes --out/probe_launch.json after every part and prints the tables.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import json
import logging
import os
import re
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("probe_launch")

ALL_CMDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"
VARIANTS = {
    "default": {},
    "cb_off": {"xla_gpu_enable_command_buffer": ""},
    "cb_min1": {"xla_gpu_graph_min_graph_size": 1},
    "cb_all": {"xla_gpu_enable_command_buffer": ALL_CMDS, "xla_gpu_graph_min_graph_size": 1},
}


def compile_variant(lowered, name):
    opts = VARIANTS[name]
    t = time.perf_counter()
    c = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    return c, time.perf_counter() - t


def hlo_counts(text: str) -> dict:
    """Counts in an optimized HLO module's text: fusions, custom calls by target, whiles, and the sizes
    of the jax-triton calls' opaques (their backend_config, unescaped)."""
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
    sizes = []
    for line in text.splitlines():
        if 'custom_call_target="triton_kernel_call"' not in line:
            continue
        m = re.search(r'backend_config="((?:[^"\\]|\\.)*)"', line)
        if m:
            try:
                sizes.append(len(codecs.escape_decode(m.group(1).encode("latin-1"))[0]))
            except Exception:                     # noqa: BLE001  (an unexpected escape: count the text)
                sizes.append(len(m.group(1)))
    return dict(fusions=len(re.findall(r"\s=\s[^=]*?\sfusion\(", text)), custom_calls=dict(targets),
                whiles=len(re.findall(r"\swhile\(", text)), conditionals=len(re.findall(r"\sconditional\(", text)),
                triton_opaque_bytes_total=sum(sizes), triton_opaque_bytes_max=max(sizes, default=0),
                triton_opaque_bytes_median=statistics.median(sizes) if sizes else 0)


def time_calls(call, state, n):
    """call(state) -> (out, new state). -> (host ms: median return time from an idle device, alone ms:
    return + device, pipe ms: n calls back to back per call, the state)."""
    import jax
    host, alone = [], []
    for i in range(n + 2):
        t = time.perf_counter()
        out, state = call(state)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        if i >= 2:
            host.append(t1 - t)
            alone.append(t2 - t)
    t = time.perf_counter()
    for _ in range(n):
        out, state = call(state)
    jax.block_until_ready(out)
    pipe = (time.perf_counter() - t) / n
    return 1e3 * statistics.median(host), 1e3 * statistics.median(alone), 1e3 * pipe, state


# ------------------------------------------------------------------------------------------ 1. micro
def micro(args, variants, on_gpu):
    import jax
    import jax.numpy as jnp
    K = args.k
    kinds = ["xla"] + (["jt0", "jt16k", "jt64k", "mixed"] if on_gpu else [])
    add_one = None
    if on_gpu:
        import triton
        import triton.language as tl
        from lingjax.kernels.jax_triton_lib import jax_triton
        jt = jax_triton()

        @triton.jit
        def add_one_kernel(x_ptr, o_ptr, N: tl.constexpr):
            i = tl.arange(0, N)
            tl.store(o_ptr + i, tl.load(x_ptr + i) + 1.0)

        def add_one(x, meta: bytes):
            return jt.triton_call(x, kernel=add_one_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  grid=(1,), N=x.size, serialized_metadata=meta)

    rng = np.random.default_rng(0)
    metas = {"jt0": b"", "jt16k": rng.bytes(16 << 10), "jt64k": rng.bytes(64 << 10)}

    def make(kind):
        def f(x):
            for i in range(K):
                if kind == "xla" or (kind == "mixed" and i % 2 == 0):
                    x = jax.lax.optimization_barrier(x * 1.0001 + 1.0)
                else:
                    x = add_one(x, metas.get(kind, b""))
            return x
        return jax.jit(f)

    x0 = jnp.zeros(128, jnp.float32)
    rows = []
    for kind in kinds:
        lowered = make(kind).lower(x0)
        ref = None
        for v in variants:
            try:
                c, cs = compile_variant(lowered, v)
                y = np.asarray(c(x0))
            except Exception as e:               # noqa: BLE001  (reported, the others still run)
                rows.append(dict(kind=kind, variant=v, error=f"{type(e).__name__}: {str(e)[:200]}"))
                log.info("micro %s %s: failed: %s", kind, v, rows[-1]["error"])
                continue
            ref = y if ref is None else ref
            host, alone, pipe, _ = time_calls(lambda s: (c(x0), s), None, args.calls)
            rows.append(dict(kind=kind, variant=v, host_us_per_op=1e3 * host / K, alone_us_per_op=1e3 * alone / K,
                             pipe_us_per_op=1e3 * pipe / K, same=bool(np.array_equal(y, ref)), compile_s=cs))
            log.info("micro %-6s %-8s host %6.2f us/op, back to back %6.2f us/op, alone %6.2f us/op, same %s",
                     kind, v, rows[-1]["host_us_per_op"], rows[-1]["pipe_us_per_op"], rows[-1]["alone_us_per_op"],
                     rows[-1]["same"])
    return dict(k=K, rows=rows)


# ------------------------------------------------------------------------------------------ 2. steps
def record_steps(args):
    """Run one request through an engine and record the last prefill step's and a decode step's calls."""
    import jax
    import jax.numpy as jnp
    from lingjax import engine as engine_lib
    from lingjax.cache import pages_for
    from lingjax.engine import Engine, SamplingParams
    from shapes import preset, random_model

    cfg = preset(args.preset, args.layers)
    model = random_model(cfg, None, jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    L = args.context + args.chunk
    eng = Engine(model, max_batch=1, prefill_chunk=args.chunk, max_len=L + 16, page_size=args.page_size,
                 num_pages=3 * pages_for(L + 16, args.page_size), prefix_cache=True, prefix_cache_states=4)
    calls = {}
    orig = engine_lib._step_fn

    def rec(*a, **kw):
        calls["decode" if a[2].decode_only else "hit"] = (a, kw)
        return orig(*a, **kw)

    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, L).tolist()
    engine_lib._step_fn = rec
    try:
        t = time.perf_counter()
        eng.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))
        first_s = time.perf_counter() - t
    finally:
        engine_lib._step_fn = orig
    return eng, calls, first_s


def steps(args, variants, budget_end, report, save):
    import jax
    from lingjax import engine as engine_lib
    eng, calls, first_s = record_steps(args)
    report["steps_first_run_s"] = first_s
    log.info("engine run (compiles the prefill and decode steps): %.1f s", first_s)
    fn = engine_lib._step_fn
    out, prep = {}, {}
    for which in ("hit", "decode"):
        a, kw = calls[which]
        rest = a[2:]
        out[which] = dict(tokens=int(a[2].tokens.shape[0]), mode=str(kw["mode"]), rows=[])
        saved = jax.tree.map(lambda x: x.copy(), eng.caches)          # the check's inputs, for every variant
        prep[which] = (a, rest, fn.lower(a[0], eng.caches, *rest, **kw), saved)

        # argument handling alone: the same arguments, no kernels (the caches returned untouched)
        noop = jax.jit(lambda params, caches, *r: caches, donate_argnums=(1,))
        h, _, _, caches = time_calls(lambda s: (lambda c: (c, c))(noop(a[0], s, *rest)), _copy(saved), args.calls)
        out[which]["args_ms"] = h
        del caches
    refs = {}
    for v in variants:                   # each variant: the hit step, then the decode step
        for which in ("hit", "decode"):
            a, rest, lowered, saved = prep[which]
            res = out[which]
            if time.perf_counter() > budget_end:
                res["rows"].append(dict(variant=v, error="not run: --budget spent"))
                log.info("%s %s: not run (--budget spent)", which, v)
                continue
            try:
                c, cs = compile_variant(lowered, v)
                o = c(a[0], _copy(saved), *rest)
                tok, lp = np.asarray(o[1]), None if o[2] is None else np.asarray(o[2])
            except Exception as e:               # noqa: BLE001
                res["rows"].append(dict(variant=v, error=f"{type(e).__name__}: {str(e)[:300]}"))
                log.info("%s %s: failed: %s", which, v, res["rows"][-1]["error"])
                continue
            ref = refs.setdefault(which, (tok, lp))
            same = bool(np.array_equal(tok, ref[0]) and (lp is None or np.array_equal(lp, ref[1])))

            def call(caches, c=c, a=a, rest=rest):
                o = c(a[0], caches, *rest)
                return o[1], o[-1]
            host, alone, pipe, caches = time_calls(call, _copy(saved), args.calls)
            del caches
            row = dict(variant=v, host_ms=host, alone_ms=alone, pipe_ms=pipe, compile_s=cs, same=same,
                       token=int(tok[0]), logprob=None if lp is None else float(lp[0]))
            if v == variants[0] or args.all_hlo:
                try:
                    row["hlo"] = hlo_counts(c.as_text())
                except Exception as e:           # noqa: BLE001
                    row["hlo_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            res["rows"].append(row)
            log.info("%s %-8s host %6.2f ms, alone %6.2f ms, back to back %6.2f ms, compile %5.1f s, same %s%s",
                     which, v, host, alone, pipe, cs, same, f", hlo {row['hlo']}" if "hlo" in row else "")
            report["steps"] = out
            save()
    report["steps"] = out
    save()
    report["pieces"] = pieces(eng, calls["hit"], args.calls)
    save()
    report["readback"] = {w: readback(eng, calls[w], args.calls) for w in ("hit", "decode")}
    save()
    try:
        report["readback_micro"] = readback_micro(args.calls)
    except Exception as e:                       # noqa: BLE001
        report["readback_micro"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    save()
    if not args.no_trace:
        for w in ("hit", "decode"):
            try:
                report.setdefault("startup", {})[w] = startup(eng, calls[w], w)
            except Exception as e:               # noqa: BLE001
                report.setdefault("startup", {})[w] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
                log.info("startup trace %s failed: %s", w, report["startup"][w]["error"])
            save()
    if not args.no_trace:
        try:
            report["trace_hit_host"] = trace_host(fn, calls["hit"], eng)
        except Exception as e:                   # noqa: BLE001
            report["trace_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log.info("trace failed: %s", report["trace_error"])
        save()
    return out


def pieces(eng, call, n):
    """Host pieces of a hit besides its step (default settings, the engine's own executables): the state
    restore's jitted call (_copy_rows, one row; return time and with the device) and the readback of a
    step's sampled token (device_get after the device is done, its copy started at dispatch as the
    engine does: the host's own cost of reading)."""
    import jax
    from lingjax import engine as engine_lib
    src, dst = np.array([eng.num_slots], np.int32), np.array([0], np.int32)
    host, alone, _, eng.caches = time_calls(lambda c: (lambda o: (o, o))(engine_lib._copy_rows(c, src, dst)),
                                            eng.caches, n)
    variants = {}
    lowered = engine_lib._copy_rows.lower(eng.caches, src, dst)
    for v in VARIANTS:                     # the same call compiled under each command-buffer setting
        try:
            c, _ = compile_variant(lowered, v)
            h, al, _, eng.caches = time_calls(lambda x, c=c: (lambda o: (o, o))(c(x, src, dst)), eng.caches, n)
            variants[v] = dict(host_ms=h, alone_ms=al)
        except Exception as e:             # noqa: BLE001
            variants[v] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
        log.info("pieces: _copy_rows %s: %s", v, variants[v])
    a, kw = call
    reads = []
    for _ in range(n):
        o = engine_lib._step_fn(a[0], eng.caches, *a[2:], **kw)
        eng.caches = o[-1]
        o[1].copy_to_host_async()
        jax.block_until_ready(o)
        t = time.perf_counter()
        jax.device_get((o[1],))
        reads.append(time.perf_counter() - t)
    res = dict(copy_rows_host_ms=host, copy_rows_alone_ms=alone, readback_ms=1e3 * statistics.median(reads),
               copy_rows_variants=variants)
    log.info("pieces: _copy_rows returns after %.3f ms (%.3f ms with the device); reading a token back after "
             "the device is done: %.3f ms", host, alone, res["readback_ms"])
    return res


def readback(eng, call, n):
    """How long the host waits for a step's sampled token beyond the step itself (default settings):
    from an idle device, the call then (a) block_until_ready (the step alone), (b) as the engine reads:
    copy_to_host_async right after the call, then jax.device_get, (c) device_get without the early copy.
    -> median ms of each; (b) - (a) is the readback's latency in the engine's pattern."""
    import jax
    from lingjax import engine as engine_lib
    a, kw = call
    res = {}
    for mode in ("alone", "engine", "no_early_copy", "alone"):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            o = engine_lib._step_fn(a[0], eng.caches, *a[2:], **kw)
            eng.caches = o[-1]
            if mode == "alone":
                jax.block_until_ready(o[1])
            else:
                if mode == "engine":
                    o[1].copy_to_host_async()
                jax.device_get((o[1],))
            ts.append(time.perf_counter() - t)
            jax.block_until_ready(o)
        res[mode] = 1e3 * statistics.median(ts)       # "alone" twice: before and after (drift)
    log.info("readback: step alone %.2f ms, with the token read as the engine does %.2f ms, without the early "
             "copy %.2f ms", res["alone"], res["engine"], res["no_early_copy"])
    return res


def startup(eng, call, label):
    """One step from an idle device under the XLA profiler (annotated host span: the call, then reading
    the token as the engine does): when the first kernel starts after the call began, the device's idle
    gaps inside the kernels' span (the largest, with the kernels around them), and the tail from the last
    kernel to the token on the host."""
    import jax
    import profile_prefix as pp
    from lingjax import engine as engine_lib
    a, kw = call
    o = engine_lib._step_fn(a[0], eng.caches, *a[2:], **kw)
    eng.caches = o[-1]
    jax.block_until_ready(o)
    t_ret = []

    def run():
        with jax.profiler.TraceAnnotation("profile_prefix_hit"):
            t = time.perf_counter()
            o = engine_lib._step_fn(a[0], eng.caches, *a[2:], **kw)
            t_ret.append(time.perf_counter() - t)
            eng.caches = o[-1]
            o[1].copy_to_host_async()
            jax.device_get((o[1],))
        jax.block_until_ready(o)
    kernels, mark = pp.trace(run, {})
    if not kernels or mark is None:
        return dict(error="no kernels or no host annotation in the trace")
    gaps, end = [], None
    for s0, d, name, _, _ in kernels:
        if end is not None and s0 - end[0] > 0:
            gaps.append((s0 - end[0], end[0], end[1], name))
        if end is None or s0 + d > end[0]:
            end = (s0 + d, name)
    first, last = kernels[0][0], end[0]
    busy = sum(d for _, d, *_ in kernels)
    big = sorted(gaps, reverse=True)[:12]
    res = dict(kernels=len(kernels), call_returns_us=1e6 * t_ret[0], first_kernel_after_us=(first - mark[0]) / 1e3,
               span_us=(last - first) / 1e3, busy_us_sum=busy / 1e3, idle_in_span_us=sum(g for g, *_ in gaps) / 1e3,
               tail_after_last_kernel_us=(mark[1] - last) / 1e3, host_span_us=(mark[1] - mark[0]) / 1e3,
               largest_gaps=[dict(gap_us=g / 1e3, at_us=(at - first) / 1e3, before=b[:70], after=n[:70])
                             for g, at, b, n in big],
               idle_first_ms_us=sum(g for g, at, *_ in gaps if at - first < 1e6) / 1e3)
    log.info("startup %s: %d kernels; call returns after %.0f us; first kernel %.0f us after the call began; span "
             "%.0f us, idle inside %.0f us (%.0f us of it in the first ms); token on the host %.0f us after the last "
             "kernel", label, res["kernels"], res["call_returns_us"], res["first_kernel_after_us"], res["span_us"],
             res["idle_in_span_us"], res["idle_first_ms_us"], res["tail_after_last_kernel_us"])
    for g in res["largest_gaps"]:
        log.info("  gap %7.1f us at %8.1f us: %s -> %s", g["gap_us"], g["at_us"], g["before"], g["after"])
    return res


def readback_micro(n):
    """The token's way back, alone: a jitted function that keeps the device busy ~2 ms (a chain of matmuls)
    and returns an int32[1]; median ms from the call to the value on the host when (a) only waiting for the
    device (block_until_ready), (b) copy_to_host_async right after the call, then device_get (the engine's
    pattern), (c) the output placed in pinned host memory by the executable itself (out_shardings with
    memory_kind="pinned_host"), then np.asarray."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    dev = jax.devices()[0]

    def f(x):
        for _ in range(8):
            x = jnp.tanh(x @ x)
        return jnp.argmax(x[0]).astype(jnp.int32)[None]
    size = 2048 if jax.default_backend() == "gpu" else 128        # the CPU smoke: the plumbing only
    x = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    fns = {"device": jax.jit(f), "engine": jax.jit(f)}
    try:
        fns["pinned_host"] = jax.jit(f, out_shardings=SingleDeviceSharding(dev, memory_kind="pinned_host"))
    except Exception as e:                     # noqa: BLE001
        log.info("readback micro: no pinned_host output: %s", e)
    res, ref = {}, None
    for mode, fn in fns.items():
        try:
            v = np.asarray(fn(x))
        except Exception as e:                 # noqa: BLE001
            res[mode] = f"failed: {type(e).__name__}: {str(e)[:150]}"
            continue
        ref = v if ref is None else ref
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            o = fn(x)
            if mode == "device":
                jax.block_until_ready(o)
            elif mode == "engine":
                o.copy_to_host_async()
                jax.device_get(o)
            else:
                np.asarray(o)
            ts.append(time.perf_counter() - t)
        res[mode] = 1e3 * statistics.median(ts)
        res[mode + "_same"] = bool(np.array_equal(v, ref))
    log.info("readback micro (ms from the call to the value on the host): %s", res)
    return res


def _copy(tree):
    import jax
    return jax.tree.map(lambda x: x.copy(), tree)


def trace_host(fn, call, eng):
    """One hit step (default variant) under the XLA profiler: host events by name (count, total us) on
    the thread that dispatched it, the device kernels' count, and the lines of each plane."""
    import jax
    from jax._src.lib import _profile_data, _profiler
    a, kw = call
    o = fn(a[0], eng.caches, *a[2:], **kw)
    eng.caches = o[-1]
    jax.block_until_ready(o)
    sess = _profiler.ProfilerSession()
    try:
        t0 = time.perf_counter_ns()
        o = fn(a[0], eng.caches, *a[2:], **kw)
        t1 = time.perf_counter_ns()
        jax.block_until_ready(o)
        eng.caches = o[-1]
    finally:
        xs = sess.stop()
    data = _profile_data.ProfileData.from_serialized_xspace(xs)
    names, planes, kernels = {}, {}, 0
    for plane in data.planes:
        planes[plane.name] = [line.name for line in plane.lines][:40]
        if plane.name.startswith("/device:GPU"):
            kernels += sum(1 for line in plane.lines if line.name.startswith("Stream") for _ in line.events)
            continue
        for line in plane.lines:
            for e in line.events:
                k = (plane.name[:20], line.name[:30], e.name[:60])
                s = names.setdefault(k, [0, 0.0])
                s[0] += 1
                s[1] += e.duration_ns / 1e3
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:40]
    res = dict(dispatch_ms_under_profiler=(t1 - t0) / 1e6, device_kernels=kernels, planes=planes,
               host_events=[dict(plane=k[0], line=k[1], name=k[2], n=v[0], us=v[1]) for k, v in top])
    log.info("trace: dispatch %.2f ms under the profiler, %d device kernels; host events by total time:",
             res["dispatch_ms_under_profiler"], kernels)
    for r in res["host_events"][:25]:
        log.info("  %9.1f us %5d x  %-20s %-30s %s", r["us"], r["n"], r["plane"], r["line"], r["name"])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["default", "cb_off", "cb_all", "cb_min1"], choices=list(VARIANTS),
                   help="XLA command-buffer settings to compare (the first is the reference of the checks); "
                        "default: default cb_off cb_all cb_min1")
    p.add_argument("--parts", nargs="+", default=["micro", "steps"], choices=["micro", "steps"],
                   help="parts to run (default both)")
    p.add_argument("--k", type=int, default=64, help="ops per call in the micro part (default 64)")
    p.add_argument("--calls", type=int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--preset", default="flash8", help="model shapes of the steps part (scripts/shapes.py; flash8)")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--context", type=int, default=8192, help="cached positions before the prefill step (8192)")
    p.add_argument("--chunk", type=int, default=512, help="tokens of the prefill step (512)")
    p.add_argument("--page-size", type=int, default=64, help="MLA page size (64)")
    p.add_argument("--all-hlo", action="store_true", help="HLO counts of every variant (default: the first)")
    p.add_argument("--no-trace", action="store_true", help="skip the profiler trace of the hit step")
    p.add_argument("--budget", type=float, default=115,
                   help="seconds: no step variant starts after it (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing: tiny preset, 256 + 64 tokens, page 16")
    p.add_argument("--out", default=os.environ.get("OUT", "scripts/results"),
                   help="directory of probe_launch.json (default $OUT or scripts/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    t_start = time.perf_counter()
    if args.smoke:
        args.preset, args.context, args.chunk, args.page_size, args.calls, args.k = "tiny", 256, 64, 16, 3, 8
    on_gpu = jax.default_backend() == "gpu"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "probe_launch.json")
    report = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, variants={v: VARIANTS[v] for v in args.variants},
                  preset=args.preset, context=args.context, chunk=args.chunk)

    def save():
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    if "micro" in args.parts:
        report["micro"] = micro(args, args.variants, on_gpu)
        save()
    if "steps" in args.parts:
        steps(args, args.variants, t_start + args.budget, report, save)
    report["total_s"] = time.perf_counter() - t_start
    save()

    print(f"\n{report['device']}, jax {report['jax']}")
    if "micro" in report:
        print(f"micro: {args.k} chained ops per call; us per op\n| ops | variant | host | back to back | alone | same |"
              "\n|---|---|---|---|---|---|")
        for r in report["micro"]["rows"]:
            if "error" in r:
                print(f"| {r['kind']} | {r['variant']} | failed: {r['error'][:80]} | | | |")
            else:
                print(f"| {r['kind']} | {r['variant']} | {r['host_us_per_op']:.2f} | {r['pipe_us_per_op']:.2f} | "
                      f"{r['alone_us_per_op']:.2f} | {'yes' if r['same'] else 'NO'} |")
    for which, res in report.get("steps", {}).items():
        print(f"\n{which} step ({res['tokens']} tokens, mode {res['mode']}; {args.preset}, context {args.context}): "
              f"argument handling alone {res['args_ms']:.2f} ms\n| variant | host ms | alone ms | back to back ms | "
              f"compile s | same token+logprob |\n|---|---|---|---|---|---|")
        for r in res["rows"]:
            if "error" in r:
                print(f"| {r['variant']} | failed: {r['error'][:100]} | | | | |")
            else:
                print(f"| {r['variant']} | {r['host_ms']:.2f} | {r['alone_ms']:.2f} | {r['pipe_ms']:.2f} | "
                      f"{r['compile_s']:.1f} | {'yes' if r['same'] else 'NO'} |")
        for r in res["rows"]:
            if "hlo" in r:
                print(f"  {r['variant']} HLO: {r['hlo']}")
    if "pieces" in report:
        pc = report["pieces"]
        print(f"\nstate restore (_copy_rows) returns after {pc['copy_rows_host_ms']:.3f} ms ({pc['copy_rows_alone_ms']:.3f} "
              f"ms with its kernels); reading the token back (device done): {pc['readback_ms']:.3f} ms")
        for v, r in pc["copy_rows_variants"].items():
            print(f"  _copy_rows compiled {v}: " + (r["error"] if "error" in r else
                                                    f"returns {r['host_ms']:.3f} ms, with the device {r['alone_ms']:.3f} ms"))
    for w, r in report.get("readback", {}).items():
        print(f"{w} step from an idle device: alone {r['alone']:.2f} ms; with the token read as the engine does "
              f"{r['engine']:.2f} ms (+{r['engine'] - r['alone']:.2f}); without the early copy {r['no_early_copy']:.2f} ms")
    if "readback_micro" in report:
        print(f"readback micro (ms from the call to an int32[1] on the host, ~2 ms of device work): "
              f"{report['readback_micro']}")
    for w, r in report.get("startup", {}).items():
        if "error" in r:
            print(f"startup trace {w}: {r['error']}")
            continue
        print(f"startup trace {w} (under the profiler): call returns {r['call_returns_us']:.0f} us, first kernel "
              f"{r['first_kernel_after_us']:.0f} us after the call, span {r['span_us']:.0f} us of which idle "
              f"{r['idle_in_span_us']:.0f} us ({r['idle_first_ms_us']:.0f} in the first ms), token on the host "
              f"{r['tail_after_last_kernel_us']:.0f} us after the last kernel; largest gaps:")
        for g in r["largest_gaps"][:8]:
            print(f"    {g['gap_us']:7.1f} us at {g['at_us']:8.1f} us: {g['before'][:50]} -> {g['after'][:50]}")
    print(f"\ntotal {report['total_s']:.0f} s; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
