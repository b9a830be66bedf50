"""`lingjax eval`: exact-match accuracy per task of the shipped tiny model (lingjax/evaluate.py) on
held-out examples, through the engine.

    lingjax eval [--model PATH] [--n 100] [--tasks add,sort,recall] [--seed S] [--show-errors K] ...

Imports only the standard library, lingjax.cli.common and lingjax.evaluate at the top (numpy, jax and
tokenizers load inside `run`), so that `lingjax --help` stays fast.
"""
from __future__ import annotations

import logging
from pathlib import Path

from lingjax.cli.common import CLIError, add_common, build_engine, default_model_dir, int_at_least, read_config
from lingjax.evaluate import HELDOUT_SEED, MAX_NEW_TOKENS, TASKS, format_table, make_examples, run_eval

log = logging.getLogger("lingjax.evaluate")

HELP = "exact-match accuracy per task of the tiny model on held-out examples, through the engine"
DESCRIPTION = (
    "Generate held-out examples of the tasks the shipped tiny model was trained on (add: '123+45=', "
    "sort: 'sort:hello=', recall: an 86-pair 'ab:123;...' listing then '?ab:'), answer them greedily "
    "through the engine (continuous batching, chunked prefill) and print exact-match accuracy per task.")


def add_arguments(p):
    p.add_argument("--n", type=int_at_least(1), default=100, metavar="N",
                   help="held-out examples per task; default %(default)s")
    p.add_argument("--tasks", default=",".join(TASKS), metavar="LIST",
                   help=f"comma-separated tasks among {', '.join(TASKS)}; default all")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, metavar="S",
                   help="seed of the held-out examples (training never uses it); default %(default)s")
    p.add_argument("--show-errors", type=int_at_least(0), default=3, metavar="K",
                   help="print up to K wrong answers per task; default %(default)s")
    add_common(p, model_required=False)


def run(args):
    from tokenizers import Tokenizer
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise CLIError(f"--tasks {args.tasks}: unknown task(s) {', '.join(bad) or '(none)'}; tasks: {', '.join(TASKS)}")
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise CLIError(f"--model {model_dir}: no such directory")
    if not (model_dir / "tokenizer.json").is_file():
        raise CLIError(f"{model_dir} has no tokenizer.json; eval needs the checkpoint's tokenizer")
    cfg = read_config(model_dir)
    examples = {t: make_examples(t, args.n, args.seed) for t in tasks}
    need = max(len(p) for ex in examples.values() for p, _ in ex) + MAX_NEW_TOKENS + 1
    # Default context: what the longest example needs (rounded up to 64), not the model's maximum:
    # the MLA cache is read up to max_len every step.
    max_len = args.max_len or min(-(-need // 64) * 64, cfg.max_position_embeddings)
    if need > max_len:
        raise CLIError(f"the longest prompt needs a context of {need} tokens; --max-len is {max_len}")
    if max_len > cfg.max_position_embeddings:
        raise CLIError(f"--max-len {max_len} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    _, eng = build_engine(args, model_dir, max_len)
    results = run_eval(eng, tok, tasks, examples=examples)
    print(format_table(results, f"{model_dir.name}  dtype={args.dtype} max_batch={args.max_batch} "
                                f"prefill_chunk={args.prefill_chunk} n={args.n} seed={args.seed}"))
    for r in results:
        wrong = [(p, a, x) for p, a, x in zip(r.prompts, r.answers, r.outputs) if a != x][: args.show_errors]
        for p, a, x in wrong:
            shown = p if len(p) <= 40 else p[:16] + "..." + p[-20:]
            print(f"  {r.task} wrong: {shown!r} expected {a!r} got {x!r}")
    log.info("%d engine steps, %d compilations", eng.steps, eng.compile_count)
