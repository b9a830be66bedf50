"""Compile the linear-attention GPU kernels both ways for sm_90 on the CPU (no GPU) and compare.

The former default (pallas_triton.py) is a Pallas program that Pallas lowers to Triton IR (TTIR);
the new default (triton_kernels.py) is the same program written in Triton. This script captures
the Pallas kernels' TTIR from their CUDA lowering (through an abstract H100 mesh), compiles it and
ours with the local `triton` package (TTIR -> TTGIR -> LLVM -> PTX, sm_90, same num_warps and
num_stages as the wrappers pick), assembles the PTX with the ptxas bundled with triton (or
--ptxas) and disassembles it with its nvdisasm, and prints per kernel: shared memory, pipelined
loads (cp.async in TTGIR), wgmma ops, PTX instruction counts, the global load/store widths,
registers and spill bytes (ptxas -v), and the SASS of the chunk loop (the innermost loop holding
the wgmma ops: instructions, local-memory spill loads/stores, MUFU (exp), FMUL/FFMA, IMAD).
Our prefill kernels are compiled in both state-update forms (decay_v: S += kᵀ (decay * v), the
default for bf16/f16; decay_k: S += (decay * k)ᵀ v, the Pallas kernels' form); the unsplit
output pass at the pipelining depth of few programs (3 for bf16) and of a full grid (2).
Equal shared memory, pipelining, wgmma and memory-access counts mean the same schedule; the
instruction counts differ by address arithmetic and the state-update form. On the GPU,
jax-triton compiles ours with the installed triton while XLA compiles the Pallas kernels with its
own Triton and LLVM, so this is evidence, not a timing: scripts/bench_linear_attention.py
--compare measures.

    python scripts/compare_triton_ir.py [--dtype bfloat16|float32] [--tokens T] [--heads H]
        [--ptxas PATH|none] [--dump DIR]
(The Pallas lowering emits JAX's Pallas-Triton deprecation warning: expected here.)
"""
import argparse
import collections
import functools
import os
import re
import subprocess
import sys
import tempfile

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


def nvidia_tool(name):
    """A binary bundled with the local triton (ptxas, nvdisasm)."""
    from triton.backends.nvidia import compiler as nv
    return os.path.join(os.path.dirname(nv.__file__), 'bin', name)


def sass_stats(ptx, ptxas, tmpdir):
    """Assemble PTX for sm_90a: registers and spill bytes (ptxas -v), and counts over the SASS
    of the chunk loop (the innermost backward branch whose body holds wgmma, i.e. HGMMA)."""
    src, cubin = os.path.join(tmpdir, 'k.ptx'), os.path.join(tmpdir, 'k.cubin')
    with open(src, 'w') as f:
        f.write(ptx)
    info = subprocess.run([ptxas, '-v', '--gpu-name', 'sm_90a', '-O3', src, '-o', cubin],
                          capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r'Used (\d+) registers', info).group(1))
    spill = int(re.search(r'(\d+) bytes spill stores', info).group(1))
    sass = subprocess.run([nvidia_tool('nvdisasm'), '-c', cubin], capture_output=True, text=True,
                          check=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(sass) if (m := re.match(r'^(\.L_x_\d+):', line))}
    loop = []
    for i, line in enumerate(sass):
        m = re.search(r'BRA `\((\.L_x_\d+)\)', line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in sass[labels[m.group(1)]:i + 1] if re.search(r'/\*[0-9a-f]{4}\*/', x)]
            if any('HGMMA' in x for x in body) and (not loop or len(body) < len(loop)):
                loop = body

    def count(pattern):
        return sum(1 for x in loop if re.search(pattern, x))
    return dict(regs=regs, spill_bytes=spill,
                loop_sass=dict(instructions=len(loop), HGMMA=count('HGMMA'), LDL=count(r'\bLDL\b'),
                               STL=count(r'\bSTL\b'), MUFU=count('MUFU'), FMUL=count(r'\bFMUL\b'),
                               FFMA=count(r'\bFFMA\b'), IMAD=count(r'\bIMAD')))


def summary(ttgir, ptx, shared, ptxas=None, tmpdir=None):
    ins = [line.strip().split()[0] for line in ptx.splitlines()
           if line.startswith('\t') and not line.strip().startswith(('//', '.', '$', '{', '}'))]
    mem = collections.Counter(i for i in ins if i.startswith(('ld.global', 'st.global')))
    out = dict(shared=shared, cp_async=ttgir.count('async_copy_global_to_local'),
               wgmma=ttgir.count('warp_group_dot'), ptx_instructions=len(ins),
               global_mem=dict(sorted(mem.items())))
    if ptxas:
        out.update(sass_stats(ptx, ptxas, tmpdir))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float16', 'float32'),
                    help='q/k/v dtype (float32: 3xTF32 products)')
    ap.add_argument('--tokens', type=int, default=4096, help='prefill tokens (one sequence)')
    ap.add_argument('--heads', type=int, default=4, help='heads (grid size only; the code does not depend on it)')
    ap.add_argument('--tmp', default='/tmp/lingjax_compare_triton_ir.ttir', help='scratch file for the TTIR')
    ap.add_argument('--ptxas', default=None,
                    help="ptxas for the register/spill/SASS figures (default: the one bundled with "
                         "triton; 'none': skip them)")
    ap.add_argument('--dump', default=None, help='also write each TTGIR and PTX into this folder')
    args = ap.parse_args()
    ptxas = None if args.ptxas == 'none' else (args.ptxas or nvidia_tool('ptxas'))
    dtype = jnp.dtype(args.dtype)
    T, H, D, B, C, BV = args.tokens, args.heads, 128, 64, 64, 64
    tt = {'bfloat16': 'bf16', 'float16': 'fp16', 'float32': 'fp32'}[args.dtype]
    prec = 'tf32x3' if tt == 'fp32' else 'tf32'
    f32 = tt == 'fp32'
    L = 1024
    common = dict(H=H, D=D, BV=BV, C=C, TILES_FIRST=True)
    out = dict(common, R=1, T=T, SCALE=0.1, DOT_PREC=prec)
    pre_ptrs = ['i32', 'i32', 'i1', 'fp32', tt, tt, tt, 'fp32', 'fp32', tt, 'fp32']
    unsplit = dict(out, L=0, NSEG=1, SPLIT=False, INTRA_IN_LOOP=False)
    ours = [
        ('prefill unsplit', tk.prefill_kernel, pre_ptrs, unsplit, gpu_common.pick_stages(None, 128, f32)),
        ('prefill unsplit', tk.prefill_kernel, pre_ptrs, unsplit, 2),
        ('prefill increments', tk.prefill_increments_kernel,
         ['i32', 'i32', 'i1', 'fp32', tt, tt, 'fp32', 'fp32'],
         dict(common, L=L, NSEG=-(-T // L), DOT_PREC=prec), gpu_common.pick_stages(L, 0, f32)),
        ('prefill split output', tk.prefill_kernel, pre_ptrs,
         dict(out, L=L, NSEG=-(-T // L), SPLIT=True, INTRA_IN_LOOP=False), gpu_common.pick_stages(L, 0, f32)),
        ('decode', tk.decode_kernel, ['i32', 'i1', 'fp32', tt, tt, tt, 'fp32', tt, 'fp32'],
         dict(B=B, H=H, D=D, BK=D, BV=BV, NV=D // BV, SCALE=0.1, SPLIT=False, TILES_FIRST=True), 1),
    ]
    unsplit_text = pallas_ttirs(dtype, T, H, D, B, segment=0)[0]
    theirs = [unsplit_text, unsplit_text] + pallas_ttirs(dtype, T, H, D, B, segment=L)
    tools = ''
    if ptxas:
        tools = '; ' + subprocess.run([ptxas, '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f'sm_{CC}, triton {triton.__version__}, q/k/v {args.dtype}, T={T}, D={D}, chunk {C}, '
          f'block_v {BV}, split segment {L}, decode B={B}{tools}')
    with tempfile.TemporaryDirectory() as tmpdir:
        for (name, kernel, arrays, consts, stages), pallas_text in zip(ours, theirs):
            print(f'{name} (num_stages={stages}):')
            forms = ([('ours', {})] if kernel is tk.decode_kernel else
                     [('ours decay_v', dict(DECAY_V=True)), ('ours decay_k', dict(DECAY_V=False))])
            variants = [('pallas_triton', pallas_text)] + [
                (who, our_ttir(kernel, arrays, dict(consts, **extra), stages)) for who, extra in forms]
            for who, text in variants:
                ttgir, ptx, shared = compile_ttir(text, stages, args.tmp)
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    stem = os.path.join(args.dump, f'{name}_{stages}_{who}'.replace(' ', '_'))
                    for ext, body in (('ttgir', ttgir), ('ptx', ptx)):
                        with open(f'{stem}.{ext}', 'w') as f:
                            f.write(body)
                print(f'  {who:14} {summary(ttgir, ptx, shared, ptxas, tmpdir)}')

if __name__ == '__main__':
    main()
