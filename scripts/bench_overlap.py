"""Host overhead of the engine step, with and without overlapped scheduling (issue 15).

Model: Ling-2.6-flash layer shapes with random weights and 8 layers (6 linear-attention + 2 MLA,
1 dense + 7 MoE; the same builder as scripts/tp_bench.py), full vocabulary (157184) by default, on
one device. For each --batch B and each mode (overlap off, on): an Engine(max_batch=B) generates
--new-tokens greedy tokens for B random prompts of --prompt-len tokens after a warm-up run of the
same shapes (compiles). Reported per mode, over the timed run's steps (one prefill step, then
decodes):

  ms/step      wall time of the run / engine steps
  host ms      time the host spent scheduling, packing and dispatching a step (Engine.stats())
  wait ms      time the host waited for a step's results (Engine.stats())
  device ms    the same decode step replayed back to back with no host work between the calls
               (the arguments of the run's last decode step, its caches fed back): the device's time
  overhead     ms/step / device ms - 1: the share of a step the device spends waiting on the host
               (issue 15's target at batch 1: <= 10%)

    PYTHONPATH=. python3 scripts/bench_overlap.py                    # GPU machine (nvidia-h200)
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 scripts/bench_overlap.py --shrink --batch 1 4   # CPU smoke test

Writes JSON to --out (default $OUT/bench_overlap.json, else ./bench_overlap.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def replay_ms(calls, caches, n):
    """Run the recorded decode step n times back to back on `caches` (the engine's; the recorded ones
    were donated) -> (ms per call, the caches to give back to the engine)."""
    import jax
    from lingjax import engine as engine_lib
    args, kw = calls[-1]
    out = engine_lib._step_fn(*args[:1], caches, *args[2:], **kw)           # warm (already compiled)
    caches = out[-1]
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n):
        out = engine_lib._step_fn(*args[:1], caches, *args[2:], **kw)
        caches = out[-1]
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t0) / n, caches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--layer-group-size", type=int, default=4)
    p.add_argument("--vocab", type=int, default=157184)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--kernels", default=None, help="the engine's kernels= (default: by platform)")
    p.add_argument("--replay", type=int, default=50, help="back-to-back replays of the decode step")
    p.add_argument("--shrink", action="store_true", help="tiny shapes, for a CPU smoke test")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from lingjax import engine as engine_lib
    from lingjax.engine import Engine, SamplingParams
    from lingjax.sharding import make_mesh
    from tp_bench import build_config, init_state

    cfg = build_config(types.SimpleNamespace(shrink=args.shrink, vocab=args.vocab, layers=args.layers,
                                             layer_group_size=args.layer_group_size))
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    model = init_state(cfg, make_mesh(1), dtype)
    rng = np.random.default_rng(0)
    orig = engine_lib._step_fn
    calls = []

    def recording(*a, **kw):
        if a[2].decode_only:
            calls[:] = [(a, kw)]
        return orig(*a, **kw)

    rows = []
    report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(), jax=jax.__version__,
                  layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, dtype=args.dtype, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, rows=rows)
    print(f"{report['device']}: Ling-2.6-flash shapes, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
          f"{args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy", flush=True)
    print(f"{'batch':>5} {'overlap':>7} {'ms/step':>8} {'host ms':>8} {'wait ms':>8} {'device ms':>9} {'overhead':>8}",
          flush=True)
    for B in args.batch:
        prompts = [rng.integers(2, cfg.vocab_size, args.prompt_len).tolist() for _ in range(B)]
        sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        ref = None
        for overlap in (False, True):
            eng = Engine(model, max_batch=B, prefill_chunk=args.prompt_len, max_len=args.prompt_len + args.new_tokens + 8,
                         kernels=args.kernels, overlap=overlap)
            eng.generate(prompts, sp)                                      # warm-up: compiles
            eng.reset_stats()
            steps0 = eng.steps
            engine_lib._step_fn = recording
            try:
                t0 = time.perf_counter()
                outs = eng.generate(prompts, sp)
                wall = time.perf_counter() - t0
            finally:
                engine_lib._step_fn = orig
            s = eng.stats()
            n_steps = eng.steps - steps0
            dev_ms, eng.caches = replay_ms(calls, eng.caches, args.replay)
            toks = [o.token_ids for o in outs]
            same = ref is None or toks == ref
            ref = ref or toks
            row = dict(batch=B, overlap=overlap, steps=n_steps, ms_per_step=1e3 * wall / n_steps,
                       host_ms_per_step=s["host_ms_per_step"], wait_ms_per_step=s["wait_ms_per_step"],
                       device_ms_per_step=dev_ms, overhead=1e3 * wall / n_steps / dev_ms - 1,
                       tokens_equal_non_overlapped=same)
            rows.append(row)
            print(f"{B:>5} {str(overlap):>7} {row['ms_per_step']:>8.2f} {row['host_ms_per_step']:>8.2f} "
                  f"{row['wait_ms_per_step']:>8.2f} {dev_ms:>9.2f} {100 * row['overhead']:>7.1f}%"
                  + ("" if same else "  (tokens differ from overlap off)"), flush=True)
    out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_overlap.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
