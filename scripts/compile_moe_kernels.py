"""Compile the MoE Triton kernels (lingjax/kernels/moe/triton_kernels.py) for sm_90 on the CPU (no GPU)
at every configuration bench_moe.py uses (gpu.pick_config's defaults and the SWEEP_SMALL /
SWEEP_LARGE sweeps) and print per kernel: shared memory (against the H100/H200's 227 KiB per
block), wgmma ops and pipelined loads (cp.async) in TTGIR, PTX instructions, and ptxas's registers
per thread and spill bytes (ptxas -v on the PTX, sm_90a). A configuration that does not compile,
does not fit or spills shows here before a device run; the timing is bench_moe.py's. (Compiled with
the local Triton; the GPU image runs Triton 3.6.0.)

    python scripts/compile_moe_kernels.py [--shape flash|1t] [--dtype bfloat16|float32]
Exit status 1 if any configuration fails to compile or exceeds the shared memory (spills are reported,
not failed: a small spill can still be the fastest).
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
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench_moe import E, K, SHAPES, SWEEP_DECODE, SWEEP_LARGE, SWEEP_SMALL  # noqa: E402
from lingjax.kernels.moe import gpu  # noqa: E402
from lingjax.kernels.moe import triton_decode as td  # noqa: E402
from lingjax.kernels.moe import triton_kernels as tk  # noqa: E402
from lingjax.kernels.moe.layout import num_blocks  # noqa: E402

CC = 90
SMEM = 227 * 1024


def compile_one(kernel, ptrs, consts, c: gpu.Config):
    sig = dict(zip(kernel.arg_names, ptrs))
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(kernel, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))})
    k = triton.compile(src, target=GPUTarget("cuda", CC, 32),
                       options=dict(num_warps=c.num_warps, num_stages=c.num_stages))
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    n_ptx = sum(1 for line in ptx.splitlines() if line.startswith("\t") and not line.strip().startswith(("//", ".")))
    return dict(shared=k.metadata.shared, wgmma=ttgir.count("warp_group_dot"),
                cp_async=ttgir.count("async_copy_global_to_local"),
                ptx=n_ptx, **ptxas_usage(ptx))


def ptxas_usage(ptx: str) -> dict:
    """{'regs': registers per thread, 'spill': spill store + load bytes} from `ptxas -v` (Triton's own ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(CC).path, "-v", f"--gpu-name=sm_{CC}a", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return dict(regs=int(regs.group(1)) if regs else -1, spill=spill)


def kernels(T, d, I, bm, cg, cd, dt):
    """[(name, kernel, pointer types, constexprs, config)] of gate_up and down for one configuration."""
    nb = num_blocks(T * K, E, bm)
    prec = "" if dt != "fp32" else "tf32x3"
    out = []
    for kind, c in (("gate_up", cg), ("down", cd)):
        Kd, N = (d, I) if kind == "gate_up" else (I, d)
        c = gpu._fit(c, Kd, N)
        common = dict(K=Kd, N=N, NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                      GROUP_M=c.group_m, PRECISION=prec)
        if c.split_k > 1:                               # split K: float32 partial outputs, no num_used
            common["SPLIT_K"] = c.split_k
            if kind == "gate_up":
                out.append((kind, tk.gate_up_split_kernel, [f"*{dt}", "*i32", "*i32", f"*{dt}", f"*{dt}", "*fp32",
                                                            "*fp32"], dict(N_TOKENS=T, **common), c))
            else:
                out.append((kind, tk.down_split_kernel, [f"*{dt}", "*i32", f"*{dt}", "*fp32"], common, c))
            continue
        common.update(PERSISTENT=c.persistent > 0, NUM_PROGRAMS=max(1, c.persistent * 132), SHORT=int(c.short_blocks),
                      N_TOKENS=T)
        if kind == "gate_up":
            out.append((kind, tk.gate_up_kernel, [f"*{dt}", "*i32", "*i32", "*i32", f"*{dt}", f"*{dt}", f"*{dt}"],
                        common, c))
        else:
            out.append((kind, tk.down_kernel, [f"*{dt}", "*i32", "*i32", "*i32", f"*{dt}", f"*{dt}"], common, c))
    return out


def decode_kernels(T, d, I, cg, cd, dt):
    """[(name, kernel, pointer types, constexprs, config)] of the decode path (gpu.experts_decode): the h-fused
    kernels when gate/up is unsplit, the partial-sum kernels otherwise."""
    n = T * K
    M, Q = max(16, 1 << (T - 1).bit_length()), 1 << (n - 1).bit_length()
    prec = "" if dt != "fp32" else "tf32x3"
    cg, cd = gpu._fit_decode(cg, d, I), gpu._fit_decode(cd, I, d)
    gu = dict(PAIRS=n, TOP_K=K, E=E, K=d, N=I, M=M, Q=Q, BLOCK_N=cg.block_n, BLOCK_K=cg.block_k, DOT=cg.dot,
              PRECISION=prec, STAGES=cg.num_stages, N_FIRST=cg.n_first)
    dn = dict(PAIRS=n, E=E, K=I, N=d, M=M, Q=Q, BLOCK_N=cd.block_n, BLOCK_K=cd.block_k, SPLIT_K=cd.split_k,
              DOT=cd.dot, PRECISION=prec, STAGES=cd.num_stages, N_FIRST=cd.n_first)
    if cg.split_k == 1:
        return [("gate_up", td.gate_up_h_decode_kernel, [f"*{dt}", "*i32", f"*{dt}", f"*{dt}", f"*{dt}"], gu, cg),
                ("down", td.down_h_decode_kernel, [f"*{dt}", "*i32", f"*{dt}", "*fp32"], dn, cd)]
    return [("gate_up", td.gate_up_decode_kernel, [f"*{dt}", "*i32", f"*{dt}", f"*{dt}", "*fp32", "*fp32"],
             dict(gu, SPLIT_K=cg.split_k), cg),
            ("down", td.down_decode_kernel, ["*fp32", "*fp32", "*i32", f"*{dt}", "*fp32"],
             dict(dn, SPLIT_GU=cg.split_k), cd)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="flash", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args(argv)
    d, I = SHAPES[args.shape]
    dt = {"bfloat16": "bf16", "float32": "fp32"}[args.dtype]
    itemsize = 2 if dt == "bf16" else 4
    plans = []
    for T in (1, 16, 64, 256, 4096, 16384):           # the defaults at each bench size
        bm = gpu.pick_block_m(T * K, E)
        plans.append((f"default T={T}", T, bm, gpu.pick_config("gate_up", bm, d, I, itemsize),
                      gpu.pick_config("down", bm, I, d, itemsize)))
    for T in (1, 2, 4, 16):          # the decode path's default tiles (taken for T <= gpu.DECODE_MAX_TOKENS)
        plans.append((f"decode T={T}", T, 0, gpu.pick_decode_config("gate_up", T, T * K, d, I, itemsize=itemsize),
                      gpu.pick_decode_config("down", T, T * K, I, d, itemsize=itemsize)))
    if dt == "bf16":
        for T, sweep in SWEEP_DECODE.items():
            for gu, dn in sweep:
                plans.append((f"dec sweep T={T}", T, 0, gpu.DecodeConfig(*gu), gpu.DecodeConfig(*dn)))
        for T, sweep in ((16, SWEEP_SMALL), (4096, SWEEP_LARGE)):
            for bm, gu, dn in sweep:
                bm = bm or gpu.pick_block_m(T * K, E)
                plans.append((f"sweep T={T}", T, bm, gpu.Config(*gu), gpu.Config(*dn)))
    bad = 0
    print(f"{'plan':<16} {'bm':>4} {'kernel':<8} {'config':<26} {'shared':>8} {'wgmma':>5} {'cp.async':>8} "
          f"{'ptx':>6} {'regs':>4} {'spill':>5}")
    for name, T, bm, cg, cd in plans:
        ks = decode_kernels(T, d, I, cg, cd, dt) if bm == 0 else kernels(T, d, I, bm, cg, cd, dt)
        for kind, kernel, ptrs, consts, c in ks:
            try:
                r = compile_one(kernel, ptrs, consts, c)
            except Exception as e:                      # noqa: BLE001 (reported; exit status 1)
                bad += 1
                print(f"{name:<16} {bm:>4} {kind:<8} {c.tag():<26} FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            over = r["shared"] > SMEM
            bad += over
            print(f"{name:<16} {bm:>4} {kind:<8} {c.tag():<26} {r['shared']:>8} {r['wgmma']:>5} {r['cp_async']:>8} "
                  f"{r['ptx']:>6} {r['regs']:>4} {r['spill']:>5}{'  OVER 227 KiB' if over else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
