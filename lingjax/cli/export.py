"""`lingjax export`: lingjax checkpoint directory -> HF checkpoint directory (lingjax/convert.py's `export`).

    lingjax export SRC DST [--dtype D] [--quantize none|fp8-block|fp8-channel] [--shard-gb GB] [--overwrite]

Errors and signals are handled as for `lingjax convert` (lingjax/cli/convert.py's `converter_errors`).
"""
from __future__ import annotations

import argparse

from lingjax.cli.convert import converter_errors, log_info
from lingjax.convert import DTYPES

HELP = "lingjax checkpoint directory -> HF checkpoint directory"
DESCRIPTION = ("Write a lingjax checkpoint back in the HF layout (safetensors shards + index, config and "
               "tokenizer files), one tensor at a time.")


def positive_gb(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB > 0, got {s!r}") from None
    if not (v > 0 and v * (1 << 30) < 2 ** 63):        # rejects nan and inf too
        raise argparse.ArgumentTypeError(f"expected a number of GB > 0, got {s!r}")
    return v


def add_arguments(p) -> None:
    p.add_argument("src", metavar="SRC", help="lingjax checkpoint directory (made by `lingjax convert`)")
    p.add_argument("dst", metavar="DST", help="output HF checkpoint directory (must not exist, see --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="tensor dtype of the safetensors (expert_bias stays float32); default: the stored one")
    p.add_argument("--quantize", choices=("none", "fp8-block", "fp8-channel"), default=None,
                   help="FP8 format of the output: fp8-block (quant_method fp8, weight_scale_inv), fp8-channel "
                   "(compressed-tensors, weight_scale), none (FP8 params dequantized to --dtype); default: "
                   "the stored one (FP8 tensors and scales written back bit for bit)")
    p.add_argument("--shard-gb", type=positive_gb, default=4.0, metavar="GB",
                   help="safetensors shard size, a number > 0; default %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


def run(args) -> int:
    from lingjax.convert import export
    log_info()
    with converter_errors():
        export(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
               quantize=args.quantize,
               shard_bytes=int(args.shard_gb * (1 << 30)))
    return 0
