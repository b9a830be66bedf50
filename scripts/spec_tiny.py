#!/usr/bin/env python
"""Speculative decoding on the shipped tiny model: acceptance rate and tokens per step on the eval tasks.

    .venv/bin/python scripts/spec_tiny.py [--model checkpoints/ling-tiny] [--n 30] [--out scripts/results/spec_tiny.json]

Runs the held-out eval examples (lingjax/evaluate.py: add, sort, recall) greedily through the plain
engine and through speculative engines with k = 1, 2, 3 drafts from the MTP layer; checks that every
speculative output equals the plain output token for token, and reports per k: acceptance rate (accepted
drafts / proposed drafts), tokens per decoding step (tokens emitted per verify of one request, 1 .. k+1),
engine steps, exact-match accuracy. float32, CPU; JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO, "checkpoints", "ling-tiny"))
    ap.add_argument("--n", type=int, default=30, help="held-out examples per task")
    ap.add_argument("--ks", default="1,2,3", help="draft counts to measure")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(REPO, "scripts", "results", "spec_tiny.json"))
    args = ap.parse_args(argv)

    import jax.numpy as jnp
    from tokenizers import Tokenizer

    from lingjax import evaluate as ev
    from lingjax.engine import Engine, load_model

    _, model = load_model(args.model, jnp.float32, mtp=True)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    examples = {t: ev.make_examples(t, args.n) for t in ev.TASKS}
    need = max(len(p) for ex in examples.values() for p, _ in ex) + ev.MAX_NEW_TOKENS + 1
    max_len = -(-need // 64) * 64
    rows = []
    ref = None
    for k in [0] + [int(x) for x in args.ks.split(",")]:
        eng = Engine(model, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, max_len=max_len,
                     num_speculative_tokens=k)
        t0 = time.perf_counter()
        res = ev.run_eval(eng, tok, examples=examples)
        dt = time.perf_counter() - t0
        outs = [o for r in res for o in r.outputs]
        if ref is None:
            ref = outs
        st = eng.stats()
        row = dict(k=k, accuracy={r.task: r.accuracy for r in res}, steps=eng.steps,
                   generated_tokens=st["generated_tokens"], seconds_incl_compile=round(dt, 1),
                   same_as_plain=outs == ref)
        if k:
            row.update(acceptance_rate=st["acceptance_rate"], tokens_per_step=st["tokens_per_step"],
                       drafts=st["spec_drafts"], accepted=st["spec_accepted"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=os.path.relpath(args.model, REPO), n_per_task=args.n, max_batch=args.max_batch,
                       prefill_chunk=args.prefill_chunk, dtype="float32", runs=rows), f, indent=1)
    print(f"wrote {args.out}")
    return 0 if all(r["same_as_plain"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
