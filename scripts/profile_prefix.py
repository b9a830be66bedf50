"""Where a prefix-cache hit's time to first token goes, on the device (issue 17).

The hit of scripts/bench_prefix.py's `hit1` row: one engine (max_batch 1, prefix cache on,
prefix_cache_save_last=False) holding the shared prefix (--prefix tokens, saved by a miss and a branch), then
prompts = prefix + their own --suffix tokens, max_new_tokens 1. Parts:

 1. Correctness on the device first: the hit's first token and its logprob against a miss of the same prompt
    on the same engine (cache cleared; it runs the same chunks): equal tokens, logprobs within 1e-2.
 2. TTFT of --n warm hits as bench_prefix times them (generate wall time, no syncs).
 3. The same hits with a sync after each piece (block_until_ready): host admission (token check, lookup,
    page sharing), the state copy into the slot (_copy_rows, dispatch + device), the step's host packing and
    dispatch, its device time after the dispatch returns, the readback of the sampled token, other host work.
 4. The hit's step alone, back to back (--repeat times, one sync at the end): its device time without host
    gaps.
 5. Device traces (XLA profiler / CUPTI) of one warm hit end to end and of the back-to-back steps: kernel
    device time grouped by category (MoE, MLA, linear attention, matmuls, copies, sampling, state restore,
    other), the kernel count, the device's idle time inside the hit (host gaps) and before its first kernel.
    Kernels are attributed through the compiled HLO's metadata (the source file of each op) where the trace
    names the HLO op, else by kernel name.
 6. --moe-block-m: the hit's MoE experts alone (one layer's weights, the model's own routing of random
    activations at the hit's token count) with each block_m of the grouped layout, checked against the
    first, timed back to back (us per layer; the step runs it once per MoE layer).
The floor of the step: the bytes it must read (every weight once, the MLA latents of the context, the linear
states read and written) over --bandwidth, plus its matmul flops over --flops.

    . scripts/gpu_env.sh; PYTHONPATH=.:scripts python3 scripts/profile_prefix.py --out $OUT   # H200, ~2-3 min
    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 scripts/profile_prefix.py --smoke           # CPU plumbing
Writes profile_prefix.json under --out and prints the tables.
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
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("profile_prefix")
warnings.filterwarnings("ignore", message=".*has no __module__ attribute")   # the profiler's event stats

CATS = ("MoE", "MLA", "linear attention", "matmuls", "copies", "sampling", "state restore", "other")
# source files (of the HLO ops' metadata) -> category; first match wins
SOURCE_CATS = [("MoE", ("kernels/moe", "model/moe.py")), ("MLA", ("kernels/mla", "model/mla.py")),
               ("linear attention", ("kernels/linear_attention", "model/linear_attention.py"))]
# kernel names -> category (the fallback); first match wins
NAME_CATS = [("MoE", ("gate_up", "moe_", "down_kernel")), ("MLA", ("mla", "paged")),
             ("sampling", ("radix_sort", "radixsort")),
             ("linear attention", ("linear", "chunk", "recurrent", "lightning", "la_")),
             ("copies", ("memcpy", "memset", "copy", "dynamic_update", "dynamic-update", "scatter")),
             ("matmuls", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "matmul", "dot"))]


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "_", name.lower())


def hlo_categories(hlo_text: str, module_cat: str | None = None) -> dict:
    """Optimized HLO text -> {normalized instruction name: category}. Each op's call stack comes from the
    module's FileNames / FileLocations / StackFrames tables (a frame's printed parent_frame_id is the
    parent's id + 1; 1: none); the category is that of the innermost lingjax frame: MoE, MLA, linear
    attention or sampling by its file (SOURCE_CATS), matmuls for a dot (or gemm) of lingjax/model/common.py
    (Dense, MLP) or decoder.py (the LM head); library frames (jax_triton) are skipped. Without a lingjax
    frame: copies for copy / dynamic-update-slice / scatter ops, matmuls for dots, else other."""
    files, locs, frames = {}, {}, {}
    section = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if line.startswith(("%", "ENTRY")):
            break
        m = re.match(r"(\d+) (.*)", line)
        if not m or section is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if section == "FileNames":
            files[i] = rest.strip('"')
        elif section == "FileLocations":
            f = re.search(r"file_name_id=(\d+)", rest)
            locs[i] = int(f.group(1)) if f else 0
        elif section == "StackFrames":
            f = re.search(r"file_location_id=(\d+)", rest)
            par = re.search(r"parent_frame_id=(\d+)", rest)
            frames[i] = (int(f.group(1)) if f else 0, int(par.group(1)) - 1 if par else 0)

    def chain(fid):
        out, seen = [], set()
        while fid and fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            out.append(files.get(locs.get(loc, 0), ""))
            fid = parent
        return out

    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\(", line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        if module_cat:
            out[_norm(name)] = module_cat
            continue
        target = re.search(r'custom_call_target="([^"]*)"', line)
        target = target.group(1).lower() if target else ""
        dot = (op in ("dot", "convolution") or "gemm" in target or "cublas" in target
               or (op == "fusion" and ("gemm" in name or "__triton_gemm" in line)))
        fid = re.search(r"stack_frame_id=(\d+)", line)
        srcs = chain(int(fid.group(1))) if fid else []
        src = re.search(r'source_file="([^"]*)"', line)
        if src:
            srcs.append(src.group(1))
        cat, first = None, True
        for f in srcs:                          # innermost first
            if "lingjax/" not in f:
                continue
            if "lingjax/engine.py" in f:        # the step's own ops (sampling); the model's ops pass through it too
                cat = "sampling" if first else None
                break
            first = False
            cat = next((c for c, keys in SOURCE_CATS if any(k in f for k in keys)), None)
            if cat is None and ("model/common.py" in f or "model/decoder.py" in f):
                if dot:
                    cat = "matmuls"
                elif "model/decoder.py" in f:
                    break                       # a layer's norms / residual adds, the final norm: other
            if cat is not None:
                break
        if cat is None:
            if op in ("copy", "copy-start", "dynamic-update-slice", "scatter") or "dynamic_update_slice" in name:
                cat = "copies"
            elif dot:
                cat = "matmuls"
            else:
                cat = "other"
        out[_norm(name)] = cat
    return out


def name_category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in NAME_CATS if any(k in low for k in keys)), "other")


def trace(run, hlo_maps: dict):
    """Run `run()` under the XLA profiler -> (kernels [(start_ns, dur_ns, name, category, module)] of the
    device streams, (start_ns, end_ns) of the 'hit' annotation on the host or None)."""
    from jax._src.lib import _profile_data, _profiler
    sess = _profiler.ProfilerSession()
    try:
        run()
    finally:
        xs = sess.stop()
    data = _profile_data.ProfileData.from_serialized_xspace(xs)
    kernels, mark, gpu, cpu_ops = [], None, False, []
    for plane in data.planes:
        if plane.name.startswith("/host"):
            for line in plane.lines:
                for e in line.events:
                    if e.name == "profile_prefix_hit":
                        mark = (e.start_ns, e.end_ns)
                    elif line.name.startswith("tf_XLA"):     # the CPU backend's ops (no device plane)
                        st = {k: str(v) for k, v in e.stats}
                        if "hlo_op" in st:
                            cpu_ops.append((e, st))
            continue
        if not plane.name.startswith("/device:GPU"):
            continue
        gpu = True
        names = [line.name for line in plane.lines]
        streams = [n for n in names if n.startswith("Stream")]
        for line in plane.lines:
            if streams and line.name not in streams:      # derived lines repeat the streams' kernels
                continue
            if not streams and any(w in line.name for w in ("XLA", "Step", "Launch", "Framework", "Source",
                                                            "TensorFlow", "Ops")):
                continue
            for e in line.events:
                st = {k: str(v) for k, v in e.stats}
                kernels.append((e.start_ns, e.duration_ns, e.name, _categorize(st, e.name, hlo_maps),
                                st.get("hlo_module", "")))
    if not gpu:               # the CPU backend: its XLA ops stand in for kernels (the plumbing's check)
        for e, st in cpu_ops:
            kernels.append((e.start_ns, e.duration_ns, e.name, _categorize(st, e.name, hlo_maps), st["hlo_module"]))
    kernels.sort()
    return kernels, mark


def _categorize(st, name, hlo_maps):
    mod, op = st.get("hlo_module", ""), st.get("hlo_op", "")
    for key in (op, name):
        for mname, mp in hlo_maps.items():
            if (not mod or mname in mod or mod in mname) and _norm(key) in mp:
                return mp[_norm(key)]
    return name_category(name)


def summarize(kernels, mark, calls: int) -> dict:
    """Per call: device time by category, kernel count, busy (union of kernel intervals), span, idle inside
    the span (host gaps), the time from the host annotation's start to the first kernel, top kernels."""
    if not kernels:
        return dict(kernels=0)
    cats, by_name = {}, {}
    for _, d, name, cat, _ in kernels:
        cats[cat] = cats.get(cat, 0.0) + d / 1e3 / calls
        k = by_name.setdefault((name[:80], cat), [0, 0.0])
        k[0] += 1
        k[1] += d / 1e3
    busy, end = 0, None
    for s, d, *_ in kernels:                           # union of the intervals (streams may overlap)
        e = s + d
        if end is None or s >= end:
            busy += d
            end = e
        elif e > end:
            busy += e - end
            end = e
    start = kernels[0][0]
    stop = max(s + d for s, d, *_ in kernels)
    out = dict(kernels=len(kernels) / calls, busy_us=busy / 1e3 / calls, span_us=(stop - start) / 1e3 / calls,
               idle_in_span_us=(stop - start - busy) / 1e3 / calls, categories=cats,
               top=[dict(name=n, category=c, n=v[0] / calls, us=v[1] / calls)
                    for (n, c), v in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]])
    if mark is not None:
        out["host_span_us"] = (mark[1] - mark[0]) / 1e3
        out["first_kernel_after_us"] = (start - mark[0]) / 1e3
        out["after_last_kernel_us"] = (mark[1] - stop) / 1e3
    return out


def step_floor(cfg, model, T, context, bandwidth, flops_rate):
    """(bytes, flops, ms) of one T-token prefill step after `context` cached positions: every weight read
    once (the embedding table: only the T rows looked up), the MLA latents of context + T positions read,
    the linear states read and written; matmul flops: 2 x T x the matrix parameters each token uses (the
    routed experts: top-k of E) plus the LM head for one row and the MLA attention products (absorbed form:
    (r + rope) + r per query, key and head)."""
    import jax
    from flax import nnx
    from lingjax.cache import page_bytes, state_bytes
    leaves = jax.tree.leaves(model)
    wbytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)
    emb = model.word_embeddings.get_value()
    wbytes -= (emb.shape[0] - T) * emb.shape[1] * emb.dtype.itemsize
    nbytes = wbytes + (context + T) * page_bytes(cfg, 1, model.dtype) + 2 * state_bytes(cfg)
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    params = 0
    for path, a in jax.tree_util.tree_leaves_with_path(nnx.state(model.layers)):
        if len(getattr(a, "shape", ())) < 2:
            continue
        n = int(np.prod(a.shape))
        if any(w in jax.tree_util.keystr(path) for w in ("w_gate", "w_up", "w_down")):
            n = n * k // E
        params += n
    H, r, rope = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    attn = 2 * T * (context + T / 2) * H * (2 * r + rope) * len(cfg.mla_layers)
    flops = 2 * T * params + 2 * cfg.hidden_size * cfg.vocab_size + attn
    return nbytes, flops, 1e3 * (nbytes / bandwidth + flops / flops_rate)


# MoE grouped-matmul variants timed at the hit's token count on the GPU (--moe-sweep): (block_m, gate_up
# config, down config) as gpu.Config fields (block_n, block_k, group_m, num_warps, num_stages[, persistent]);
# None: gpu.pick_config's default for that block_m; an optional 4th item: the layout method (default: the
# implementation's pick_layout_method: 'sort' above 2048 pairs). group_m 8 orders the tiles so that the blocks of one
# expert (at T=512 about half the experts get two 16-row blocks) read its weight tiles back to back (L2).
MOE_SWEEP = [
    (16, None, None, "compare"),          # the default tiles with the comparison-built layout (layout.py)
    (32, None, None, "compare"),
    (16, (64, 128, 8, 4, 4), (128, 64, 8, 4, 4)),
    (16, (64, 128, 8, 4, 4, 1), (128, 64, 8, 4, 4, 1)),
    (32, (64, 128, 8, 4, 4), (128, 64, 8, 4, 4)),
    (32, (128, 64, 8, 4, 4), (256, 64, 8, 8, 3)),
]


def moe_variants(model, T, block_ms, sweep, iters, impl):
    """The MoE experts of the first MoE layer at T tokens (the model's routing of random activations), with
    each block_m at its default tiles, then each `sweep` variant (GPU) -> dict with a row per variant: us per
    layer (back to back), blocks used, relative error against the first row."""
    import jax
    import jax.numpy as jnp
    from lingjax.kernels import moe as mk
    moe = next(l.mlp for l in model.layers if l.is_moe)
    wg, wu, wd = moe.w_gate.get_value(), moe.w_up.get_value(), moe.w_down.get_value()
    x = jax.random.normal(jax.random.key(1), (T, model.cfg.hidden_size), jnp.float32).astype(model.dtype)
    idx, w = jax.jit(moe.route)(x)
    E = wg.shape[0]
    counts = np.bincount(np.asarray(idx).ravel(), minlength=E)
    mod = mk._module(impl)
    variants = [(bm, None, None) for bm in block_ms] + (list(sweep) if impl == "gpu" else [])

    def make(bm, gu, dn, method=None):
        kw_gu = kw_dn = {}
        if gu is not None:
            kw_gu, kw_dn = dict(config=mod.Config(*gu)), dict(config=mod.Config(*dn))

        @jax.jit
        def f(x, idx, w, wg, wu, wd):
            lay = mk.make_layout(idx, E, bm, method or mod.pick_layout_method(idx.size))
            h = mod.gate_up(x, lay, wg, wu, **kw_gu)
            y = mod.down(h, lay, wd, **kw_dn)
            return mk.combine(y, lay, w).astype(x.dtype)
        return f

    rows, ref = [], None
    for bm, gu, dn, *method in variants:
        method = method[0] if method else None
        tag = (f"bm{bm} " + ("default tiles" if gu is None else f"{mod.Config(*gu).tag()} / {mod.Config(*dn).tag()}")
               + (f", {method} layout" if method else ""))
        try:
            f = make(bm, gu, dn, method)
            y = np.asarray(f(x, idx, w, wg, wu, wd), np.float32)
        except Exception as e:          # noqa: BLE001  (a variant that does not compile: reported, skipped)
            log.info("MoE %s: failed: %s: %s", tag, type(e).__name__, str(e)[:200])
            rows.append(dict(variant=tag, block_m=bm, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        ref = y if ref is None else ref
        err = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(iters):
                out = f(x, idx, w, wg, wu, wd)
            jax.block_until_ready(out)
            ts.append((time.perf_counter() - t) / iters * 1e6)
        blocks = int(np.sum(-(-counts // bm)))
        rows.append(dict(variant=tag, block_m=bm, us=statistics.median(ts), rel_err_vs_first=err, blocks=blocks))
        log.info("MoE T=%d %s: %.1f us/layer, %d blocks, rel err vs the first: %.1e", T, tag, rows[-1]["us"],
                 blocks, err)
    return dict(T=T, pairs_per_expert_max=int(counts.max()), pairs_per_expert_mean=float(counts.mean()),
                experts_touched=int((counts > 0).sum()), pick_block_m=mod.pick_block_m(idx.size, E), rows=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash8", help="model shapes (scripts/shapes.py; default flash8)")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--prefix", type=int, default=8192, help="shared prefix tokens (default 8192)")
    p.add_argument("--suffix", type=int, default=512, help="tokens after the prefix (default 512)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="engine prefill chunk (default 2048)")
    p.add_argument("--page-size", type=int, default=64, help="MLA cache page size (default 64)")
    p.add_argument("--n", type=int, default=3, help="warm hits timed per part (default 3)")
    p.add_argument("--repeat", type=int, default=10, help="back-to-back runs of the hit's step (default 10)")
    p.add_argument("--moe-block-m", default="16,32,64",
                   help="block_m values for the MoE experts alone at the hit's token count ('' skips; default 16,32,64)")
    p.add_argument("--no-moe-sweep", dest="moe_sweep", action="store_false",
                   help="skip MOE_SWEEP's tile variants (GPU) after the block_m rows")
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="copy bandwidth for the floor, bytes/s (4.3e12)")
    p.add_argument("--flops", type=float, default=680e12, help="dense bf16 rate for the floor, flop/s (680e12)")
    p.add_argument("--no-trace", action="store_true", help="skip the device traces")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny preset, 256 + 64 tokens, chunk 64, "
                   "page 16")
    p.add_argument("--out", default=os.environ.get("OUT", "scripts/results"),
                   help="directory of profile_prefix.json (default $OUT or scripts/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from lingjax import engine as engine_mod
    from lingjax.cache import pages_for
    from lingjax.engine import Engine, SamplingParams
    from shapes import preset, random_model

    if args.smoke:
        args.preset, args.prefix, args.suffix, args.prefill_chunk, args.page_size = "tiny", 256, 64, 64, 16
        args.n, args.repeat = 2, 3
    on_gpu = jax.default_backend() == "gpu"
    cfg = preset(args.preset, args.layers)
    t_all = time.perf_counter()
    model = random_model(cfg, None, jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    rng = np.random.default_rng(0)
    V = cfg.vocab_size
    prefix = rng.integers(3, V, args.prefix).tolist()
    suffixes = [rng.integers(3, V, args.suffix).tolist() for _ in range(2 * args.n + 20)]
    max_len = args.prefix + args.suffix + 16
    eng = Engine(model, max_batch=1, prefill_chunk=args.prefill_chunk, max_len=max_len, page_size=args.page_size,
                 num_pages=3 * pages_for(max_len, args.page_size), prefix_cache=True, prefix_cache_states=4,
                 prefix_cache_save_last=False)
    sp = SamplingParams(max_new_tokens=1, ignore_eos=True)                 # as bench_prefix
    sp_check = SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=0)   # the same compiled step
    nxt = iter(range(len(suffixes)))

    def gen(prompt, params=sp):
        t = time.perf_counter()
        o = eng.generate([prompt], params)[0]
        return time.perf_counter() - t, o

    def fill():
        eng.clear_prefix_cache()
        gen(prefix + suffixes[next(nxt)])            # a miss: the prompt's blocks
        gen(prefix + suffixes[next(nxt)])            # a branch: the state at the end of the shared prefix

    t0 = time.perf_counter()
    fill()
    gen(prefix + suffixes[next(nxt)])                # a hit (compiles the state copy)
    compile_s = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "profile_prefix.json")

    def save():                                      # after every part: a timeout still leaves the parts done
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    report = dict(device=jax.devices()[0].device_kind, preset=args.preset, layers=cfg.num_hidden_layers,
                  prefix=args.prefix, suffix=args.suffix, prefill_chunk=args.prefill_chunk, page_size=args.page_size,
                  compile_s=compile_s)

    # 1. correctness: a hit against a miss of the same prompt
    s = suffixes[next(nxt)]
    h0 = eng.stats()["prefix_cache_hits"]
    _, hit = gen(prefix + s, sp_check)
    assert eng.stats()["prefix_cache_hits"] == h0 + 1, "the check's hit did not hit"
    eng.clear_prefix_cache()
    _, miss = gen(prefix + s, sp_check)
    dlp = abs(hit.logprobs[0] - miss.logprobs[0])
    report["check"] = dict(hit_token=hit.token_ids[0], miss_token=miss.token_ids[0], logprob_diff=dlp)
    ok = hit.token_ids == miss.token_ids and dlp <= 1e-2
    log.info("check: hit token %d logprob %.5f, miss token %d logprob %.5f: %s", hit.token_ids[0],
             hit.logprobs[0], miss.token_ids[0], miss.logprobs[0], "ok" if ok else "MISMATCH")
    save()
    if not ok:
        raise SystemExit(f"hit and miss differ: {report['check']}")

    # 2. warm hits, as bench_prefix times them
    fill()
    eng.reset_stats()
    steps0 = eng.steps
    ttft = [gen(prefix + suffixes[next(nxt)])[0] * 1e3 for _ in range(args.n)]
    st = eng.stats()
    assert st["prefix_cache_hits"] == args.n, st
    report.update(ttft_ms=ttft, ttft_median_ms=statistics.median(ttft), steps_per_hit=(eng.steps - steps0) / args.n,
                  hit_tokens=st["prefix_cache_hit_tokens"] // args.n, compilations_during_hits=0)
    c0 = eng.compile_count
    save()
    log.info("warm hits: TTFT %s ms, %g step(s) per hit (%.0f s so far)", [round(t, 2) for t in ttft],
             report["steps_per_hit"], time.perf_counter() - t_all)

    # 3. the same hits with a sync after each piece
    parts, cur = {}, {}

    def add(k, dt):                                   # summed over the calls of one hit
        cur[k] = cur.get(k, 0.0) + dt * 1e3

    orig = dict(admit=eng._admit_waiting, copy=eng._copy_states, dispatch=eng._dispatch, collect=eng._collect)

    def admit():
        t = time.perf_counter()
        orig["admit"]()
        add("admission (host, incl. copy dispatch)", time.perf_counter() - t)

    def copy(pairs):
        t = time.perf_counter()
        orig["copy"](pairs)
        if pairs:
            jax.block_until_ready(eng.caches)
            add("state copy into the slot (dispatch + device)", time.perf_counter() - t)

    def dispatch(pieces):
        t = time.perf_counter()
        f = orig["dispatch"](pieces)
        t1 = time.perf_counter()
        add("step: host pack + dispatch", t1 - t)
        jax.block_until_ready((f.outputs, eng.caches))
        add("step: device after dispatch", time.perf_counter() - t1)
        return f

    def collect(f):
        t = time.perf_counter()
        o = orig["collect"](f)
        add("readback of the token", time.perf_counter() - t)
        return o

    eng._admit_waiting, eng._copy_states, eng._dispatch, eng._collect = admit, copy, dispatch, collect
    walls = []
    for _ in range(args.n):
        cur.clear()
        walls.append(gen(prefix + suffixes[next(nxt)])[0] * 1e3)
        for k, v in cur.items():
            parts.setdefault(k, []).append(v)
    for k, v in orig.items():
        setattr(eng, {"admit": "_admit_waiting", "copy": "_copy_states", "dispatch": "_dispatch",
                      "collect": "_collect"}[k], v)
    med = {k: statistics.median(v) for k, v in parts.items()}
    wall = statistics.median(walls)
    # admission's time includes the state copy's (it is dispatched from there)
    copy_ms = med.get("state copy into the slot (dispatch + device)", 0.0)
    med["admission (host, incl. copy dispatch)"] = med.get("admission (host, incl. copy dispatch)", 0.0) - copy_ms
    med["other host (token check, generate, bookkeeping)"] = wall - sum(med.values())
    report["synced"] = dict(wall_ms=wall, parts_ms=med)
    save()
    log.info("synced hit: wall %.2f ms, %s", wall, {k: round(v, 2) for k, v in med.items()})

    # 3b. the host's Python time in one unsynced hit (cProfile, by own time; the jitted calls' C++ work
    # counts against the function that makes the call)
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prompt = prefix + suffixes[next(nxt)]
    prof.enable()
    gen(prompt)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    report["host_cprofile"] = buf.getvalue()[-4000:]
    log.info("host cProfile of one hit (own time):\n%s", "\n".join(buf.getvalue().splitlines()[-20:]))

    # 4. the hit's step alone, back to back
    captured = {}
    step_orig = engine_mod._step_fn

    def capture(*a, **kw):
        captured["args"], captured["kw"] = a, kw
        return step_orig(*a, **kw)

    fill()
    engine_mod._step_fn = capture
    try:
        gen(prefix + suffixes[next(nxt)])
    finally:
        engine_mod._step_fn = step_orig
    a, kw = captured["args"], captured["kw"]
    batch = a[2]
    report["step_tokens"] = int(batch.tokens.shape[0])
    report["step_mode"] = str(kw["mode"])
    rest = a[2:]

    def steps(k):
        caches = eng.caches
        for _ in range(k):
            out = step_orig(eng._params, caches, *rest, **kw)
            caches = out[-1]
        jax.block_until_ready(out)
        eng.caches = caches

    steps(1)
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        steps(args.repeat)
        ts.append((time.perf_counter() - t) / args.repeat * 1e3)
    report["step_back_to_back_ms"] = statistics.median(ts)
    launch, alone = [], []                     # one call from an idle device: when it returns, when it is done
    for _ in range(5):
        caches = eng.caches
        t = time.perf_counter()
        out = step_orig(eng._params, caches, *rest, **kw)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        eng.caches = out[-1]
        launch.append((t1 - t) * 1e3)
        alone.append((t2 - t) * 1e3)
    report["step_call_returns_ms"] = statistics.median(launch)
    report["step_alone_ms"] = statistics.median(alone)
    eng.clear_prefix_cache()            # the repeated steps rewrote the last request's (cached) pages
    report["compilations_during_hits"] = eng.compile_count - c0
    nbytes, flops, floor = step_floor(cfg, model, report["step_tokens"], args.prefix, args.bandwidth,
                                      args.flops)
    report.update(floor_bytes=nbytes, floor_flops=flops, floor_ms=floor,
                  floor_bytes_ms=1e3 * nbytes / args.bandwidth, floor_flops_ms=1e3 * flops / args.flops)
    save()
    log.info("step back to back %.2f ms, alone %.2f ms (its call returns after %.2f ms) (floor %.2f ms) (%.0f s so "
             "far)", report["step_back_to_back_ms"], report["step_alone_ms"], report["step_call_returns_ms"], floor,
             time.perf_counter() - t_all)

    # 5. device traces
    if not args.no_trace:
        maps = {}
        try:
            maps["_step_fn"] = hlo_categories(step_orig.lower(a[0], eng.caches, *rest, **kw).compile().as_text())
        except Exception as e:          # noqa: BLE001  (the names then decide)
            log.info("no HLO map of the step: %s: %s", type(e).__name__, str(e)[:200])
        try:
            maps["_copy_rows"] = hlo_categories(engine_mod._copy_rows.lower(
                eng.caches, np.zeros(1, np.int32), np.zeros(1, np.int32)).compile().as_text(), "state restore")
        except Exception as e:          # noqa: BLE001
            log.info("no HLO map of the state copy: %s: %s", type(e).__name__, str(e)[:200])
        fill()
        prompt = prefix + suffixes[next(nxt)]

        def hit_run():
            with jax.profiler.TraceAnnotation("profile_prefix_hit"):
                gen(prompt)
        try:
            k1, mark = trace(hit_run, maps)
            report["trace_hit"] = summarize(k1, mark, 1)
            k2, _ = trace(lambda: steps(args.repeat), maps)
            report["trace_steps"] = summarize(k2, None, args.repeat)
        except Exception as e:          # noqa: BLE001
            log.info("trace failed: %s: %s", type(e).__name__, str(e)[:300])
            report["trace_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        eng.clear_prefix_cache()
        save()
        log.info("traces done (%.0f s so far)", time.perf_counter() - t_all)

    # 6. the MoE experts alone at the hit's token count
    bms = [int(b) for b in args.moe_block_m.split(",") if b.strip()]
    if bms:
        from lingjax.kernels import moe as mk
        report["moe"] = moe_variants(model, report["step_tokens"], bms, MOE_SWEEP if args.moe_sweep else [],
                                     args.repeat, "gpu" if on_gpu else mk.resolve(None))
    report["total_s"] = time.perf_counter() - t_all
    save()

    print(f"\n{report['device']}, {args.preset} ({cfg.num_hidden_layers} layers): prefix {args.prefix} + suffix "
          f"{args.suffix}, chunk {args.prefill_chunk}, page {args.page_size}; hit = {report['hit_tokens']} cached "
          f"tokens, {report['steps_per_hit']:g} step(s) of {report['step_tokens']} tokens, mode {report['step_mode']}; "
          f"compilations during the hits: {report['compilations_during_hits']}")
    print(f"TTFT of a warm hit (no syncs): {report['ttft_median_ms']:.2f} ms (runs {', '.join(f'{t:.2f}' for t in ttft)})")
    print(f"the hit's step alone: {report['step_alone_ms']:.2f} ms (the jitted call returns after "
          f"{report['step_call_returns_ms']:.2f} ms: the host enqueueing its kernels)")
    print(f"the hit's step back to back: {report['step_back_to_back_ms']:.2f} ms; floor {floor:.2f} ms = "
          f"{nbytes / 2**30:.2f} GiB / {args.bandwidth / 1e12:.1f} TB/s ({report['floor_bytes_ms']:.2f} ms) + "
          f"{flops / 1e12:.2f} TFLOP / {args.flops / 1e12:.0f} TFLOP/s ({report['floor_flops_ms']:.2f} ms)")
    print(f"\nsynced hit: wall {wall:.2f} ms\n| part | ms |\n|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    for key, title in (("trace_hit", "one warm hit, end to end"), ("trace_steps", "the hit's step, back to back")):
        tr = report.get(key)
        if not tr or not tr.get("kernels"):
            continue
        print(f"\ndevice trace, {title} (per step/hit): {tr['kernels']:.0f} kernels, busy {tr['busy_us'] / 1e3:.2f} ms, "
              f"span {tr['span_us'] / 1e3:.2f} ms, idle inside the span {tr['idle_in_span_us'] / 1e3:.2f} ms"
              + (f"; first kernel {tr['first_kernel_after_us'] / 1e3:.2f} ms after generate() began, last one "
                 f"{tr['after_last_kernel_us'] / 1e3:.2f} ms before it returned (host span "
                 f"{tr['host_span_us'] / 1e3:.2f} ms)" if "first_kernel_after_us" in tr else ""))
        print("| category | device ms |\n|---|---|")
        for c in sorted(tr["categories"], key=lambda c: -tr["categories"][c]):
            print(f"| {c} | {tr['categories'][c] / 1e3:.3f} |")
        print("top kernels: us (count) category name")
        for k in tr["top"][:15]:
            print(f"  {k['us']:9.1f} ({k['n']:.0f}) {k['category']:<17} {k['name']}")
    if "moe" in report:
        m = report["moe"]
        print(f"\nMoE experts alone, T={m['T']}: {m['experts_touched']} experts touched, pairs per expert mean "
              f"{m['pairs_per_expert_mean']:.1f} max {m['pairs_per_expert_max']}; pick_block_m -> {m['pick_block_m']}"
              f"\n| variant | us/layer | blocks | rel err vs first |\n|---|---|---|---|")
        for r in m["rows"]:
            if "error" in r:
                print(f"| {r['variant']} | failed | | {r['error'][:60]} |")
            else:
                print(f"| {r['variant']} | {r['us']:.1f} | {r['blocks']} | {r['rel_err_vs_first']:.1e} |")
    print(f"\ntotal {report['total_s']:.0f} s; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
