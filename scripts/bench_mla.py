"""MLA decode attention over the paged latent cache on one GPU (issue 14): lingjax's Triton decode kernel
beside today's path (the per-slot [num_slots, max_len, 576] cache of MLA._attend_cache), and the paged
prefill attention: lingjax's Triton prefill kernel beside the jnp reference.

Shapes: Ling-2.6-flash MLA (kv_lora_rank 512, qk_rope_head_dim 64, --heads 32, nope/v 128), bf16 latents,
page size --page-size (64), batch 1/16/64/256 x context 1k/8k/32k/128k (every request at the full context),
pages of the batch scattered over the pool in a random order. A shape whose latents exceed --max-gb is skipped.

Rows (method):
  paged-triton    lingjax.kernels.mla.decode(impl='gpu'): the kernel + the jnp merge of its context splits
  paged-triton[c] gpu.decode with Config c (--sweep; tag
                  h<block_h>n<block_n>s<splits>w<warps>st<stages>[swap][rp][fc][sk][pb], the configurations of
                  sweep_configs, each checked with scripts/compile_mla_kernels.py)
  paged-ref       lingjax.kernels.mla.decode(impl='reference') (jnp, flash-style over pages; --ref)
  today           MLA._attend_cache over a [batch, context, 576] cache (absorbs W_UK/W_UV as the engine does)
  prefill-triton  lingjax.kernels.mla.prefill(impl='gpu') (gpu_prefill.py) over a packed batch: one request of
                  each --prefill length (causal over itself), and each --packed batch (B requests of n new
                  tokens after P cached tokens each: a prefix-cache hit / a later chunk)
  prefill-triton[c] the same with gpu_prefill.Config c = (block_m, block_n, block_r, num_warps, num_stages)
                  (--prefill-sweep: at those shapes, every PREFILL_SWEEP config)
  prefill-ref     lingjax.kernels.mla.prefill(impl='reference') at the same shapes (up to --prefill-ref-max tokens)

Timing: --iters calls chained in one jitted, unrolled loop (each call's query depends on the last output, so
nothing is hoisted; unrolled: no while-loop condition between calls, as in the engine's step), seconds per
call = loop time / iters, median of --reps loops.
Columns: us per call; GB/s over the bytes a decode must move (latents of every request up to its length
+ q + out) and its share of the copy bandwidth (read + write of a 4 GiB bf16 array, measured in the same
run: the larger of JAX's and PyTorch's); rel_err of every paged-triton row against the reference on the first
2 and last 2 requests, computed before its timing (bf16 queries in the kernel's products: ~1e-3..1e-2). Latent bytes
are counted once per request even for configurations whose head blocks each read them (block_h < heads).
--device-time adds, per paged-triton row, CUPTI device times (XLA profiler) of one more execution of the timed
loop: kernel_us / pct_copy_kernel (the decode kernel alone) and busy_us / pct_copy_busy (every kernel of a call:
+ the split combine, + the loop's own q update). The wall-clock us also holds the jitted program's launch
overhead (0.4-0.8 ms per execution on the H200: up to ~80 us per call at --iters 10; it was round 1's ~40 us
"fixed cost" per call). --profile adds the kernel's own per-program timestamps (gpu.decode_profiled): spans, and the
median program's phases (q: start to queries in registers; table: to the first page id; first: to the first
block's products done; loop: the other blocks; per_block: loop / (blocks - 1); tail: last block done to the end,
the partial's store).
Prefill: TFLOP/s over the causal flops 2 * H * (r + rope + r) per (query, key) pair
and its share (pct_mm) of the dense bf16 matmul rate (8192^3, measured in the same run); before timing,
prefill-triton's output is checked against the reference on --check-tokens tokens (the first, the last and
random ones; all of a request at a prefix boundary are covered): rel_err, and a row whose rel_err exceeds
2e-2 (bf16 queries and probabilities in the products) is marked check_failed and not timed.

    PYTHONPATH=. python3 scripts/bench_mla.py [--batches 1,16,64,256] [--contexts 1024,8192,32768,131072]
        [--shapes 16:4096,64:4096] [--sweep 16:32768,256:32768] [--prefill 4096,32768] [--packed 8x512@8192]
        [--prefill-sweep 8x512@8192]
        [--out DIR] [--name bench_mla]     # writes DIR/NAME.json and DIR/NAME.log
    prefill only: --batches "" --methods "" --prefill-methods prefill-triton,prefill-ref
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 scripts/bench_mla.py --smoke     # CPU: tiny shapes, reference impl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from bench_moe import loop_time  # noqa: E402  (scripts/ is on sys.path when run as a script)

log = logging.getLogger("bench_mla")
R, ROPE, NOPE = 512, 64, 128
BATCHES, CONTEXTS = (1, 16, 64, 256), (1024, 8192, 32768, 131072)


def sweep_configs(heads):
    """Configurations --sweep times (gpu.Config; num_splits 0: gpu.with_splits' choice for the configuration
    (its programs per SM), -1: half of it, -2: twice it; > 0: as given).
    Each compiles for sm_90 without spilling and fits (scripts/compile_mla_kernels.py prints registers,
    shared memory and latent buffers: bufs 1 = the next block's load waits for this block's products)."""
    from lingjax.kernels.mla.gpu import Config
    C = lambda h, n, w, st, swap=False, s=0, rp=False, fc=False, sk=False, pb=False: Config(  # noqa: E731
        block_h=h, block_n=n, num_splits=s, num_warps=w, num_stages=st, swap=swap, reg_prefetch=rp, combine=fc,
        stream=sk, low_partials=pb)
    if heads > 32:
        return [C(64, 32, 8, 3, True), C(64, 32, 8, 3, True, -1), C(64, 32, 8, 3, True, -2), C(64, 32, 8, 4, True),
                C(64, 16, 8, 5, True), C(32, 64, 4, 3), C(32, 64, 8, 3), C(32, 32, 4, 3)]
    # round 3 (bench_notes_mla.md): the kernel prefetches each block's page id one block ahead, so st<k> keeps
    # k - 1 latent buffers and the loop leaves k - 2 blocks in flight while it computes one (TTGIR: the copy of
    # block i + k - 1 is issued after block i's products). Shared-memory reads per latent byte ~ 2 + warps x
    # block_h / block_n (mma.sync: every warp reads all queries once per block). fc: the splits merged in the
    # kernel (no combine pass); sk: stream-K (the batch's blocks in equal runs, one per resident program).
    # Round 3 measured (CUPTI kernel time): 1 buffer + 2 programs per SM (h32n64w4st2, now the default) 80-87%;
    # round 2's h32n64w4st3 74-78%; fc and the 32-token forms lower (bench_notes_mla.md).
    # Session 6: bf16 partials (pb) +3-5 points at B=16 4k-32k / B=64 4k.
    return [C(32, 64, 4, 2, pb=True),                               # the default: 1 buffer, 2 programs per SM
            C(32, 64, 4, 2),                                        # session 5's default (float32 partials)
            C(32, 64, 4, 3),                                        # round 2's default (2 buffers, 1 per SM)
            C(32, 64, 4, 2, sk=True), C(32, 64, 4, 3, sk=True),     # stream-K runs
            C(32, 64, 4, 3, fc=True),                               # splits merged in the kernel
            C(32, 32, 4, 4), C(32, 32, 4, 5), C(32, 32, 4, 6)]      # ratio 6 with 2, 3, 4 blocks in flight


# prefill configs (gpu_prefill.Config: block_m, block_n, block_r (0: all of r), num_warps, num_stages)
PREFILL_SWEEP = [(64, 64, 0, 8, 2), (64, 32, 0, 8, 2), (64, 32, 0, 8, 3), (64, 16, 0, 8, 3), (64, 64, 0, 8, 1),
                 (32, 64, 0, 8, 2)]     # value splits (block_r < r) and block_m 128 exceed sm_90's shared memory


def time_calls(fn, args, iters, reps, trace=False):
    """bench_moe.loop_time's measurement (iters chained calls, unrolled, in one jitted program; median of reps)
    -> (seconds per call, trace): with trace, one more execution of the same compiled program under the XLA
    profiler (CUPTI, bench_linear_attention.device_trace): per call, the decode kernel alone (kernel names with
    'decode': decode_kernel, decode_stream_kernel) and every kernel of the call ('busy': + the combine's fusions
    + the loop's own update of q).
    The wall-clock time also holds the jitted program's launch overhead (0.4-0.8 ms per execution on the H200,
    bench_linear_attention.py), i.e. up to ~80 us per call at 10 calls: the device times do not."""
    import statistics
    import time
    import jax

    def loop(x, *rest):
        def body(i, x):
            return (x + 1e-3 * fn(x, *rest)).astype(x.dtype)
        return jax.lax.fori_loop(0, iters, body, x, unroll=True)

    run = jax.jit(loop)
    jax.block_until_ready(run(*args))                            # compile + warm
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        ts.append((time.perf_counter() - t) / iters)
    dev = None
    if trace:
        try:
            from bench_linear_attention import device_trace
            tr = device_trace(lambda: jax.block_until_ready(run(*args)), iters)
            streams = [t for k, t in tr.items() if k != "_lines"]
            if streams:
                t = max(streams, key=lambda t: t["busy_us"])
                kern = sum(k["sum_us"] for name, k in t["kernels"].items() if "decode" in name)   # (stream_)kernel
                dev = dict(kernel_us=round(kern / iters, 2), busy_us=round(t["busy_us"] / iters, 2),
                           kernels={name[:40]: round(k["sum_us"] / iters, 2) for name, k in t["kernels"].items()})
        except Exception as e:                                  # noqa: BLE001 (the wall-clock time stands)
            dev = dict(trace_error=f"{type(e).__name__}: {e}"[:200])
    return statistics.median(ts), dev


def matmul_rate(smoke):
    """dense bf16 matmul FLOP/s (8192^3; 256^3 for --smoke), 20 calls in one jitted loop after a warm-up."""
    import jax
    import jax.numpy as jnp
    m = 256 if smoke else 8192
    a = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(3), (m, m), jnp.bfloat16)
    loop_time(lambda x, y: x @ y, (a, b), 20, 1)
    return 2 * m ** 3 / loop_time(lambda x, y: x @ y, (a, b), 20, 5)


def prefill_problem(B, n, P, H, ps, seed):
    """B requests of n new tokens after P cached ones each, packed back to back (request b: row b, positions
    P..P+n-1), pages of P + n tokens per request scattered over a shuffled pool. -> (q_lat, q_pe, pages, table,
    token_rows, positions) and the causal (query, key) pairs."""
    import jax
    import jax.numpy as jnp
    _, _, pages, table, _, _ = make_problem(B, P + n, H, ps, seed)
    q_lat, q_pe = (jax.random.normal(jax.random.key(seed + 7 + i), (B * n, H, d), jnp.float32) * 0.05
                   for i, d in enumerate((R, ROPE)))
    rows = jnp.repeat(jnp.arange(B, dtype=jnp.int32), n)
    positions = jnp.tile(jnp.arange(P, P + n, dtype=jnp.int32), B)
    return (q_lat, q_pe, pages, table, rows, positions), B * (n * P + n * (n + 1) // 2)


def make_problem(B, L, H, ps, seed, r=R, rope=ROPE):
    """pages of B requests of L tokens scattered over a shuffled pool (+1 spare page); q_lat, q_pe f32."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = -(-L // ps)
    k = jax.random.split(jax.random.key(seed), 3)
    pages = jax.random.normal(k[0], (B * n + 1, ps, r + rope), jnp.bfloat16)
    table = jnp.asarray(np.random.default_rng(seed).permutation(B * n + 1)[: B * n].reshape(B, n), jnp.int32)
    q_lat = jax.random.normal(k[1], (B, H, r), jnp.float32) * 0.05
    q_pe = jax.random.normal(k[2], (B, H, rope), jnp.float32) * 0.05
    return q_lat, q_pe, pages, table, jnp.arange(B, dtype=jnp.int32), jnp.full((B,), L, jnp.int32)


def today_fn(H, r=R, rope=ROPE):
    """MLA._attend_cache of a module with the flash MLA dims (small hidden size: only W_UK/W_UV matter)."""
    import jax.numpy as jnp
    from flax import nnx
    from lingjax.config import BailingConfig
    from lingjax.model.mla import MLA
    cfg = BailingConfig(hidden_size=256, num_attention_heads=H, num_key_value_heads=H, num_hidden_layers=8,
                        layer_group_size=8, group_norm_size=1, head_dim=128, vocab_size=8, intermediate_size=16,
                        num_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=16,
                        kv_lora_rank=r, qk_rope_head_dim=rope, qk_nope_head_dim=NOPE, v_head_dim=NOPE)
    mla = MLA(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graph, state = nnx.split(mla)

    def fn(q_nope, q_pe, cache, slots, positions, state):
        m = nnx.merge(graph, state)
        o = m._attend_cache(q_nope.astype(jnp.bfloat16), q_pe.astype(jnp.bfloat16), cache, slots, positions)
        return o.astype(q_nope.dtype)                                   # [B, H, v_head_dim = NOPE]
    return fn, state


def parse_packed(text):
    """'BxN@P' -> (B, N, P); ValueError naming the text otherwise."""
    try:
        bn, p = text.split("@")
        b, n = bn.split("x")
        return int(b), int(n), int(p)
    except ValueError:
        raise ValueError(f"--packed {text!r}: expected BxN@P, e.g. 8x512@8192") from None


def check_prefill(fn, args, scale, n_check):
    """Relative error of fn's output against mla.prefill(impl='reference') on n_check tokens: the first and
    last quarter of them at the ends of the batch, the rest random (the reference on a subset of queries
    reads the same keys, so it stays cheap at 32k)."""
    import jax
    import numpy as np
    from lingjax.kernels import mla
    q_lat, q_pe, pages, table, rows, positions = args
    T = q_lat.shape[0]
    k = min(n_check, T)
    rng = np.random.default_rng(0)
    idx = np.unique(np.r_[np.arange(k // 4), np.arange(T - k // 4, T), rng.integers(0, T, k - 2 * (k // 4))])
    got = np.asarray(jax.jit(fn)(*args)[idx], np.float64)
    want = np.asarray(jax.jit(lambda *a: mla.prefill(*a, scale, impl="reference"))(
        q_lat[idx], q_pe[idx], pages, table, rows[idx], positions[idx]), np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def print_decode_table(rows):
    """decode rows: us, % of copy bandwidth, rel_err (CHECK FAILED above 2e-2: bf16 products allow ~1e-3);
    then the --profile rows."""
    print(f"\n{'batch':>5} {'context':>7} {'method':<34} {'us':>9} {'pct_copy':>8} {'kernel_us':>9} {'pct_kern':>8} "
          f"{'busy_us':>9} {'pct_busy':>8} {'rel_err':>9}")
    for r in rows:
        if "batch" in r and "method" in r and not r["method"].startswith("profile"):
            err = r.get("rel_err")
            bad = err is not None and not err <= 2e-2
            print(f"{r['batch']:>5} {r['context']:>7} {r['method']:<34} {r.get('us', float('nan')):>9} "
                  f"{r.get('pct_copy', float('nan')):>8} {r.get('kernel_us', float('nan')):>9} "
                  f"{r.get('pct_copy_kernel', float('nan')):>8} {r.get('busy_us', float('nan')):>9} "
                  f"{r.get('pct_copy_busy', float('nan')):>8} {err if err is not None else float('nan'):>9.2e} "
                  f"{r.get('skipped') or r.get('error') or r.get('check_error') or ('CHECK FAILED' if bad else '')}")


    prof = [r for r in rows if r.get("method", "").startswith("profile")]
    if prof:
        keys = ("us_profiled_call", "span_us", "start_spread_us", "end_spread_us", "prog_min_us", "prog_med_us",
                "prog_max_us", "q_us", "table_us", "first_us", "loop_us", "per_block_us", "tail_us", "sms",
                "programs")
        print(f"\n{'batch':>5} {'context':>7} {'profile':<34} " + " ".join(f"{k[:-3] if k.endswith('_us') else k:>9}"
                                                                      for k in keys))
        for r in prof:
            print(f"{r['batch']:>5} {r['context']:>7} {r['method']:<34} "
                  + " ".join(f"{r.get(k, float('nan')):>9}" for k in keys) + f" {r.get('error', '')}")


def print_prefill_table(rows):
    print(f"\n{'prefill':<14} {'method':<34} {'ms':>9} {'TFLOP/s':>8} {'pct_mm':>6} {'rel_err':>9}")
    for r in rows:
        if "prefill" in r:
            us = r.get("us")
            err = r.get("rel_err")
            print(f"{r['prefill']:<14} {r['method']:<34} {us / 1e3 if us else float('nan'):>9.3f} "
                  f"{r.get('TFLOP/s', float('nan')):>8} {r.get('pct_mm', float('nan')):>6} "
                  f"{err if err is not None else float('nan'):>9.2e} "
                  f"{r.get('skipped') or r.get('error') or ('CHECK FAILED' if r.get('check_failed') else '')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,64,256", help="comma list of batch sizes")
    p.add_argument("--contexts", default="1024,8192,32768,131072", help="comma list of context lengths (tokens)")
    p.add_argument("--heads", type=int, default=32, help="MLA heads on the device (default 32: flash, no TP)")
    p.add_argument("--page-size", type=int, default=64, help="tokens per page (default 64)")
    p.add_argument("--methods", default="paged-triton,today", help="comma list of: paged-triton, paged-ref, today")
    p.add_argument("--max-gb", type=float, default=40.0, help="skip shapes whose latents exceed this (GB, default 40)")
    p.add_argument("--today-max-tokens", type=int, default=64 * 131072,
                   help="skip 'today' above this batch x context (it holds a second, contiguous copy of the "
                   "latents and float32 gathers; default 64 x 131072)")
    p.add_argument("--shapes", default="", help="batch:context pairs to run instead of every --batches x --contexts "
                   "pair, in this order (e.g. 16:8192,64:4096)")
    p.add_argument("--sweep", default="", help="batch:context pairs at which to also time each sweep configuration")
    p.add_argument("--configs", default="", help="comma list of config tags to sweep instead of sweep_configs "
                   "(h<block_h>n<block_n>s<splits>w<warps>st<stages>[swap][rp][fc][sk][pb]; s0: gpu.with_splits' "
                   "splits for that config, s-1: half, s-2: twice, s<k>: k; check them first with "
                   "scripts/compile_mla_kernels.py)")
    p.add_argument("--profile", default="", help="batch:context pairs at which to also run the kernel with its PROFILE "
                   "timestamps (gpu.decode_profiled) for the default config and each --profile-configs tag: spread "
                   "of program starts / ends, program times, SMs used (the profiled kernel has its own registers: "
                   "compare its span with the timed rows, not its speed)")
    p.add_argument("--device-time", action="store_true", help="paged-triton rows: also the device time per call "
                   "from CUPTI (XLA profiler): the kernel alone (kernel_us, pct_copy_kernel) and every kernel of "
                   "the call (busy_us, pct_copy_busy: + the split combine + the loop's q update)")
    p.add_argument("--profile-configs", default="", help="comma list of config tags also profiled (as --configs)")
    p.add_argument("--prefill", default="4096,32768", help="prompt lengths of one-request prefills ('' to skip)")
    p.add_argument("--packed", default="8x512@8192",
                   help="packed prefill batches BxN@P: B requests of N new tokens after P cached each ('' to skip)")
    p.add_argument("--prefill-methods", default="prefill-triton,prefill-ref",
                   help="comma list of: prefill-triton, prefill-ref ('' to skip every prefill)")
    p.add_argument("--prefill-ref-max", type=int, default=4096,
                   help="time prefill-ref only up to this many query tokens (default 4096: 32k takes seconds)")
    p.add_argument("--prefill-sweep", default="", help="prefill shapes (a --prefill length or a --packed BxN@P) at "
                   "which to also time each PREFILL_SWEEP config")
    p.add_argument("--check-tokens", type=int, default=256, help="tokens of each prefill checked against the "
                   "reference before timing (default 256)")
    p.add_argument("--iters", type=int, default=10, help="calls per timed loop (default 10)")
    p.add_argument("--reps", type=int, default=3, help="timed loops; the median is reported (default 3)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny shapes, reference impl only")
    p.add_argument("--out", help="output directory for NAME.json and NAME.log (default $OUT when set, else "
                   "scripts/results; with --smoke and no --out nothing is written)")
    p.add_argument("--name", default="bench_mla", help="file name stem of the outputs (default bench_mla)")
    args = p.parse_args(argv)
    out_dir = args.out or (None if args.smoke else os.environ.get("OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    handlers = [logging.StreamHandler(sys.stdout)]
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(out_dir, f"{args.name}.log"), mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=handlers, force=True)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lingjax.kernels import mla
    if args.smoke:
        batches, contexts, H, ps, iters, reps = [1, 3], [40, 130], 4, 16, 2, 1
        methods, prefills, packed = ["paged-ref", "today"], [64], [(2, 24, 40)]
        prefill_methods = ["prefill-ref"]
    else:
        batches = [int(b) for b in args.batches.split(",") if b]
        contexts = [int(c) for c in args.contexts.split(",") if c]
        H, ps, iters, reps = args.heads, args.page_size, args.iters, args.reps
        methods, prefills = args.methods.split(","), [int(x) for x in args.prefill.split(",") if x]
        packed = [parse_packed(x) for x in args.packed.split(",") if x]
        prefill_methods = [m for m in args.prefill_methods.split(",") if m]
    prefill_sweep = {x for x in args.prefill_sweep.split(",") if x}
    sweep = {tuple(int(v) for v in s.split(":")) for s in args.sweep.split(",") if s}
    profile = {tuple(int(v) for v in s.split(":")) for s in args.profile.split(",") if s}
    if args.configs:
        from lingjax.kernels.mla.gpu import Config
        configs = [Config.from_tag(t) for t in args.configs.split(",") if t]
    else:
        configs = sweep_configs(H)
    from bench_moe import copy_bandwidth
    copy_bw = copy_bandwidth(args.smoke)
    mm_rate = matmul_rate(args.smoke) if prefill_methods and (prefills or packed) else None
    dev = jax.devices()[0].device_kind
    log.info("device %s: copy %.2f TB/s, dense bf16 matmul %s TFLOP/s", dev, copy_bw / 1e12,
             f"{mm_rate / 1e12:.0f}" if mm_rate else "-")
    rows = []
    out_path = os.path.join(out_dir, f"{args.name}.json") if out_dir else None
    scale = (NOPE + ROPE) ** -0.5

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(dict(device=dev, copy_bw=copy_bw, mm_rate=mm_rate, heads=H, page_size=ps, rows=rows), f,
                          indent=1)

    def record(row, fn, fargs, nbytes=None, flops=None):
        try:
            trace = args.device_time and row.get("method", "").startswith("paged-triton")
            t, dev = time_calls(fn, fargs, iters, reps, trace=trace)
            row["us"] = round(t * 1e6, 2)
            if nbytes:
                row["GB/s"] = round(nbytes / t / 1e9, 1)
                row["pct_copy"] = round(100 * nbytes / t / copy_bw, 1)
            if dev:
                row.update(dev)
                if nbytes and dev.get("kernel_us"):
                    row["pct_copy_kernel"] = round(100 * nbytes / (dev["kernel_us"] * 1e-6) / copy_bw, 1)
                    row["pct_copy_busy"] = round(100 * nbytes / (dev["busy_us"] * 1e-6) / copy_bw, 1)
            if flops:
                row["TFLOP/s"] = round(flops / t / 1e12, 2)
                if mm_rate:
                    row["pct_mm"] = round(100 * flops / t / mm_rate, 1)
        except Exception as e:                                  # noqa: BLE001 (OOM, compile failure: recorded)
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        log.info("%s", json.dumps(row))
        save()

    shapes_bl = ([tuple(int(v) for v in x.split(":")) for x in args.shapes.split(",") if x] if args.shapes
                 else [(B, L) for B in batches for L in contexts])
    for B, L in shapes_bl:
        lat_bytes = B * L * (R + ROPE) * 2
        if lat_bytes > args.max_gb * 1e9:
            rows.append(dict(batch=B, context=L, skipped=f"{lat_bytes / 1e9:.0f} GB of latents"))
            continue
        q_lat, q_pe, pages, table, slots, lengths = make_problem(B, L, H, ps, seed=B + L)
        nbytes = lat_bytes + B * H * (R + ROPE) * 4 + B * H * R * 4
        base = dict(batch=B, context=L, heads=H, page_size=ps)
        if "paged-triton" in methods:
            from lingjax.kernels.mla import gpu
            want = None

            pick = np.unique([0, 1, B - 2, B - 1]).clip(0, B - 1)     # the first and the last requests

            def check(row, f):
                """rel_err of f on the first 2 and last 2 requests against the reference (on the device,
                before timing; the last ones run in the last wave, and with an in-kernel combine (fc)
                their merge is the last to happen)."""
                nonlocal want
                try:
                    if want is None:
                        want = np.asarray(jax.jit(lambda *a: mla.decode(*a, scale, impl="reference"))(
                            q_lat[pick], q_pe[pick], pages, table, slots[pick], lengths[pick]), np.float64)
                    got = np.asarray(jax.jit(f)(q_lat, q_pe, pages, table, slots, lengths)[pick], np.float64)
                    row["rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                except Exception as e:                      # noqa: BLE001
                    row["check_error"] = f"{type(e).__name__}: {e}"[:300]

            row = dict(base, method="paged-triton", config=gpu.pick_config(B, H, ps, table.shape[1]).tag())
            f = lambda q, *a: mla.decode(q, *a, scale, impl="gpu")          # noqa: E731
            check(row, f)
            record(row, f, (q_lat, q_pe, pages, table, slots, lengths), nbytes)
            if (B, L) in sweep:
                c0 = gpu.pick_config(B, H, ps, table.shape[1])
                done = {c0.tag()}
                for c in configs:
                    s0 = gpu.with_splits(c, B, H, ps, table.shape[1]).num_splits   # its own programs per SM
                    s = {0: s0, -1: max(1, s0 // 2), -2: 2 * s0}.get(c.num_splits, c.num_splits)
                    c = dataclasses.replace(c, num_splits=s, combine=c.combine and s > 1)  # fc: only if split
                    if c.tag() in done:                     # the default row above, or a repeated split
                        continue
                    done.add(c.tag())
                    row = dict(base, method=f"paged-triton[{c.tag()}]", config=c.tag())
                    f = lambda q, *a, c=c: gpu.decode(q, *a, scale, config=c)    # noqa: E731
                    check(row, f)
                    record(row, f, (q_lat, q_pe, pages, table, slots, lengths), nbytes)
            if (B, L) in profile:
                from lingjax.kernels.mla.gpu import Config
                c0 = gpu.pick_config(B, H, ps, table.shape[1])
                profiled = set()
                for c in [c0] + [Config.from_tag(t) for t in args.profile_configs.split(",") if t]:
                    s0 = gpu.with_splits(c, B, H, ps, table.shape[1]).num_splits
                    s = {0: s0, -1: max(1, s0 // 2), -2: 2 * s0}.get(c.num_splits, c.num_splits)
                    c = dataclasses.replace(c, num_splits=s, combine=c.combine and s > 1)
                    if c.tag() in profiled:                 # fc at one split is the default kernel
                        continue
                    profiled.add(c.tag())
                    row = dict(base, method=f"profile[{c.tag()}]", config=c.tag())
                    try:
                        fp = jax.jit(lambda *a, c=c: gpu.decode_profiled(*a, scale, config=c))
                        fargs = (q_lat, q_pe, pages, table, slots, lengths)
                        jax.block_until_ready(fp(*fargs))
                        n_blk = -(-L // c.block_n)
                        per_prog = -(-n_blk // c.num_splits)
                        runs = sorted((gpu.profile_summary(jax.block_until_ready(fp(*fargs))[1], per_prog)
                                       for _ in range(5)), key=lambda d: d["span_us"])
                        row.update(runs[2])                 # the median span of 5 calls
                        t, _ = time_calls(lambda *a: fp(*a)[0], fargs, iters, reps)
                        row["us_profiled_call"] = round(t * 1e6, 2)     # the profiled kernel's own time
                    except Exception as e:                  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
                    log.info("%s", json.dumps(row))
                    save()
        if "paged-ref" in methods:
            record(dict(base, method="paged-ref"), lambda q, *a: mla.decode(q, *a, scale, impl="reference"),
                   (q_lat, q_pe, pages, table, slots, lengths), nbytes)
        if "today" in methods:
            if B * L > args.today_max_tokens:
                rows.append(dict(base, method="today", skipped=f"batch x context > {args.today_max_tokens}"))
            else:
                cache = pages[table.reshape(-1)].reshape(B, -1, R + ROPE)[:, :L]
                fn, state = today_fn(H)
                q_nope = jnp.zeros((B, H, NOPE), jnp.float32) + 0.01
                record(dict(base, method="today"),
                       lambda q, qp, c, s, pos, st: fn(q, qp, c, s, pos, st),
                       (q_nope, q_pe, cache, slots, lengths - 1, state), nbytes)
                del cache
        del pages
    shapes = [(str(L), (1, L, 0)) for L in prefills] + [(f"{B}x{n}@{P}", (B, n, P)) for B, n, P in packed]
    for name, (B, n, P) in shapes:                              # B requests of n new tokens after P cached each
        args_, pairs = prefill_problem(B, n, P, H, ps, seed=B + n + P)
        flops = 2 * H * (2 * R + ROPE) * pairs
        base = dict(prefill=name, tokens=B * n, cached=P, heads=H, page_size=ps)
        if "prefill-triton" in prefill_methods:
            from lingjax.kernels.mla import gpu_prefill
            configs = [(None, "prefill-triton")]
            if name in prefill_sweep:
                configs += [(gpu_prefill.Config(*c), f"prefill-triton[{gpu_prefill.Config(*c).tag()}]")
                            for c in PREFILL_SWEEP]
            for c, method in configs:
                row = dict(base, method=method)
                fn = (lambda q, *a: mla.prefill(q, *a, scale, impl="gpu")) if c is None else \
                    (lambda q, *a, c=c: gpu_prefill.prefill(q, *a, scale, config=c))
                try:
                    row["rel_err"] = check_prefill(fn, args_, scale, args.check_tokens)
                except Exception as e:                          # noqa: BLE001 (compile failure: recorded)
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
                    log.info("%s", json.dumps(row))
                    continue
                if not row["rel_err"] <= 2e-2:
                    row["check_failed"] = True
                    rows.append(row)
                    log.info("%s", json.dumps(row))
                    continue
                record(row, fn, args_, flops=flops)
        if "prefill-ref" in prefill_methods:
            if B * n > args.prefill_ref_max:
                rows.append(dict(base, method="prefill-ref",
                                 skipped=f"tokens > --prefill-ref-max {args.prefill_ref_max}"))
            else:
                record(dict(base, method="prefill-ref"), lambda q, *a: mla.prefill(q, *a, scale, impl="reference"),
                       args_, flops=flops)
    print_decode_table(rows)
    print_prefill_table(rows)
    save()


if __name__ == "__main__":
    main()
