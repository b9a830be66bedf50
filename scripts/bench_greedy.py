"""Decode step time of the engine's all-greedy fast path against the full sampler, on a random tiny model
with a large vocabulary (the sampler's cost grows with the vocabulary, the tiny model's does not).

    PYTHONPATH=. python scripts/bench_greedy.py [--vocab 157184] [--batch 1 8 64] [--json bench_greedy.json]

For each batch size: ms per decode step (lingjax/bench.py's `bench_generate`: full generate minus a
prefill-only run, min of --repeats) of a greedy run (temperature 0: the "greedy" step kind, argmax alone)
and of a sampling run with every filter off (temperature 1, top_k 0, top_p 1: the "sample" kind, whose
sort over the vocabulary runs whatever the filters). The difference is what the fast path saves per step.
"""
import argparse
import json
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=157184, help="vocabulary size; default %(default)s (Ling-2.5/2.6)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes; default 1 8 64")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens; default %(default)s")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request; default %(default)s")
    p.add_argument("--repeats", type=int, default=3, help="timed runs, min taken; default %(default)s")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32", help="default %(default)s")
    p.add_argument("--kernels", default=None, help="the engine's kernel backend; default: by platform")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lingjax.bench import bench_generate
    from lingjax.model import BailingModel
    from lingjax.testing import tiny_config

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    model = BailingModel(tiny_config(vocab_size=args.vocab), dtype=dtype, rngs=nnx.Rngs(0), mtp=False)
    common = dict(prompt_len=args.prompt_len, new_tokens=args.new_tokens, prefill_chunk=256, repeats=args.repeats,
                  kernels=args.kernels)
    greedy = bench_generate(model, args.batch, temperature=0.0, **common)
    sampled = bench_generate(model, args.batch, temperature=1.0, **common)
    print(f"bench_greedy: random tiny model, vocab {args.vocab}, {args.dtype}, {jax.devices()[0].platform}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'batch':>5} {'greedy ms/step':>15} {'sampling ms/step':>17} {'saved ms/step':>14}")
    rows = []
    for g, s in zip(greedy, sampled):
        a, b = g["ms_per_decode_step"], s["ms_per_decode_step"]
        rows.append(dict(batch=g["batch"], greedy_ms_per_step=a, sampling_ms_per_step=b))
        print(f"{g['batch']:>5} {a:>15.2f} {b:>17.2f} {b - a:>14.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vocab=args.vocab, dtype=args.dtype, device=str(jax.devices()[0]), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
