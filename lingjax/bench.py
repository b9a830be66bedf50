"""End-to-end engine throughput (prefill and decode tokens/s) at several batch sizes.

    lingjax bench [--model PATH | --random-tiny] --batch 1 8 --prompt-len 128 --new-tokens 64

For each batch size B: one warm-up run of B identical-length random prompts (it compiles every step
shape the run needs; its time and the compilations are reported), then `--repeats` timed runs
(min taken). Decode tokens/s counts generated tokens over the time of the full generate run minus a
prefill-only run (1 new token); prefill tokens/s is the prompt tokens over that prefill-only run.
"host ms" is the host's time per step scheduling, packing and dispatching (Engine.stats(); with
overlap, the default, it runs while the device computes the previous step; `--no-overlap` turns that
off; with `--decode-steps N` a step is a dispatch, which may run up to N decode steps). `lingjax bench` (lingjax/cli/bench.py) prints the table; `--json` writes the rows.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def bench_generate(model, batches, *, prompt_len, new_tokens, prefill_chunk, repeats=3, temperature=0.0,
                   mesh=None, seed=0, kernels=None, overlap=True, decode_steps=1):
    """Rows of measurements, one per batch size (see the module docstring)."""
    import numpy as np
    from lingjax.engine import Engine, SamplingParams

    rng = np.random.default_rng(seed)
    rows = []
    for B in batches:
        prompts = [rng.integers(3, model.cfg.vocab_size, prompt_len).tolist() for _ in range(B)]
        full = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, seed=seed, ignore_eos=True)
        first = SamplingParams(max_new_tokens=1, temperature=temperature, seed=seed, ignore_eos=True)
        eng = Engine(model, max_batch=B, prefill_chunk=prefill_chunk, max_len=prompt_len + new_tokens + 1, mesh=mesh,
                     kernels=kernels, overlap=overlap, decode_steps=decode_steps)
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
                         decode_steps=decode_steps,
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
