"""Where a tensor-parallel decode step's time goes, per device: the all-reduces, the other kernels, the idle
time, and the host's time to enqueue the step (issue 22 asks for the all-reduce time per step; issue 13's
full-depth tp 2 table has a B=1 row at 13.4 ms for a 1.6 ms byte floor).

Model and step as scripts/bench_e2e.py's decode rows (random weights generated on device in their shards,
bench_e2e.decode_setup: the engine's step + greedy sampling, B requests at context C, pages scattered,
caches donated). Per row:
  step ms      --steps steps dispatched back to back, then one sync, per step (median of --reps): what
               bench_e2e reports
  host ms      time for one call to return (the host enqueueing every kernel of the step on every
               device), the device idle before it: median over --steps calls, each followed by a sync
  alone ms     one call and its sync (host + device, nothing overlapped)
Then --steps back-to-back steps run under the XLA profiler; per device (GPU i), per step:
  busy         summed kernel time (all streams)
  all-reduce   the collectives: kernels whose name says NCCL / all-reduce / psum, their time and count. On
               nvidia-h200-x2 (jax 0.11.2) XLA runs shard_map's psums as its own kernels named after the op
               (psum_invariant_<n>_0_fusion_1), on streams of their own, 2 per layer; NCCL only for a gather
               (session 8 call 1, scripts/results/session8/call1/tp). A kernel's time includes its wait
               for the other device
  and, per row (device 0), the 30 kernel names and the streams with the most device time per step
  kernels      kernel launches
  span         first kernel start to last kernel end over the traced steps, per step
  idle         span - busy (negative when streams overlap)

    . scripts/gpu_env.sh; XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python3 scripts/profile_tp.py --preset flash --tp 2 \
        --decode 1x1024,16x1024 --out $OUT/profile_tp.json                                # nvidia-h200-x2
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 \
        scripts/profile_tp.py --preset tiny --tp 2 --decode 2x16 --steps 2        # the CPU: no trace, the plumbing
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
log = logging.getLogger("profile_tp")

ALL_REDUCE = ("nccl", "allreduce", "all_reduce", "all-reduce", "psum")


def per_device(xspace_bytes, steps):
    """Per GPU plane of a serialized XSpace: busy / all-reduce / span per step, kernels per step, and the
    all-reduce kernels' names."""
    from jax._src.lib import _profile_data
    data = _profile_data.ProfileData.from_serialized_xspace(xspace_bytes)
    out = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        lines = [ln for ln in plane.lines if ln.name.startswith("Stream")]
        ev = [(e.start_ns, e.duration_ns, e.name) for ln in lines for e in ln.events]
        if not ev:
            continue
        ar = [(d, n) for _, d, n in ev if any(k in n.lower() for k in ALL_REDUCE)]
        span = max(t + d for t, d, _ in ev) - min(t for t, _, _ in ev)
        busy = sum(d for _, d, _ in ev)
        by_name, by_stream = {}, {}
        for ln in lines:
            for e in ln.events:
                for key, table in ((e.name[:80], by_name), (ln.name, by_stream)):
                    n, t = table.get(key, (0, 0))
                    table[key] = (n + 1, t + e.duration_ns)
        per_step = lambda table, top: [dict(name=k, per_step=n / steps, us=t / 1e3 / steps)
                                       for k, (n, t) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]]
        out[plane.name] = dict(busy_us=busy / 1e3 / steps, all_reduce_us=sum(d for d, _ in ar) / 1e3 / steps,
                               all_reduces=len(ar) / steps, kernels=len(ev) / steps, span_us=span / 1e3 / steps,
                               idle_us=(span - busy) / 1e3 / steps, streams=len(lines),
                               all_reduce_kernels=sorted({re.sub(r"\d+", "N", n[:80]) for _, n in ar}),
                               top_kernels=per_step(by_name, 30), stream_busy=per_step(by_stream, 16))
    return out


def profile_row(model, cfg, mesh, B, C, steps, reps, page_size):
    import jax
    from bench_e2e import decode_setup, time_steps
    f, state, caches, batch = decode_setup(model, cfg, mesh, B, C, page_size)
    step_ms, compile_s, caches = time_steps(f, state, caches, batch, steps, reps)
    row = dict(batch=B, context=C, compile_s=compile_s)
    host, alone = [], []
    for _ in range(steps):
        t = time.perf_counter()
        toks, caches = f(state, caches, batch)
        host.append((time.perf_counter() - t) * 1e3)
        jax.block_until_ready((toks, caches))
        alone.append((time.perf_counter() - t) * 1e3)
    row.update(step_ms=step_ms, host_ms=statistics.median(host), alone_ms=statistics.median(alone))
    if jax.default_backend() == "gpu":
        from jax._src.lib import _profiler
        sess = _profiler.ProfilerSession()
        try:
            for _ in range(steps):
                toks, caches = f(state, caches, batch)
            jax.block_until_ready((toks, caches))
        finally:
            xs = sess.stop()
        try:
            row["devices"] = per_device(xs, steps)
        except Exception as e:                          # noqa: BLE001 (the timings above still stand)
            row["trace_error"] = f"{type(e).__name__}: {e}"[:300]
            log.info("trace not read: %s", row["trace_error"])
    del caches
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default="flash8", help="model shapes (scripts/shapes.py; default flash8)")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (devices; default 1)")
    p.add_argument("--decode", default="1x1024,16x1024", help="decode rows BxC, comma list (default 1x1024,16x1024)")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run and per trace (default 10)")
    p.add_argument("--reps", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--page-size", type=int, default=64, help="MLA latent positions per page (default 64)")
    p.add_argument("--out", help="JSON output (default $OUT/profile_tp.json when $OUT is set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from bench_e2e import parse_pairs, step_bytes
    from lingjax import sharding
    from shapes import preset, random_model
    cfg = preset(args.preset, args.layers, args.vocab)
    mesh = sharding.make_mesh(args.tp) if args.tp > 1 else None
    t = time.perf_counter()
    model = random_model(cfg, mesh, jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    log.info("%s x%d: %s, %d layers, vocab %d, weights made in %.0f s", jax.devices()[0].device_kind, args.tp,
             args.preset, cfg.num_hidden_layers, cfg.vocab_size, time.perf_counter() - t)
    out = args.out or (os.path.join(os.environ["OUT"], "profile_tp.json") if os.environ.get("OUT") else None)
    report = dict(device=jax.devices()[0].device_kind, preset=args.preset, layers=cfg.num_hidden_layers,
                  vocab=cfg.vocab_size, tp=args.tp, steps=args.steps, rows=[])
    for B, C in parse_pairs(args.decode):
        row = profile_row(model, cfg, mesh, B, C, args.steps, args.reps, args.page_size)
        row["bytes_per_device"] = step_bytes(cfg, model, B, C, args.tp)[0]
        report["rows"].append(row)
        if out:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
        log.info("B=%d C=%d: step %.2f ms, host %.2f ms, alone %.2f ms (compile %.0f s)", B, C, row["step_ms"],
                 row["host_ms"], row["alone_ms"], row["compile_s"])
    print(f"\n{report['device']} x{args.tp}, {args.preset} ({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}), "
          f"bf16, {args.steps} steps traced; per step")
    print("| batch | context | step ms | host ms | alone ms | device | busy ms | all-reduce ms (n) | kernels | span ms "
          "| idle ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        devs = r.get("devices") or {"-": None}
        for name, d in devs.items():
            dev = name.rsplit(":", 1)[-1]
            cells = ("- | - | - | - | -" if d is None else
                     f"{d['busy_us'] / 1e3:.2f} | {d['all_reduce_us'] / 1e3:.2f} ({d['all_reduces']:.0f}) | "
                     f"{d['kernels']:.0f} | {d['span_us'] / 1e3:.2f} | {d['idle_us'] / 1e3:.2f}")
            print(f"| {r['batch']} | {r['context']} | {r['step_ms']:.2f} | {r['host_ms']:.2f} | {r['alone_ms']:.2f} "
                  f"| {dev} | {cells} |")
    for r in report["rows"]:
        for name, d in (r.get("devices") or {}).items():
            log.info("B=%d %s all-reduce kernels: %s", r["batch"], name, d["all_reduce_kernels"])
            # session 6 call C matched one all-reduce kernel per step where every layer reduces twice: the kernel
            # names and streams by time show what the collectives are called (count per step ~ 2 x layers)
            print(f"\nB={r['batch']} {name}: kernels by device time per step (first 80 characters of the name)")
            print("| kernel | per step | us per step |\n|---|---|---|")
            for k in d["top_kernels"]:
                print(f"| {k['name']} | {k['per_step']:.1f} | {k['us']:.1f} |")
            print("| stream | kernels per step | us per step |\n|---|---|---|")
            for k in d["stream_busy"]:
                print(f"| {k['name']} | {k['per_step']:.1f} | {k['us']:.1f} |")
            break


if __name__ == "__main__":
    main()
