"""Dense projections with FP8 weights behind one dispatch point (issue 18).

    y = matmul(x, w, impl=None)        x [..., in] @ w [in, out], w a plain array or a quant.FP8Weight

Implementations (impl=):
  reference  the formats' math in jnp (quant.matmul): dynamic activation quantize-dequantize, then the
             dequantized weight; the CPU path and the oracle of the kernel
  gpu        Hopper, the fastest measured GPU path by rows (device call A of session 6): up to
             XLA_DOT_MAX_ROWS rows (decode) XLA's own FP8 dot (xla.py) where it takes the weight (or,
             DENSE_DECODE 'triton', the Triton kernel with gpu.decode_config), from
             DEQUANT_MIN_ROWS (prefill) the reference math (the weight dequantized for a 16-bit dot); in
             between the activations quantized to float8_e4m3fn in jnp, then a Triton kernel (gpu.py,
             through jax-triton) multiplies the fp8 operands on the tensor cores with float32
             accumulation, scales applied per 128 k-block where they vary along K; weights the kernel
             does not take (weight-only FP8, a tp-sharded weight whose scale is kept whole) run the
             reference math (gpu.supports)
  xla        XLA's own FP8 dot (xla.py: dot_general on the fp8 operands, float32 results, the scales
             applied after; fp8-block as a dot batched over the 128-deep K groups); weights it does not
             take run the reference math (xla.supports)
impl=None picks by jax.default_backend(): gpu -> 'gpu', anything else -> 'reference'. The model's
single `kernels` option (a linear-attention implementation name) maps to its family here: the GPU
names to 'gpu', the TPU and *_interpret names to 'reference' (FROM_MODEL_KERNELS). Plain weights
always take the plain dot (quant.matmul). The kernel module is imported only when chosen.
"""
import jax

from lingjax import quant

IMPLS = ('reference', 'gpu', 'xla')
# impl 'gpu' runs XLA's FP8 dot up to this many rows: flash's 4096 x 4096 projection, session 6 call A
# (bench_fp8.py, loop time per call incl. the quantization): T=16 26.7 us against the Triton kernel's
# best tiles 34.4 us (cuBLAS bf16 38.9); T=64 49.6 against 53.4 (bf16 25.0). Above 64 rows the batched
# form's [K / 128, rows, N] float32 partial products outgrow the weight (4x at 256 rows).
XLA_DOT_MAX_ROWS = 64
# ... and above this many rows (prefill) the reference math (activations quantize-dequantized, the weight
# dequantized to the activation dtype, XLA's / cuBLAS's 16-bit dot): session 6 call B, flash's 4096 x 4096
# at T=4096: 303.3 us against the Triton FP8 kernel's 597.1 (cuBLAS bf16 with a bf16 weight 261.8).
# Rows between: the Triton kernel (not measured against the others there).
DEQUANT_MIN_ROWS = 257
# ... and at up to XLA_DOT_MAX_ROWS rows, which kernel: 'xla' (XLA's FP8 dot above) or 'triton' (the Triton
# kernel with gpu.decode_config: swapped operands, the activations quantized in the kernel, split-K sums
# fused into the consumer). Read when a step is traced. Session 9 (flash8 fp8-block, H200) measured
# 'triton' no faster at B=16 (3.97 ms both) and slower at B=1 (3.36 against 1.91) and B=64 (9.44 against 7.94):
# each jax-triton launch runs outside XLA's CUDA graphs (scripts/bench_notes_fp8.md).
DENSE_DECODE = 'xla'
FROM_MODEL_KERNELS = {'mosaic_gpu': 'gpu', 'pallas_triton': 'gpu', 'tpu': 'reference',
                      'tpu_interpret': 'reference', 'gpu_interpret': 'reference',
                      'mosaic_gpu_interpret': 'reference', 'pallas_triton_interpret': 'reference'}


def step_xla_options(model) -> dict:
    """XLA options for compiling a step over this model's weights (jax.jit's compiler_options; the engine's
    default xla_options): {"xla_disable_hlo_passes": "dot-merger"} on a GPU when some FP8 weight runs
    XLA's one-dot FP8 path (per-token activations with per-channel / per-tensor weight scales: the
    compressed-tensors scheme, xla.py), else {}. XLA's dot merger joins the projections of one input
    (linear attention's q / k / v / g, an MLP's gate / up) into one dot over the concatenation of their
    weights; cuBLASLt's FP8 GEMM reads that operand contiguous, so XLA copied every such weight each step
    (flash8, B=16: 220 us of a 3.72 ms step; without the merger 3.57 ms: session 9, calls 2-3,
    scripts/bench_notes_fp8.md). fp8-block's batched dot is XLA's own GEMM kernel, which reads the pieces
    in place: no option."""
    if jax.default_backend() != 'gpu':
        return {}
    leaves = jax.tree.leaves(model, is_leaf=quant.is_fp8)
    one_dot = any(quant.is_fp8(w) and w.act == 'token' and tuple(w.block) in ((0, 0), (0, 1)) for w in leaves)
    return {'xla_disable_hlo_passes': 'dot-merger'} if one_dot else {}


def resolve(impl=None) -> str:
    """The implementation impl names (None: by the default backend; a model kernels name: its
    family's); ValueError naming it if unknown."""
    impl = FROM_MODEL_KERNELS.get(impl, impl)
    if impl is None:
        return 'gpu' if jax.default_backend() == 'gpu' else 'reference'
    if impl not in IMPLS:
        raise ValueError(f'unknown FP8 matmul implementation {impl!r}; expected one of {IMPLS}')
    return impl


def matmul(x, w, *, impl=None):
    """x [..., in] @ w -> [..., out] in x.dtype, for a plain array or an FP8Weight (see module doc)."""
    if not quant.is_fp8(w):
        return quant.matmul(x, w)
    impl = resolve(impl)
    if impl == 'gpu':
        from lingjax.kernels.fp8 import gpu, xla
        rows = 1
        for n in x.shape[:-1]:
            rows *= n
        if rows <= XLA_DOT_MAX_ROWS and DENSE_DECODE == 'triton' and gpu.supports(x, w):
            K, N = w.shape
            return gpu.matmul(x, w, config=gpu.decode_config(rows, N, K))
        if rows <= XLA_DOT_MAX_ROWS and xla.supports(x, w):
            return xla.matmul(x, w)
        if rows >= DEQUANT_MIN_ROWS:
            return quant.matmul(x, w)
        if gpu.supports(x, w):
            return gpu.matmul(x, w)
    if impl == 'xla':
        from lingjax.kernels.fp8 import xla
        if xla.supports(x, w):
            return xla.matmul(x, w)
    return quant.matmul(x, w)
