"""Compile the MLA decode Triton kernel (lingjax/kernels/mla/triton_kernels.py) for sm_90 on the CPU (no GPU)
at every configuration scripts/bench_mla.py times (gpu.pick_config at each bench shape and sweep_configs)
and print per configuration: registers per thread and spill stores / loads (`ptxas -v`, the ptxas that
Triton ships), shared memory (against the H100/H200's 227 KiB per block), programs per SM that registers
and shared memory allow, the shared buffers of the latent block (bufs: 1 = the next block's load waits for
the current block's products; 2 = double-buffered; 0 for reg_prefetch configs (tag suffix rp): the next
block waits in registers, one shared tile per block), wait: the fewest async copy groups the loop leaves
in flight when it waits (0: the loop waits for every load before its products, i.e. no overlap of the
next block's load with this block's work, even with 2 buffers), and wgmma / pipelined-load (cp.async) ops
in the TTGIR. A configuration that fails, spills more than SPILL_OK bytes per thread or does not fit is
marked DROP; it must not stay in bench_mla.sweep_configs or be pick_config's choice (exit status 1 if one is). float32 latents (tf32x3
products, a parity path) spill at every configuration: there only failing or not fitting is DROP.

    python scripts/compile_mla_kernels.py [--heads 32|64] [--dtype bfloat16|float16|float32] [--configs TAGS]
        [--json out.json]
The device runs Triton 3.6.0; to compile with that version here (same results at the time of writing):
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python scripts/compile_mla_kernels.py
"""
import argparse
import json
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

from bench_mla import BATCHES, CONTEXTS, ROPE, R, sweep_configs  # noqa: E402
from lingjax.kernels.mla import gpu  # noqa: E402
from lingjax.kernels.mla import triton_kernels as tk  # noqa: E402

CC = 90
SMEM = 227 * 1024
REGS_PER_SM = 65536
SPILL_OK = 8        # bytes per thread: h32n64w4 (4 warps, 255 registers) spills one register, one 4-byte
                    # store and load per 64-token block (to L1, next to 32 x 16-byte copies per thread)
SPILL_OK_COMBINE = 32   # combine (tag fc) at 4 warps: 28 bytes, 6 stores + 6 loads of 4 bytes per block inside
                        # the loop (nvdisasm); kept as a device-measured candidate (round 3), not the default
SPILL_OK_STREAM = 72    # stream (tag sk): h32n64w4st3 56/72 bytes (stores/loads), 2 loads of 4 bytes per block in
                        # the block loop, the rest around it (per run); h32n32w4st5 24, none in the block loop
                        # (nvdisasm)


def ptxas_info(ptx: str) -> dict:
    """registers / spill bytes of the kernel, from `ptxas -v` on Triton's PTX."""
    import triton.backends.nvidia as nv
    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "k.ptx"), "w") as f:
            f.write(ptx)
        p = subprocess.run([ptxas, "-arch=sm_90a", "-v", os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
    text = p.stdout + p.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    st, ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return dict(regs=regs, spill_st=st, spill_ld=ld)


def compile_one(c: gpu.Config, heads: int, page_size: int, max_pages: int, dt: str) -> dict:
    """Compile decode_kernel for sm_90 with latents of Triton dtype `dt` ('bf16', 'fp16', 'fp32')."""
    if c.stream:                                        # decode_stream_kernel (batch of 256: its vectors)
        k = tk.decode_stream_kernel
        ptrs = ["*fp32", "*fp32", f"*{dt}", "*i32", "*i32", "*i32", "*fp32", "*fp32", "*fp32", "*i32"]
        consts = dict(SCALE=0.0722, B=256, B_P2=256, H=heads, R=R, ROPE=ROPE, PAGE_SIZE=page_size,
                      MAX_PAGES=max_pages, BLOCK_H=c.block_h, BLOCK_N=c.block_n, P_P2=256,
                      PRECISION="tf32x3" if dt == "fp32" else "")
    else:
        k = tk.decode_kernel
        o_dt = dt if c.low_partials and dt != "fp32" else "fp32"       # the splits' partials (with splits > 1)
        ptrs = ["*fp32", "*fp32", f"*{dt}", "*i32", "*i32", "*i32", f"*{o_dt}", "*fp32", "*fp32", "*i32", "*i32"]
        consts = dict(SCALE=0.0722, H=heads, R=R, ROPE=ROPE, PAGE_SIZE=page_size, MAX_PAGES=max_pages,
                      NUM_SPLITS=c.num_splits, BLOCK_H=c.block_h, BLOCK_N=c.block_n,
                      PRECISION="tf32x3" if dt == "fp32" else "", SWAP=c.swap,
                      REG_PREFETCH=c.reg_prefetch, COMBINE=c.combine and c.num_splits > 1)
    sig = dict(zip(k.arg_names, ptrs))
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(k, signature=sig, constexprs=consts,
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))})
    out = triton.compile(src, target=GPUTarget("cuda", CC, 32),
                         options=dict(num_warps=c.num_warps, num_stages=c.num_stages))
    ttgir = out.asm["ttgir"]
    bufs = [int(n) for n in re.findall(rf"local_alloc : \(\) -> !ttg.memdesc<(\d+)x{c.block_n}x{R}x", ttgir)]
    loop = ttgir[ttgir.find("scf.for", max(0, ttgir.find("scf.while"))):]   # the block loop (in the runs' while)
    loop = loop[:loop.find("scf.yield")]
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*\{num = (\d+)", loop)]
    r = dict(shared=out.metadata.shared, bufs=max(bufs, default=0), wait=min(waits, default=0),
             wgmma=ttgir.count("warp_group_dot"),
             cp_async=ttgir.count("async_copy_global_to_local"), **ptxas_info(out.asm["ptx"]))
    threads = 32 * c.num_warps
    by_regs = REGS_PER_SM // (threads * max(r["regs"], 1))
    r["per_sm"] = min(by_regs, SMEM // max(r["shared"], 1), 64 // c.num_warps)
    ok = SPILL_OK_STREAM if c.stream else SPILL_OK_COMBINE if c.combine and c.num_splits > 1 else SPILL_OK
    spills = max(r["spill_st"], r["spill_ld"]) > ok and dt != "fp32"   # float32 (tf32x3) spills everywhere
    r["drop"] = bool(spills or r["shared"] > SMEM or r["per_sm"] < 1)
    return r


def plans(heads: int, page_size: int, itemsize: int, configs=None):
    """[(name, Config)]: pick_config at every bench shape, then (16-bit latents) the sweep configurations
    (`configs`, default bench_mla.sweep_configs)."""
    seen, out = set(), []
    for B in BATCHES:
        for L in CONTEXTS:
            c = gpu.pick_config(B, heads, page_size, -(-L // page_size), itemsize=itemsize)
            key = dataclass_key(c)
            if key not in seen:
                seen.add(key)
                out.append(("pick", c))
    for c in (configs or sweep_configs(heads)) if itemsize == 2 else []:
        c = gpu.Config(**{**c.__dict__, "num_splits": 8 if c.combine else 1})   # combine: compiled with splits
        if dataclass_key(c) not in seen:
            seen.add(dataclass_key(c))
            out.append(("sweep", c))
    return out


def dataclass_key(c):
    """Compile-relevant fields (the split count only changes a constant)."""
    return (c.block_h, c.block_n, c.num_warps, c.num_stages, c.swap, c.reg_prefetch, c.combine and c.num_splits > 1,
            c.stream, c.low_partials)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=32, help="MLA heads per device (32: flash; 64: 1T without TP)")
    ap.add_argument("--page-size", type=int, default=64, help="tokens per page (default 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="latent dtype (float32: pick_config only, tf32x3 products)")
    ap.add_argument("--configs", default="", help="comma list of config tags to check instead of "
                    "bench_mla.sweep_configs (as bench_mla.py --configs)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    dt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]
    rows, bad = [], 0
    print(f"{'plan':<18} {'config':<22} {'regs':>5} {'spill':>9} {'shared':>7} {'per_sm':>6} {'bufs':>4} {'wait':>4} "
          f"{'wgmma':>5} {'cp.async':>8}")
    configs = [gpu.Config.from_tag(t) for t in args.configs.split(",") if t]
    for name, c in plans(args.heads, args.page_size, 4 if dt == "fp32" else 2, configs):
        try:
            r = compile_one(c, args.heads, args.page_size, 2048, dt)
        except Exception as e:                          # noqa: BLE001 (reported; DROP)
            r = dict(error=f"{type(e).__name__}: {str(e)[:200]}", drop=True)
            print(f"{name:<18} {c.tag():<22} FAILED {r['error']}")
        else:
            print(f"{name:<18} {c.tag():<22} {r['regs']:>5} {r['spill_st']:>4}/{r['spill_ld']:<4} {r['shared']:>7} "
                  f"{r['per_sm']:>6} {r['bufs']:>4} {r['wait']:>4} {r['wgmma']:>5} {r['cp_async']:>8}"
                  f"{'  DROP' if r['drop'] else ''}")
        bad += r["drop"]
        rows.append(dict(plan=name, config=c.tag(), **r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(heads=args.heads, page_size=args.page_size, dtype=args.dtype, rows=rows), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
