"""`lingjax bench`: engine throughput (prefill and decode tokens/s) at several batch sizes, measured by
lingjax/bench.py's `bench_generate` (its docstring says what each column means).

    lingjax bench [--model PATH | --random-tiny] --batch 1 8 --prompt-len 128 --new-tokens 64

Imports only the standard library and lingjax.cli.common at the top (jax and the engine load inside
`run`), so that `lingjax --help` stays fast.
"""
from __future__ import annotations

import json

from lingjax.cli.common import (CLIError, add_decode_steps, add_kernels, check_output_path, default_model_dir, int_at_least,
                                make_mesh, write_output_atomic)

HELP = "engine throughput: prefill and decode tokens/s at several batch sizes"
DESCRIPTION = ("Measure the engine end to end on random prompts: for each --batch size, a warm-up run (compiles), "
               "then --repeats timed runs of generate and of a prefill-only run; prints prefill and decode "
               "tokens/s, ms per decode step and the compilations.")


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="checkpoint directory (HF or converted); default: the shipped "
                                                     "model in checkpoints/")
    src.add_argument("--random-tiny", action="store_true", help="a random tiny model (lingjax.testing.tiny_config) "
                                                                "instead of a checkpoint")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="default %(default)s")
    p.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1, 8], metavar="B",
                   help="batch sizes to measure (each is the engine's max-batch); default 1 8")
    p.add_argument("--prompt-len", type=int_at_least(1), default=128, metavar="N", help="prompt tokens; default %(default)s")
    p.add_argument("--new-tokens", type=int_at_least(2), default=64, metavar="N", help="tokens generated per request; "
                                                                                       "default %(default)s")
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=256, metavar="N", help="default %(default)s")
    p.add_argument("--repeats", type=int_at_least(1), default=3, metavar="N", help="timed runs (min taken); default 3")
    p.add_argument("--tp", type=int_at_least(1), default=1, metavar="N", help="tensor-parallel degree; default 1")
    add_kernels(p)
    p.add_argument("--no-overlap", action="store_true",
                   help="read each step's results before packing the next (the engine's overlap=False)")
    add_decode_steps(p)
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


def run(args):
    import jax
    import jax.numpy as jnp
    from lingjax import bench

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    if args.json:
        check_output_path(args.json, "--json")      # a bad path fails now, not after the benchmark
    mesh = make_mesh(args)
    if args.random_tiny:
        from flax import nnx
        from lingjax.model import BailingModel
        from lingjax.testing import tiny_config
        model, what = BailingModel(tiny_config(), dtype=dtype, rngs=nnx.Rngs(0), mtp=False), "random tiny model"
        if mesh is not None:
            raise CLIError("--tp needs --model (the random tiny model is not sharded)")
    else:
        from lingjax.engine import load_model
        path = args.model or str(default_model_dir())
        _, model = load_model(path, dtype, mesh=mesh)
        what = path
    cfg = model.cfg
    if args.prompt_len + args.new_tokens + 1 > cfg.max_position_embeddings:
        raise CLIError(f"--prompt-len + --new-tokens exceeds max_position_embeddings={cfg.max_position_embeddings}")
    rows = bench.bench_generate(model, args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                prefill_chunk=args.prefill_chunk, repeats=args.repeats, mesh=mesh,
                                kernels=args.kernels, overlap=not args.no_overlap, decode_steps=args.decode_steps)
    print(f"lingjax bench: {what}, {args.dtype}, {jax.devices()[0].platform} x{jax.device_count()}, tp={args.tp}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"overlap {'off' if args.no_overlap else 'on'}, decode steps {args.decode_steps}")
    print(bench.format_table(rows))
    if args.json:
        doc = dict(model=what, dtype=args.dtype, device=str(jax.devices()[0]), tp=args.tp, rows=rows)
        write_output_atomic(args.json, lambda f: f.write(json.dumps(doc, indent=2).encode()), "--json")
    return 0
