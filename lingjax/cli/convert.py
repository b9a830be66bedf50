"""`lingjax convert`: HF checkpoint directory -> lingjax (Orbax) checkpoint directory (lingjax/convert.py).

    lingjax convert SRC DST [--dtype bfloat16] [--no-mtp] [--quantize fp8-block|fp8-channel] [--overwrite]

Also holds `converter_errors`, the error and signal handling that `lingjax export` shares. Imports
lingjax.convert at the top (standard library and lingjax.checkpoint only; numpy, jax and orbax load
inside its functions), so that `lingjax --help` stays fast.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

from lingjax.cli.common import CLIError
from lingjax.convert import DTYPES

log = logging.getLogger("lingjax.convert")

HELP = "HF checkpoint directory -> lingjax (Orbax) checkpoint directory"
DESCRIPTION = ("Convert an HF checkpoint directory to a lingjax (Orbax) one, tensor by tensor with bounded "
               "memory; every name, shape and dtype is checked against config.json first, and DST appears "
               "only when complete.")


def add_arguments(p) -> None:
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory (config.json, *.safetensors, optional "
                   "model.safetensors.index.json, tokenizer files)")
    p.add_argument("dst", metavar="DST", help="output lingjax checkpoint directory (must not exist, see --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="stored param dtype (expert_bias stays float32); default %(default)s")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP (NextN) layer")
    p.add_argument("--quantize", choices=("fp8-block", "fp8-channel"), default=None,
                   help="store the attention and MLP / expert projections in FP8: fp8-block (128x128 block "
                   "scales, the block-FP8 / DeepSeek format) or fp8-channel (per-output-channel scales, "
                   "compressed-tensors FP8_DYNAMIC: on an H200 the faster of the two, README 'FP8 checkpoints'); "
                   "router, norms, embeddings and lm_head stay in --dtype. "
                   "An FP8 source keeps its own FP8 format without this flag")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


@contextlib.contextmanager
def converter_errors():
    """WeightError / ConvertError -> the CLI's one-line error; SIGINT / SIGTERM -> Interrupted (the
    temporary directory is removed; exit status 130 / 143), deferred while Orbax is mid-save."""
    import signal

    from lingjax.checkpoint import _SIGNALS, _first_line
    from lingjax.convert import ConvertError
    from lingjax.weights import WeightError
    prev = {}
    _SIGNALS.depth, _SIGNALS.pending, _SIGNALS.fired = 0, None, False
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev[sig] = signal.signal(sig, _SIGNALS.handler)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # conversion runs on the host CPU
    try:
        yield
    except (WeightError, ConvertError) as e:
        raise CLIError(_first_line(e)) from None
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h)


def log_info():
    """The converter's INFO summary is part of the command's output: show it without -v."""
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)


def run(args) -> int:
    from lingjax.convert import convert
    log_info()
    with converter_errors():
        convert(args.src, args.dst, dtype=args.dtype, mtp=not args.no_mtp, overwrite=args.overwrite,
                quantize=args.quantize,
                progress=not args.no_progress)
    return 0
