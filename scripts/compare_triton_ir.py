"""Compile the linear-attention GPU kernels both ways for sm_90 on the CPU (no GPU) and compare.

The former default (pallas_triton.py) is a Pallas program that Pallas lowers to Triton IR (TTIR);
the new default (triton_kernels.py) is the same program written in Triton. This script captures
the Pallas kernels' TTIR from their CUDA lowering (through an abstract H100 mesh), compiles it and
ours with the local `triton` package (TTIR -> TTGIR -> LLVM -> PTX, sm_90, same num_warps and
num_stages as the wrappers pick), and prints per kernel: shared memory, pipelined loads
(cp.async in TTGIR), wgmma ops, PTX instruction counts and the global load/store widths.
Equal shared memory, pipelining, wgmma and memory-access counts mean the same schedule; the PTX
instruction count differs by address arithmetic. On the GPU, jax-triton compiles ours with the
installed triton while XLA compiles the Pallas kernels with its own Triton, so this is evidence,
not a timing: scripts/bench_linear_attention.py --compare measures.

    python scripts/compare_triton_ir.py [--dtype bfloat16|float32] [--tokens T] [--heads H]
(The Pallas lowering emits JAX's Pallas-Triton deprecation warning: expected here.)
"""
import argparse
import collections
import functools
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import triton  # noqa: E402
from jax._src.mesh import AbstractDevice, AbstractMesh  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration as pallas_reg  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lingjax.kernels.linear_attention import gpu_common, pallas_triton  # noqa: E402
from lingjax.kernels.linear_attention import triton_kernels as tk  # noqa: E402

CC = 90


def pallas_ttirs(dtype, T, H, D, B, segment):
    """TTIR text of the Pallas kernels, in lowering order: [increments, output pass] of a split
    prefill (or [output pass] unsplit), then decode."""
    captured = []
    lower = pallas_reg.lowering.lower_jaxpr_to_triton_module

    def hook(*a, **k):
        res = lower(*a, **k)
        captured.append(res.module.operation.get_asm(enable_debug_info=False))
        return res
    pallas_reg.lowering.lower_jaxpr_to_triton_module = hook
    sd = jax.ShapeDtypeStruct
    pre = (sd((T, H, D), dtype),) * 3 + (sd((H,), jnp.float32), sd((8, H, D, D), jnp.float32),
                                         sd((1,), jnp.int32), sd((2,), jnp.int32), sd((1,), jnp.bool_))
    dec = (sd((B, H, D), dtype),) * 3 + (sd((H,), jnp.float32), sd((8, H, D, D), jnp.float32),
                                         sd((B,), jnp.int32), sd((B,), jnp.bool_))
    mesh = AbstractMesh((1,), ('x',), abstract_device=AbstractDevice(
        device_kind='NVIDIA H100 80GB HBM3', num_cores=1, platform='cuda'))
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            jax.jit(functools.partial(pallas_triton.prefill, scale=0.1, segment=segment)).trace(
                *pre).lower(lowering_platforms=('cuda',))
            jax.jit(functools.partial(pallas_triton.decode, scale=0.1)).trace(*dec).lower(
                lowering_platforms=('cuda',))
    finally:
        pallas_reg.lowering.lower_jaxpr_to_triton_module = lower
    return captured


def our_ttir(kernel, arrays, consts, num_stages):
    """TTIR of one of our kernels, specialized as jax-triton does (16-byte aligned pointers)."""
    sig = {n: f'*{t}' for n, t in zip(kernel.arg_names, arrays)}
    sig.update({n: 'constexpr' for n in consts})
    src = ASTSource(kernel, signature=sig, constexprs=consts,
                    attrs={(i,): [['tt.divisibility', 16]] for i in range(len(arrays))})
    k = triton.compile(src, target=GPUTarget('cuda', CC, 32), options=dict(num_warps=4, num_stages=num_stages))
    return k.asm['ttir']


def compile_ttir(text, num_stages, tmp):
    """TTIR text -> (TTGIR, PTX, shared bytes) with the local Triton's CUDA backend."""
    with open(tmp, 'w') as f:
        f.write(text)
    be = CUDABackend(GPUTarget('cuda', CC, 32))
    opts = be.parse_options(dict(num_warps=4, num_stages=num_stages))
    ctx = ir.context()
    ir.load_dialects(ctx)
    be.load_dialects(ctx)
    mod = ir.parse_mlir_module(tmp, ctx)
    mod.context = ctx
    md = {}
    ttgir = be.make_ttgir(be.make_ttir(mod, md, opts, CC), md, opts, CC)
    ttgir_text = str(ttgir)
    ptx = be.make_ptx(be.make_llir(ttgir, md, opts, CC), md, opts, CC)
    return ttgir_text, ptx, md['shared']


def summary(ttgir, ptx, shared):
    ins = [line.strip().split()[0] for line in ptx.splitlines()
           if line.startswith('\t') and not line.strip().startswith(('//', '.', '$', '{', '}'))]
    mem = collections.Counter(i for i in ins if i.startswith(('ld.global', 'st.global')))
    return dict(shared=shared, cp_async=ttgir.count('async_copy_global_to_local'),
                wgmma=ttgir.count('warp_group_dot'), ptx_instructions=len(ins),
                global_mem=dict(sorted(mem.items())))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'),
                    help='q/k/v dtype (float32: 3xTF32 products)')
    ap.add_argument('--tokens', type=int, default=4096, help='prefill tokens (one sequence)')
    ap.add_argument('--heads', type=int, default=4, help='heads (grid size only; the code does not depend on it)')
    ap.add_argument('--tmp', default='/tmp/lingjax_compare_triton_ir.ttir', help='scratch file for the TTIR')
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    T, H, D, B, C, BV = args.tokens, args.heads, 128, 64, 64, 64
    tt = {'bfloat16': 'bf16', 'float16': 'fp16', 'float32': 'fp32'}[args.dtype]
    prec = 'tf32x3' if tt == 'fp32' else 'tf32'
    f32 = tt == 'fp32'
    L = 1024
    common = dict(H=H, D=D, BV=BV, C=C, TILES_FIRST=True)
    out = dict(common, R=1, T=T, SCALE=0.1, DOT_PREC=prec)
    pre_ptrs = ['i32', 'i32', 'i1', 'fp32', tt, tt, tt, 'fp32', 'fp32', tt, 'fp32']
    ours = [
        ('prefill unsplit', tk.prefill_kernel, pre_ptrs, dict(out, L=0, NSEG=1, SPLIT=False),
         gpu_common.pick_stages(None, H * D // BV, f32)),
        ('prefill increments', tk.prefill_increments_kernel,
         ['i32', 'i32', 'i1', 'fp32', tt, tt, 'fp32', 'fp32'],
         dict(common, L=L, NSEG=-(-T // L), DOT_PREC=prec), gpu_common.pick_stages(L, 0, f32)),
        ('prefill split output', tk.prefill_kernel, pre_ptrs,
         dict(out, L=L, NSEG=-(-T // L), SPLIT=True), gpu_common.pick_stages(L, 0, f32)),
        ('decode', tk.decode_kernel, ['i32', 'i1', 'fp32', tt, tt, tt, 'fp32', tt, 'fp32'],
         dict(B=B, H=H, D=D, BK=D, BV=BV, NV=D // BV, SCALE=0.1, SPLIT=False, TILES_FIRST=True), 1),
    ]
    theirs = pallas_ttirs(dtype, T, H, D, B, segment=0)[:1] + pallas_ttirs(dtype, T, H, D, B, segment=L)
    print(f'sm_{CC}, triton {triton.__version__}, q/k/v {args.dtype}, T={T}, D={D}, chunk {C}, '
          f'block_v {BV}, split segment {L}, decode B={B}')
    for (name, kernel, arrays, consts, stages), pallas_text in zip(ours, theirs):
        print(f'{name} (num_stages={stages}):')
        for who, text in (('pallas_triton', pallas_text), ('triton (ours)', our_ttir(kernel, arrays, consts, stages))):
            print(f'  {who:14} {summary(*compile_ttir(text, stages, args.tmp))}')


if __name__ == '__main__':
    main()
