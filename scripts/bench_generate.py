"""Throughput of `Engine.generate` on the tiny random model at batch 1 and 8 (CPU by default).

    python scripts/bench_generate.py [--dtype float32] [--json bench_generate.json] [other `lingjax bench` flags]

A thin wrapper over `lingjax bench --random-tiny` (lingjax/bench.py) with the defaults used for the
engine's CPU figures: float32, prompt 32, 64 new tokens, batch 1 and 8.
"""
import sys

from lingjax.cli import main

if __name__ == "__main__":
    defaults = ["--random-tiny", "--dtype", "float32", "--batch", "1", "8", "--prompt-len", "32",
                "--new-tokens", "64", "--json", "bench_generate.json"]
    sys.exit(main(["bench"] + defaults + sys.argv[1:]))
