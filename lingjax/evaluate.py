"""Task-accuracy eval of the shipped tiny model (run by `lingjax eval`), and the synthetic tasks it was trained on.

Three tasks with exactly checkable answers, prompts a user can type (one token per character):

    add      "123+45="                            -> "168"     operands of 1-3 digits
    sort     "sort:hello="                        -> "ehllo"   1-8 lowercase letters
    recall   "ab:123;xy:042;...;?ab:"             -> "123"     86 pairs of a unique 2-letter key and a
                                                               3-digit value; the queried pair ends at
                                                               least 512 tokens before the prompt's end

`lingjax eval` (lingjax/cli/eval.py) generates held-out examples (a seed the training never uses),
runs them through the engine (continuous batching, chunked prefill, greedy) and prints exact-match
accuracy per task.
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
