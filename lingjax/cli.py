"""The `lingjax` command line (DESIGN.md "Public interface").

    lingjax score --model PATH --tokens IN.json --out OUT.npz [--prefill-chunk N] [--max-batch B] ...
    lingjax generate [--model PATH] --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] ...

Each command is a `Command` in the `COMMANDS` registry: a name, a help line, a function that adds its
flags to an argparse parser and a function that runs it. Commands of other modules (convert, export,
bench, eval) register themselves with `register(...)` below, importing their heavy modules lazily
inside `run` so `lingjax --help` stays fast.

Errors: a wrong command line exits 2, anything else that fails (bad input file, missing model, a
prompt that does not fit) exits 1; both print one line `lingjax: error: ...` on stderr, never a
traceback (`--debug` shows it). Diagnostics go through `logging` (`-v` for INFO, `--debug` for DEBUG).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from lingjax.cli_common import (  # noqa: F401  (the shared pieces, under the names this module always used)
    CHECKPOINTS_DIR, DEFAULT_CHECKPOINT, REPO_ROOT, CLIError, default_model_dir)
from lingjax.cli_common import add_common as _add_common
from lingjax.cli_common import add_speculative
from lingjax.cli_common import build_engine as _engine
from lingjax.cli_common import first_line as _first_line
from lingjax.cli_common import float_in as _float_in
from lingjax.cli_common import int_at_least as _int_at_least
from lingjax.cli_common import max_len_for as _max_len
from lingjax.cli_common import progress_bar as _progress_bar
from lingjax.cli_common import read_config as _read_config
from lingjax.cli_common import check_output_path, write_output_atomic  # noqa: F401

log = logging.getLogger("lingjax")


# ------------------------------------------------------------------------------------------ registry
@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments, run, description: str | None = None) -> None:
    """Add a subcommand: `add_arguments(parser)` declares its flags, `run(args)` runs it (returns the
    exit status or None for 0; raise CLIError / EngineError for a one-line error)."""
    COMMANDS[name] = Command(name, help, add_arguments, run, description)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `lingjax: error: ...` and exit status 2."""

    def error(self, message):
        self.exit(2, f"lingjax: error: {message} (see `{self.prog} --help`)\n")


# ------------------------------------------------------------------------------------------ score
def _score_arguments(p):
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
    _add_common(p, model_required=True)


def _load_token_lists(path):
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


def _write_npz_atomic(out, arrays):
    import numpy as np
    write_output_atomic(out, lambda f: np.savez(f, **arrays))


def _score_run(args):
    from lingjax.engine import check_token_lists
    data = _load_token_lists(args.tokens)
    check_output_path(args.out)
    cfg = _read_config(args.model) if os.path.isdir(args.model) else None
    if cfg is None:
        raise CLIError(f"--model {args.model}: no such directory")
    max_len = _max_len(args, cfg)
    # Validate before loading any weights: a bad input file fails in a second, not after the load.
    seqs = check_token_lists(data, vocab_size=cfg.vocab_size, max_len=max_len, what="sequence")
    if args.mtp and args.tp > 1:
        raise CLIError("--mtp does not support --tp > 1 yet")
    _, eng = _engine(args, args.model, max_len)
    with _progress_bar(len(seqs), "scoring", enabled=len(seqs) > 1) as bar:
        logits = eng.score(seqs, progress=bar.update)
    arrays = {f"logits_{i}": l for i, l in enumerate(logits)}
    if args.mtp:
        from lingjax.speculative import mtp_score
        arrays.update({f"mtp_logits_{i}": l for i, l in enumerate(mtp_score(eng.model, seqs))})
    import jax
    if jax.process_index() == 0:                    # multi-host: process 0 writes the file
        _write_npz_atomic(args.out, arrays)
        log.info("scored %d sequences (%d tokens) in %d steps, %d compilations; wrote %s", len(seqs),
                 sum(map(len, seqs)), eng.steps, eng.compile_count, args.out)


# ------------------------------------------------------------------------------------------ generate
def _generate_arguments(p):
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text; repeat the flag for several prompts (batched, with a progress bar)")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="read more prompts from FILE, one per line (empty lines skipped); '-' reads stdin")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message with the checkpoint's chat template "
                        "(tokenizer_config.json chat_template, or chat_template.jinja)")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the user message")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=128, metavar="N",
                   help="stop after N new tokens; default %(default)s")
    p.add_argument("--temperature", type=_float_in(0.0, None, name="temperature"), default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy (argmax); default %(default)s")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, metavar="K",
                   help="sample among the K most likely tokens; 0 = off; default %(default)s")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True, name="top_p"), default=1.0, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P; 1.0 = off; "
                        "default %(default)s")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed; a run is reproducible for a seed, whatever the batching; default %(default)s")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per prompt (prompt, text, token_ids, finish_reason) instead of text")
    add_speculative(p)
    _add_common(p, model_required=False)


def _tokenizer(model_dir):
    from lingjax.tokenizer import Tokenizer, TokenizerError
    try:
        return Tokenizer(model_dir)
    except TokenizerError as e:
        raise CLIError(str(e)) from None


def _encode(tok, text, chat=False, system=None, what="prompt") -> list[int]:
    """A prompt's ids: the text as is, or (chat) one user message after an optional system message.
    Characters the tokenizer cannot encode become its unknown token: a warning says how many."""
    if chat:
        from lingjax.tokenizer import TokenizerError
        try:
            text = tok.chat(text, system)
        except TokenizerError as e:
            raise CLIError(f"--chat: {e}") from None
    ids = tok.encode(text, add_special_tokens=not chat)
    unk = tok.hf.unk_token or getattr(tok.hf.backend_tokenizer.model, "unk_token", None)
    unk_id = tok.hf.convert_tokens_to_ids(unk) if unk else None
    if unk is not None and unk_id is not None:
        n = ids.count(unk_id) - text.count(unk)
        if n > 0:
            log.warning("%s: %d character(s) the tokenizer cannot encode became %r (id %d)", what, n, unk, unk_id)
    return ids


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file == "-" and sys.stdin is None:
        raise CLIError("--prompt-file -: standard input is closed")
    if args.prompt_file:
        try:
            f = sys.stdin if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8")
            with f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise CLIError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise CLIError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({e})") from None
    if not prompts:
        raise CLIError("no prompt: pass --prompt TEXT (or --prompt-file FILE)")
    for i, p in enumerate(prompts):     # bytes that were not UTF-8 reach Python as lone surrogates
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise CLIError(f"prompt {i} ({ascii(p)[:60]}): not valid UTF-8 text") from None
    return prompts


class _Streamer:
    """Prints one request's text as its tokens arrive (never half of a multi-byte character)."""

    def __init__(self, tok, out=None):
        self.detok, self.out = tok.detokenizer(), out or sys.stdout

    def __call__(self, _index, token):
        piece = self.detok.add([token])
        if piece:
            self.out.write(piece)
            self.out.flush()

    def finish(self):
        self.out.write(self.detok.flush() + "\n")
        self.out.flush()


class _FinishedRequests:
    """An on_token callback that keeps each request's tokens and notes when it is finished, by the
    engine's own rules (a stop token, max_new_tokens, a full context), so that an interrupted run can
    still print the results that were complete."""

    def __init__(self, prompts, params, max_len):
        self.prompt_len = [len(p) for p in prompts]
        self.params, self.max_len = params, max_len
        self.stop = frozenset(() if params.ignore_eos else params.stop_token_ids or ())
        self.tokens = [[] for _ in prompts]
        self.finished: dict[int, tuple[list[int], str]] = {}

    def __call__(self, i, token):
        toks = self.tokens[i]
        toks.append(token)
        if token in self.stop:
            self.finished[i] = (toks, "stop")
        elif len(toks) >= self.params.max_new_tokens or self.prompt_len[i] + len(toks) >= self.max_len:
            self.finished[i] = (toks, "length")


def _print_result(args, i, prompt, text, token_ids, finish_reason):
    if args.jsonl:
        print(json.dumps({"index": i, "prompt": prompt, "text": text, "token_ids": token_ids,
                          "finish_reason": finish_reason}, ensure_ascii=False), flush=True)
    else:
        print(f"=== {i} ===\n{text}", flush=True)


def _generate_run(args):
    from lingjax.engine import SamplingParams, check_token_lists
    if args.system and not args.chat:
        raise CLIError("--system needs --chat")
    prompts = _read_prompts(args)
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise CLIError(f"--model {model_dir}: no such directory")
    cfg = _read_config(model_dir)
    max_len = _max_len(args, cfg)
    tok = _tokenizer(model_dir)
    ids = [_encode(tok, p, chat=args.chat, system=args.system, what=f"prompt {i}") for i, p in enumerate(prompts)]
    ids = check_token_lists(ids, vocab_size=cfg.vocab_size, max_len=max_len, what="prompt", room=1)
    stop = tok.eos_token_ids          # config.json, generation_config.json and the tokenizer's EOS
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=min(args.top_k, cfg.vocab_size),      # k >= vocab: the filter is off
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                            stop_token_ids=stop)
    _, eng = _engine(args, model_dir, max_len)
    if len(ids) == 1 and not args.jsonl:
        streamer = _Streamer(tok)
        try:
            out = eng.generate(ids, params, on_token=streamer)[0]
        except KeyboardInterrupt:      # the text so far is on the screen: end its line
            sys.stdout.write("\n")
            raise
        streamer.finish()
        outs = [out]
    else:
        done = _FinishedRequests(ids, params, max_len)
        try:
            with _progress_bar(len(ids), "generating") as bar:
                outs = eng.generate(ids, params, progress=bar.update, on_token=done)
        except KeyboardInterrupt:       # Ctrl-C: print what is finished, then exit 130
            for i, (token_ids, reason) in sorted(done.finished.items()):
                _print_result(args, i, prompts[i], tok.decode(token_ids), token_ids, reason)
            log.warning("interrupted: printed the %d of %d results that were finished", len(done.finished), len(ids))
            raise
        for i, (p, o) in enumerate(zip(prompts, outs)):
            _print_result(args, i, p, tok.decode(o.token_ids), o.token_ids, o.finish_reason)
    n_new = sum(len(o.token_ids) for o in outs)
    log.info("generated %d tokens for %d prompts in %d steps, %d compilations", n_new, len(outs), eng.steps,
             eng.compile_count)


register("score", "teacher-forced next-token logits of token sequences, to an .npz",
         _score_arguments, _score_run,
         description="Score token sequences: OUT.npz gets logits_i, float32 [len_i, vocab], row t holding the "
                     "next-token logits after the first t+1 tokens of sequence i, computed by the same engine "
                     "step as generate (continuous batching, chunked prefill).")
register("generate", "generate text from prompts", _generate_arguments, _generate_run,
         description="Generate a continuation of each prompt. One prompt streams its text to stdout; several "
                     "show a progress bar and print each result. Stops at the end-of-sequence token, after "
                     "--max-new-tokens, or when the context (--max-len) is full.")

from lingjax import convert as _convert   # noqa: E402  (stdlib imports only; numpy/jax/orbax load inside run)

register("convert", _convert.CONVERT_HELP, _convert.convert_arguments, _convert.convert_run,
         description="Convert an HF checkpoint directory to a lingjax (Orbax) one, tensor by tensor with bounded "
                     "memory; every name, shape and dtype is checked against config.json first, and DST appears "
                     "only when complete.")
register("export", _convert.EXPORT_HELP, _convert.export_arguments, _convert.export_run,
         description="Write a lingjax checkpoint back in the HF layout (safetensors shards + index, config and "
                     "tokenizer files), one tensor at a time.")

from lingjax import evaluate as _evaluate   # noqa: E402  (stdlib imports only; numpy/jax load inside run)

register("eval", _evaluate.EVAL_HELP, _evaluate.eval_arguments, _evaluate.eval_run,
         description=_evaluate.EVAL_DESCRIPTION)


from lingjax import bench as _bench   # noqa: E402  (stdlib imports only; jax loads inside run)

register("bench", _bench.BENCH_HELP, _bench.bench_arguments, _bench.bench_run,
         description=_bench.BENCH_DESCRIPTION)


from lingjax import serve_cli as _serve_cli   # noqa: E402  (stdlib imports only; the server loads inside run)

register("serve", _serve_cli.SERVE_HELP, _serve_cli.serve_arguments, _serve_cli.serve_run,
         description=_serve_cli.SERVE_DESCRIPTION)


# ------------------------------------------------------------------------------------------ main
PRINTING_COMMANDS = ("generate", "eval", "bench")     # their results go to stdout


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lingjax", description="BailingMoE V2.5 (Ling-2.5 / Ling-2.6 / Ring-2.5) in JAX.",
                     epilog="Exit status: 0 success, 1 failure (bad input, missing model), 2 wrong command line.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, description=c.description or c.help)
        c.add_arguments(p)
        p.set_defaults(_run=c.run)
    return parser


def _setup_logging(args) -> None:
    level = logging.DEBUG if getattr(args, "debug", False) else \
        logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("lingjax: %(message)s"))
    root = logging.getLogger("lingjax")
    root.handlers[:] = [h]
    root.setLevel(level)
    root.propagate = False


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.error("choose a command")
    _setup_logging(args)
    from lingjax.checkpoint import CheckpointError
    from lingjax.config import ConfigError
    try:
        from lingjax.engine import EngineError
    except ImportError:          # keep errors one line even if JAX itself cannot be imported
        EngineError = CLIError
    try:
        if sys.stdout is None and args.command in PRINTING_COMMANDS:
            raise CLIError("standard output is closed: nowhere to print the results")
        rc = args._run(args)
        return int(rc or 0)
    except KeyboardInterrupt as e:     # Ctrl-C, or SIGTERM where a command turns it into this (convert)
        print("lingjax: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except (CLIError, EngineError, CheckpointError, ConfigError, OSError) as e:
        if args.debug:
            raise
        print(f"lingjax: error: {_first_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:       # a bug: still one line, the traceback on --debug
        if args.debug:
            raise
        print(f"lingjax: error: internal error: {type(e).__name__}: {_first_line(e)} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # `python -m lingjax.cli`: run the imported module's main, so that the CLIError the commands
    # import from lingjax.cli is the class main() catches (this file as __main__ is a second copy).
    from lingjax import cli as _cli
    sys.exit(_cli.main())
