"""Task accuracy of the shipped tiny model in FP8 against its bf16 checkpoint (issue 18):

    PYTHONPATH=. python scripts/eval_fp8.py [--n 100] [--dtype float32] [--model checkpoints/ling-tiny]

Converts the model with `lingjax convert --quantize fp8-block` and `--quantize fp8-channel` (into a
temporary directory), runs `lingjax eval`'s held-out tasks through the engine on each, and prints the
accuracy tables and the difference in points. On the CPU the FP8 matmuls run the reference math
(lingjax/quant.py); on a GPU the FP8 Triton kernels (lingjax/kernels/fp8, kernels/moe/gpu_fp8.py: the
model's kernels default by backend)."""
import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def evaluate(model_dir, n, dtype, max_batch=16):
    from lingjax import evaluate as ev
    tok, eng = ev.load_engine(model_dir, dtype, max_batch=max_batch)
    res = ev.run_eval(eng, tok, n=n)
    return res, sum(r.correct for r in res) / max(sum(r.n for r in res), 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "checkpoints", "ling-tiny"), help="bf16 HF checkpoint directory")
    p.add_argument("--n", type=int, default=100, help="held-out examples per task (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="activation dtype")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from lingjax import evaluate as ev
    from lingjax.convert import convert
    base, acc0 = evaluate(a.model, a.n, a.dtype)
    print(ev.format_table(base, f"bf16 checkpoint ({a.dtype} activations)"))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("fp8-block", "fp8-channel"):
            d = os.path.join(tmp, scheme)
            convert(a.model, d, quantize=scheme)
            res, acc = evaluate(d, a.n, a.dtype)
            print()
            print(ev.format_table(res, f"{scheme} ({a.dtype} activations)"))
            print(f"{scheme}: {100 * (acc - acc0):+.1f} points against bf16")
            worst = max(worst, 100 * (acc0 - acc))
    print(f"\nlargest drop: {worst:.1f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
