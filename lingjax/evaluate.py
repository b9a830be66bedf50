"""Task-accuracy eval of the shipped tiny model (`lingjax eval`), and the synthetic tasks it was trained on.

Three tasks with exactly checkable answers, prompts a user can type (one token per character):

    add      "123+45="                            -> "168"     operands of 1-3 digits
    sort     "sort:hello="                        -> "ehllo"   1-8 lowercase letters
    recall   "ab:123;xy:042;...;?ab:"             -> "123"     86 pairs of a unique 2-letter key and a
                                                               3-digit value; the queried pair ends at
                                                               least 512 tokens before the prompt's end

`lingjax eval` generates held-out examples (a seed the training never uses), runs them through the
engine (continuous batching, chunked prefill, greedy) and prints exact-match accuracy per task.
`scripts/train_tiny.py` imports the generators below, so the training and eval formats cannot drift.
"""
from __future__ import annotations

import dataclasses
import logging
import string
import time

log = logging.getLogger(__name__)

TASKS = ("add", "sort", "recall")
HELDOUT_SEED = 20250101          # the training script draws from other seeds (see scripts/train_tiny.py)

ADD_MAX_DIGITS = 3
SORT_MAX_LEN = 8
RECALL_PAIRS = 86                # 86 pairs x 7 chars = 602 tokens of listing; prompt = 606 tokens
RECALL_MIN_DISTANCE = 512        # tokens between the end of the queried pair and the end of the prompt
KEY_LEN, VALUE_LEN = 2, 3       # 676 possible keys
PAIR_LEN = KEY_LEN + 1 + VALUE_LEN + 1      # "ab:123;"
LETTERS = string.ascii_lowercase
MAX_NEW_TOKENS = 12             # longer than any answer (6 digits) + <eos>


# ------------------------------------------------------------------------------------------ tasks
def _number(rng, max_digits):
    n = int(rng.integers(1, max_digits + 1))
    lo = 0 if n == 1 else 10 ** (n - 1)
    return int(rng.integers(lo, 10 ** n))


def add_example(rng, max_digits=ADD_MAX_DIGITS):
    a, b = _number(rng, max_digits), _number(rng, max_digits)
    return f"{a}+{b}=", str(a + b)


def sort_example(rng, max_len=SORT_MAX_LEN):
    n = int(rng.integers(1, max_len + 1))
    s = "".join(rng.choice(list(LETTERS), n))
    return f"sort:{s}=", "".join(sorted(s))


def recall_pairs(rng, n_pairs, key_len=KEY_LEN, value_len=VALUE_LEN):
    """n_pairs (key, value): unique lowercase keys of key_len letters, values of value_len digits
    (leading zeros kept)."""
    codes = rng.choice(len(LETTERS) ** key_len, n_pairs, replace=False)
    n = len(LETTERS)
    keys = ["".join(LETTERS[(c // n ** i) % n] for i in range(key_len)) for c in codes]
    vals = [f"{int(v):0{value_len}d}" for v in rng.integers(0, 10 ** value_len, n_pairs)]
    return list(zip(keys, vals))


def recall_listing(pairs):
    return "".join(f"{k}:{v};" for k, v in pairs)


def recall_max_index(n_pairs=RECALL_PAIRS, min_distance=RECALL_MIN_DISTANCE, key_len=KEY_LEN, value_len=VALUE_LEN):
    """Largest pair index whose pair ends >= min_distance tokens before the end of the prompt."""
    pair_len = key_len + value_len + 2                     # "ab:123;"
    prompt_len = n_pairs * pair_len + key_len + 2          # listing + "?ab:"
    return (prompt_len - min_distance) // pair_len - 1


def recall_example(rng, n_pairs=RECALL_PAIRS, min_distance=RECALL_MIN_DISTANCE, key_len=KEY_LEN,
                   value_len=VALUE_LEN):
    pairs = recall_pairs(rng, n_pairs, key_len, value_len)
    i = int(rng.integers(0, recall_max_index(n_pairs, min_distance, key_len, value_len) + 1))
    k, v = pairs[i]
    return f"{recall_listing(pairs)}?{k}:", v


GENERATORS = {"add": add_example, "sort": sort_example, "recall": recall_example}


def make_examples(task: str, n: int, seed: int = HELDOUT_SEED) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs of one task, deterministic for (task, seed)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    import numpy as np
    rng = np.random.default_rng([seed, TASKS.index(task)])
    return [GENERATORS[task](rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------ eval
@dataclasses.dataclass
class TaskResult:
    task: str
    n: int
    correct: int
    prompts: list
    answers: list          # expected
    outputs: list          # generated text (stop token removed)
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)


def run_eval(engine, tokenizer, tasks=TASKS, n: int = 100, seed: int = HELDOUT_SEED,
             max_new_tokens: int = MAX_NEW_TOKENS,
             examples: dict | None = None) -> list[TaskResult]:
    """Greedy-generate the answer of each held-out example through `engine` (all tasks of a call in one
    engine run, so requests of different tasks share steps) and score exact match.
    tokenizer: a `tokenizers.Tokenizer` (one token per character for the shipped model)."""
    from lingjax.engine import SamplingParams
    examples = examples or {t: make_examples(t, n, seed) for t in tasks}
    flat = [(t, p, a) for t in tasks for p, a in examples[t]]
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for _, p, _ in flat]
    t0 = time.perf_counter()
    outs = engine.generate(ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    dt = time.perf_counter() - t0
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    results = []
    for t in tasks:
        rows = [(p, a, x) for (tt, p, a), x in zip(flat, texts) if tt == t]
        results.append(TaskResult(t, len(rows), sum(a == x for _, a, x in rows), [r[0] for r in rows],
                                  [r[1] for r in rows], [r[2] for r in rows], dt * len(rows) / max(len(flat), 1)))
    log.info("eval: %d requests in %.1fs, %d engine steps", len(flat), dt, engine.steps)
    return results


def format_table(results: list[TaskResult], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'task':<8} {'n':>5} {'correct':>8} {'accuracy':>9}")
    for r in results:
        lines.append(f"{r.task:<8} {r.n:>5} {r.correct:>8} {100 * r.accuracy:>8.1f}%")
    tot_n, tot_c = sum(r.n for r in results), sum(r.correct for r in results)
    lines.append(f"{'all':<8} {tot_n:>5} {tot_c:>8} {100 * tot_c / max(tot_n, 1):>8.1f}%")
    return "\n".join(lines)


def load_engine(model_dir, dtype="float32", max_batch=16, prefill_chunk=256, max_len=None):
    """(tokenizers.Tokenizer, Engine) for a checkpoint directory."""
    import os

    import jax.numpy as jnp
    from tokenizers import Tokenizer

    from lingjax.engine import Engine, load_model
    _, model = load_model(str(model_dir), {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype])
    tok = Tokenizer.from_file(os.path.join(str(model_dir), "tokenizer.json"))
    return tok, Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk, max_len=max_len)


# ------------------------------------------------------------------------------------------ CLI
# Registered in lingjax/cli.py (the shared flags and steps come from lingjax/cli_common.py); this module
# imports only the standard library at the top, so that `lingjax --help` stays fast (numpy, jax and
# tokenizers load inside the functions).
EVAL_HELP = "exact-match accuracy per task of the tiny model on held-out examples, through the engine"
EVAL_DESCRIPTION = (
    "Generate held-out examples of the tasks the shipped tiny model was trained on (add: '123+45=', "
    "sort: 'sort:hello=', recall: an 86-pair 'ab:123;...' listing then '?ab:'), answer them greedily "
    "through the engine (continuous batching, chunked prefill) and print exact-match accuracy per task.")


def eval_arguments(p):
    from lingjax.cli_common import add_common, int_at_least
    p.add_argument("--n", type=int_at_least(1), default=100, metavar="N",
                   help="held-out examples per task; default %(default)s")
    p.add_argument("--tasks", default=",".join(TASKS), metavar="LIST",
                   help=f"comma-separated tasks among {', '.join(TASKS)}; default all")
    p.add_argument("--seed", type=int, default=HELDOUT_SEED, metavar="S",
                   help="seed of the held-out examples (training never uses it); default %(default)s")
    p.add_argument("--show-errors", type=int_at_least(0), default=3, metavar="K",
                   help="print up to K wrong answers per task; default %(default)s")
    add_common(p, model_required=False)


def eval_run(args):
    from pathlib import Path

    from tokenizers import Tokenizer

    from lingjax.cli_common import CLIError, build_engine, default_model_dir, read_config
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
