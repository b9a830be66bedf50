"""Compile the MLA prefill Triton kernel (prefill_kernel in lingjax/kernels/mla/triton_kernels.py) for sm_90 on
the CPU (no GPU) at gpu_prefill's default configuration and at every configuration of bench_mla.py's
PREFILL_SWEEP, for the Ling-2.6-flash MLA shapes (kv_lora_rank 512, rope 64, --heads 32, page size 64), and
print per configuration: registers per thread, spill stores / loads (bytes, from ptxas -v on the PTX), shared
memory (against the H100/H200's 227 KiB per block) and the wgmma ops in TTGIR. A configuration that does not
compile, spills or does not fit shows here before a device run; the timing is bench_mla.py's.
The local Triton may differ from the device's (3.6.0): the device's own compile is what runs.

    python scripts/compile_mla_prefill.py [--dtype bfloat16|float32] [--heads 32] [--page-size 64]
Exit status 1 if any configuration fails to compile or exceeds the shared memory.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.backends.nvidia as nvidia_backend  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench_mla import PREFILL_SWEEP, R, ROPE  # noqa: E402
from lingjax.kernels.mla import gpu_prefill  # noqa: E402
from lingjax.kernels.mla import triton_kernels as tk  # noqa: E402

CC = 90
SMEM = 227 * 1024


def ptxas_info(ptx: str) -> dict:
    """registers, spill stores/loads (bytes) of the PTX, from the ptxas Triton ships (ptxas -v)."""
    ptxas = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", os.path.join(d, "k.ptx"), "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    text = p.stdout + p.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(regs=int(regs.group(1)) if regs else -1,
                spill_st=int(spills.group(1)) if spills else 0, spill_ld=int(spills.group(2)) if spills else 0)


def compile_one(c: gpu_prefill.Config, T: int, H: int, ps: int, dt: str) -> dict:
    _, sizes = gpu_prefill.launch(T, H, R, ROPE, ps, 1024, c)
    ptrs = [f"*{dt}", f"*{dt}", f"*{dt}", "*i32", "*i32", "*i32", "*fp32"]
    sig = dict(zip(tk.prefill_kernel.arg_names, ptrs))
    consts = dict(sizes, SCALE=0.0722, PRECISION="" if dt == "bf16" else "tf32x3")
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(tk.prefill_kernel, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))})
    k = triton.compile(src, target=GPUTarget("cuda", CC, 32),
                       options=dict(num_warps=c.num_warps, num_stages=c.num_stages))
    return dict(shared=k.metadata.shared, wgmma=k.asm["ttgir"].count("warp_group_dot"), **ptxas_info(k.asm["ptx"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="latent cache dtype")
    ap.add_argument("--heads", type=int, default=32, help="MLA heads on the device (default 32)")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page (default 64)")
    ap.add_argument("--configs", default="", help="instead of the sweep: ';'-separated block_m,block_n,block_r,"
                    "num_warps,num_stages tuples")
    args = ap.parse_args(argv)
    dt = {"bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    T = 4096
    configs = [("default", gpu_prefill.pick_config(T, args.heads, R, itemsize=2 if dt == "bf16" else 4))]
    sweep = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";") if c] or PREFILL_SWEEP
    configs += [("sweep", gpu_prefill.Config(*c)) for c in sweep]
    bad = 0
    print(f"{'plan':<8} {'config':<18} {'regs':>5} {'spill st/ld':>12} {'shared':>8} {'wgmma':>5}")
    for name, c in configs:
        try:
            r = compile_one(c, T, args.heads, args.page_size, dt)
        except Exception as e:                              # noqa: BLE001 (reported; exit status 1)
            bad += 1
            print(f"{name:<8} {c.tag():<18} FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        over = r["shared"] > SMEM
        bad += over
        print(f"{name:<8} {c.tag():<18} {r['regs']:>5} {r['spill_st']:>5}/{r['spill_ld']:<6} {r['shared']:>8} "
              f"{r['wgmma']:>5}{'  OVER 227 KiB' if over else ''}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
