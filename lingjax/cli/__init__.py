"""The `lingjax` command line (DESIGN.md "Public interface"): the argparse tree and the dispatch.

    lingjax score | generate | convert | export | eval | bench | serve  [flags]   (`lingjax COMMAND --help`)

One module per subcommand in this package (score.py, generate.py, convert.py, export.py, eval.py,
bench.py, serve.py), each with HELP, DESCRIPTION, `add_arguments(parser)` and `run(args)`; what they
share (the error type, flag types, the common model/engine flags, flags -> engine, atomic output
files) is common.py. The subcommand modules import only the standard library and common.py at the
top (their heavy modules load inside `run`), so that `lingjax --help` stays fast. `COMMANDS` is the
registry; `register(...)` adds a command.

Errors: a wrong command line exits 2, anything else that fails (bad input file, missing model, a
prompt that does not fit) exits 1; both print one line `lingjax: error: ...` on stderr, never a
traceback (`--debug` shows it). Diagnostics go through `logging` (`-v` for INFO, `--debug` for DEBUG).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable

from lingjax.cli import bench, convert, export, generate, score, serve
from lingjax.cli import eval as eval_
from lingjax.cli.common import CLIError, first_line


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


for _name, _module in (("score", score), ("generate", generate), ("convert", convert), ("export", export),
                       ("eval", eval_), ("bench", bench), ("serve", serve)):
    register(_name, _module.HELP, _module.add_arguments, _module.run, description=_module.DESCRIPTION)

PRINTING_COMMANDS = ("generate", "eval", "bench")     # their results go to stdout


# ------------------------------------------------------------------------------------------ main
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `lingjax: error: ...` and exit status 2."""

    def error(self, message):
        self.exit(2, f"lingjax: error: {message} (see `{self.prog} --help`)\n")


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
        print(f"lingjax: error: {first_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:       # a bug: still one line, the traceback on --debug
        if args.debug:
            raise
        print(f"lingjax: error: internal error: {type(e).__name__}: {first_line(e)} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
