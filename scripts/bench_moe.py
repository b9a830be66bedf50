"""MoE routed-expert layer on one GPU: lingjax's grouped matmul against the forms it replaced and the peers.

Shapes: Ling-2.6-flash (d 4096, I 1024) and Ling-2.5-1T (d 8192, I 2048), E 256 experts, top-8,
T = 1, 16, 64, 256, 4096, 16384 tokens, bf16 weights and activations, uniform random routing (each
token 8 distinct experts) with float32 combine weights. Every method computes the same routed sum
out[t] = sum_j w[t,j] * (silu(x_t Wg[e]) * (x_t Wu[e])) Wd[e] (the shared expert is not included).

Methods (rows):
  lingjax       lingjax.kernels.moe.experts(impl='gpu'): layout + Triton gate_up/down + combine, the
                routing ids carried through the timed loop (the layout is computed every call)
  lingjax-grouped  at T <= gpu.DECODE_MAX_TOKENS: the grouped-matmul path (experts(decode=False)),
                which 'lingjax' ran there before the decode path (gpu.experts_decode)
  lingjax-decode  (method 'decode') at T > gpu.DECODE_MAX_TOKENS: the decode path (experts(decode=True))
  dec ...       --sweep at decode sizes: the whole decode path with each SWEEP_DECODE config
  lingjax-sort  (only when named) the same with the sort-built layout (make_layout method 'sort': what
                T <= 256 ran before the comparison-built one), where gpu.pick_layout_method picks 'compare'
  layout-compare / layout-sort
                the layout alone (plus a checksum of its arrays)
  lingjax-mm    the two Triton grouped matmuls alone (layout precomputed), default tiles
  parts         (T > gpu.DECODE_MAX_TOKENS) mm-gate-up: the gate/up grouped matmul alone, default tiles
                (TFLOP/s over its own useful flops, 2/3 of the layer's; down = lingjax-mm - mm-gate-up)
  mm bm.. ..    --sweep: the grouped matmuls with each configuration of SWEEP_SMALL / SWEEP_LARGE
                (block_m, gate_up tiles / down tiles, 'p': persistent, 'x': split K, 'h':
                half-height tiles for half-padding blocks; gpu.Config.tag); the best per T is printed
  old-gather / old-sorted / old-dense
                the three forms of lingjax/model/moe.py before the grouped matmul (the issue's
                baseline: 'dense' was what every T >= 32 ran at these shapes)
  ragged_dot    jax.lax.ragged_dot on expert-sorted rows (gate, up, down)
  tokamax       tokamax.ragged_dot (Pallas Mosaic GPU), if it imports (carried wheels)
  torch-gmm     torch._grouped_mm on the same buffers (dlpack), CUDA-graph-free, timed with CUDA events

Timing: JAX methods run `--iters` times chained in one jitted function (each call's input depends on
the last output, so nothing is hoisted; unrolled unless --unroll 0), device time per call = total /
iters (median of --reps); torch with CUDA events (median). Ceilings measured in the same run: copy
bandwidth (read + write of a 4 GiB bf16 array) and the dense bf16 matmul rate (8192^3), JAX's and
PyTorch's, the larger kept.
Device time (--trace T, or all): every row of lingjax's kernels at those T runs its compiled loop once more
under the XLA profiler (CUPTI): dev us = the device's busy time per call (the layer's kernels, plus the loop's
chaining add, ~1 us), span = first kernel start to last kernel end per call. The copy-bandwidth target of
T <= 256 is judged on dev us: it is the time the layer's kernels occupy the GPU, which the kernels decide; the
wall clock of this loop adds the launch gaps between small kernels and the executable's own launch (~40-80 us
per execution on the H200, amortised over --iters calls), which in a model's decode step are shared by every
layer of one executable (bench_e2e.py measures that step as a whole).
Columns: us; TFLOP/s over the useful flops 2 * T * k * 3 * d * I and its share of the matmul rate;
TB/s over the unique bytes (each touched expert's weights once + x + out) and its share of copy
bandwidth; rel err of the first tokens against a float64 numpy oracle (lingjax and grouped-matmul
rows, the latter combined; bf16: ~3e-3); ops: top-level instructions of the compiled layer (about
one kernel launch each).

    PYTHONPATH=. python3 scripts/bench_moe.py [--shapes flash,1t] [--tokens 1,16,...] [--out $OUT/bench_moe.json]
    XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu PYTHONPATH=. \\
        python3 scripts/bench_moe.py --smoke        # CPU: tiny shapes, reference impl, no peers
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

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU

log = logging.getLogger("bench_moe")
SHAPES = {"flash": (4096, 1024), "1t": (8192, 2048)}
E, K = 256, 8


# Tile sweeps of the grouped matmuls (--sweep): (block_m or None for pick_block_m's, gate_up config, down
# config), a config being gpu.Config's fields (block_n, block_k, group_m, num_warps, num_stages[, persistent
# [, split_k[, short_blocks]]]). The first entry of each list is the default of gpu.pick_config; the
# best row per T is printed and saved.
SWEEP_SMALL = [  # blocks of <= 32 rows (decode: weight streaming)
    (None, (64, 128, 1, 4, 4), (128, 64, 1, 4, 4)),
    (None, (32, 128, 1, 4, 4), (64, 128, 1, 4, 4)),      # twice the programs (T = 1: 8 blocks only)
    # split K (T = 1 at the flash shapes: 8 blocks x 16 gate/up or 32 down tiles = 128 / 256 programs on
    # 132 SMs; split 4 / 2: 512 each, every program still reads whole 128- or 256-byte weight rows)
    (None, (64, 128, 1, 4, 4, 0, 2), (128, 64, 1, 4, 4, 0, 2)),
    (None, (64, 128, 1, 4, 4, 0, 4), (128, 64, 1, 4, 4, 0, 2)),
    (None, (64, 128, 1, 4, 4, 0, 8), (128, 64, 1, 4, 4, 0, 4)),
    (None, (128, 128, 1, 4, 4, 0, 8), (256, 64, 1, 4, 4, 0, 4)),    # 256/512-byte rows, 512 programs each
    (None, (32, 128, 1, 4, 4, 0, 4), (64, 128, 1, 4, 4, 0, 4)),     # narrow tiles and split: 1024 programs
]
# The decode path (gpu.experts_decode; experts() takes it for T <= gpu.DECODE_MAX_TOKENS, through gpu.experts_decode
# at any T here): (gate_up, down) gpu.DecodeConfig fields (block_n, block_k, split_k, dot, num_warps, num_stages);
# rows 'dec ...' time the whole layer (no layout; two kernels + the combine). gpu.pick_decode_config's default
# (session 6: dot form, gate/up unsplit with h fused, the grouped path's decode tiles) is the first entry at T = 1.
# Session 5 call A at T = 1 (us, whole layer, wall clock; grouped path 107.4): n128k32 multiply-add x8/x2 s4 120.3,
# s1 163.0, x16/x4 187.9, x4/x1 95.0 (best), n256k32 x8/x4 130.8, n128k64 w8 x8/x4 147.4, n64k64 x8/x2 137.2,
# n1024k8 x32 / n512k16 x8 233.5, dot n128k64 x2/x2 99.3, dot n64k128 x2 / n128k64 x4 98.3; call B: x4/x1 114.4,
# dot n128k64 x2/x1 104.0 (CUPTI: x4/x1's kernels 38.3 + 31.8 us; the grouped path's 32.3 + 18.1 us).
_DEC_DEFAULT = ((64, 128, 1, True, 4, 4), (128, 64, 1, True, 4, 4))
# Session 6 call A, T = 1 (CUPTI device us / wall us per layer call; gate/up + down kernel us): the default 53.6 / 95.7
# (33.0 + 17.6), down n256k64 w8 53.9 / 90.6 (32.8 + 18.1), down n64k128 55.9 / 99.5 (32.9 + 20.2), gate/up n128k64 +
# down n128k128 s3 54.8 / 92.6 (33.7 + 18.2), gate/up n32k128 65.2 / 100.3 (44.9 + 17.8), multiply-add with h fused
# 119.1 / 137.1 (90.6 + 26.0), session 5's default (multiply-add, gate/up x4) 73.2 / 89.2 (38.6 + 31.9). T = 2: the
# default 96.1 / 120.5, narrower tiles (n32k128 / n64k128) 131.7 / 165.3, multiply-add with h fused 139.8 / 165.2.
SWEEP_DECODE_T1 = [
    _DEC_DEFAULT,
    ((64, 128, 1, True, 4, 4), (256, 64, 1, True, 8, 4)),      # down: 256-wide (512-byte rows), 8 warps
    ((64, 128, 1, True, 4, 4), (64, 128, 1, True, 4, 4)),      # down: 64-wide, 128-deep (512 programs at T = 1)
    ((128, 64, 1, True, 4, 4), (128, 128, 1, True, 4, 3)),     # gate/up 128-wide (64 programs at T = 1)
    ((32, 128, 1, True, 4, 4), (128, 64, 1, True, 4, 4)),      # gate/up 32-wide (256 programs at T = 1)
    ((64, 32, 1, False, 4, 4), (128, 32, 1, False, 4, 4)),     # multiply-add, h fused (128 / 256 programs)
    ((128, 32, 4, False, 4, 4), (128, 32, 1, False, 4, 4)),    # session 5's default: multiply-add, gate/up x4
]
# T >= 2 (session 6 call A: the decode path's gate/up kernel 5% slower than the grouped path's at T = 16, 408.2 vs
# 388.7 us, the same tiles; the grouped kernel's launch order takes the n tiles of one block consecutively, the decode
# kernels' one n tile of every pair): the tiles without and with the n tiles of a pair first (n_first). Call B (device
# us): T = 2 93.6 / 95.4, T = 4 172.6 / 169.7, T = 8 347.8 / 335.4, T = 32 972.8 / 938.2, so gpu.pick_decode_config's
# default takes n_first from T = 4 (the second entry is the default there, the first below).
SWEEP_DECODE_SMALL = [
    _DEC_DEFAULT,
    tuple(c + (True,) for c in _DEC_DEFAULT),                  # n_first: the n tiles of one pair consecutive
]
SWEEP_DECODE = {1: SWEEP_DECODE_T1, **{t: SWEEP_DECODE_SMALL for t in (2, 3, 4, 8, 16, 32, 64)}}
SWEEP_LARGE = [  # blocks of >= 64 rows
    # default (gpu.LARGE_*): 128 x 128 (x2) / 128 x 256 tiles, 8 warps, persistent 1 per SM (run 17's best).
    # Dropped after session 4 run 2 (slower there): half- and quarter-height tiles, 4 stages, 128-deep k steps,
    # the pre-run-17 default. Session 5: blocks of 64 rows at T = 4096 (an expert's 128 +- 11 pairs padded to
    # 1.25x the useful products instead of 1.46x) with the large tiles' width, and group_m 16.
    (None, (128, 64, 8, 8, 3, 1), (256, 64, 8, 8, 3, 1)),
    (64, (128, 64, 8, 4, 4, 1), (256, 64, 8, 8, 3, 1)),       # 64 x 128 (x2) gate/up, one warpgroup
    (64, (256, 64, 8, 8, 3, 1), (256, 64, 8, 8, 3, 1)),       # 64 x 256 (x2) gate/up, two warpgroups
    (64, (128, 64, 8, 8, 3, 1), (256, 64, 8, 8, 4, 1)),
    (64, (128, 64, 8, 4, 3), (256, 64, 8, 4, 3)),              # one program per tile
    (None, (128, 64, 16, 8, 3, 1), (256, 64, 16, 8, 3, 1)),   # 16 blocks per n tile in the tile order
]


def make_problem(T, d, I, E, k, seed, dtype):
    import jax
    import jax.numpy as jnp
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (T, d), jnp.float32).astype(dtype)
    wg = (jax.random.normal(ks[1], (E, d, I), dtype) * (d ** -0.5)).astype(dtype)
    wu = (jax.random.normal(ks[2], (E, d, I), dtype) * (d ** -0.5)).astype(dtype)
    wd = (jax.random.normal(ks[3], (E, I, d), dtype) * (I ** -0.5)).astype(dtype)
    idx = jnp.argsort(jax.random.uniform(ks[4], (T, E)), axis=-1)[:, :k].astype(jnp.int32)
    w = jax.random.uniform(ks[5], (T, k), jnp.float32, 0.1, 1.0)
    return x, idx, w, wg, wu, wd


# ------------------------------------------------------------------------------------------ methods
def old_forms():
    """The routed-expert forms of lingjax/model/moe.py before the grouped matmul (commit 1055d1e)."""
    import jax
    import jax.numpy as jnp
    F32 = jnp.float32

    def gather(x, idx, w, wg, wu, wd):
        h = jax.nn.silu(jnp.einsum('td,tkdi->tki', x, wg[idx]))
        h = h * jnp.einsum('td,tkdi->tki', x, wu[idx])
        y = jnp.einsum('tki,tkid->tkd', h, wd[idx])
        return jnp.einsum('tkd,tk->td', y.astype(F32), w).astype(x.dtype)

    def dense(x, idx, w, wg, wu, wd):
        T, n = x.shape[0], wg.shape[0]
        combine = jnp.zeros((T, n), F32).at[jnp.arange(T)[:, None], idx].add(w)
        h = jax.nn.silu(jnp.einsum('td,edi->tei', x, wg))
        h = h * jnp.einsum('td,edi->tei', x, wu)
        y = jnp.einsum('tei,eid->ted', h, wd)
        return jnp.einsum('ted,te->td', y.astype(F32), combine).astype(x.dtype)

    def sorted_(x, idx, w, wg, wu, wd):
        from lingjax.kernels.moe import layout as L
        from lingjax.kernels.moe import combine
        bm = 64
        lay = L.make_layout(idx, wg.shape[0], bm)
        nb = lay.block_expert.shape[0]
        e = jnp.maximum(lay.block_expert, 0)
        xb = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[lay.row_token].reshape(nb, bm, -1)
        h = jax.nn.silu(jnp.einsum('bnd,bdi->bni', xb, wg[e])) * jnp.einsum('bnd,bdi->bni', xb, wu[e])
        y = jnp.einsum('bni,bid->bnd', h, wd[e]).reshape(nb * bm, -1)
        return combine(y, lay, w).astype(x.dtype)

    return dict(gather=gather, dense=dense, sorted=sorted_)


def ragged(x, idx, w, wg, wu, wd, dot):
    """Expert-sorted rows (no padding) through a ragged matmul `dot(lhs, rhs, group_sizes)`."""
    import jax
    import jax.numpy as jnp
    T, k = idx.shape
    n = wg.shape[0]
    e = idx.reshape(-1)
    order = jnp.argsort(e, stable=True)
    gs = jnp.bincount(e, length=n).astype(jnp.int32)
    xs = x[order // k]
    h = jax.nn.silu(dot(xs, wg, gs)) * dot(xs, wu, gs)
    y = dot(h, wd, gs)
    out = jnp.zeros((T, x.shape[1]), jnp.float32).at[order // k].add(y.astype(jnp.float32) * w.reshape(-1)[order, None])
    return out.astype(x.dtype)


def carried_routing(fn):
    """fn with its routing ids made to depend on the loop carry x (an addition of 0 the compiler cannot
    prove is 0), so that the layout is computed in every iteration of loop_time and not hoisted out
    of the loop as loop-invariant."""
    import jax.numpy as jnp

    def f(x, idx, *rest):
        return fn(x, idx + (x[0, 0] > 1e30).astype(idx.dtype), *rest)
    return f


def layout_only(n_exp, bm, method):
    """A function of the loop's signature that builds the layout and returns a [T, d] array depending
    on every array of it (a checksum of each, broadcast), for timing the layout alone."""
    import jax.numpy as jnp
    from lingjax.kernels.moe import make_layout

    def f(x, idx, w, wg, wu, wd):
        lay = make_layout(idx, n_exp, bm, method)
        s = (jnp.sum(lay.row_token) + jnp.sum(lay.block_expert) + jnp.sum(lay.pair_row) + lay.num_used_blocks)
        return jnp.broadcast_to((s % 2).astype(x.dtype), x.shape)
    return carried_routing(f)


def hlo_ops(fn, args):
    """{opcode: count} of the top-level instructions of fn's compiled entry computation (fusions,
    custom calls, sorts, scatters ...: about one kernel launch each), and their total."""
    import collections
    import re
    import jax
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[: entry.find("\n}") if "\n}" in entry else len(entry)]
    ops = collections.Counter(re.findall(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][\w-]*)\(", entry))
    for skip in ("parameter", "constant", "get-tuple-element", "bitcast", "tuple"):
        ops.pop(skip, None)
    return dict(ops), sum(ops.values())


def loop_fn(fn, iters, unroll):
    """The jitted loop of loop_time: `iters` calls of fn chained through x."""
    import jax

    def loop(x, *rest):
        def body(i, x):
            return (x + 1e-3 * fn(x, *rest)).astype(x.dtype)
        return jax.lax.fori_loop(0, iters, body, x, unroll=True if unroll else 1)
    return jax.jit(loop)


def kernel_trace(run, args, iters):
    """Per-kernel device times of loop_time's loop `run` (already compiled; CUPTI through the XLA profiler,
    as bench_linear_attention.py --trace): {busy_us: the kernels' device time per call, span_us per call
    (span - busy: the device idle between kernels, e.g. waiting for the host), kernel_us: the Triton
    kernels' (names with 'kernel') per call, kernels: {name: [count per call, median us]}} of the busiest
    stream. busy includes the timed loop's own chaining add (x + 1e-3 * out, ~1 us; XLA fuses it with
    the layer's last fusion where it can)."""
    import jax
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_linear_attention import device_trace
    tr = device_trace(lambda: jax.block_until_ready(run(*args)), iters)
    streams = [t for k, t in tr.items() if k != "_lines"]
    if not streams:
        return dict(error="no device stream in the profile")
    t = max(streams, key=lambda t: t["busy_us"])
    return dict(busy_us=t["per_call_busy_us"], span_us=t["per_call_span_us"],
                kernel_us=sum(v["sum_us"] for k, v in t["kernels"].items() if "kernel" in k) / iters,
                kernels={k: [v["n"] / iters, v["median_us"]] for k, v in
                         sorted(t["kernels"].items(), key=lambda kv: -kv[1]["sum_us"])})


def loop_time(fn, args, iters, reps, unroll=False, run=None):
    """Device time per call: `iters` calls chained in one jitted fori_loop (x_{i+1} depends on out_i).
    Every array is an argument of the jitted loop (closed-over arrays would become constants).
    unroll: the calls inlined one after the other (no while loop, whose per-iteration condition can
    cost the GPU a round trip to the host: a fixed cost that matters next to a 50 us decode layer)."""
    import jax
    run = run or loop_fn(fn, iters, unroll)
    jax.block_until_ready(run(*args))                            # compile + warm
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(*args))
        ts.append((time.perf_counter() - t) / iters)
    return statistics.median(ts)


def oracle_rel(out, x, idx, w, wg, wu, wd, n_tok, cache=None):
    """Relative error of out[:n_tok] against float64 numpy (only the touched experts are copied);
    cache: a dict holding the oracle's result for these inputs across calls."""
    import numpy as np
    n_tok = min(n_tok, x.shape[0])
    if cache is None or "want" not in cache:
        want = _oracle(x, idx, w, wg, wu, wd, n_tok)
        if cache is not None:
            cache["want"] = want
    want = cache["want"] if cache is not None else want
    got = np.asarray(out[:n_tok], np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _oracle(x, idx, w, wg, wu, wd, n_tok):
    import numpy as np
    xs = np.asarray(x[:n_tok], np.float64)
    ids, ws = np.asarray(idx[:n_tok]), np.asarray(w[:n_tok], np.float64)
    want = np.zeros((n_tok, x.shape[1]))
    for t in range(n_tok):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = xs[t] @ np.asarray(wg[e], np.float64)
            u = xs[t] @ np.asarray(wu[e], np.float64)
            want[t] += ws[t, j] * ((g / (1 + np.exp(-g)) * u) @ np.asarray(wd[e], np.float64))
    return want


def ceilings(smoke):
    """(copy bandwidth B/s counting read + write, dense bf16 matmul FLOP/s), each timed as 10 calls in
    one jitted loop after a warm-up that also brings the clocks up."""
    import jax
    import jax.numpy as jnp
    n = (1 << 20) if smoke else (2 << 30)                 # bf16 elements: 4 GiB
    a = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
    t_copy = loop_time(lambda v: v * 1.0001 - v, (a,), 10, 5)
    copy = 2 * a.nbytes / t_copy
    del a
    m = 256 if smoke else 8192
    p = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(3), (m, m), jnp.bfloat16)
    loop_time(lambda a, b: a @ b, (p, q), 20, 1)
    t_mm = loop_time(lambda a, b: a @ b, (p, q), 20, 5)
    return copy, 2 * m ** 3 / t_mm


def copy_bandwidth(smoke):
    """Copy bandwidth (read + write, B/s): the larger of JAX's and PyTorch's measurement (bench_moe's
    ceilings), so the % columns stay conservative (last session's JAX-only figure was 3.04 TB/s against
    PyTorch's 4.27)."""
    bw, _ = ceilings(smoke)
    if not smoke:
        try:
            t_copy, _ = torch_ceilings()
            import torch
            torch.cuda.empty_cache()                    # its 8 GiB of buffers back to the device
            logging.getLogger(__name__).info("copy: JAX %.2f TB/s, PyTorch %.2f TB/s", bw / 1e12, t_copy / 1e12)
            bw = max(bw, t_copy)
        except Exception as e:                          # noqa: BLE001
            logging.getLogger(__name__).info("PyTorch copy not measured: %s", e)
    return bw


def cuda_events_time(f, warmup=5, iters=20, reps=5):
    """Median seconds per call of a torch function, timed with CUDA events."""
    import torch
    for _ in range(warmup):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            f()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3 / iters)
    return statistics.median(ts)


def torch_ceilings():
    """(copy B/s read + write, dense bf16 matmul FLOP/s) through PyTorch, as KINDS.md measured them."""
    import torch
    src = torch.randn(2 << 30, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy = 2 * src.nbytes / cuda_events_time(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    rate = 2 * 8192 ** 3 / cuda_events_time(lambda: a @ b)
    return copy, rate


def torch_gmm_time(x, idx, wg, wu, wd):
    """torch._grouped_mm on the same bf16 buffers (dlpack; weights viewed [E, d, I] as stored)."""
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as tF
    tx, tg, tu, td = (torch.from_dlpack(a) for a in (x, wg, wu, wd))
    T, k = idx.shape
    e = jnp.asarray(idx).reshape(-1)
    order = torch.from_dlpack(jnp.argsort(e, stable=True).astype(jnp.int32)).long()
    offs = torch.from_dlpack(jnp.cumsum(jnp.bincount(e, length=wg.shape[0])).astype(jnp.int32))
    xs = tx[order // k].contiguous()

    def f():
        h = tF.silu(torch._grouped_mm(xs, tg, offs=offs)) * torch._grouped_mm(xs, tu, offs=offs)
        return torch._grouped_mm(h, td, offs=offs)
    return cuda_events_time(f)


def tokamax_dot():
    import tokamax

    def dot(lhs, rhs, gs):
        return tokamax.ragged_dot(lhs, rhs, gs, implementation="mosaic")
    return dot


# ------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="flash,1t", help="comma list of: flash (d 4096, I 1024), 1t (d 8192, I 2048)")
    p.add_argument("--tokens", default="1,16,64,256,4096,16384", help="comma list of token counts T")
    p.add_argument("--methods", default="lingjax,lingjax-mm,old,ragged_dot,torch-gmm",
                   help="comma list of methods (old = the three old forms)")
    p.add_argument("--iters", type=int, default=10, help="calls per timed loop (default 10)")
    p.add_argument("--reps", type=int, default=3, help="timed loops; the median is reported (default 3)")
    p.add_argument("--unroll", type=int, default=1, help="1 (default): the timed calls unrolled in one jitted "
                   "function; 0: a rolled fori_loop (as runs 1-2 of scripts/bench_notes_moe.md)")
    p.add_argument("--max-old-tflop", type=float, default=40.0,
                   help="skip an old form whose flops (TFLOP) would exceed this per call (dense at large T)")
    p.add_argument("--oracle-tokens", type=int, default=4, help="tokens checked against float64 numpy (default 4)")
    p.add_argument("--sweep", default="", help="token counts at which to also time the grouped matmuls with "
                   "each tile configuration of SWEEP_SMALL / SWEEP_LARGE (rows 'mm[...]')")
    p.add_argument("--trace", default="", help="token counts (or 'all') at which every row of lingjax's kernels "
                   "(lingjax*, dec ..., mm ...) is also run once more under the XLA profiler: CUPTI device time per "
                   "call (columns dev us, dev%%copy: what the copy-bandwidth target is judged on), span, per-kernel "
                   "times (GPU)")
    p.add_argument("--budget-s", type=float, default=0.0, help="skip (and list as skipped) the rows that would start "
                   "after this many seconds, so that the tables still print inside a device call's limit (0: none)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny shapes, reference impl, no peers")
    p.add_argument("--out", help="JSON output (default $OUT/bench_moe.json when $OUT is set)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from lingjax.kernels.moe import combine, experts, make_layout
    from lingjax.kernels.moe.layout import COMPARE_MAX_PAIRS
    impl = "reference" if args.smoke else "gpu"
    shapes = {"smoke": (64, 32)} if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    n_exp, k = (16, 4) if args.smoke else (E, K)
    tokens = [1, 5, 64] if args.smoke else [int(t) for t in args.tokens.split(",")]
    methods = args.methods.split(",")
    if args.smoke:
        methods = [m for m in methods if m in ("lingjax", "lingjax-mm", "layout", "parts", "old", "ragged_dot")]
    copy_bw, mm_rate = ceilings(args.smoke)
    if not args.smoke:             # the larger of JAX's and PyTorch's measurement: the % columns stay conservative
        try:
            t_copy, t_rate = torch_ceilings()
            log.info("ceilings: JAX copy %.2f TB/s, matmul %.0f TFLOP/s; PyTorch copy %.2f TB/s, matmul %.0f TFLOP/s",
                     copy_bw / 1e12, mm_rate / 1e12, t_copy / 1e12, t_rate / 1e12)
            copy_bw, mm_rate = max(copy_bw, t_copy), max(mm_rate, t_rate)
        except Exception as e:                          # noqa: BLE001
            log.info("PyTorch ceilings not measured: %s", e)
    log.info("device %s: copy %.2f TB/s, dense bf16 matmul %.0f TFLOP/s", jax.devices()[0].device_kind,
             copy_bw / 1e12, mm_rate / 1e12)
    mod = __import__(f"lingjax.kernels.moe.{'reference' if impl == 'reference' else 'gpu'}", fromlist=["x"])
    rows, best = [], {}
    out_path = args.out or (os.path.join(os.environ["OUT"], "bench_moe.json") if os.environ.get("OUT") else None)

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(dict(device=jax.devices()[0].device_kind, copy_bw=copy_bw, matmul_rate=mm_rate,
                               rows=rows, best=best), f, indent=1)

    trace_ts = [] if args.smoke else ([t for t in tokens] if args.trace == "all" else
                                      [int(t) for t in args.trace.split(",") if t])

    def traced(T, name):
        """Whether this row also gets the CUPTI device time: every row of lingjax's kernels at the --trace T."""
        return T in trace_ts and (name.startswith(("lingjax", "dec ", "mm")))

    for sname, (d, I) in shapes.items():
        for T in tokens:
            x, idx, w, wg, wu, wd = make_problem(T, d, I, n_exp, k, seed=T, dtype=jnp.bfloat16)
            flops = 2 * T * k * 3 * d * I
            touched = len(set(map(int, jax.device_get(idx).reshape(-1))))
            nbytes = touched * 3 * d * I * 2 + 2 * T * d * 2
            args_ = (x, idx, w, wg, wu, wd)
            cands = {}
            bm0 = mod.pick_block_m(T * k, n_exp)
            small = T * k <= COMPARE_MAX_PAIRS          # where the layout is built by comparisons
            if "lingjax" in methods:
                cands["lingjax"] = carried_routing(lambda *a: experts(*a, impl=impl))
                if "lingjax-sort" in methods and small and T > getattr(mod, "DECODE_MAX_TOKENS", 0):
                    cands["lingjax-sort"] = carried_routing(lambda *a: experts(*a, impl=impl, layout_method="sort"))
                if T <= getattr(mod, "DECODE_MAX_TOKENS", 0):           # the grouped path (before)
                    cands["lingjax-grouped"] = carried_routing(lambda *a: experts(*a, impl=impl, decode=False))
                elif "decode" in methods and not args.smoke:             # the decode path above its default range
                    cands["lingjax-decode"] = carried_routing(lambda *a: experts(*a, impl=impl, decode=True))
            if "layout" in methods:
                for m in (("compare", "sort") if small else ("sort",)):
                    cands[f"layout-{m}"] = layout_only(n_exp, bm0, m)
            lays = {}

            def layout_for(bm):
                if bm not in lays:
                    lays[bm] = jax.jit(make_layout, static_argnums=(1, 2))(idx, n_exp, bm)
                return lays[bm]
            checks = {}      # grouped-matmul rows: the same matmuls + combine, checked against the oracle

            def add_mm(name, lay, cg=None, cd=None):
                def y(x, wg, wu, wd):
                    kg, kd = ({"config": cg}, {"config": cd}) if cg else ({}, {})
                    return mod.down(mod.gate_up(x, lay, wg, wu, **kg), lay, wd, **kd)
                cands[name] = lambda x, idx, w, wg, wu, wd: y(x, wg, wu, wd)[: x.shape[0]]   # the matmuls only
                checks[name] = lambda x, idx, w, wg, wu, wd: combine(y(x, wg, wu, wd), lay, w).astype(x.dtype)
            if "lingjax-mm" in methods:
                add_mm("lingjax-mm", layout_for(bm0))
            part_flops = {}
            if "parts" in methods and T > getattr(mod, "DECODE_MAX_TOKENS", 0):
                lay0 = layout_for(bm0)
                cands["mm-gate-up"] = lambda x, idx, w, wg, wu, wd: mod.gate_up(x, lay0, wg, wu)[: x.shape[0], :1] \
                    .astype(x.dtype) * jnp.ones((1, x.shape[1]), x.dtype)
                part_flops = {"mm-gate-up": flops * 2 // 3}
            sweep = {}
            if str(T) in args.sweep.split(",") and not args.smoke and T in SWEEP_DECODE:
                for gu, dn in SWEEP_DECODE[T]:
                    cg, cd = mod.DecodeConfig(*gu), mod.DecodeConfig(*dn)
                    name = f"dec {cg.tag()}/{cd.tag()}"
                    cands[name] = carried_routing(
                        lambda *a, _g=cg, _d=cd: mod.experts_decode(*a, gate_up_config=_g, down_config=_d))
                    checks[name] = cands[name]
                    sweep[name] = dict(decode=True, gate_up=dataclasses.asdict(cg), down=dataclasses.asdict(cd))
            elif str(T) in args.sweep.split(",") and not args.smoke:
                for bm, gu, dn in (SWEEP_SMALL if bm0 <= 32 else SWEEP_LARGE):
                    cg, cd = mod.Config(*gu), mod.Config(*dn)
                    name = f"mm bm{bm or bm0} {cg.tag()}/{cd.tag()}"
                    add_mm(name, layout_for(bm or bm0), cg, cd)
                    sweep[name] = dict(block_m=bm or bm0, gate_up=dataclasses.asdict(cg), down=dataclasses.asdict(cd))
            if "old" in methods:
                for name, fn in old_forms().items():
                    f_old = 2 * T * n_exp * 3 * d * I if name == "dense" else flops
                    if f_old / 1e12 > args.max_old_tflop:
                        rows.append(dict(shape=sname, T=T, method=f"old-{name}", skipped=f"{f_old / 1e12:.0f} TFLOP"))
                        continue
                    cands[f"old-{name}"] = fn
            if "ragged_dot" in methods:
                cands["ragged_dot"] = lambda *a: ragged(*a, dot=jax.lax.ragged_dot)
            if "tokamax" in methods:
                try:
                    cands["tokamax"] = lambda *a, _d=tokamax_dot(): ragged(*a, dot=_d)
                except Exception as e:                      # noqa: BLE001 (a peer that does not import)
                    rows.append(dict(shape=sname, T=T, method="tokamax", error=f"{type(e).__name__}: {e}"[:300]))
            cache = {}                                  # the float64 oracle of this problem
            for name, fn in cands.items():
                row = dict(shape=sname, d=d, I=I, T=T, method=name, touched_experts=touched)
                if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                    rows.append(dict(row, skipped=f"--budget-s {args.budget_s:g} spent"))
                    continue
                if name in sweep:
                    row["config"] = sweep[name]
                try:
                    if name.startswith("lingjax") and name != "lingjax-mm":
                        out = jax.jit(fn)(*args_)
                        row["rel_err"] = oracle_rel(out, *args_, args.oracle_tokens if d < 8192 else 2, cache)
                        row["hlo_ops"], row["n_ops"] = hlo_ops(fn, args_)
                    elif name in checks:
                        out = jax.jit(checks[name])(*args_)
                        row["rel_err"] = oracle_rel(out, *args_, args.oracle_tokens if d < 8192 else 2, cache)
                    iters = args.iters if flops < 1e13 else 3
                    run = loop_fn(fn, iters, args.unroll)
                    t = loop_time(fn, args_, iters, args.reps, run=run)
                    if traced(T, name):
                        try:
                            row["trace"] = kernel_trace(run, args_, iters)
                        except Exception as e:          # noqa: BLE001 (the timing stands without it)
                            row["trace"] = dict(error=f"{type(e).__name__}: {e}"[:200])
                        tr = row["trace"]
                        log.info("  trace %s T=%d: %s", name, T, tr.get("error") or
                                 f"busy {tr['busy_us']:.1f} us / span {tr['span_us']:.1f} us per call; " + "; ".join(
                                     f"{k} x{c:g} {us:.1f} us" for k, (c, us) in list(tr["kernels"].items())[:8]))
                except Exception as e:                      # noqa: BLE001 (OOM, unsupported: recorded)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    rows.append(row)
                    log.info("%-6s T=%-6d %-12s error %s", sname, T, name, row["error"][:120])
                    continue
                f_row = part_flops.get(name, flops)
                row.update(us=t * 1e6, tflops=f_row / t / 1e12, pct_matmul=100 * f_row / t / mm_rate,
                           tbps=nbytes / t / 1e12, pct_copy=100 * nbytes / t / copy_bw)
                if "busy_us" in row.get("trace", {}):      # device time: the kernels' busy time per call
                    dev = row["trace"]["busy_us"] * 1e-6
                    row.update(dev_us=dev * 1e6, dev_span_us=row["trace"]["span_us"],
                               dev_pct_copy=100 * nbytes / dev / copy_bw, dev_pct_matmul=100 * f_row / dev / mm_rate)
                rows.append(row)
                log.info("%-6s T=%-6d %-12s %10.1f us %7.1f TFLOP/s (%5.1f%%) %6.2f TB/s (%5.1f%%)%s%s%s", sname, T, name,
                         row["us"], row["tflops"], row["pct_matmul"], row["tbps"], row["pct_copy"],
                         f"  device {row['dev_us']:.1f} us ({row['dev_pct_copy']:.1f}% copy)" if "dev_us" in row else "",
                         f"  rel {row['rel_err']:.1e}" if "rel_err" in row else "",
                         f"  {row['n_ops']} ops {row['hlo_ops']}" if "n_ops" in row else "")
                save()
            if "torch-gmm" in methods and not args.smoke:
                row = dict(shape=sname, d=d, I=I, T=T, method="torch-gmm", touched_experts=touched)
                try:
                    t = torch_gmm_time(x, idx, wg, wu, wd)
                    row.update(us=t * 1e6, tflops=flops / t / 1e12, pct_matmul=100 * flops / t / mm_rate,
                               tbps=nbytes / t / 1e12, pct_copy=100 * nbytes / t / copy_bw)
                    log.info("%-6s T=%-6d %-12s %10.1f us %7.1f TFLOP/s (%5.1f%%) %6.2f TB/s (%5.1f%%)", sname, T,
                             "torch-gmm", row["us"], row["tflops"], row["pct_matmul"], row["tbps"], row["pct_copy"])
                except Exception as e:                      # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    log.info("%-6s T=%-6d torch-gmm error %s", sname, T, row["error"][:120])
                rows.append(row)
                save()
            del x, wg, wu, wd
    print(f"\ncopy {copy_bw / 1e12:.2f} TB/s, dense bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s")
    w = max([12] + [len(r["method"]) for r in rows])
    print("us / %copy: wall clock per call (--iters calls chained in one jitted function); dev us / dev%copy: the "
          "CUPTI device time of the same calls' kernels (--trace T), span: first kernel start to last end per call")
    print(f"{'shape':<6} {'T':>6} {'method':<{w}} {'us':>10} {'TFLOP/s':>8} {'%mm':>6} {'TB/s':>6} {'%copy':>6} "
          f"{'dev us':>7} {'dev%copy':>8} {'span us':>7} {'rel err':>8} {'ops':>4}")
    nan = float("nan")
    for r in rows:
        if "us" in r:
            print(f"{r['shape']:<6} {r['T']:>6} {r['method']:<{w}} {r['us']:>10.1f} {r['tflops']:>8.1f} "
                  f"{r['pct_matmul']:>6.1f} {r['tbps']:>6.2f} {r['pct_copy']:>6.1f} "
                  f"{r.get('dev_us', nan):>7.1f} {r.get('dev_pct_copy', nan):>8.1f} {r.get('dev_span_us', nan):>7.1f} "
                  f"{r.get('rel_err', float('nan')):>8.1e} {r.get('n_ops', ''):>4}")
        else:
            print(f"{r['shape']:<6} {r['T']:>6} {r['method']:<{w}} {r.get('error') or 'skipped: ' + r.get('skipped', '')}"[:160])
    best.update(best_configs(rows))
    for key, b in best.items():
        print(f"best {'decode path' if b['config'].get('decode') else 'grouped matmul'} {key}: {b['method']} "
              f"{b['us']:.1f} us ({b['speedup']:.2f}x the default)")
    save()
    return 0


def best_configs(rows):
    """{'shape T=..': the fastest swept grouped-matmul row (its config, us, speedup over lingjax-mm)}."""
    best = {}
    for r in rows:
        if "us" not in r or "config" not in r or r.get("rel_err", 1.0) > 2e-2:
            continue
        key = f"{r['shape']} T={r['T']}"
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = dict(method=r["method"], us=r["us"], config=r["config"])
    for key, b in best.items():
        # decode rows: the whole layer, against the decode path's default ('lingjax' where it is the default)
        refs = ("lingjax-decode", "lingjax") if b["config"].get("decode") else ("lingjax-mm",)
        base = [r["us"] for ref in refs for r in rows
                if "us" in r and r["method"] == ref and f"{r['shape']} T={r['T']}" == key]
        b["speedup"] = base[0] / b["us"] if base else float("nan")
    return best


if __name__ == "__main__":
    sys.exit(main())
