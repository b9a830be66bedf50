"""GPU vs CPU parity of `score` logits, in one process (issue 21): float32 must mean float32 on the GPU.

For each model -- the test suite's random tiny checkpoints (lingjax.testing: the default tiny config,
the head-dim-64 config of the kernel tests, and an 8-head config with float32 weights) and the shipped
checkpoints/ling-tiny -- and each dtype (float32, bfloat16), the same random sequences (628 tokens
in 6 sequences) are scored through the engine on the accelerator and on JAX's CPU backend (pure-jnp
kernels), in the four batching modes (prefill_chunk, max_batch) = (4096, 1), (16, 4), (1, 4),
(7, 3). Per mode it prints the worst relative error over sequences, ||gpu - cpu||_F / ||cpu||_F,
and how many positions' top-1 token differ. Exit status 1 if any float32 error exceeds --tol (1e-5);
bfloat16 is reported only (its rounding differs with the kernels' reduction order).

    PYTHONPATH=. python3 scripts/check_gpu_parity.py [--out $OUT/parity.json]

The CPU pass runs in a child process (JAX_PLATFORMS=cpu, the same script with --cpu-pass) at the same
time as the accelerator pass, to halve the wall time: compiling the engine's steps for every batching
mode dominates both. --self-test checks the script itself without an accelerator (CPU device 1 of this
process plays the accelerator).
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODES = [(4096, 1), (16, 4), (1, 4), (7, 3)]
log = logging.getLogger("check_gpu_parity")


def models(tmp):
    """[(name, checkpoint dir)]: random test checkpoints written here plus the shipped tiny model."""
    from lingjax.testing import tiny_config, write_tiny_checkpoint
    out = []
    specs = [("tiny-seed0", tiny_config(), 0, "bfloat16"),
             ("tiny-hd64", tiny_config(head_dim=64, num_attention_heads=2, num_key_value_heads=2), 2, "bfloat16"),
             ("tiny-tp-f32w", tiny_config(num_attention_heads=8, num_key_value_heads=8, num_experts=8, n_group=4,
                                          topk_group=2), 3, "float32")]
    import ml_dtypes
    for name, cfg, seed, wdt in specs:
        d = os.path.join(tmp, name)
        write_tiny_checkpoint(d, cfg, seed=seed, dtype=np.float32 if wdt == "float32" else ml_dtypes.bfloat16)
        out.append((name, d))
    out.append(("ling-tiny", str(REPO / "checkpoints" / "ling-tiny")))
    return out


def sequences(vocab, seed, n=6, total=628):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, total), n - 1, replace=False))
    lens = np.diff(np.concatenate([[0], cuts, [total]]))
    return [rng.integers(3, vocab, int(l)).tolist() for l in lens]


def _use_kernels(kernels):
    """Start a pass with this kernel choice: forget compiled steps (the choice is made at trace time)."""
    import jax
    from lingjax import engine as eng_mod
    if "kernels" not in inspect.signature(eng_mod.Engine).parameters:      # engines that read the env var
        if kernels:
            os.environ["LINGJAX_KERNELS"] = kernels
        else:
            os.environ.pop("LINGJAX_KERNELS", None)
    if hasattr(eng_mod, "clear_compiled"):
        eng_mod.clear_compiled()
    jax.clear_caches()


def score(path, dtype, seqs, chunk, batch, device, kernels):
    import jax
    from lingjax.engine import Engine, load_model
    kw = {"kernels": kernels} if "kernels" in inspect.signature(Engine).parameters else {}
    with jax.default_device(device):
        _, model = load_model(path, dtype)
        eng = Engine(model, max_batch=batch, prefill_chunk=chunk, max_len=1024, **kw)
        return eng.score(seqs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tol", type=float, default=1e-5, help="float32 bound on the relative error (default 1e-5)")
    p.add_argument("--out", help="write the table as JSON here (default $OUT/check_gpu_parity.json if $OUT is set)")
    p.add_argument("--only", help="comma-separated model names to run (default: all)")
    p.add_argument("--cpu-pass", metavar="NPZ", help=argparse.SUPPRESS)     # child: CPU pass, write NPZ
    p.add_argument("--self-test", action="store_true",
                   help="check this script without an accelerator: CPU device 1 plays the accelerator "
                        "(needs XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import jax
    import jax.numpy as jnp
    with tempfile.TemporaryDirectory() as tmp:
        todo = []
        for name, path in models(tmp):
            if args.only and name not in args.only.split(","):
                continue
            cfg = json.load(open(os.path.join(path, "config.json")))
            seqs = sequences(cfg["vocab_size"], seed=len(todo))
            for dname, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
                for chunk, batch in MODES:
                    todo.append((name, path, dname, dtype, seqs, chunk, batch))
        if args.cpu_pass:
            return run_pass(todo, jax.devices("cpu")[0], "reference", args.cpu_pass)
        return compare(args, todo, tmp)


def run_pass(todo, device, kernels, npz):
    _use_kernels(kernels)
    t0 = time.perf_counter()
    out = {}
    for i, (name, path, dname, dtype, seqs, chunk, batch) in enumerate(todo):
        for j, a in enumerate(score(path, dtype, seqs, chunk, batch, device, kernels)):
            out[f"r{i}_{j}"] = a
    np.savez(npz, **out)
    log.info("%s pass: %d runs in %.0f s", device.platform, len(todo), time.perf_counter() - t0)
    return 0


def compare(args, todo, tmp):
    import jax
    acc = jax.devices()[1:2] if args.self_test else [d for d in jax.devices() if d.platform != "cpu"]
    if not acc:
        log.error("no accelerator visible to JAX (devices: %s): nothing to compare", jax.devices())
        return 2
    dev = acc[0]
    cpu_npz, acc_npz = os.path.join(tmp, "cpu.npz"), os.path.join(tmp, "acc.npz")
    if args.self_test:
        run_pass(todo, jax.devices("cpu")[0], "reference", cpu_npz)
    else:
        child = subprocess.Popen([sys.executable, __file__, "--cpu-pass", cpu_npz]
                                 + (["--only", args.only] if args.only else []),
                                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
    run_pass(todo, dev, None, acc_npz)
    if not args.self_test and child.wait() != 0:
        log.error("the CPU pass failed (exit %d)", child.returncode)
        return 2
    ref_all, got_all = np.load(cpu_npz), np.load(acc_npz)
    rows, failed = [], False
    for i, (name, path, dname, dtype, seqs, chunk, batch) in enumerate(todo):
        ref = [ref_all[f"r{i}_{j}"] for j in range(len(seqs))]
        got = [got_all[f"r{i}_{j}"] for j in range(len(seqs))]
        rel = max(float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(got, ref))
        flips = sum(int((g.argmax(-1) != r.argmax(-1)).sum()) for g, r in zip(got, ref))
        npos = sum(len(s) for s in seqs)
        ok = dname != "float32" or rel <= args.tol
        failed |= not ok
        rows.append(dict(model=name, dtype=dname, prefill_chunk=chunk, max_batch=batch, rel_err=rel,
                         top1_diff=flips, positions=npos, ok=ok))
    print(f"\n{'model':<13} {'dtype':<8} {'chunk':>5} {'batch':>5} {'rel err':>9} {'top1 diff':>9}  verdict")
    for r in rows:
        print(f"{r['model']:<13} {r['dtype']:<8} {r['prefill_chunk']:>5} {r['max_batch']:>5} {r['rel_err']:>9.2e} "
              f"{r['top1_diff']:>5}/{r['positions']:<4} {'ok' if r['ok'] else 'FAIL'}")
    worst = {d: max((r["rel_err"] for r in rows if r["dtype"] == d), default=float("nan")) for d in ("float32", "bfloat16")}
    print(f"worst float32 {worst['float32']:.2e} (bound {args.tol:g}), worst bfloat16 {worst['bfloat16']:.2e}; "
          f"device {dev.device_kind}")
    out = args.out or (os.path.join(os.environ["OUT"], "check_gpu_parity.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(dict(device=dev.device_kind, tol=args.tol, rows=rows, worst=worst), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
