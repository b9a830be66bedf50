"""`lingjax generate`: generate text from prompts.

    lingjax generate [--model PATH] --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] ...

One prompt streams its text to stdout; several show a progress bar and print each result (Ctrl-C
prints the results that were finished). Imports only the standard library and lingjax.cli.common at
the top (the tokenizer, the engine and JAX load inside `run`), so that `lingjax --help` stays fast.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from lingjax.cli.common import (CLIError, add_common, add_decode_steps, add_speculative, build_engine, default_model_dir, float_in,
                                int_at_least, max_len_for, progress_bar, read_config)

log = logging.getLogger("lingjax")

HELP = "generate text from prompts"
DESCRIPTION = ("Generate a continuation of each prompt. One prompt streams its text to stdout; several "
               "show a progress bar and print each result. Stops at the end-of-sequence token, after "
               "--max-new-tokens, or when the context (--max-len) is full.")


def add_arguments(p):
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="prompt text; repeat the flag for several prompts (batched, with a progress bar)")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="read more prompts from FILE, one per line (empty lines skipped); '-' reads stdin")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message with the checkpoint's chat template "
                        "(tokenizer_config.json chat_template, or chat_template.jinja)")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the user message")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=128, metavar="N",
                   help="stop after N new tokens; default %(default)s")
    p.add_argument("--temperature", type=float_in(0.0, None, name="temperature"), default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy (argmax); default %(default)s")
    p.add_argument("--top-k", type=int_at_least(0), default=0, metavar="K",
                   help="sample among the K most likely tokens; 0 = off; default %(default)s")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True, name="top_p"), default=1.0, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P; 1.0 = off; "
                        "default %(default)s")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed; a run is reproducible for a seed, whatever the batching; default %(default)s")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--jsonl", action="store_true",
                   help="print one JSON object per prompt (prompt, text, token_ids, finish_reason) instead of text")
    add_speculative(p)
    add_decode_steps(p)
    add_common(p, model_required=False)


def tokenizer(model_dir):
    from lingjax.tokenizer import Tokenizer, TokenizerError
    try:
        return Tokenizer(model_dir)
    except TokenizerError as e:
        raise CLIError(str(e)) from None


def encode(tok, text, chat=False, system=None, what="prompt") -> list[int]:
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


def read_prompts(args) -> list[str]:
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


class Streamer:
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


class FinishedRequests:
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


def print_result(args, i, prompt, text, token_ids, finish_reason):
    if args.jsonl:
        print(json.dumps({"index": i, "prompt": prompt, "text": text, "token_ids": token_ids,
                          "finish_reason": finish_reason}, ensure_ascii=False), flush=True)
    else:
        print(f"=== {i} ===\n{text}", flush=True)


def run(args):
    from lingjax.engine import SamplingParams, check_token_lists
    if args.system and not args.chat:
        raise CLIError("--system needs --chat")
    prompts = read_prompts(args)
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise CLIError(f"--model {model_dir}: no such directory")
    cfg = read_config(model_dir)
    max_len = max_len_for(args, cfg)
    tok = tokenizer(model_dir)
    ids = [encode(tok, p, chat=args.chat, system=args.system, what=f"prompt {i}") for i, p in enumerate(prompts)]
    ids = check_token_lists(ids, vocab_size=cfg.vocab_size, max_len=max_len, what="prompt", room=1)
    stop = tok.eos_token_ids          # config.json, generation_config.json and the tokenizer's EOS
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=min(args.top_k, cfg.vocab_size),      # k >= vocab: the filter is off
                            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                            stop_token_ids=stop)
    _, eng = build_engine(args, model_dir, max_len)
    if len(ids) == 1 and not args.jsonl:
        streamer = Streamer(tok)
        try:
            out = eng.generate(ids, params, on_token=streamer)[0]
        except KeyboardInterrupt:      # the text so far is on the screen: end its line
            sys.stdout.write("\n")
            raise
        streamer.finish()
        outs = [out]
    else:
        done = FinishedRequests(ids, params, max_len)
        try:
            with progress_bar(len(ids), "generating") as bar:
                outs = eng.generate(ids, params, progress=bar.update, on_token=done)
        except KeyboardInterrupt:       # Ctrl-C: print what is finished, then exit 130
            for i, (token_ids, reason) in sorted(done.finished.items()):
                print_result(args, i, prompts[i], tok.decode(token_ids), token_ids, reason)
            log.warning("interrupted: printed the %d of %d results that were finished", len(done.finished), len(ids))
            raise
        for i, (p, o) in enumerate(zip(prompts, outs)):
            print_result(args, i, p, tok.decode(o.token_ids), o.token_ids, o.finish_reason)
    n_new = sum(len(o.token_ids) for o in outs)
    log.info("generated %d tokens for %d prompts in %d steps, %d compilations", n_new, len(outs), eng.steps,
             eng.compile_count)
