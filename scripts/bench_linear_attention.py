"""Benchmark + on-device correctness check of the linear-attention kernels (issues 6, 19).

Run on a CUDA machine with fla (fla-core / flash-linear-attention 0.6.0) and jax-triton 0.3.1
importable:
    python scripts/bench_linear_attention.py [--compare] [--smoke] [--quick] [--profile] [--trace]
        [--sweep SHAPES] [--rows ROWS] [--configs JSON] [--no-check] [--no-xla] [--no-fla]
        [--no-pallas-triton] [--deadline S] [--out DIR]
"ours" = the GPU default, the Triton kernels launched through jax-triton (triton_gpu.py);
"gpu.py" = the former default, the same kernels as Pallas programs through the deprecated
Pallas-Triton lowering (pallas_triton.py), timed beside ours in every row unless
--no-pallas-triton (same config, same inputs, same method).
--compare (issue 19): the on-device float64-oracle checks of every kernel, then every row of the
table (H 32/64 x decode B 1/16/64/256 and prefill T 4096/32768 x N 1/16) at the default configs,
ours vs gpu.py vs fla, no XLA rows, no sweep; one table with device times, the ratios ours/gpu.py
and ours/fla (< 1 = ours faster) and decode's % of copy bandwidth; JSON + log under --out.
--smoke: only the oracle checks of ours (bf16, f32 3xTF32 and IEEE; split and unsplit; decode),
three production-shape calls checked against the XLA reference, and one call through the dispatch
inside jit + shard_map; fails fast (exit status 1) on any failed check.
--profile: after the table, run Nsight Compute (ncu --clock-control none) on a child process that
launches our decode (B=64, 256) and prefill (T=32768, N=1) kernels and fla's, once each, inside
cudaProfilerStart/Stop, and write ncu_details.txt + profile_summary.txt (duration, DRAM throughput,
occupancy, registers, top warp stalls per kernel) to --out.
--trace: per row, the per-kernel in-situ breakdown (CUPTI through the XLA profiler) for ours and
fla, and op counts of our compiled HLO (custom calls, fusions, copies of >= 16 MiB).
--sweep: time the configs of decode_sweep / prefill_sweep (ours only, by device time) for the
listed shapes ("decode:H:B,prefill:H:T:R") and use the fastest in the rows. --sweep-variants: the
prefill sweep tries the Triton kernel's code-generation options (decay_v, intra_in_loop, stages;
_triton_prefill_variants) instead; each sweep line also gives gpu.py's device time at the shape
and the ratio. --rows none: the sweep alone (it may then use the whole --deadline).
--rows: only the listed rows, in the order listed; every row's log line ends with the seconds
since the start, [N s].

Rows: ours (Triton kernels via jax-triton, lingjax.kernels.linear_attention.triton_gpu) vs fla 0.6
(`fused_recurrent_simple_gla` for decode, `chunk_simple_gla` for prefill, both with g_gamma) vs the
XLA jnp reference, for H in {32, 64}, D = 128, bf16 q/k/v, f32 state:
  decode  at batch 1, 16, 64, 256 over a 512-slot pool (slots rotate every step, so the state
          tiles come from HBM, not L2);
  prefill at 4096 and 32768 total tokens in 1 and 16 equal sequences, continuing from states.
fla gets its initial states already gathered into a contiguous [N, H, D, D] tensor (its kernels
have no slot indirection), i.e. fla's best case: same bytes as ours, no gather/scatter counted.
Each row, two timings for ours and for fla (see the comment above TRACE): host/events (ours: wall
clock around a jitted loop, with its fixed launch overhead; fla: CUDA events around a CUDA graph,
or eager calls where a capture fails) and device (CUPTI kernel time per call, same for both);
bytes / measured copy bandwidth (the floor), % of copy bandwidth, ratios fla / ours (> 1 = we are
faster), and our max relative error vs an f32 reference.
Prints a table and writes JSON to --out (default $OUT or ./out).
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lingjax.kernels.linear_attention as la  # noqa: E402
from lingjax.kernels.linear_attention import (gpu_common, mosaic_gpu, pallas_triton, reference,  # noqa: E402
                                              triton_gpu)

F32 = jnp.float32
NUM_SLOTS = 512


def slopes(n):
    def pow2(n):
        start = 2 ** (-(2 ** -(np.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if np.log2(n).is_integer():
        return pow2(n)
    c = 2 ** int(np.floor(np.log2(n)))
    return pow2(c) + slopes(2 * c)[0::2][:n - c]


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Two timings per row, for ours and for fla alike:
#  - host/events (the method of runs 1-5): ours = wall clock around a jitted loop of n calls, / n
#    (includes a fixed per-execution launch overhead of the jit, measured at 0.4-0.8 ms on the
#    H200, i.e. 4-20 us per decode call); fla = CUDA events around a CUDA-graph replay (decode) or
#    eager calls (prefill, where a graph capture fails).
#  - device (CUPTI, through the XLA profiler, which records every kernel of the process, fla's
#    too): after the timing, one more execution of the same jitted loop / graph; the sum of the
#    kernel durations on the stream per call ("dev", every kernel of the call counted: ours'
#    small XLA fusions, fla's reduce/copy kernels), and the span first-start..last-end per call.
# --trace adds the per-kernel breakdown and, for ours, op counts of the compiled HLO.
# The timing helpers leave their result in DIAG['last']; the row functions move it into the row.
TRACE = dict(on=False, dev=True)
DIAG = {}
QKV = dict(dtype=jnp.dtype('bfloat16'))   # prefill rows' q/k/v dtype (--qkv-dtype)
CHECK = dict(ours_only=False)             # oracle checks of ours only (--smoke)
PT_CACHE = {}                             # gpu.py's prefill timing per (shape, config), reused by
                                          # the sweep's configs that differ only in TRITON_ONLY options
PT = dict(on=True, default=False)         # time gpu.py (pallas_triton.py) beside ours in each row;
                                          # default: at gpu.py's own default config (--pt-default)
SWEEP = dict(variants=False, triton_only=False)   # --sweep-variants, --sweep-triton-only
REPS = dict(n=5, calls_div=1)             # host-timed repetitions; decode calls per execution / div


def dev_times(trace):
    """(busy us per call, span us per call) of the busiest stream of a device_trace result."""
    streams = [t for k, t in trace.items() if k != '_lines']
    if not streams:
        return None, None
    t = max(streams, key=lambda t: t['busy_us'])
    return t['per_call_busy_us'], t['per_call_span_us']


def device_trace(run, calls):
    """Run `run()` under the XLA profiler; per device stream: kernels (count, median/sum us),
    busy time, span, gaps; `calls` = how many timed calls run() makes (for per-call numbers)."""
    from jax._src.lib import _profile_data, _profiler
    sess = _profiler.ProfilerSession()
    try:
        run()
    finally:
        xs = sess.stop()
    data = _profile_data.ProfileData.from_serialized_xspace(xs)
    out = {}
    for plane in data.planes:
        if not plane.name.startswith('/device:GPU'):
            continue
        names = [line.name for line in plane.lines]
        out.setdefault('_lines', []).extend(names)
        streams = [n for n in names if n.startswith('Stream')]
        for line in plane.lines:
            # derived lines (XLA Ops, XLA Modules, Steps, ...) repeat the kernels of the streams
            if streams and line.name not in streams:
                continue
            if not streams and any(w in line.name for w in ('XLA', 'Step', 'Launch', 'Framework',
                                                             'Source', 'TensorFlow', 'Ops')):
                continue
            ev = sorted((e.start_ns, e.duration_ns, e.name) for e in line.events)
            if not ev:
                continue
            kern = {}
            for _, d, name in ev:
                kern.setdefault(name[:70], []).append(d / 1e3)
            gaps = [(b[0] - (a[0] + a[1])) / 1e3 for a, b in zip(ev, ev[1:])]
            span = (max(t + d for t, d, _ in ev) - ev[0][0]) / 1e3
            busy = sum(d for _, d, _ in ev) / 1e3
            out[line.name] = dict(
                calls=calls, span_us=span, busy_us=busy, per_call_span_us=span / calls,
                per_call_busy_us=busy / calls,
                gap_median_us=statistics.median(gaps) if gaps else 0.0,
                gap_max_us=max(gaps) if gaps else 0.0, gap_sum_us=sum(gaps),
                kernels={k: dict(n=len(v), median_us=statistics.median(v), sum_us=sum(v))
                         for k, v in kern.items()})
    return out


def hlo_stats(compiled_text, big=1 << 24):
    """Op counts of an optimized HLO module: custom calls, fusions, copies (and the shapes of
    copies of >= 16 MiB: a copy of the state pool would cost a full read + write of it)."""
    import re
    n = dict(custom_calls=0, fusions=0, copies=0, while_loops=0, command_buffers=0)
    big_copies = []
    for line in compiled_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%?[\w.-]+ = (?:\(.*?\)|(\w+)\[([\d,]*)\]\S*) ([\w-]+)\(', line)
        if not m:
            if 'command_buffer' in line:
                n['command_buffers'] += 1
            continue
        dt, dims, op = m.group(1) or '', m.group(2) or '', m.group(3)
        if op == 'custom-call':
            n['custom_calls'] += 1
        elif op == 'fusion':
            n['fusions'] += 1
        elif op in ('copy', 'copy-start'):
            n['copies'] += 1
            size = int(np.prod([int(x) for x in dims.split(',') if x] or [1])) * \
                {'f32': 4, 'bf16': 2, 's32': 4, 'pred': 1}.get(dt, 4)
            if size >= big:
                big_copies.append(f'{dt}[{dims}]')
        elif op == 'while':
            n['while_loops'] += 1
        if 'command_buffer' in line:
            n['command_buffers'] += 1
    n['big_copies'] = big_copies[:8]
    return n


def _diag(run, calls, hlo=None):
    if not (TRACE['on'] or TRACE['dev']):
        return
    d = {}
    if TRACE['on'] and hlo is not None:
        try:
            d['hlo'] = hlo_stats(hlo())
        except Exception as e:
            d['hlo'] = f'failed: {type(e).__name__}: {str(e)[:200]}'
    try:
        d['trace'] = device_trace(run, calls)
        d['dev_us'], d['span_us'] = dev_times(d['trace'])
    except Exception as e:
        d['trace'] = f'failed: {type(e).__name__}: {str(e)[:200]}'
    DIAG['last'] = d


KERNEL_NAMES = re.compile(r'prefill|decode|linear_attention')   # ours and gpu.py's kernel names


def _take_diag(row, who):
    d = DIAG.pop('last', None)
    if not d:
        return
    if d.get('dev_us'):
        row[f'{who}_dev_us'] = d['dev_us']
        row[f'{who}_span_us'] = d['span_us']
    if who in ('ours', 'pt') and isinstance(d.get('trace'), dict):
        # the linear-attention kernels alone, without the XLA ops around them (per call)
        kern = [(k['sum_us'], t['calls']) for name, t in d['trace'].items() if name != '_lines'
                for kname, k in t['kernels'].items() if KERNEL_NAMES.search(kname)]
        if kern:
            row[f'{who}_kernel_us'] = sum(u for u, _ in kern) / kern[0][1]
    if TRACE['on']:
        row[f'diag_{who}'] = d


def time_jax_loop(step, carry, n, reps=5):
    """Median per-step device time of `step(i, carry) -> carry` run n times inside one jit."""
    f = jax.jit(lambda c: jax.lax.fori_loop(0, n, step, c), donate_argnums=0)
    carry = f(carry)
    jax.block_until_ready(carry)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        carry = f(carry)
        jax.block_until_ready(carry)
        ts.append((time.perf_counter() - t0) / n)
    box = [carry]

    def run():
        box[0] = f(box[0])
        jax.block_until_ready(box[0])
    _diag(run, n, lambda: f.lower(carry).compile().as_text())
    return statistics.median(ts)


def time_jax_unrolled(step, pool, xs, reps=5):
    """Median per-call device time of `pool = step(pool, x)` for x in xs, unrolled in one jit
    (back-to-back kernels, no loop bookkeeping between them)."""
    def many(pool, xs):
        outs = []
        for x in xs:
            pool, o = step(pool, x)
            outs.append(o)
        return pool, outs          # every call's output stays live (no call's epilogue is dead code)
    f = jax.jit(many, donate_argnums=0)
    pool, _ = f(pool, xs)
    jax.block_until_ready(pool)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pool, o = f(pool, xs)
        jax.block_until_ready((pool, o))
        ts.append((time.perf_counter() - t0) / len(xs))
    box = [pool]

    def run():
        box[0], o = f(box[0], xs)
        jax.block_until_ready((box[0], o))
    _diag(run, len(xs), lambda: f.lower(pool, xs).compile().as_text())
    return statistics.median(ts)


def copy_bandwidth():
    x = jnp.ones((1 << 29,), F32) * 1.5               # 2 GiB
    f = jax.jit(lambda a: a * 1.0000001)
    y = f(x)
    y.block_until_ready()
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        y = f(x)
        y.block_until_ready()
        ts.append(time.perf_counter() - t0)
    jax_bw = 2 * x.nbytes / min(ts)
    del x, y
    import torch
    t = torch.empty(1 << 29, dtype=torch.float32, device='cuda').normal_()
    u = torch.empty_like(t)
    for _ in range(3):
        u.copy_(t)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 1e9
    for _ in range(10):
        e0.record()
        u.copy_(t)
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) / 1e3)
    torch_bw = 2 * t.numel() * 4 / best
    del t, u
    torch.cuda.empty_cache()
    return max(jax_bw, torch_bw), jax_bw, torch_bw


def torch_time(fn, reps=20, graph=True, calls=1):
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
        except Exception as e:  # fla may sync to host inside; fall back to plain launches
            print(f'  (no CUDA graph for fla: {type(e).__name__}: {str(e)[:80]})')
            graph = False
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    def run():
        fn()
        fn()
        torch.cuda.synchronize()
    _diag(run, 2 * calls)
    if 'last' in DIAG:
        DIAG['last']['graph'] = graph
    return statistics.median(ts)


# ---------------------------------------------------------------------------------------------
# correctness against a float64 numpy recurrence, small varlen case, f32 and bf16 inputs


def oracle_prefill(q, k, v, g, pool, slots, cu, fresh, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    pool = np.asarray(pool, np.float64).copy()
    o = np.zeros_like(q)
    gam = np.exp(np.asarray(g, np.float64))[:, None, None]
    for r in range(len(slots)):
        s, e = cu[r], cu[r + 1]
        if e <= s or slots[r] < 0:
            continue
        S = np.zeros_like(pool[0]) if fresh[r] else pool[slots[r]].copy()
        for t in range(s, e):
            S = gam * S + k[t][:, :, None] * v[t][:, None, :]
            o[t] = scale * np.einsum('hk,hkv->hv', q[t], S)
        pool[slots[r]] = S
    return o, pool


def check_small(log):
    rng = np.random.default_rng(1)
    H, D, N = 4, 128, 12
    lens = [1, 63, 64, 65, 300, 0, 7]
    slots = np.array([3, 0, 7, 1, 5, 9, -1], np.int32)
    lens[-1] = 5                                 # padding sequence with negative slot
    fresh = np.array([0, 1, 0, 0, 1, 0, 0], bool)
    T = sum(lens) + 9
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    g = -np.linspace(0.004, 0.92, H).astype(np.float32)
    pool = rng.standard_normal((N, H, D, D)).astype(np.float32) * 0.3
    res = {}
    for dt, tol in (('float32', 1e-5), ('bfloat16', 1e-2)):
        q, k, v = (jnp.asarray(rng.standard_normal((T, H, D)) * 0.5, dt) for _ in range(3))
        o_ref, p_ref = oracle_prefill(q.astype(F32), k.astype(F32), v.astype(F32), g, pool, slots,
                                      cu, fresh, D ** -0.5)
        fns = [('prefill', triton_gpu.prefill)]                   # f32 inputs: 3xTF32, the default
        if dt == 'float32':
            fns.append(('prefill_ieee', our_kernel('prefill', dict(f32_dot='ieee'))))
        # the state-update forms the dtype's default does not take (decay_v: True for bf16, False
        # for f32), and the causal decay matrix recomputed per chunk
        fns += [('prefill_decay_v' if dt == 'float32' else 'prefill_decay_k',
                 our_kernel('prefill', dict(decay_v=dt == 'float32'))),
                ('prefill_intra_in_loop', our_kernel('prefill', dict(intra_in_loop=True)))]
        if not CHECK['ours_only']:
            fns.append(('pallas_triton_prefill', pallas_triton.prefill))
            if dt == 'bfloat16':
                fns.append(('mosaic_prefill', mosaic_gpu.prefill))
        for name, fn in fns:
            o, p = fn(q, k, v, jnp.asarray(g), jnp.asarray(pool), jnp.asarray(slots),
                      jnp.asarray(cu), jnp.asarray(fresh), scale=D ** -0.5)
            o, p = np.asarray(o.astype(F32)), np.asarray(p)
            untouched = [i for i in range(N) if i not in set(slots[(np.diff(cu) > 0) & (slots >= 0)])]
            ok_untouched = bool(np.array_equal(p[untouched], pool[untouched]))
            e_o, e_s = rel(o, o_ref), rel(p, p_ref)
            # per-sequence check too (a short sequence's error hides in the global norm)
            e_seq = max(rel(o[cu[r]:cu[r + 1]], o_ref[cu[r]:cu[r + 1]]) for r in range(len(lens))
                        if lens[r] > 0 and slots[r] >= 0)
            pad_zero = bool(np.all(o[cu[-1]:] == 0) and np.all(o[cu[-2]:cu[-1]] == 0))
            res[f'{name}_{dt}'] = dict(rel_o=e_o, rel_state=e_s, rel_o_worst_seq=e_seq,
                                       untouched=ok_untouched, padding_zero=pad_zero,
                                       ok=max(e_o, e_s, e_seq) <= tol and ok_untouched and pad_zero)
        B = 9
        dslots = np.array([4, -1, 0, 11, 2, 6, 8, 10, 1], np.int32)
        dfresh = np.array([0, 0, 1, 0, 0, 1, 0, 0, 0], bool)
        q, k, v = (jnp.asarray(rng.standard_normal((B, H, D)) * 0.5, dt) for _ in range(3))
        o_ref, p_ref = oracle_prefill(q.astype(F32), k.astype(F32), v.astype(F32), g, pool, dslots,
                                      np.arange(B + 1), dfresh, D ** -0.5)
        dfns = [('decode', triton_gpu.decode), ('decode_key_split', our_kernel('decode', dict(block_k=64)))]
        if not CHECK['ours_only']:
            dfns += [('pallas_triton_decode', pallas_triton.decode), ('mosaic_decode', mosaic_gpu.decode)]
        for name, fn in dfns:
            o, p = fn(q, k, v, jnp.asarray(g), jnp.asarray(pool), jnp.asarray(dslots),
                      jnp.asarray(dfresh), scale=D ** -0.5)
            o, p = np.asarray(o.astype(F32)), np.asarray(p)
            e_o, e_s = rel(o, o_ref), rel(p, p_ref)
            untouched = [i for i in range(N) if i not in set(dslots[dslots >= 0])]
            ok_untouched = bool(np.array_equal(p[untouched], pool[untouched]))
            res[f'{name}_{dt}'] = dict(rel_o=e_o, rel_state=e_s, untouched=ok_untouched,
                                       padding_zero=bool(np.all(o[1] == 0)),
                                       ok=max(e_o, e_s) <= tol and ok_untouched and bool(np.all(o[1] == 0)))
    for name, r in res.items():
        log(f'oracle check {name}: ' + ', '.join(f'{a}={b:.2e}' if isinstance(b, float) else f'{a}={b}'
                                                 for a, b in r.items()))
    return res


def _other_decay_form(q, *args, **kw):
    """Our prefill with the state-update form its dtype's default does not take (both passes)."""
    return triton_gpu.prefill(q, *args, decay_v=q.dtype == jnp.float32, **kw)


def check_split(log):
    """Segment-split prefill (forced small segment) vs the float64 oracle: a long continuing
    sequence, ragged lengths, an empty and a padding (slot -1) sequence, a fresh slot,
    padding tokens, untouched slots; and the auto split on one long sequence."""
    rng = np.random.default_rng(2)
    H, D, N = 4, 128, 12
    lens = [1100, 0, 7, 300, 700, 512]
    slots = np.array([3, 0, -1, 7, 1, 5], np.int32)
    fresh = np.array([0, 0, 0, 1, 0, 0], bool)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1]) + 13
    g = -np.linspace(0.004, 0.92, H).astype(np.float32)
    pool = rng.standard_normal((N, H, D, D)).astype(np.float32) * 0.3
    res = {}
    cases = [('ragged_seg256', slots, cu, fresh, T, dict(segment=256)),
             ('single_auto', np.array([2], np.int32), np.array([0, 4000], np.int32),
              np.array([0], bool), 4000 + 5, {})]
    kernels = [('', triton_gpu.prefill), ('other_decay_form_', _other_decay_form)] + (
        [] if CHECK['ours_only'] else [('pallas_triton_', pallas_triton.prefill)])
    for (name, sl, c, fr, TT, kw), (who, kernel) in ((case, k) for case in cases for k in kernels):
        for dt, tol in (('float32', 1e-5), ('bfloat16', 1e-2)):
            q, k, v = (jnp.asarray(rng.standard_normal((TT, H, D)) * 0.5, dt) for _ in range(3))
            o_ref, p_ref = oracle_prefill(q.astype(F32), k.astype(F32), v.astype(F32), g, pool, sl,
                                          c, fr, D ** -0.5)
            o, p = kernel(q, k, v, jnp.asarray(g), jnp.asarray(pool), jnp.asarray(sl),
                          jnp.asarray(c), jnp.asarray(fr), scale=D ** -0.5, **kw)
            o, p = np.asarray(o.astype(F32)), np.asarray(p)
            live = [r for r in range(len(sl)) if c[r + 1] > c[r] and sl[r] >= 0]
            untouched = [i for i in range(N) if i not in set(sl[live])]
            e_seq = max(rel(o[c[r]:c[r + 1]], o_ref[c[r]:c[r + 1]]) for r in live)
            e_s = max(rel(p[sl[r]], p_ref[sl[r]]) for r in live)
            ok_untouched = bool(np.array_equal(p[untouched], pool[untouched]))
            zero = bool(np.all(o[c[-1]:] == 0) and all(np.all(o[c[r]:c[r + 1]] == 0)
                                                        for r in range(len(sl)) if r not in live))
            seg = gpu_common.pick_segment(TT, len(sl), H, 2, 64, kw.get('segment'))
            res[f'{who}split_{name}_{dt}'] = dict(segment=seg, rel_o_worst_seq=e_seq, rel_state=e_s,
                                             untouched=ok_untouched, padding_zero=zero,
                                             ok=max(e_seq, e_s) <= tol and ok_untouched and zero
                                             and seg is not None)
    for name, r in res.items():
        log(f'oracle check {name}: ' + ', '.join(f'{a}={b:.2e}' if isinstance(b, float) else f'{a}={b}'
                                                 for a, b in r.items()))
    return res


def check_production_shapes(log):
    """Ours at production shapes (H=32, D=128, chunks of 64) against the XLA f32 reference
    (reference.chunked / reference.decode, precision highest): bf16 prefill of one 4096-token
    sequence (auto split) and of 16 x 256 tokens (unsplit), f32 prefill (3xTF32), bf16 decode
    at B=64 over a 512-slot pool. Tolerance 1e-2 (bf16), 1e-5 (f32)."""
    H, D, scale = 32, 128, 128 ** -0.5
    g = jnp.asarray(-np.asarray(slopes(H), np.float32))
    res = {}
    for name, T, R, dt, tol in (('prefill_T4096_N1_bf16', 4096, 1, 'bfloat16', 1e-2),
                                ('prefill_T4096_N16_bf16', 4096, 16, 'bfloat16', 1e-2),
                                ('prefill_T4096_N16_f32', 4096, 16, 'float32', 1e-5)):
        ks = jax.random.split(jax.random.key(T + R), 4)
        q, k, v = (jax.random.normal(kk, (T, H, D), dt) * s for kk, s in zip(ks[:3], (1.0, 0.3, 1.0)))
        pool = jax.random.normal(ks[3], (64, H, D, D), F32) * 0.1
        slots = jnp.arange(R, dtype=jnp.int32) * 3 % 64
        cu = jnp.arange(R + 1, dtype=jnp.int32) * (T // R)
        fresh = jnp.zeros((R,), bool)
        o_ref, s_ref = reference.chunked(*(x.reshape(R, T // R, H, D) for x in (q, k, v)), g,
                                         pool[slots], scale=scale)
        o, p = triton_gpu.prefill(q, k, v, g, pool, slots, cu, fresh, scale=scale)
        e_o = rel(o.astype(F32), o_ref.reshape(T, H, D).astype(F32))
        e_s = rel(p[slots], s_ref)
        res[name] = dict(rel_o=e_o, rel_state=e_s, segment=gpu_common.pick_segment(T, R, H, 2, 64, None),
                         ok=max(e_o, e_s) <= tol)
    B = 64
    ks = jax.random.split(jax.random.key(B), 4)
    q, k, v = (jax.random.normal(kk, (B, H, D), jnp.bfloat16) for kk in ks[:3])
    pool = jax.random.normal(ks[3], (NUM_SLOTS, H, D, D), F32) * 0.1
    slots = jnp.asarray(np.random.default_rng(0).permutation(NUM_SLOTS)[:B].astype(np.int32))
    fresh = jnp.zeros((B,), bool).at[3].set(True)
    o_ref, p_ref = reference.decode(q, k, v, g, pool, slots, fresh, scale=scale)
    o, p = triton_gpu.decode(q, k, v, g, pool, slots, fresh, scale=scale)
    e_o, e_s = rel(o.astype(F32), o_ref.astype(F32)), rel(p[slots], p_ref[slots])
    res['decode_B64_bf16'] = dict(rel_o=e_o, rel_state=e_s, ok=max(e_o, e_s) <= 1e-2)
    for name, r in res.items():
        log(f'oracle check {name}: ' + ', '.join(f'{a}={b:.2e}' if isinstance(b, float) else f'{a}={b}'
                                                 for a, b in r.items()))
    return res


def check_shard_map(log):
    """Ours through the dispatch (impl='gpu') inside jit + shard_map over the heads (a 1-device
    mesh), the pool donated, against the jnp reference: prefill then decode."""
    H, D, T, scale = 4, 128, 300, 128 ** -0.5
    g = jnp.asarray(-np.linspace(0.004, 0.92, H).astype(np.float32))
    ks = jax.random.split(jax.random.key(7), 4)
    q, k, v = (jax.random.normal(kk, (T, H, D), jnp.bfloat16) for kk in ks[:3])
    pool = jax.random.normal(ks[3], (6, H, D, D), F32) * 0.1
    slots, cu, fresh = (jnp.asarray([2, 0, 5], jnp.int32), jnp.asarray([0, 130, 131, 290], jnp.int32),
                        jnp.asarray([False, True, False]))
    mesh = jax.make_mesh((1,), ('tensor',), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec
    hs = P(None, 'tensor')

    def run(impl, pool):
        def body(q, k, v, g, pool, slots, cu, fresh):
            o, pool = la.prefill(q, k, v, g, pool, slots, cu, fresh, scale=scale, impl=impl)
            o2, pool = la.decode(q[:3], k[:3], v[:3], g, pool, slots, jnp.zeros_like(fresh),
                                 scale=scale, impl=impl)
            return o, o2, pool
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(hs,) * 3 + (P('tensor'), hs, P(), P(), P()),
                                  out_specs=(hs, hs, hs)), donate_argnums=4)
        return f(q, k, v, g, pool, slots, cu, fresh)
    ref = run('reference', pool + 0)
    got = run('gpu', pool + 0)
    errs = [rel(a.astype(F32), b.astype(F32)) for a, b in zip(got, ref)]
    res = {'shard_map_dispatch_bf16': dict(rel_o=errs[0], rel_o_decode=errs[1], rel_pool=errs[2],
                                           ok=max(errs) <= 1e-2)}
    log('oracle check shard_map_dispatch_bf16: ' + ', '.join(f'{e:.2e}' for e in errs))
    return res


def fmt_compare(rows):
    """Issue 19's table: device time (CUPTI) of ours (Triton via jax-triton), gpu.py (Pallas-
    Triton, pallas_triton.py) and fla; ratios ours/gpu.py and ours/fla (< 1 = ours faster); last
    column: the ratio of the linear-attention kernels alone (without the XLA ops of the call)."""
    hdr = (f"{'kind':8}{'H':>4}{'shape':>14}{'ours dev':>10}{'gpu.py dev':>12}{'fla dev':>10}"
           f"{'ours/gpu.py':>12}{'ours/fla':>10}{'%BW ours':>9}{'ours host':>11}{'gpu.py host':>12}"
           f"{'err ours':>10}{'err gpu.py':>11}{'kernels ours/gpu.py':>20}")
    out = [hdr, '-' * len(hdr)]
    nan = float('nan')
    for r in rows:
        shape = f"B={r['batch']}" if r['kind'] == 'decode' else f"T={r['tokens']},N={r['seqs']}"
        od, pd, fd, oh, ph = (r.get(k) or nan for k in ('ours_dev_us', 'pt_dev_us', 'fla_dev_us',
                                                        'ours_us', 'pt_us'))
        pct = 100 * r['bytes'] / r['bw'] / (od * 1e-6)
        err = max(r.get('rel_err_o', nan), r.get('rel_err_state', 0.0))
        perr = max(r.get('pt_rel_err_o', nan), r.get('pt_rel_err_state', 0.0))
        out.append(f"{r['kind']:8}{r['H']:>4}{shape:>14}{od:>10.1f}{pd:>12.1f}{fd:>10.1f}"
                   f"{od / pd:>12.3f}{od / fd:>10.3f}{pct:>8.0f}%{oh:>11.1f}{ph:>12.1f}"
                   f"{err:>10.1e}{perr:>11.1e}"
                   f"{(r.get('ours_kernel_us') or nan) / (r.get('pt_kernel_us') or nan):>20.3f}")
    return '\n'.join(out)


def verdicts(rows):
    """Issue 19's targets per row, by device time: ours <= 1.03 x gpu.py; decode at B >= 64
    >= 85% of copy bandwidth; prefill <= fla. None where a time is missing."""
    out = []
    for r in rows:
        od, pd, fd = r.get('ours_dev_us'), r.get('pt_dev_us'), r.get('fla_dev_us')
        v = dict(kind=r['kind'], H=r['H'], shape=r.get('batch') or (r['tokens'], r['seqs']),
                 within_3pct_of_gpu_py=(od / pd <= 1.03) if od and pd else None)
        if r['kind'] == 'decode' and r['batch'] >= 64:
            v['bw_85pct'] = (r['bytes'] / r['bw'] / (od * 1e-6) >= 0.85) if od else None
        if r['kind'] == 'prefill':
            v['prefill_at_least_fla'] = (od <= fd) if od and fd else None
        out.append(v)
    return out


# ---------------------------------------------------------------------------------------------
# benchmark rows


def bench_decode(H, B, bw, cfg, with_fla=True, with_xla=True):
    import torch
    D = 128
    scale = D ** -0.5
    rng = np.random.default_rng(B + H)
    g = jnp.asarray(-np.asarray(slopes(H), np.float32))
    key = jax.random.key(B)
    kq, kk, kv, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (B, H, D), jnp.bfloat16)
    k = jax.random.normal(kk, (B, H, D), jnp.bfloat16) * 0.3
    v = jax.random.normal(kv, (B, H, D), jnp.bfloat16)
    pool = jax.random.normal(kp, (NUM_SLOTS, H, D, D), F32) * 0.1
    perm = jnp.asarray(rng.permutation(NUM_SLOTS).astype(np.int32))
    fresh = jnp.zeros((B,), bool)
    state_bytes = B * H * D * D * 4 * 2
    io_bytes = 4 * B * H * D * 2
    nbytes = state_bytes + io_bytes
    row = dict(kind='decode', H=H, D=D, batch=B, bytes=nbytes, floor_us=nbytes / bw * 1e6)

    # correctness (ours vs jnp reference, f32 math) on one step
    slots0 = perm[:B]
    o_ref, p_ref = reference.decode(q, k, v, g, pool, slots0, fresh, scale=scale)
    o, p = our_kernel('decode', cfg)(q, k, v, g, pool, slots0, fresh, scale=scale)
    row['rel_err_o'] = rel(o.astype(F32), o_ref.astype(F32))
    row['rel_err_state'] = rel(p[slots0], p_ref[slots0])
    pt = _as_pallas_triton(cfg, 'decode') if PT['on'] else None
    if pt is not None:
        o, p = our_kernel('decode', pt)(q, k, v, g, pool, slots0, fresh, scale=scale)
        row['pt_rel_err_o'] = rel(o.astype(F32), o_ref.astype(F32))
        row['pt_rel_err_state'] = rel(p[slots0], p_ref[slots0])
    del o_ref, p_ref, p

    h0_check = pool[slots0]
    n = (100 if B <= 16 else 40) // REPS['calls_div']
    slot_sets = tuple(jnp.take(perm, (i * B + jnp.arange(B)) % NUM_SLOTS) for i in range(n))

    def make_step(fn):
        def step(pool_c, slots):
            o, pool_c = fn(q, k, v, g, pool_c, slots, fresh, scale=scale)
            return pool_c, o
        return step

    row['ours_us'] = time_jax_unrolled(make_step(our_kernel('decode', cfg)),
                                       pool, slot_sets, reps=REPS['n']) * 1e6
    _take_diag(row, 'ours')
    if pt is not None:                  # gpu.py (pallas_triton.py), same config, a fresh pool
        pool3 = jax.random.normal(kp, (NUM_SLOTS, H, D, D), F32) * 0.1
        row['pt_us'] = time_jax_unrolled(make_step(our_kernel('decode', pt)), pool3, slot_sets,
                                         reps=REPS['n']) * 1e6
        _take_diag(row, 'pt')
        del pool3
    if with_xla:
        pool2 = jax.random.normal(kp, (NUM_SLOTS, H, D, D), F32) * 0.1
        dev, TRACE['dev'] = TRACE['dev'], False
        row['xla_us'] = time_jax_unrolled(make_step(reference.decode), pool2, slot_sets) * 1e6
        TRACE['dev'] = dev
        DIAG.pop('last', None)
        del pool2
    if with_fla:
        from fla.ops.simple_gla import fused_recurrent_simple_gla
        tq = torch.from_dlpack(q).unsqueeze(1).contiguous()      # [B, 1, H, D]
        tk = torch.from_dlpack(k).unsqueeze(1).contiguous()
        tv = torch.from_dlpack(v).unsqueeze(1).contiguous()
        tg = torch.from_dlpack(g).contiguous()
        nsets = max(2, min(64, (256 << 20) // (B * H * D * D * 4)))
        h0s = [torch.from_dlpack(jax.random.normal(jax.random.key(100 + i), (B, H, D, D), F32) * 0.1)
               for i in range(nsets)]

        def run():
            for h0 in h0s:
                fused_recurrent_simple_gla(tq, tk, tv, g_gamma=tg, scale=scale, initial_state=h0,
                                           output_final_state=True)
        row['fla_us'] = torch_time(run, calls=nsets) / nsets * 1e6
        _take_diag(row, 'fla')
        # fla accuracy on the same step
        h0 = torch.from_dlpack(h0_check).contiguous()
        fo, fh = fused_recurrent_simple_gla(tq, tk, tv, g_gamma=tg, scale=scale, initial_state=h0,
                                            output_final_state=True)
        o_ref, _ = reference.decode(q, k, v, g, h0_check, jnp.arange(B, dtype=jnp.int32), fresh,
                                    scale=scale)
        row['fla_rel_err_o'] = rel(fo[:, 0].float().cpu().numpy(), o_ref.astype(F32))
        del h0s, h0, fo, fh
        torch.cuda.empty_cache()
    return row


def bench_prefill(H, T, R, bw, flops_rate, cfg, with_fla=True, with_xla=True, check=True):
    import torch
    D = 128
    C = 64
    scale = D ** -0.5
    L = T // R
    g = jnp.asarray(-np.asarray(slopes(H), np.float32))
    key = jax.random.key(T + R + H)
    kq, kk, kv, kp = jax.random.split(key, 4)
    q = jax.random.normal(kq, (T, H, D), QKV['dtype'])
    k = jax.random.normal(kk, (T, H, D), QKV['dtype']) * 0.3
    v = jax.random.normal(kv, (T, H, D), QKV['dtype'])
    npool = 64
    pool = jax.random.normal(kp, (npool, H, D, D), F32) * 0.1
    slots = jnp.arange(R, dtype=jnp.int32) * 3 % npool
    cu = jnp.arange(R + 1, dtype=jnp.int32) * L
    fresh = jnp.zeros((R,), bool)
    h0_init = pool[slots]
    nbytes = 4 * T * H * D * q.dtype.itemsize + R * H * D * D * 4 * 2
    flops = T * H * (4 * C * D + 4 * D * D)
    row = dict(kind='prefill', H=H, D=D, tokens=T, seqs=R, bytes=nbytes, flops=flops,
               floor_us=max(nbytes / bw, flops / flops_rate) * 1e6)

    # correctness: ours vs XLA `chunked` (f32 math, highest precision) on the same bf16 inputs
    ref_fn = jax.jit(lambda q, k, v, h0: reference.chunked(
        q.reshape(R, L, H, D), k.reshape(R, L, H, D), v.reshape(R, L, H, D), g, h0, scale=scale))
    pt = _as_pallas_triton(cfg, 'prefill') if PT['on'] else None
    if check:
        o, p = our_kernel('prefill', cfg)(q, k, v, g, pool, slots, cu, fresh, scale=scale)
        o_ref, s_ref = ref_fn(q, k, v, h0_init)
        row['rel_err_o'] = rel(o.astype(F32), o_ref.reshape(T, H, D).astype(F32))
        row['rel_err_state'] = rel(p[slots], s_ref)
        if pt is not None:
            o, p = our_kernel('prefill', pt)(q, k, v, g, pool, slots, cu, fresh, scale=scale)
            row['pt_rel_err_o'] = rel(o.astype(F32), o_ref.reshape(T, H, D).astype(F32))
            row['pt_rel_err_state'] = rel(p[slots], s_ref)
        del o, p, o_ref, s_ref
    nv = D // min(cfg.get('block_v', 64), D)
    row['segment'] = gpu_common.pick_segment(T, R, H, nv, cfg.get('chunk', 64), cfg.get('segment'))

    def make_step(fn):
        def step(i, c):
            pool_c, acc = c
            o, pool_c = fn(q, k, v, g, pool_c, slots, cu, fresh, scale=scale)
            return pool_c, acc + o[0, 0, 0].astype(F32)
        return step
    n = 10 if T <= 4096 else 3
    row['ours_us'] = time_jax_loop(make_step(our_kernel('prefill', cfg)), (pool, jnp.zeros((), F32)),
                                   n, reps=REPS['n']) * 1e6
    _take_diag(row, 'ours')
    pt_key = ('prefill', H, T, R, json.dumps(pt, sort_keys=True))
    if pt is not None and pt_key in PT_CACHE:     # gpu.py at this shape and config: timed once
        row.update(PT_CACHE[pt_key])
    elif pt is not None:                # gpu.py (pallas_triton.py), same config, a fresh pool
        pool3 = jax.random.normal(kp, (npool, H, D, D), F32) * 0.1
        row['pt_us'] = time_jax_loop(make_step(our_kernel('prefill', pt)),
                                     (pool3, jnp.zeros((), F32)), n, reps=REPS['n']) * 1e6
        _take_diag(row, 'pt')
        PT_CACHE[pt_key] = {a: b for a, b in row.items() if a.startswith(('pt_', 'diag_pt'))}
        del pool3
    if with_xla:
        def xstep(i, c):
            pool_c, acc = c
            o, s = reference.chunked(q.reshape(R, L, H, D), k.reshape(R, L, H, D),
                                     v.reshape(R, L, H, D), g, pool_c[slots], scale=scale)
            return pool_c.at[slots].set(s), acc + o[0, 0, 0, 0].astype(F32)
        pool2 = jax.random.normal(kp, (npool, H, D, D), F32) * 0.1
        dev, TRACE['dev'] = TRACE['dev'], False
        row['xla_us'] = time_jax_loop(xstep, (pool2, jnp.zeros((), F32)), 2, reps=3) * 1e6
        TRACE['dev'] = dev
        DIAG.pop('last', None)
        del pool2
    if with_fla:
        from fla.ops.simple_gla import chunk_simple_gla
        tq, tk, tv = (torch.from_dlpack(x).unsqueeze(0).contiguous() for x in (q, k, v))
        tg = torch.from_dlpack(g).contiguous()
        h0 = torch.from_dlpack(h0_init).contiguous()
        tcu = torch.from_dlpack(cu).long() if R > 1 else None
        tcu_cpu = tcu.cpu() if R > 1 else None
        kw = dict(cu_seqlens=tcu, cu_seqlens_cpu=tcu_cpu) if R > 1 else {}

        def run():
            return chunk_simple_gla(tq, tk, tv, g_gamma=tg, scale=scale, initial_state=h0,
                                    output_final_state=True, **kw)
        row['fla_us'] = torch_time(run, reps=10, graph=R == 1) * 1e6   # capture needs no host sync
        _take_diag(row, 'fla')
        fo, _ = run()
        o_ref, _ = ref_fn(q, k, v, h0_init)
        row['fla_rel_err_o'] = rel(fo[0].float().cpu().numpy(), o_ref.reshape(T, H, D).astype(F32))
        del fo, tq, tk, tv, h0
        torch.cuda.empty_cache()
    return row


def fmt_diag(row):
    """One line per (ours / fla, device stream) of a row's --trace data."""
    out = []
    for who in ('ours', 'fla'):
        d = row.get(f'diag_{who}')
        if not d:
            continue
        if 'hlo' in d:
            out.append(f'  {who} HLO: {d["hlo"]}')
        tr = d.get('trace')
        if not isinstance(tr, dict):
            out.append(f'  {who} trace: {tr}')
            continue
        for stream, t in tr.items():
            if stream == '_lines':
                continue
            ks = '; '.join(f'{k} x{v["n"]} med {v["median_us"]:.1f}' for k, v in
                           sorted(t['kernels'].items(), key=lambda kv: -kv[1]['sum_us']))
            out.append(f'  {who} {stream}: per call span {t["per_call_span_us"]:.1f} us, busy '
                       f'{t["per_call_busy_us"]:.1f} us; gaps median {t["gap_median_us"]:.2f} max '
                       f'{t["gap_max_us"]:.1f} us; kernels: {ks}')
    return '\n'.join(out)


def matmul_rate():
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * 8192 ** 3 / min(ts)


def fmt_table(rows):
    """Both timings (see the comment above TRACE): 'host'/'evt' = ours wall clock around the jitted
    loop / fla CUDA events; 'dev' = CUPTI kernel time per call, the same method for both."""
    hdr = (f"{'kind':8}{'H':>4}{'shape':>14}{'ours dev':>10}{'fla dev':>10}{'dev x':>7}{'%BW dev':>8}"
           f"{'ours host':>11}{'fla evt':>9}{'h/e x':>7}{'%BW host':>9}{'xla us':>10}{'floor':>8}"
           f"{'rel err':>9}")
    out = [hdr, '-' * len(hdr)]
    nan = float('nan')
    for r in rows:
        shape = f"B={r['batch']}" if r['kind'] == 'decode' else f"T={r['tokens']},N={r['seqs']}"
        od, fd, oh, fe = (r.get(k) or nan for k in ('ours_dev_us', 'fla_dev_us', 'ours_us', 'fla_us'))
        pct = [100 * r['bytes'] / r['bw'] / (t * 1e-6) for t in (od, oh)]
        err = max(r.get('rel_err_o', nan), r.get('rel_err_state', 0.0))
        out.append(f"{r['kind']:8}{r['H']:>4}{shape:>14}{od:>10.1f}{fd:>10.1f}{fd / od:>7.2f}"
                   f"{pct[0]:>7.0f}%{oh:>11.1f}{fe:>9.1f}{fe / oh:>7.2f}{pct[1]:>8.0f}%"
                   f"{r.get('xla_us') or nan:>10.1f}{r['floor_us']:>8.1f}{err:>9.1e}")
    return '\n'.join(out)


# ---------------------------------------------------------------------------------------------
# --profile: Nsight Compute on one launch of each kernel (child process, inside cudaProfilerStart)

PROFILE_SHAPES = (('decode', 32, 64, 1), ('decode', 32, 256, 1), ('prefill', 32, 32768, 1))


def profile_worker(cfgs):
    """Child of ncu: warm everything up (jit, fla autotune), then launch each profiled kernel once
    between cudaProfilerStart/Stop (ncu --profile-from-start off sees only those)."""
    import torch
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    D = 128
    scale = D ** -0.5
    calls = []
    for kind, H, n, R in PROFILE_SHAPES:
        g = jnp.asarray(-np.asarray(slopes(H), np.float32))
        tg = torch.from_dlpack(g).contiguous()
        ks = jax.random.split(jax.random.key(n), 4)
        if kind == 'decode':
            q, k, v = (jax.random.normal(kk, (n, H, D), jnp.bfloat16) for kk in ks[:3])
            pool = jax.random.normal(ks[3], (NUM_SLOTS, H, D, D), F32) * 0.1
            slots = jnp.asarray(np.random.default_rng(0).permutation(NUM_SLOTS)[:n].astype(np.int32))
            fresh = jnp.zeros((n,), bool)
            cfg = cfgs.get(f'decode_{n}', {})
            f = jax.jit(lambda pool, q=q, k=k, v=v, g=g, slots=slots, fresh=fresh, cfg=cfg: our_kernel('decode', cfg)(
                q, k, v, g, pool, slots, fresh, scale=scale), donate_argnums=0)
            tq, tk, tv = (torch.from_dlpack(x).unsqueeze(1).contiguous() for x in (q, k, v))
            h0 = torch.from_dlpack(pool[slots]).contiguous()

            def fla_call(tq=tq, tk=tk, tv=tv, tg=tg, h0=h0):
                return fused_recurrent_simple_gla(tq, tk, tv, g_gamma=tg, scale=scale,
                                                  initial_state=h0, output_final_state=True)
        else:
            q, k, v = (jax.random.normal(kk, (n, H, D), jnp.bfloat16) for kk in ks[:3])
            pool = jax.random.normal(ks[3], (8, H, D, D), F32) * 0.1
            slots = jnp.zeros((R,), jnp.int32)
            cu = jnp.asarray([0, n], jnp.int32)
            fresh = jnp.zeros((R,), bool)
            cfg = cfgs.get(f'prefill_{n}_{R}', {})
            f = jax.jit(lambda pool, q=q, k=k, v=v, g=g, slots=slots, cu=cu, fresh=fresh, cfg=cfg:
                        our_kernel('prefill', cfg)(q, k, v, g, pool, slots, cu, fresh, scale=scale),
                        donate_argnums=0)
            tq, tk, tv = (torch.from_dlpack(x).unsqueeze(0).contiguous() for x in (q, k, v))
            h0 = torch.from_dlpack(pool[:1]).contiguous()

            def fla_call(tq=tq, tk=tk, tv=tv, tg=tg, h0=h0):
                return chunk_simple_gla(tq, tk, tv, g_gamma=tg, scale=scale, initial_state=h0,
                                        output_final_state=True)
        box = [pool]

        def ours(f=f, box=box):
            o, box[0] = f(box[0])
            jax.block_until_ready((o, box[0]))
        for _ in range(2):                       # compile / autotune outside the profiled range
            ours()
            fla_call()
        torch.cuda.synchronize()
        calls.append((f'{kind} H={H} {"B" if kind == "decode" else "T"}={n}', ours, fla_call))
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, ours, fla_call in calls:
        print(f'profiling {name}', flush=True)
        ours()
        fla_call()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _find_ncu():
    import glob
    import shutil
    for c in [shutil.which('ncu')] + sorted(glob.glob('/opt/nvidia/nsight-compute/*/ncu')) + \
            ['/usr/local/cuda/bin/ncu']:
        if c and os.path.exists(c):
            return c
    return None


def run_profile(out, cfgs, log, timeout):
    import subprocess
    ncu = _find_ncu()
    if ncu is None:
        log('profile: ncu not found')
        return None
    rep = os.path.join(out, 'profile')
    cmd = [ncu, '--clock-control', 'none', '--profile-from-start', 'off', '--force-overwrite',
           '--section', 'SpeedOfLight', '--section', 'MemoryWorkloadAnalysis', '--section', 'Occupancy',
           '--section', 'LaunchStats', '--section', 'WarpStateStats', '--section', 'SchedulerStats',
           '-o', rep, sys.executable, os.path.abspath(__file__), '--profile-worker', json.dumps(cfgs)]
    log('profile: ' + ' '.join(cmd[:-1]) + " '<configs>'")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f'profile: ncu timed out after {timeout:.0f} s')
        return None
    with open(os.path.join(out, 'profile_worker.log'), 'w') as f:
        f.write(p.stdout[-200000:] + '\n--- stderr ---\n' + p.stderr[-200000:])
    log(f'profile: ncu rc={p.returncode} in {time.time() - t0:.0f} s')
    if not os.path.exists(rep + '.ncu-rep'):
        log('profile: no report; tail: ' + (p.stdout + p.stderr)[-1500:])
        return None
    det = subprocess.run([ncu, '--import', rep + '.ncu-rep', '--page', 'details'], check=False,
                         capture_output=True, text=True)
    with open(os.path.join(out, 'ncu_details.txt'), 'w') as f:
        f.write(det.stdout)
    raw = subprocess.run([ncu, '--import', rep + '.ncu-rep', '--page', 'raw', '--csv'],
                         check=False, capture_output=True, text=True).stdout
    with open(os.path.join(out, 'ncu_raw.csv'), 'w') as f:
        f.write(raw)
    summary, text = summarize_ncu_csv(raw)
    if summary is None:
        log('profile: empty raw page')
        return None
    with open(os.path.join(out, 'profile_summary.txt'), 'w') as f:
        f.write(text + '\n')
    log(text)
    return summary


def summarize_ncu_csv(raw):
    import csv
    import io
    rows = list(csv.reader(io.StringIO(raw)))
    if len(rows) < 3:
        return None, ''
    hdr, units, data = rows[0], rows[1], rows[2:]

    def col(r, name):
        try:
            return r[hdr.index(name)]
        except (ValueError, IndexError):
            return ''
    want = [('us', 'gpu__time_duration.sum'),
            ('DRAM%', 'gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed'),
            ('DRAM TB/s', 'dram__bytes.sum.per_second'),
            ('L2 hit%', 'lts__t_sector_hit_rate.pct'),
            ('SM%', 'sm__throughput.avg.pct_of_peak_sustained_elapsed'),
            ('occ%', 'sm__warps_active.avg.pct_of_peak_sustained_active'),
            ('theo%', 'sm__maximum_warps_per_active_cycle_pct'),
            ('regs', 'launch__registers_per_thread'),
            ('smem KB', 'launch__shared_mem_per_block_dynamic'),
            ('lim regs', 'launch__occupancy_limit_registers'),
            ('lim smem', 'launch__occupancy_limit_shared_mem'),
            ('grid', 'launch__grid_size'),
            ('waves', 'launch__waves_per_multiprocessor'),
            ('warps/blk', 'launch__block_size')]
    pre = 'smsp__average_warps_issue_stalled_'
    stall_cols = [h for h in hdr if h.startswith(pre) and '_per_issue_active' in h]
    summary = []
    for r in data:
        name = col(r, 'Kernel Name')[:60]
        vals = {}
        for short, m in want:
            v = col(r, m).replace(',', '')
            u = units[hdr.index(m)] if m in hdr else ''
            try:
                x = float(v)
            except ValueError:
                vals[short] = v
                continue
            if m == 'gpu__time_duration.sum':
                x = x / 1e3 if u in ('nsecond', 'ns') else x * 1e3 if u in ('msecond', 'ms') else x
            if m == 'dram__bytes.sum.per_second':
                x = x / {'byte/s': 1e12, 'Kbyte/s': 1e9, 'Mbyte/s': 1e6, 'Gbyte/s': 1e3}.get(u, 1.0)
            if m == 'launch__shared_mem_per_block_dynamic':
                x = x / {'byte': 1e3, 'Kbyte': 1.0, 'Mbyte': 1e-3}.get(u, 1e3)
            if m == 'launch__block_size':
                x = x / 32
            vals[short] = x
        stalls = []
        for h in stall_cols:
            try:
                stalls.append((float(col(r, h).replace(',', '')),
                               h[len(pre):h.index('_per_issue_active')]))
            except ValueError:
                pass
        stalls.sort(reverse=True)
        summary.append(dict(kernel=name, **vals, stalls={k: v for v, k in stalls[:4]}))
    lines = ['ncu --clock-control none (caches flushed before each kernel: ncu default), one launch each,',
             'in launch order (per shape: ours then fla); stalls = top smsp__average_warps_issue_stalled_*',
             '_per_issue_active ratios (warps stalled per issued instruction, by reason)',
             '']
    for d in summary:
        lines.append(d['kernel'])
        lines.append('   ' + '  '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}'
                                       for k, v in d.items() if k not in ('kernel', 'stalls') and v != ''))
        lines.append('   stalls: ' + ', '.join(f'{k} {v:.2f}' for k, v in d['stalls'].items()))
    return summary, '\n'.join(lines)


# ---------------------------------------------------------------------------------------------


KERNELS = {'triton': triton_gpu, 'pallas_triton': pallas_triton, 'mosaic': mosaic_gpu}


def our_kernel(kind, cfg):
    """Our 'prefill' or 'decode' for a bench config: cfg["kernel"] = "triton" (default: the
    Triton kernels through jax-triton, triton_gpu.py), "pallas_triton" (the former default,
    pallas_triton.py) or "mosaic" (mosaic_gpu.py), with the rest of cfg as its options."""
    cfg = dict(cfg)
    fn = getattr(KERNELS[cfg.pop('kernel', 'triton')], kind)
    return lambda *a, **kw: fn(*a, **kw, **cfg)


def _as_pallas_triton(cfg, kind=None):
    """The same config on the former default (gpu.py, now pallas_triton.py), or None where the
    config is not a Triton one. With --pt-default, gpu.py's own default config for `kind` instead
    (today's gpu.py as a user runs it, whatever config ours was given)."""
    if PT['default'] and kind is not None:
        return dict(PT_DEFAULTS[kind], kernel='pallas_triton')
    if cfg.get('kernel', 'triton') != 'triton':
        return None
    return dict({a: b for a, b in cfg.items() if a not in TRITON_ONLY}, kernel='pallas_triton')


# Options of the Triton kernels that the Pallas-Triton ones do not have (their form is decay_v=False,
# intra_in_loop=False): a config's gpu.py twin runs without them.
TRITON_ONLY = ('decay_v', 'intra_in_loop')


PT_DEFAULTS = dict(decode=dict(block_v=64, num_warps=4), prefill=dict(block_v=64, num_warps=4, chunk=64))


def decode_sweep(B):
    """Decode configs tried per batch size (ours only): the Triton default, the Mosaic GPU kernel
    at three value-block widths, then the Triton variants of _triton_decode_sweep."""
    d = dict(block_v=64, num_warps=4, tiles_first=True)                        # the default
    mosaic = [dict(kernel='mosaic', block_v=bv) for bv in (64, 32, 128)]
    return [d] + mosaic + _triton_decode_sweep(B, d)[1:]


def _triton_decode_sweep(B, d):
    """block_k: key dim split over programs + an XLA sum of the partial outputs."""
    if B >= 64:
        return [d, dict(d, block_k=64)]
    if B >= 16:
        return [d, dict(d, tiles_first=False), dict(d, block_k=64)]
    return [dict(d, block_k=64), dict(d, block_v=32), dict(d, block_k=64, block_v=32)]


def prefill_sweep(T, R, H):
    """Prefill configs tried per (H, T, R) (ours only): the Mosaic GPU kernel, then the Triton
    kernel's grid order, pipelining depth, segment. float32 q/k/v (--qkv-dtype): the Triton
    kernel's two f32 product modes, at its default config."""
    if QKV['dtype'] == jnp.float32:
        return [dict(f32_dot=m) for m in ('tf32', 'tf32x3', 'ieee')]
    if SWEEP['triton_only']:
        return _triton_prefill_sweep(T, R, H)
    mosaic = [dict(kernel='mosaic')]                   # segment split by the same auto rule
    if mosaic_gpu._pick_segment(T, R, H, 2, 64, None) is not None:
        mosaic.append(dict(kernel='mosaic', segment=0))
    return mosaic + _triton_prefill_sweep(T, R, H)


def _triton_prefill_sweep(T, R, H):
    c = dict(block_v=64, num_warps=4, chunk=64)
    if SWEEP['variants']:
        return _triton_prefill_variants(T, R, H)
    if R > 1:
        return [dict(c, num_stages=2, segment=0, tiles_first=True),
                dict(c, num_stages=2, segment=0, tiles_first=False),
                dict(c, num_stages=3, segment=0, tiles_first=True),
                dict(c, num_stages=1, segment=0, tiles_first=True),
                dict(c, num_warps=8, num_stages=2, segment=0, tiles_first=True),
                dict(c, block_v=32, num_stages=2, segment=0, tiles_first=True)]
    if T <= 4096:
        return ([dict(c, num_stages=2, segment=s, tiles_first=True) for s in (None, 512, 1024)]
                + [dict(c, num_stages=3, segment=0, tiles_first=True),
                   dict(c, block_v=32, num_stages=3, segment=0, tiles_first=True),
                   dict(c, block_v=32, num_stages=2, segment=1024, tiles_first=True)])
    if gpu_common.pick_segment(T, R, H, 2, 64, None) is None:      # auto: unsplit (H=64)
        return [dict(c, num_stages=3, segment=None, tiles_first=True),
                dict(c, num_stages=3, segment=None, tiles_first=False),
                dict(c, num_stages=2, segment=T // 8, tiles_first=True)]
    return [dict(c, num_stages=2, segment=None, tiles_first=True),
            dict(c, num_stages=2, segment=None, tiles_first=False),
            dict(c, num_stages=3, segment=None, tiles_first=True)]


def _triton_prefill_variants(T, R, H):
    """--sweep-variants (issue 19): the Triton kernel's code-generation options at the library's
    default config: the default first (decay_v auto = True for bf16), then decay_v=False (the
    Pallas kernels' state-update form: the pre-issue-19 Triton kernel, less its int64 pool-offset
    tensor), then intra_in_loop; for the unsplit rows of at most one wave of programs (3 stages,
    one block per SM, latency-bound: H=64 T=4096 N=1) also 2 stages (decay_v needs 8 KiB more
    shared memory per stage), 8 warps, block_v 32 (twice the programs, half the state registers),
    and the segment split at 1024 tokens (the auto rule splits only at <= 64 programs)."""
    d = dict(block_v=64, num_warps=4, chunk=64)
    out = [d, dict(d, decay_v=False), dict(d, intra_in_loop=True)]
    if gpu_common.pick_segment(T, R, H, 2, 64, None) is None and R * H * 2 <= 132:
        out += [dict(d, num_stages=2), dict(d, num_warps=8), dict(d, block_v=32)]
        if T >= 2048:
            out.append(dict(d, segment=1024))
    return out


def _cfg_key(s):
    return tuple(int(x) for x in str(s).split(','))


def _lookup(sel, H, shape, default, h32=True):
    """Most specific config: (H, *shape), then (*shape,) (any H), then H=32's (if h32), then
    default. (Prefill passes h32=False: whether to split depends on H.)"""
    for key in ((H,) + shape, shape) + (((32,) + shape,) if h32 else ()):
        if key in sel:
            return sel[key]
    return default


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true', help='few rows (smoke test)')
    ap.add_argument('--compare', action='store_true',
                    help='issue 19: oracle checks, then every row at the default configs, ours vs '
                         'gpu.py (pallas_triton.py) vs fla, no XLA rows, no sweep; one comparison table')
    ap.add_argument('--smoke', action='store_true',
                    help='only the oracle checks of ours (incl. production shapes and shard_map); '
                         'exit status 1 if one fails')
    ap.add_argument('--pt-default', action='store_true',
                    help="time gpu.py at its own default config in every row, whatever config ours runs")
    ap.add_argument('--no-pallas-triton', action='store_true',
                    help='do not time gpu.py (pallas_triton.py) beside ours in each row')
    ap.add_argument('--no-sweep', action='store_true', help='default configs, no per-shape sweep')
    ap.add_argument('--sweep', default=None,
                    help='sweep only these shapes, e.g. "decode:32:64,prefill:64:32768:1" (as --rows); '
                         'picks override --configs')
    ap.add_argument('--sweep-variants', action='store_true',
                    help="prefill sweep: the Triton kernel's code-generation options (decay_v, "
                         "intra_in_loop, stages) at the default config instead of the config sweep")
    ap.add_argument('--sweep-triton-only', action='store_true',
                    help='prefill sweep: no Mosaic GPU configs')
    ap.add_argument('--profile', action='store_true', help='ncu profile of decode + prefill kernels')
    ap.add_argument('--trace', action='store_true',
                    help='per row: in-situ kernel durations / gaps (XLA profiler, CUPTI) for ours '
                         'and fla, and op counts of our compiled HLO')
    ap.add_argument('--deadline', type=float, default=560,
                    help='seconds: sweeps stop early, rows are skipped (--compare) and the profile '
                         'is skipped past this')
    ap.add_argument('--no-xla', action='store_true')
    ap.add_argument('--no-fla', action='store_true')
    ap.add_argument('--out', default=os.environ.get('OUT', 'out'))
    ap.add_argument('--tag', default='', help='suffix of the JSON/log file names')
    ap.add_argument('--configs', default=None,
                    help='JSON {"decode": {"B" or "H,B": cfg}, "prefill": {"T,R" or "H,T,R": cfg}}')
    ap.add_argument('--rows', default=None,
                    help='only these rows, in this order, e.g. "prefill:64:32768:1,decode:32:64" (no full '
                         'sweep); "none": no rows (with --sweep: the sweep alone, up to the deadline)')
    ap.add_argument('--no-check', action='store_true', help='skip the float64 oracle checks')
    ap.add_argument('--qkv-dtype', default='bfloat16', choices=('bfloat16', 'float32'),
                    help='dtype of the prefill rows\' q/k/v (float32 = what the engine feeds, SPEC 2.2; '
                         'the floor still counts bf16 matmul rate)')
    ap.add_argument('--profile-only', action='store_true', help='only the ncu profile (--configs)')
    ap.add_argument('--profile-worker', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile_worker is not None:
        profile_worker(json.loads(args.profile_worker))
        return
    TRACE['on'] = args.trace
    PT['on'] = not args.no_pallas_triton
    PT['default'] = args.pt_default
    CHECK['ours_only'] = args.smoke
    if args.compare:
        args.no_xla, args.no_sweep = True, True
        REPS.update(n=3, calls_div=2)
    QKV['dtype'] = jnp.dtype(args.qkv_dtype)
    SWEEP.update(variants=args.sweep_variants, triton_only=args.sweep_triton_only)
    given = json.loads(args.configs) if args.configs else {}
    given_d = {_cfg_key(b): c for b, c in given.get('decode', {}).items()}
    given_p = {_cfg_key(k): c for k, c in given.get('prefill', {}).items()}

    def profile_cfgs(dsel, psel):
        cfgs = {f'decode_{n}': _lookup(dsel, H, (n,), {}) for kind, H, n, R in PROFILE_SHAPES
                if kind == 'decode'}
        cfgs.update({f'prefill_{n}_{R}': _lookup(psel, H, (n, R), {})
                     for kind, H, n, R in PROFILE_SHAPES if kind == 'prefill'})
        return cfgs
    if args.profile_only:
        os.makedirs(args.out, exist_ok=True)
        run_profile(args.out, profile_cfgs(given_d, given_p), print, timeout=args.deadline)
        return
    only = None
    if args.rows:
        only_order = []
        for item in ([] if args.rows == 'none' else args.rows.split(',')):
            f = item.split(':')
            only_order.append((f[0], int(f[1])) + tuple(int(x) for x in f[2:]))
        only = set(only_order)
    t_start = time.time()

    def left():
        return args.deadline - (time.time() - t_start)
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = jax.devices()[0]
    log(f'device: {dev.device_kind}; jax {jax.__version__}; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    try:
        import fla
        import torch
        import triton
        log(f'fla {getattr(fla, "__version__", "?")}; torch {torch.__version__}; triton {triton.__version__}')
    except Exception as e:
        log(f'fla import failed: {e}')
    if args.smoke:
        result = dict(device=dev.device_kind, jax=jax.__version__, argv=sys.argv[1:], oracle={})
        for check in (check_small, check_split, check_production_shapes, check_shard_map):
            try:
                result['oracle'].update(check(log))
            except Exception as e:
                log(f'{check.__name__}: FAILED {type(e).__name__}: {str(e)[:600]}')
                result['oracle'][check.__name__] = dict(ok=False, error=str(e)[:600])
        ok = all(r['ok'] for r in result['oracle'].values())
        log(f'smoke: oracle checks all ok: {ok} ({time.time() - t_start:.0f} s)')
        with open(os.path.join(args.out, f'bench_linear_attention_smoke{"_" + args.tag if args.tag else ""}.json'),
                  'w') as f:
            json.dump(result, f, indent=1, default=str)
        sys.exit(0 if ok else 1)
    bw, jbw, tbw = copy_bandwidth()
    rate = matmul_rate()
    log(f'copy bandwidth (read+write): jax {jbw / 1e12:.2f} TB/s, torch {tbw / 1e12:.2f} TB/s -> using {bw / 1e12:.2f}')
    log(f'bf16 matmul 8192^3: {rate / 1e12:.0f} TFLOP/s')
    result = dict(device=dev.device_kind, jax=jax.__version__, copy_bw=bw, matmul_rate=rate,
                  xla_flags=os.environ.get('XLA_FLAGS', ''), argv=sys.argv[1:])
    tag = f'_{args.tag}' if args.tag else ''

    def dump(rows=()):
        result['rows'] = list(rows)
        if PT['on'] and rows:
            result['verdicts'] = verdicts(rows)
        result['elapsed_s'] = time.time() - t_start
        with open(os.path.join(args.out, f'bench_linear_attention{tag}.json'), 'w') as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(args.out, f'bench_linear_attention{tag}.log'), 'w') as f:
            f.write('\n'.join(lines) + '\n\n' + (fmt_table(rows) if rows else '') + '\n')
            if PT['on'] and rows:
                f.write('\n' + fmt_compare(rows) + '\n' + json.dumps(verdicts(rows)) + '\n')

    result['oracle'] = {}
    for check in () if args.no_check else (check_small, check_split):
        try:
            result['oracle'].update(check(log))
        except Exception as e:
            log(f'{check.__name__}: FAILED {type(e).__name__}: {str(e)[:400]}')
            result['oracle'][check.__name__] = dict(ok=False, error=str(e)[:400])
    if args.no_check:
        log('oracle checks: skipped (--no-check)')
    else:
        log(f'oracle checks all ok: {all(r["ok"] for r in result["oracle"].values())}')
    dump()

    dcfg = dict(block_v=64, num_warps=4)
    pcfg = dict(block_v=64, num_warps=4, chunk=64)        # num_stages, segment, grid order: auto
    dsel, psel, sweep = dict(given_d), dict(given_p), []
    shapes = ((4096, 1), (4096, 16), (32768, 1), (32768, 16))
    sweep_items = []
    if args.sweep:
        sweep_items = [tuple([f.split(':')[0]] + [int(x) for x in f.split(':')[1:]])
                       for f in args.sweep.split(',')]
    elif not args.quick and not args.no_sweep and not given and only is None:
        sweep_items = [('prefill', 32, T, R) for T, R in shapes[::-1]] + \
                      [('decode', 32, B) for B in (1, 16, 64, 256)]
    if sweep_items:
        rows_after = only is None or len(only) > 0

        def pick(kind, label, configs, run, note, min_left):
            """Time each config (ours only), log it, keep it in the sweep; the fastest config or None."""
            best = None
            for c in configs:
                if left() < (min_left if rows_after else 8):
                    log(f'{kind} sweep: stopping early (deadline)')
                    break
                try:
                    r = run(c)
                except Exception as e:
                    log(f'{kind} sweep {label} {c}: FAILED {type(e).__name__}: {str(e)[:200]}')
                    continue
                log(f'{kind} sweep {label} {c}{note(r)}')
                sweep.append(dict(r, config=c))
                t = r.get('ours_dev_us') or r['ours_us']
                if best is None or t < best[0]:
                    best = (t, c)
            return best and best[1]

        trace_on, TRACE['on'] = TRACE['on'], False
        for item in sweep_items:
            H = item[1]
            if item[0] == 'prefill':
                T, R = item[2:]
                c = pick('prefill', f'H={H} T={T} R={R}', prefill_sweep(T, R, H),
                         lambda c: bench_prefill(H, T, R, bw, rate, c, with_fla=False,
                                                 with_xla=False, check=False),
                         lambda r: f' (segment used {r["segment"]}): dev {r.get("ours_dev_us") or 0:.1f} us '
                                   f'(span {r.get("ours_span_us") or 0:.1f}), host {r["ours_us"]:.1f} us'
                                   + (f'; gpu.py dev {r["pt_dev_us"]:.1f} us, ours/gpu.py '
                                      f'{r["ours_dev_us"] / r["pt_dev_us"]:.3f}'
                                      if r.get('pt_dev_us') and r.get('ours_dev_us') else '')
                                   + (f'; kernels alone ours {r["ours_kernel_us"]:.1f} gpu.py '
                                      f'{r["pt_kernel_us"]:.1f} us, '
                                      f'{r["ours_kernel_us"] / r["pt_kernel_us"]:.3f}'
                                      if r.get('ours_kernel_us') and r.get('pt_kernel_us') else '')
                                   + f' [{time.time() - t_start:.0f} s]', 60)
                if c:
                    psel[(H, T, R)] = c
            else:
                B = item[2]
                c = pick('decode', f'H={H} B={B}', decode_sweep(B),
                         lambda c: bench_decode(H, B, bw, c, with_fla=False, with_xla=False),
                         lambda r: f': dev {r.get("ours_dev_us") or 0:.1f} us (span '
                                   f'{r.get("ours_span_us") or 0:.1f}; {100 * r["bytes"] / bw / ((r.get("ours_dev_us") or 1e9) * 1e-6):.0f}% '
                                   f'copy BW), host {r["ours_us"]:.1f} us, err {r["rel_err_o"]:.1e}', 30)
                if c:
                    dsel[(H, B)] = c
        TRACE['on'] = trace_on
        result['sweep'] = sweep
        dump()
    result['decode_configs'] = {','.join(map(str, b)): c for b, c in dsel.items()}
    result['prefill_configs'] = {','.join(map(str, k)): c for k, c in psel.items()}

    rows = []
    Hs = (32,) if args.quick else (32, 64)
    specs = [x for H in Hs for x in [('decode', H, B) for B in ((1, 64) if args.quick else (1, 16, 64, 256))]
             + [('prefill', H, T, R) for T, R in (((4096, 1),) if args.quick else shapes)]]
    if only is not None:                # --rows: those rows, in the order given
        specs = [x for x in only_order if x in set(specs)]
    for spec in specs:
        if spec[0] == 'decode':
            _, H, B = spec
            if left() < 25:
                log(f'decode H={H} B={B}: skipped (deadline)')
                continue
            try:
                c = _lookup(dsel, H, (B,), dcfg)
                r = bench_decode(H, B, bw, c, with_xla=not args.no_xla, with_fla=not args.no_fla)
            except Exception as e:
                log(f'decode H={H} B={B}: FAILED {type(e).__name__}: {str(e)[:300]}')
                continue
            r['bw'] = bw
            r['config'] = c
            rows.append(r)
            log(f'decode H={H} B={B} {c}: ' + json.dumps({a: b for a, b in r.items()
                                                           if 'us' in a or 'err' in a})
                + f' [{time.time() - t_start:.0f} s]')
        else:
            _, H, T, R = spec
            if left() < 40:
                log(f'prefill H={H} T={T} R={R}: skipped (deadline)')
                continue
            c = _lookup(psel, H, (T, R), pcfg, h32=False)
            try:
                r = bench_prefill(H, T, R, bw, rate, c, with_xla=not args.no_xla,
                                  with_fla=not args.no_fla, check=not args.no_check)
            except Exception as e:
                log(f'prefill H={H} T={T} R={R} {c}: FAILED {type(e).__name__}: {str(e)[:300]}')
                continue
            r['bw'] = bw
            r['config'] = c
            rows.append(r)
            log(f'prefill H={H} T={T} R={R} {c}: ' + json.dumps(
                {a: b for a, b in r.items() if 'us' in a or 'err' in a or a == 'segment'})
                + f' [{time.time() - t_start:.0f} s]')
        if args.trace:
            log(fmt_diag(r))
        dump(rows)
    table = fmt_table(rows)
    dump(rows)
    print()
    print(f'device: {dev.device_kind}; copy BW {bw / 1e12:.2f} TB/s; bf16 matmul {rate / 1e12:.0f} TFLOP/s')
    print(table, flush=True)
    if PT['on'] and rows:
        print()
        print('ours = Triton via jax-triton (triton_gpu.py); gpu.py = Pallas-Triton (pallas_triton.py); '
              'device time (CUPTI) per call, us')
        print(fmt_compare(rows))
        for v in verdicts(rows):
            print('  ' + json.dumps(v))
        print(f'elapsed {time.time() - t_start:.0f} s', flush=True)
    if args.profile:
        if left() < 45:
            log(f'profile: skipped ({left():.0f} s left before the deadline)')
        else:
            result['profile'] = run_profile(args.out, profile_cfgs(dsel, psel), log,
                                            timeout=max(left(), 45))
        dump(rows)
        print()
        print(table, flush=True)


if __name__ == '__main__':
    main()
