"""Routed-expert FFN of a MoE layer behind one dispatch point: grouped matmuls over the (token, expert)
pairs sorted by expert (layout.py), for every token count.

    y = experts(x, idx, weights, w_gate, w_up, w_down, impl=None)

Steps (the same for every implementation; only the two grouped matmuls differ):
  block_m = mod.pick_block_m(T * k, E)                  static, the implementation's choice
  method  = mod.pick_layout_method(T * k)               'sort' or 'compare' (layout.py), same result
  layout  = make_layout(idx, E, block_m, method)        pairs grouped by expert, groups padded to blocks
  h = mod.gate_up(x, layout, w_gate, w_up)   [P, I]     silu(x Wg[e]) * (x Wu[e]), f32 accumulation
  y = mod.down(h, layout, w_down)            [P, d]     h Wd[e], f32 accumulation
  out = combine(y, layout, weights)          [T, d]     sum_j weights[t, j] * y[pair_row[t, j]] in f32

Implementations (impl=):
  reference      pure jnp (reference.py): the CPU path, differentiable, the oracle of the kernels
  gpu            Triton grouped matmul through jax-triton (gpu.py; imports jax_triton: GPU only); for
                 T <= gpu.DECODE_MAX_TOKENS (8) the decode path instead (gpu.experts_decode: kernels over the
                 pairs, triton_decode.py; no layout, no grouped matmul); FP8
                 weights (quant.FP8Weight): the FP8 variant (gpu_fp8.py + triton_fp8.py: fp8 x fp8
                 products, float32 accumulation) where it takes them, else dequantized as below; its
                 decode path (gpu_fp8.experts_decode, triton_fp8_decode.py) with decode=True
  tpu            Pallas Mosaic TPU grouped matmul (tpu.py)
  tpu_interpret  tpu.py's kernels in Pallas TPU interpret mode (on the CPU; for tests)
impl=None picks by jax.default_backend(): gpu -> 'gpu', tpu -> 'tpu', anything else -> 'reference'.
The kernel modules are imported only when chosen.
"""
import importlib

import jax
import jax.numpy as jnp

from lingjax import quant
from lingjax.kernels.moe.layout import Layout, make_layout, num_blocks  # noqa: F401

F32 = jnp.float32
IMPLS = ('reference', 'gpu', 'tpu', 'tpu_interpret')


# The model's single `kernels` option names a linear-attention implementation
# (lingjax.kernels.linear_attention.IMPLS); the MoE implementation of the same family:
FROM_MODEL_KERNELS = {'mosaic_gpu': 'gpu', 'pallas_triton': 'gpu', 'gpu_interpret': 'reference',
                      'mosaic_gpu_interpret': 'reference', 'pallas_triton_interpret': 'reference'}


def resolve(impl=None) -> str:
    """The implementation that impl names (None: by the default backend; a linear-attention name:
    its family's, FROM_MODEL_KERNELS); ValueError if unknown."""
    impl = FROM_MODEL_KERNELS.get(impl, impl)
    if impl is None:
        backend = jax.default_backend()
        return backend if backend in ('gpu', 'tpu') else 'reference'
    if impl not in IMPLS:
        raise ValueError(f'unknown MoE kernel implementation {impl!r}; expected one of {IMPLS}')
    return impl


def _module(impl):
    name = {'tpu_interpret': 'tpu'}.get(impl, impl)
    return importlib.import_module(f'lingjax.kernels.moe.{name}')


def combine(y, layout: Layout, weights):
    """y [P, d]; weights [T, k] f32 -> [T, d] float32: sum over j (in order j = 0..k-1) of
    weights[t, j] * y[pair_row[t, j]], a dropped pair (pair_row P, out of bounds) adding zero. A
    gather of k rows per token (no copy of y, no scatter-add): deterministic."""
    out = None
    for j in range(layout.pair_row.shape[1]):
        rows = jnp.take(y, layout.pair_row[:, j], axis=0, mode='fill', fill_value=0)
        term = rows.astype(F32) * weights[:, j, None].astype(F32)
        out = term if out is None else out + term
    return out


def experts(x, idx, weights, w_gate, w_up, w_down, *, impl=None, layout_method=None, decode=None):
    """Routed experts: x [T, d]; idx [T, k] int32 expert ids local to this device (ids outside
    [0, E) are dropped: another device's experts); weights [T, k] float32 combine weights;
    w_gate/w_up [E, d, I], w_down [E, I, d] as stored (cast to x.dtype only if they differ), or FP8
    weights (lingjax.quant.FP8Weight) of those shapes; layout_method: make_layout's method ('sort' or
    'compare'; None: the implementation's pick_layout_method); decode (impl 'gpu'): True runs the decode
    path (no layout: kernels over the pairs; gpu.experts_decode, or gpu_fp8.experts_decode for FP8
    weights the FP8 kernels take), False the grouped matmul, None (default) the decode path when
    T <= gpu.DECODE_MAX_TOKENS (and gpu.decode_fits(d, I)), for FP8 weights T <= gpu_fp8.DECODE_MAX_TOKENS
    (0: never, until measured)
    -> [T, d] in x.dtype."""
    impl = resolve(impl)
    T, d = x.shape
    E, d2, I = w_gate.shape
    if idx.shape != weights.shape or idx.shape[0] != T:
        raise ValueError(f'experts: idx {idx.shape} and weights {weights.shape} must both be [T={T}, k]')
    if d2 != d or w_up.shape != w_gate.shape or w_down.shape != (E, I, d):
        raise ValueError(f'experts: weight shapes w_gate {w_gate.shape}, w_up {w_up.shape}, w_down '
                         f'{w_down.shape} do not fit [E, d={d}, I] / [E, I, d]')
    fp8 = quant.is_fp8(w_gate)
    if fp8 != quant.is_fp8(w_up) or fp8 != quant.is_fp8(w_down):
        raise ValueError('experts: w_gate, w_up and w_down must be all FP8 or all plain arrays')
    act = w_gate.act if fp8 else 'none'
    if fp8 and impl == 'gpu':
        from lingjax.kernels.moe import gpu_fp8       # FP8 grouped matmul (fp8 products, f32 accumulation)
        if gpu_fp8.supports(x, w_gate, w_up, w_down):
            use_decode = decode if decode is not None else T <= gpu_fp8.DECODE_MAX_TOKENS
            if use_decode:
                return gpu_fp8.experts_decode(x, idx.astype(jnp.int32), weights, w_gate, w_up, w_down)
            n_pairs = T * idx.shape[1]
            layout = make_layout(idx.astype(jnp.int32), E, gpu_fp8.pick_block_m(n_pairs, E),
                                 layout_method or gpu_fp8.pick_layout_method(n_pairs))
            return combine(gpu_fp8.grouped(x, layout, w_gate, w_up, w_down), layout, weights).astype(x.dtype)
    if fp8:
        # FP8 experts (lingjax.quant): dynamic activation scaling per the format, dequantized weights.
        # (impl 'gpu' runs the FP8 grouped matmul above, gpu_fp8.py, where it takes the weights)
        w_gate, w_up, w_down = (quant.dequantize(w, x.dtype) for w in (w_gate, w_up, w_down))
    w_gate, w_up, w_down = (w if w.dtype == x.dtype else w.astype(x.dtype) for w in (w_gate, w_up, w_down))
    mod = _module(impl)
    if impl == 'gpu' and not fp8 and (decode if decode is not None else
                                      T <= mod.DECODE_MAX_TOKENS and mod.decode_fits(d, I)):
        return mod.experts_decode(x, idx.astype(jnp.int32), weights, w_gate, w_up, w_down)
    kw = {'interpret': True} if impl == 'tpu_interpret' else {}
    block_m = mod.pick_block_m(T * idx.shape[1], E)
    lay = make_layout(idx.astype(jnp.int32), E, block_m, layout_method or mod.pick_layout_method(idx.size))
    h = mod.gate_up(quant.quantize_activation(x, act), lay, w_gate, w_up, **kw)
    y = mod.down(quant.quantize_activation(h, act), lay, w_down, **kw)
    return combine(y, lay, weights).astype(x.dtype)
