"""Soak test of the engine: thousands of random requests through one continuous-batching engine, each
answer checked against the same request run alone.

    python scripts/soak.py [--requests 2000] [--max-batch 4] [--prefill-chunk 8] [--model checkpoints/ling-tiny]
                           [--dtype float32] [--seed 0] [--json scripts/results/soak.json]

Requests come in waves of 1 to 3 * max_batch, each wave a `generate` (every request with its own
random SamplingParams: greedy or sampled, top-k, top-p, seed, ignore_eos, 1-16 new tokens) or a
`score` call, with random prompt lengths (1-48 tokens); more requests than slots queue, so prefill
chunks and decodes of different requests share steps. Every request is then run alone on a second
engine (max_batch 1, prefill chunk 16: other chunk boundaries too; at the same index in its call, as a
sample's random key depends on it) and compared:
- generate: the token ids must be equal. A difference is classified by the alone run's logits at the
  first differing position (scored alone): the gap between the two tokens, relative to the largest
  logit. Floating-point rounding (~1e-5 relative in float32) moves logits only by that much, so a
  greedy flip with a larger gap is a bug, and so is any flip of a sampled token (counted as such).
- score: max |logits - logits alone| / max |logits alone| per request, must stay below 1e-4 (float32).
At the end: compilations (must stay within the shapes `Engine.buckets()` lists), the process RSS
(start, end, largest growth between checkpoints) and the free slots (all of them). Prints a table and
writes the JSON. Uses only the engine's public API (Engine, generate, score, compile_count, buckets).
Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE_TOL = 1e-4           # float32: rounding differences are ~1e-6..1e-5 relative
TIE_TOL = 1e-4             # a greedy flip between logits closer than this (relative) is rounding


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def random_wave(rng, n, cfg, max_len):
    """(kind, prompts, params) for one call of n requests."""
    from lingjax.engine import SamplingParams
    kind = "score" if rng.random() < 0.35 else "generate"
    prompts, params = [], []
    for _ in range(n):
        new = int(rng.integers(1, 17))
        length = int(rng.integers(1, 49))
        if kind == "generate":
            length = min(length, max_len - 1)
        prompts.append(rng.integers(0, cfg.vocab_size, length).tolist())
        greedy = rng.random() < 0.5
        params.append(SamplingParams(
            max_new_tokens=new, temperature=0.0 if greedy else float(rng.choice([0.5, 0.8, 1.0, 1.3])),
            top_k=int(rng.choice([0, 0, 3, 20])), top_p=float(rng.choice([1.0, 1.0, 0.9, 0.6])),
            seed=int(rng.integers(0, 2 ** 31)), ignore_eos=bool(rng.random() < 0.5)))
    return kind, prompts, params


def classify_flip(alone, prompt, ours, theirs, greedy):
    """A differing generation: the alone run's logits where the two first differ."""
    k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b) if ours[:len(theirs)] != theirs[:len(ours)] \
        else min(len(ours), len(theirs))
    if k >= min(len(ours), len(theirs)):
        return {"position": k, "kind": "length differs with equal tokens", "rounding": False}
    row = alone.score([prompt + theirs[:k]])[0][-1]
    scale = float(np.abs(row).max())
    gap = abs(float(row[ours[k]] - row[theirs[k]])) / scale
    return {"position": k, "ours": ours[k], "alone": theirs[k], "relative_logit_gap": gap,
            "kind": "greedy" if greedy else "sampled", "rounding": greedy and gap < TIE_TOL}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests in all (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=4, help="engine under test: requests in flight (default %(default)s)")
    p.add_argument("--prefill-chunk", type=int, default=8, help="engine under test: prefill chunk (default %(default)s)")
    p.add_argument("--model", default=os.path.join(ROOT, "checkpoints", "ling-tiny"), help="checkpoint directory")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="default %(default)s")
    p.add_argument("--max-len", type=int, default=96, help="context per slot (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request stream (default %(default)s)")
    p.add_argument("--json", default=os.path.join(ROOT, "scripts", "results", "soak.json"), help="output JSON")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from lingjax.engine import Engine, SamplingParams, load_model

    t0 = time.perf_counter()
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    cfg, model = load_model(args.model, dtype)
    eng = Engine(model, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, max_len=args.max_len)
    alone = Engine(model, max_batch=1, prefill_chunk=16, max_len=args.max_len)
    rng = np.random.default_rng(args.seed)
    rss = {"start_mb": rss_mb()}
    rss_marks = []
    stats = {"generate": 0, "score": 0, "waves": 0, "new_tokens": 0, "score_tokens": 0}
    flips, score_err, score_worst = [], 0.0, None
    slot_leaks = 0
    done = 0
    while done < args.requests:
        n = min(int(rng.integers(1, 3 * args.max_batch + 1)), args.requests - done)
        kind, prompts, params = random_wave(rng, n, cfg, args.max_len)
        stats["waves"] += 1
        if kind == "score":
            got = eng.score(prompts)
            for i, (pr, g) in enumerate(zip(prompts, got)):
                want = alone.score([pr])[0]
                err = float(np.abs(g - want).max() / np.abs(want).max())
                if err > score_err:
                    score_err, score_worst = err, {"request": done + i, "tokens": len(pr)}
                stats["score_tokens"] += len(pr)
        else:
            got = eng.generate(prompts, params)
            for i, (pr, sp, g) in enumerate(zip(prompts, params, got)):
                # A sample's key is (seed, index in the call, token number): run it alone at the same index,
                # behind i one-token requests (max_batch 1: each runs by itself).
                want = alone.generate([[0]] * i + [pr], [SamplingParams(max_new_tokens=1)] * i + [sp])[-1]
                stats["new_tokens"] += len(g.token_ids)
                if g.token_ids != want.token_ids or g.finish_reason != want.finish_reason:
                    f = classify_flip(alone, pr, g.token_ids, want.token_ids, sp.temperature == 0)
                    f.update(request=done + i, prompt_len=len(pr), temperature=sp.temperature)
                    flips.append(f)
        stats[kind] += n
        free = getattr(getattr(eng, "slots", None), "num_free", None)
        if free is not None and free != eng.num_slots:
            slot_leaks += 1
        done += n
        if done // 250 != (done - n) // 250:
            rss_marks.append((done, rss_mb()))
            print(f"  {done:5d} requests, {time.perf_counter() - t0:6.1f} s, rss {rss_marks[-1][1]:.0f} MB, "
                  f"{len(flips)} differing", file=sys.stderr, flush=True)
    rss["end_mb"] = rss_mb()
    rss["after_first_250_mb"] = rss_marks[0][1] if rss_marks else None
    rss["growth_after_first_250_mb"] = round(rss["end_mb"] - rss_marks[0][1], 1) if rss_marks else None
    shapes = set(eng.buckets())
    compiled = eng.compiled_shapes() if hasattr(eng, "compiled_shapes") else {}
    free = getattr(getattr(eng, "slots", None), "num_free", None)
    unexplained = [f for f in flips if not f["rounding"]]
    result = {
        "command": "python scripts/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": os.path.relpath(args.model, ROOT) if args.model.startswith(ROOT) else args.model,
        "dtype": args.dtype, "device": str(jax.devices()[0]), "max_batch": args.max_batch,
        "prefill_chunk": args.prefill_chunk, "max_len": args.max_len, "seed": args.seed,
        "requests": done, **stats, "seconds": round(time.perf_counter() - t0, 1),
        "generate_differing": len(flips), "generate_differing_unexplained": len(unexplained), "flips": flips,
        "score_max_relative_error": score_err, "score_worst": score_worst,
        "compile_count": eng.compile_count, "compile_bound": len(shapes),
        "compiled_outside_buckets": sorted(map(list, set(compiled) - shapes)),
        "free_slots_end": free, "num_slots": eng.num_slots, "waves_with_slots_in_use_after": slot_leaks,
        "rss_mb": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in rss.items()},
        "rss_marks": [[d, round(m, 1)] for d, m in rss_marks],
    }
    ok = (not unexplained and score_err < SCORE_TOL and eng.compile_count <= len(shapes)
          and not result["compiled_outside_buckets"] and free in (None, eng.num_slots) and not slot_leaks)
    result["ok"] = ok
    rows = [("requests (generate / score)", f"{done} ({stats['generate']} / {stats['score']}) in {stats['waves']} waves"),
            ("tokens generated / scored", f"{stats['new_tokens']} / {stats['score_tokens']}"),
            ("generate differing from alone", f"{len(flips)} ({len(unexplained)} not explained by a near-tie)"),
            ("score max relative error", f"{score_err:.2e} (limit {SCORE_TOL:g})"),
            ("compilations (bound)", f"{eng.compile_count} ({len(shapes)})"),
            ("free slots at the end", f"{free} of {eng.num_slots}"),
            ("RSS start / after 250 / end", f"{rss['start_mb']:.0f} / {rss['after_first_250_mb'] or 0:.0f} / "
                                            f"{rss['end_mb']:.0f} MB"),
            ("time", f"{result['seconds']} s"), ("result", "OK" if ok else "FAILED")]
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{a:<{w}}  {b}" for a, b in rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
