"""Throughput of `Engine.generate` on the tiny random model (lingjax.testing.tiny_config), batch 1 and 8.

    python scripts/bench_generate.py [--dtype float32] [--new 64] [--prompt-len 32] [--json out.json]

For each batch size: a first run (compiles every step shape it needs; its wall time and the number of
compilations are reported), then `--repeats` timed runs of the same requests (no compilation). tokens/s
counts generated tokens only; prefill tokens/s is the prompt tokens over the time to the first token of
a prefill-only run. Prints a table and writes JSON.
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from lingjax.engine import Engine, SamplingParams
from lingjax.model import BailingModel
from lingjax.testing import tiny_config
from flax import nnx


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="bench_generate.json")
    args = ap.parse_args()

    cfg = tiny_config()
    dtype = jnp.dtype(args.dtype)
    model = BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=False)
    rng = np.random.default_rng(0)
    rows = []
    for B in args.batches:
        prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(B)]
        sp = SamplingParams(max_new_tokens=args.new, temperature=args.temperature, seed=0, ignore_eos=True)
        eng = Engine(model, max_batch=B, prefill_chunk=args.prefill_chunk, max_len=args.prompt_len + args.new + 1)
        t0 = time.perf_counter()
        eng.generate(prompts, sp)
        first = time.perf_counter() - t0
        compiles = eng.compile_count
        steps0 = eng.steps
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = eng.generate(prompts, sp)
            times.append(time.perf_counter() - t0)
        n_new = sum(len(o.token_ids) for o in outs)
        best = min(times)
        steps = (eng.steps - steps0) // args.repeats
        # prefill alone: one new token, so the run is the prompt steps plus nothing else
        t0 = time.perf_counter()
        eng.generate(prompts, SamplingParams(max_new_tokens=1, ignore_eos=True))
        t_prefill = time.perf_counter() - t0
        rows.append(dict(batch=B, new_tokens=n_new, steps=steps, seconds=best, tokens_per_s=n_new / best,
                         ms_per_step=1e3 * best / steps, prefill_tokens_per_s=B * args.prompt_len / t_prefill,
                         first_run_seconds=first, compilations=compiles, buckets=len(eng.buckets("sample"))))
    print(f"generate on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}), tiny model "
          f"{args.dtype}, prompt {args.prompt_len}, {args.new} new tokens, temperature {args.temperature}")
    print(f"{'batch':>5} {'tok/s':>9} {'ms/step':>8} {'steps':>6} {'prefill tok/s':>14} {'1st run s':>10} "
          f"{'compiles':>9} {'buckets':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['tokens_per_s']:>9.1f} {r['ms_per_step']:>8.2f} {r['steps']:>6} "
              f"{r['prefill_tokens_per_s']:>14.1f} {r['first_run_seconds']:>10.1f} {r['compilations']:>9} "
              f"{r['buckets']:>8}")
    with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), device=str(jax.devices()[0]), results=rows), f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
