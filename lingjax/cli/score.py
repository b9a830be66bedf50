"""`lingjax score`: teacher-forced next-token logits of token sequences, to an .npz.

    lingjax score --model PATH --tokens IN.json --out OUT.npz [--prefill-chunk N] [--max-batch B] ...

Imports only the standard library and lingjax.cli.common at the top (the engine and JAX load inside
`run`), so that `lingjax --help` stays fast.
"""
from __future__ import annotations

import json
import logging
import os

from lingjax.cli.common import (CLIError, add_common, build_engine, check_output_path, max_len_for,
                                progress_bar, read_config, write_output_atomic)

log = logging.getLogger("lingjax")

HELP = "teacher-forced next-token logits of token sequences, to an .npz"
DESCRIPTION = ("Score token sequences: OUT.npz gets logits_i, float32 [len_i, vocab], row t holding the "
               "next-token logits after the first t+1 tokens of sequence i, computed by the same engine "
               "step as generate (continuous batching, chunked prefill).")


def add_arguments(p):
    p.add_argument("--tokens", required=True, metavar="IN.json",
                   help="a JSON list of token-id lists, e.g. [[1, 2, 3], [4, 5]]")
    p.add_argument("--out", required=True, metavar="OUT.npz",
                   help="output .npz with logits_0, logits_1, ...: float32 [len_i, vocab], the teacher-forced "
                        "next-token logits of each sequence (row t predicts token t+1); written atomically")
    p.add_argument("--mtp", action="store_true",
                   help="also write mtp_logits_i, float32 [len_i, vocab]: the MTP layer's logits, row t from the "
                        "main model's final-norm hidden state at t and the embedding of token t+1 (token id 0 at "
                        "the last row), causal over positions 0..t (row t predicts token t+2); needs the "
                        "checkpoint's MTP layer; not with --tp > 1")
    add_common(p, model_required=True)


def load_token_lists(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CLIError(f"--tokens {path}: no such file") from None
    except IsADirectoryError:
        raise CLIError(f"--tokens {path}: is a directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"--tokens {path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CLIError(f"--tokens {path}: JSON nested too deeply (expected a list of token-id lists)") from None
    if not isinstance(data, list) or not data:
        raise CLIError(f"--tokens {path}: expected a non-empty JSON list of token-id lists")
    return data


def write_npz_atomic(out, arrays):
    import numpy as np
    write_output_atomic(out, lambda f: np.savez(f, **arrays))


def run(args):
    from lingjax.engine import check_token_lists
    data = load_token_lists(args.tokens)
    check_output_path(args.out)
    cfg = read_config(args.model) if os.path.isdir(args.model) else None
    if cfg is None:
        raise CLIError(f"--model {args.model}: no such directory")
    max_len = max_len_for(args, cfg)
    # Validate before loading any weights: a bad input file fails in a second, not after the load.
    seqs = check_token_lists(data, vocab_size=cfg.vocab_size, max_len=max_len, what="sequence")
    if args.mtp and args.tp > 1:
        raise CLIError("--mtp does not support --tp > 1 yet")
    _, eng = build_engine(args, args.model, max_len)
    with progress_bar(len(seqs), "scoring", enabled=len(seqs) > 1) as bar:
        logits = eng.score(seqs, progress=bar.update)
    arrays = {f"logits_{i}": l for i, l in enumerate(logits)}
    if args.mtp:
        from lingjax.speculative import mtp_score
        arrays.update({f"mtp_logits_{i}": l for i, l in enumerate(mtp_score(eng.model, seqs))})
    import jax
    if jax.process_index() == 0:                    # multi-host: process 0 writes the file
        write_npz_atomic(args.out, arrays)
        log.info("scored %d sequences (%d tokens) in %d steps, %d compilations; wrote %s", len(seqs),
                 sum(map(len, seqs)), eng.steps, eng.compile_count, args.out)
