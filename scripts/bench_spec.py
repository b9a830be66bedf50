#!/usr/bin/env python
"""Cost of a speculative verify step (k = 1, 2, 3 MTP drafts) against a plain decode step (issue 16).

    PYTHONPATH=.:scripts python3 scripts/bench_spec.py --out $OUT/bench_spec.json                   # one H200
    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 scripts/bench_spec.py --preset tiny --smoke      # CPU check

Model: a preset of scripts/shapes.py (default flash8: Ling-2.6-flash layer shapes, 8 layers, vocab cut
to 32768) plus one MTP layer (MLA + MoE, as the checkpoint's), random bf16 weights made on device.
Random weights accept (almost) no drafts, so acceptance cannot be measured here; the step costs are what
matter and do not depend on it.

For each batch B (requests, each at context --context): the device time of
  plain   one engine decode step (lingjax.engine._step_fn: B tokens through the main model, sampling),
  verify  one speculative step (lingjax.speculative._spec_step_fn) with k drafts per request: B (k + 1)
          tokens through the main model, acceptance, linear-state rollback, the MTP layer over the
          B (k + 1) rows and k - 1 more single-row MTP passes (the next step's drafts),
each the median over --reps runs of --steps steps dispatched back to back (caches donated). Reported:
cost ratio verify / plain and the speedup implied at acceptance a in --accept: expected tokens per step
(1 - a^(k+1)) / (1 - a) over the cost ratio (independent per-draft acceptance a). Target: at B = 1,
k = 1 the ratio is <= 1.15. JSON to --out after every measurement (a run cut short keeps its rows).
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

import numpy as np

log = logging.getLogger("bench_spec")


def timed(fn, carry, steps, reps):
    """fn(carry) -> (out, carry); median ms per call over reps runs of `steps` calls."""
    import jax
    out, carry = fn(carry)                 # compile + warm up
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            out, carry = fn(carry)
        jax.block_until_ready((out, carry))
        ts.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(ts), carry


def plain_ms(model, B, C, steps, reps):
    import jax.numpy as jnp
    from lingjax.batch import StepBatch
    from lingjax.cache import contiguous_page_table
    from lingjax.engine import Engine, _step_fn
    e = Engine(model, max_batch=B, prefill_chunk=8, max_len=C + 16, overlap=False)
    rng = np.random.default_rng(B)
    batch = StepBatch(tokens=jnp.asarray(rng.integers(2, model.cfg.vocab_size, B), jnp.int32),
                      positions=jnp.full((B,), C, jnp.int32), token_seq=jnp.arange(B, dtype=jnp.int32),
                      slots=jnp.arange(B, dtype=jnp.int32), cu_seqlens=jnp.arange(B + 1, dtype=jnp.int32),
                      fresh=jnp.zeros((B,), bool), decode_only=True,
                      page_table=jnp.asarray(contiguous_page_table(B, e.max_len, e.page_size)))
    z = jnp.zeros(B, jnp.int32)
    host = (jnp.full(B, -1, jnp.int32), jnp.arange(B, dtype=jnp.int32), jnp.zeros(B, jnp.float32), z,
            jnp.ones(B, jnp.float32), jnp.zeros(B, jnp.uint32), z, z)

    def one(caches):
        take, rows, *rest = host
        out = _step_fn(e._params, caches, batch, take, e._prev, rows, *rest, graph=e._graph, mode=(False, True, False, True))
        return out[1], out[-1]
    ms, caches = timed(one, e.caches, steps, reps)
    del caches, e
    return ms


def verify_ms(model, B, C, k, steps, reps):
    import jax.numpy as jnp
    from lingjax.batch import StepBatch
    from lingjax.cache import contiguous_page_table
    from lingjax.engine import Engine
    from lingjax.speculative import _spec_step_fn
    e = Engine(model, max_batch=B, prefill_chunk=8, max_len=C + 16, num_speculative_tokens=k)
    T = B * (k + 1)
    rng = np.random.default_rng(B + k)
    r = np.repeat(np.arange(B), k + 1)
    j = np.tile(np.arange(k + 1), B)
    batch = StepBatch(tokens=jnp.asarray(rng.integers(2, model.cfg.vocab_size, T), jnp.int32),
                      positions=jnp.asarray(C + j, jnp.int32), token_seq=jnp.asarray(r, jnp.int32),
                      slots=jnp.arange(B, dtype=jnp.int32),
                      cu_seqlens=jnp.asarray(np.arange(B + 1) * (k + 1), jnp.int32),
                      fresh=jnp.zeros((B,), bool), decode_only=False,
                      page_table=jnp.asarray(contiguous_page_table(B, e.max_len, e.page_size)))
    draft_take = jnp.asarray(np.where(j > 0, r * k + j - 1, -1), jnp.int32)
    next_take = jnp.asarray(r * (k + 1) + j, jnp.int32)
    z = jnp.zeros(B, jnp.int32)
    args = (draft_take, jnp.zeros(T, jnp.int32), next_take, jnp.asarray(np.arange(B) * (k + 1), jnp.int32),
            jnp.full(B, k, jnp.int32), jnp.ones(B, bool), jnp.full(B, e.max_len, jnp.int32), jnp.zeros(B, jnp.float32), z, jnp.ones(B, jnp.float32),
            jnp.zeros(B, jnp.uint32), z, z)

    def one(carry):
        caches, spec = carry
        out = _spec_step_fn(e._params, caches, spec, batch, *args, graph=e._graph, mode=(False, False), k=k)
        return out[1], (out[-2], out[-1])
    ms, carry = timed(one, (e.caches, e._spec.state), steps, reps)
    del carry, e
    return ms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash8", help="model shapes (scripts/shapes.py): flash8, flash, 1t, tiny")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--batches", default="1,16,64", help="batch sizes B (comma list)")
    p.add_argument("--ks", default="1,2,3", help="draft counts k (comma list)")
    p.add_argument("--context", type=int, default=1024, help="tokens already in each request's cache")
    p.add_argument("--accept", default="0.6,0.8,0.9", help="acceptance rates for the implied speedup")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--reps", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--time-budget", type=float, default=215.0,
                   help="seconds after which no new measurement starts (rows are written as they finish; B=1 "
                        "first); default %(default)s, so the run fits 4 minutes with the last compile")
    p.add_argument("--smoke", action="store_true", help="CPU check: 1 step, 1 rep, context 16")
    p.add_argument("--out", help="JSON output (default $OUT/bench_spec.json when $OUT is set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from shapes import preset, random_model
    if args.smoke:
        args.steps, args.reps, args.context = 1, 1, 16
    cfg = dataclasses.replace(preset(args.preset, args.layers, args.vocab), num_nextn_predict_layers=1)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    t0 = time.perf_counter()
    model = random_model(cfg, None, dtype, mtp=True)
    jax.block_until_ready(jax.tree.leaves(nnx_state(model)))
    kinds = "".join("L" if kd == "linear" else "M" for kd in cfg.layer_kinds)
    report = dict(device=jax.devices()[0].device_kind, preset=args.preset, layers=cfg.num_hidden_layers, kinds=kinds,
                  vocab=cfg.vocab_size, dtype=args.dtype, context=args.context, init_s=time.perf_counter() - t0,
                  note="random weights: drafts are (almost) never accepted; costs only, speedups implied", rows=[])
    out = args.out or (os.path.join(os.environ["OUT"], "bench_spec.json") if os.environ.get("OUT") else None)
    accs = [float(a) for a in args.accept.split(",")]
    skipped = []
    for B in (int(b) for b in args.batches.split(",")):
        if time.perf_counter() - t0 > args.time_budget:
            skipped.append(f"B={B}")
            continue
        base = plain_ms(model, B, args.context, args.steps, args.reps)
        log.info("B=%d plain decode step %.3f ms", B, base)
        for k in (int(x) for x in args.ks.split(",")):
            if time.perf_counter() - t0 > args.time_budget:
                skipped.append(f"B={B} k={k}")
                continue
            v = verify_ms(model, B, args.context, k, args.steps, args.reps)
            ratio = v / base
            speed = {str(a): ((1 - a ** (k + 1)) / (1 - a)) / ratio for a in accs}
            row = dict(batch=B, k=k, plain_ms=base, verify_ms=v, cost_ratio=ratio, speedup_at_acceptance=speed)
            report["rows"].append(row)
            log.info("B=%d k=%d verify %.3f ms = %.3fx plain; implied speedup %s", B, k, v, ratio,
                     "  ".join(f"a={a}: {s:.2f}x" for a, s in speed.items()))
            if out:
                with open(out, "w") as f:
                    json.dump(report, f, indent=1)
    if skipped:
        report["skipped_for_time"] = skipped
        log.info("time budget %.0f s: skipped %s", args.time_budget, ", ".join(skipped))
        if out:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
    b1 = [r for r in report["rows"] if r["batch"] == 1 and r["k"] == 1]
    if b1:
        log.info("target B=1 k=1 verify <= 1.15x plain: %.3fx (%s)", b1[0]["cost_ratio"],
                 "met" if b1[0]["cost_ratio"] <= 1.15 else "NOT met")
    return 0


def nnx_state(model):
    from flax import nnx
    return nnx.state(model)


if __name__ == "__main__":
    sys.exit(main())
