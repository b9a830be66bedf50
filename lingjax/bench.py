"""`lingjax bench`: end-to-end engine throughput (prefill and decode tokens/s) at several batch sizes.

    lingjax bench [--model PATH | --random-tiny] --batch 1 8 --prompt-len 128 --new-tokens 64

For each batch size B: one warm-up run of B identical-length random prompts (it compiles every step
shape the run needs; its time and the compilations are reported), then `--repeats` timed runs
(min taken). Decode tokens/s counts generated tokens over the time of the full generate run minus a
prefill-only run (1 new token); prefill tokens/s is the prompt tokens over that prefill-only run.
"host ms" is the host's time per step scheduling, packing and dispatching (Engine.stats(); with
overlap, the default, it runs while the device computes the previous step; `--no-overlap` turns that
off). Prints a table; `--json` writes the rows.
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger(__name__)

BENCH_HELP = "engine throughput: prefill and decode tokens/s at several batch sizes"
BENCH_DESCRIPTION = ("Measure the engine end to end on random prompts: for each --batch size, a warm-up run (compiles), "
                     "then --repeats timed runs of generate and of a prefill-only run; prints prefill and decode "
                     "tokens/s, ms per decode step and the compilations.")


def bench_generate(model, batches, *, prompt_len, new_tokens, prefill_chunk, repeats=3, temperature=0.0,
                   mesh=None, seed=0, kernels=None, overlap=True):
    """Rows of measurements, one per batch size (see the module docstring)."""
    import numpy as np
    from lingjax.engine import Engine, SamplingParams

    rng = np.random.default_rng(seed)
    rows = []
    for B in batches:
        prompts = [rng.integers(3, model.cfg.vocab_size, prompt_len).tolist() for _ in range(B)]
        full = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed, ignore_eos=True)
        first = SamplingParams(max_new_tokens=1, ignore_eos=True)
        eng = Engine(model, max_batch=B, prefill_chunk=prefill_chunk, max_len=prompt_len + new_tokens + 1, mesh=mesh,
                     kernels=kernels, overlap=overlap)
        t0 = time.perf_counter()
        eng.generate(prompts, full)
        eng.generate(prompts, first)
        warm = time.perf_counter() - t0
        eng.reset_stats()

        def timed(params):
            best, out = float("inf"), None
            for _ in range(repeats):
                t = time.perf_counter()
                out = eng.generate(prompts, params)
                best = min(best, time.perf_counter() - t)
            return best, out

        t_full, outs = timed(full)
        t_prefill, _ = timed(first)
        n_new = sum(len(o.token_ids) for o in outs)
        t_decode = max(t_full - t_prefill, 1e-9)
        rows.append(dict(batch=B, prompt_len=prompt_len, new_tokens=n_new, seconds=t_full,
                         prefill_tokens_per_s=B * prompt_len / t_prefill,
                         decode_tokens_per_s=(n_new - B) / t_decode,
                         ms_per_decode_step=1e3 * t_decode / max(new_tokens - 1, 1),
                         warmup_seconds=warm, compilations=eng.compile_count, overlap=overlap,
                         host_ms_per_step=eng.stats()["host_ms_per_step"],
                         wait_ms_per_step=eng.stats()["wait_ms_per_step"]))
        log.info("batch %d done", B)
    return rows


def format_table(rows) -> str:
    head = (f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/decode step':>15} {'host ms':>8} "
            f"{'warm-up s':>10} {'compiles':>9}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['prefill_tokens_per_s']:>14.1f} {r['decode_tokens_per_s']:>13.1f} "
                     f"{r['ms_per_decode_step']:>15.2f} {r['host_ms_per_step']:>8.2f} {r['warmup_seconds']:>10.1f} "
                     f"{r['compilations']:>9}")
    return "\n".join(lines)


def bench_arguments(p):
    from lingjax.cli_common import add_kernels, int_at_least
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
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


def bench_run(args):
    import jax
    import jax.numpy as jnp
    from lingjax import cli_common as cli

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    if args.json:
        cli.check_output_path(args.json, "--json")      # a bad path fails now, not after the benchmark
    mesh = cli.make_mesh(args)
    if args.random_tiny:
        from flax import nnx
        from lingjax.model import BailingModel
        from lingjax.testing import tiny_config
        model, what = BailingModel(tiny_config(), dtype=dtype, rngs=nnx.Rngs(0), mtp=False), "random tiny model"
        if mesh is not None:
            raise cli.CLIError("--tp needs --model (the random tiny model is not sharded)")
    else:
        from lingjax.engine import load_model
        path = args.model or str(cli.default_model_dir())
        _, model = load_model(path, dtype, mesh=mesh)
        what = path
    cfg = model.cfg
    if args.prompt_len + args.new_tokens + 1 > cfg.max_position_embeddings:
        raise cli.CLIError(f"--prompt-len + --new-tokens exceeds max_position_embeddings={cfg.max_position_embeddings}")
    rows = bench_generate(model, args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          prefill_chunk=args.prefill_chunk, repeats=args.repeats, mesh=mesh,
                          kernels=args.kernels, overlap=not args.no_overlap)
    print(f"lingjax bench: {what}, {args.dtype}, {jax.devices()[0].platform} x{jax.device_count()}, tp={args.tp}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, "
          f"overlap {'off' if args.no_overlap else 'on'}")
    print(format_table(rows))
    if args.json:
        doc = dict(model=what, dtype=args.dtype, device=str(jax.devices()[0]), tp=args.tp, rows=rows)
        cli.write_output_atomic(args.json, lambda f: f.write(json.dumps(doc, indent=2).encode()), "--json")
    return 0
