"""MoE routed-expert layer on one GPU: lingjax's grouped matmul against the forms it replaced and the peers.

Shapes: Ling-2.6-flash (d 4096, I 1024) and Ling-2.5-1T (d 8192, I 2048), E 256 experts, top-8,
T = 1, 16, 64, 256, 4096, 16384 tokens, bf16 weights and activations, uniform random routing (each
token 8 distinct experts) with float32 combine weights. Every method computes the same routed sum
out[t] = sum_j w[t,j] * (silu(x_t Wg[e]) * (x_t Wu[e])) Wd[e] (the shared expert is not included).

Methods (rows):
  lingjax       lingjax.kernels.moe.experts(impl='gpu'): layout + Triton gate_up/down + combine
  lingjax-mm    the two Triton grouped matmuls alone (layout precomputed)
  old-gather / old-sorted / old-dense
                the three forms of lingjax/model/moe.py before the grouped matmul (the issue's
                baseline: 'dense' was what every T >= 32 ran at these shapes)
  ragged_dot    jax.lax.ragged_dot on expert-sorted rows (gate, up, down)
  tokamax       tokamax.ragged_dot (Pallas Mosaic GPU), if it imports (carried wheels)
  torch-gmm     torch._grouped_mm on the same buffers (dlpack), CUDA-graph-free, timed with CUDA events

Timing: JAX methods run `--iters` times inside one jitted fori_loop (each iteration's input depends
on the last output, so nothing is hoisted), device time per iteration = loop time / iters (median of
--reps); torch with triton.testing.do_bench (median). Ceilings measured in the same run: copy
bandwidth (read + write of a 4 GiB bf16 array) and the dense bf16 matmul rate (8192^3).
Columns: us; TFLOP/s over the useful flops 2 * T * k * 3 * d * I and its share of the matmul rate;
TB/s over the unique bytes (each touched expert's weights once + x + out) and its share of copy
bandwidth; rel err of the first tokens against a float64 numpy oracle (lingjax rows; bf16: ~1e-2).

    PYTHONPATH=. python3 scripts/bench_moe.py [--shapes flash,1t] [--tokens 1,16,...] [--out $OUT/bench_moe.json]
    XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu PYTHONPATH=. \\
        python3 scripts/bench_moe.py --smoke        # CPU: tiny shapes, reference impl, no peers
"""
from __future__ import annotations

import argparse
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


def loop_time(fn, args, iters, reps):
    """Device time per call: `iters` calls chained in one jitted fori_loop (x_{i+1} depends on out_i)."""
    import jax
    import jax.numpy as jnp

    def body(i, x):
        out = fn(x, *args[1:])
        return (x + 1e-3 * out).astype(x.dtype)

    run = jax.jit(lambda x: jax.lax.fori_loop(0, iters, body, x))
    jax.block_until_ready(run(args[0]))                          # compile + warm
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(args[0]))
        ts.append((time.perf_counter() - t) / iters)
    return statistics.median(ts)


def oracle_rel(out, x, idx, w, wg, wu, wd, n_tok):
    """Relative error of out[:n_tok] against float64 numpy (only the touched experts are copied)."""
    import numpy as np
    n_tok = min(n_tok, x.shape[0])
    xs = np.asarray(x[:n_tok], np.float64)
    ids, ws = np.asarray(idx[:n_tok]), np.asarray(w[:n_tok], np.float64)
    want = np.zeros((n_tok, x.shape[1]))
    for t in range(n_tok):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = xs[t] @ np.asarray(wg[e], np.float64)
            u = xs[t] @ np.asarray(wu[e], np.float64)
            want[t] += ws[t, j] * ((g / (1 + np.exp(-g)) * u) @ np.asarray(wd[e], np.float64))
    got = np.asarray(out[:n_tok], np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def ceilings(smoke):
    import jax
    import jax.numpy as jnp
    n = (1 << 20) if smoke else (2 << 30)                 # bf16 elements: 4 GiB
    a = jax.random.normal(jax.random.key(1), (n,), jnp.bfloat16)
    f = jax.jit(lambda v: v * 1.0001)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t)
    copy = 2 * a.nbytes / statistics.median(ts)
    m = 256 if smoke else 8192
    p = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(3), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(mm(p, q))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(mm(p, q))
        ts.append(time.perf_counter() - t)
    rate = 2 * m ** 3 / statistics.median(ts)
    del a, p, q
    return copy, rate


def torch_gmm_time(x, idx, wg, wu, wd):
    """torch._grouped_mm on the same bf16 buffers (dlpack; weights viewed [E, d, I] as stored)."""
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as tF
    from triton.testing import do_bench
    tx, tg, tu, td = (torch.from_dlpack(a) for a in (x, wg, wu, wd))
    T, k = idx.shape
    e = jnp.asarray(idx).reshape(-1)
    order = torch.from_dlpack(jnp.argsort(e, stable=True).astype(jnp.int32)).long()
    offs = torch.from_dlpack(jnp.cumsum(jnp.bincount(e, length=wg.shape[0])).astype(jnp.int32))
    xs = tx[order // k].contiguous()

    def f():
        h = tF.silu(torch._grouped_mm(xs, tg, offs=offs)) * torch._grouped_mm(xs, tu, offs=offs)
        return torch._grouped_mm(h, td, offs=offs)
    f()
    torch.cuda.synchronize()
    return do_bench(f, warmup=25, rep=100, return_mode="median") * 1e-3


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
    p.add_argument("--methods", default="lingjax,lingjax-mm,old,ragged_dot,tokamax,torch-gmm",
                   help="comma list of methods (old = the three old forms)")
    p.add_argument("--iters", type=int, default=10, help="calls per timed loop (default 10)")
    p.add_argument("--reps", type=int, default=3, help="timed loops; the median is reported (default 3)")
    p.add_argument("--max-old-tflop", type=float, default=40.0,
                   help="skip an old form whose flops (TFLOP) would exceed this per call (dense at large T)")
    p.add_argument("--oracle-tokens", type=int, default=4, help="tokens checked against float64 numpy (default 4)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny shapes, reference impl, no peers")
    p.add_argument("--out", help="JSON output (default $OUT/bench_moe.json when $OUT is set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from lingjax.kernels.moe import experts, make_layout, resolve
    impl = "reference" if args.smoke else "gpu"
    shapes = {"smoke": (64, 32)} if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    n_exp, k = (16, 4) if args.smoke else (E, K)
    tokens = [1, 5, 64] if args.smoke else [int(t) for t in args.tokens.split(",")]
    methods = args.methods.split(",")
    if args.smoke:
        methods = [m for m in methods if m in ("lingjax", "lingjax-mm", "old", "ragged_dot")]
    copy_bw, mm_rate = ceilings(args.smoke)
    log.info("device %s: copy %.2f TB/s, dense bf16 matmul %.0f TFLOP/s", jax.devices()[0].device_kind,
             copy_bw / 1e12, mm_rate / 1e12)
    mod = __import__(f"lingjax.kernels.moe.{'reference' if impl == 'reference' else 'gpu'}", fromlist=["x"])
    rows = []
    out_path = args.out or (os.path.join(os.environ["OUT"], "bench_moe.json") if os.environ.get("OUT") else None)

    def save():
        if out_path:
            with open(out_path, "w") as f:
                json.dump(dict(device=jax.devices()[0].device_kind, copy_bw=copy_bw, matmul_rate=mm_rate,
                               rows=rows), f, indent=1)

    for sname, (d, I) in shapes.items():
        for T in tokens:
            x, idx, w, wg, wu, wd = make_problem(T, d, I, n_exp, k, seed=T, dtype=jnp.bfloat16)
            flops = 2 * T * k * 3 * d * I
            touched = len(set(map(int, jax.device_get(idx).reshape(-1))))
            nbytes = touched * 3 * d * I * 2 + 2 * T * d * 2
            args_ = (x, idx, w, wg, wu, wd)
            cands = {}
            if "lingjax" in methods:
                cands["lingjax"] = lambda *a: experts(*a, impl=impl)
            if "lingjax-mm" in methods:
                lay = jax.jit(make_layout, static_argnums=(1, 2))(idx, n_exp, mod.pick_block_m(T * k, n_exp))

                def mm(x, idx, w, wg, wu, wd, lay=lay):
                    return mod.down(mod.gate_up(x, lay, wg, wu), lay, wd)[: x.shape[0]]
                cands["lingjax-mm"] = mm
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
            for name, fn in cands.items():
                row = dict(shape=sname, d=d, I=I, T=T, method=name, touched_experts=touched)
                try:
                    if name == "lingjax":
                        out = jax.jit(fn)(*args_)
                        row["rel_err"] = oracle_rel(out, *args_, args.oracle_tokens if d < 8192 else 2)
                        t = loop_time(fn, args_, args.iters, args.reps)
                    else:
                        t = loop_time(fn, args_, args.iters if flops < 1e13 else 3, args.reps)
                except Exception as e:                      # noqa: BLE001 (OOM, unsupported: recorded)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    rows.append(row)
                    log.info("%-6s T=%-6d %-12s error %s", sname, T, name, row["error"][:120])
                    continue
                row.update(us=t * 1e6, tflops=flops / t / 1e12, pct_matmul=100 * flops / t / mm_rate,
                           tbps=nbytes / t / 1e12, pct_copy=100 * nbytes / t / copy_bw)
                rows.append(row)
                log.info("%-6s T=%-6d %-12s %10.1f us %7.1f TFLOP/s (%5.1f%%) %6.2f TB/s (%5.1f%%)%s", sname, T, name,
                         row["us"], row["tflops"], row["pct_matmul"], row["tbps"], row["pct_copy"],
                         f"  rel {row['rel_err']:.1e}" if "rel_err" in row else "")
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
    print(f"{'shape':<6} {'T':>6} {'method':<12} {'us':>10} {'TFLOP/s':>8} {'%mm':>6} {'TB/s':>6} {'%copy':>6} {'rel err':>8}")
    for r in rows:
        if "us" in r:
            print(f"{r['shape']:<6} {r['T']:>6} {r['method']:<12} {r['us']:>10.1f} {r['tflops']:>8.1f} {r['pct_matmul']:>6.1f} "
                  f"{r['tbps']:>6.2f} {r['pct_copy']:>6.1f} {r.get('rel_err', float('nan')):>8.1e}")
        else:
            print(f"{r['shape']:<6} {r['T']:>6} {r['method']:<12} {r.get('error') or 'skipped: ' + r.get('skipped', '')}"[:140])
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
