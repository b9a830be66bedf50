"""Dense FP8 matmul through XLA's own FP8 dot (jax.lax.dot_general on float8_e4m3fn operands, float32
results; on Hopper XLA hands it to cuBLASLt's FP8 GEMM or its Triton GEMM emitter), the scales applied
to the float32 product in jnp:

    per-token activations x per-channel / per-tensor weights (fp8-channel):
        y = (x_q @ w_q) * s_x[m] * s_w[n]                                  exact: one dot
    per-128-group activations x 128 x 128-block weights (fp8-block):
        y = sum_g (x_q[:, g] @ w_q[g, :]) * s_x[m, g] * s_w[g, n // 128]   a dot batched over the
        K / 128 groups ([G, M, N] float32 products), then the scaled sum over g

The activations are quantized first (quant.quantize_activation_fp8, as the other paths). The same
math as quant.matmul up to float32 summation order. `supports(x, w)` says which weights this takes:
act "token" / "group", weight blocks (0, 0), (0, 1) or (128, 128) with the local scale, K a multiple
of 128 for the block case. A measured alternative to the Triton kernel (gpu.py): scripts/bench_fp8.py
--methods fp8-block-xla,fp8-channel-xla."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lingjax import quant

GROUP = quant.BLOCK
F32 = jnp.float32


def supports(x, w) -> bool:
    """The weights the Triton kernel takes (gpu.supports: the activation dtype, a 2-D weight, its scale's
    shape) whose scheme is one dot here: per-token activations with a per-tensor / per-channel weight scale,
    or per-128-group activations with 128 x 128-block weight scales over a K that is whole groups."""
    from lingjax.kernels.fp8 import gpu
    if not gpu.supports(x, w):
        return False
    block = tuple(w.block)
    if w.act == "token":
        return block in ((0, 0), (0, 1))
    return block == (GROUP, GROUP) and w.shape[0] % GROUP == 0


def matmul(x, w):
    """x [..., K] @ w (FP8Weight [K, N], either layout) -> [..., N] in x.dtype (see the module doc)."""
    if not supports(x, w):
        raise ValueError(f"fp8 xla matmul: unsupported weight (block {w.block}, act {w.act}, scale "
                         f"{tuple(w.scale.shape)}) or activation dtype {x.dtype}")
    K, N = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    xq, xs = quant.quantize_activation_fp8(x2, w.act, GROUP)
    wk = w.q if w.kmajor else w.q.T                                 # [N, K]: K-major, what cuBLASLt FP8 takes
    if w.block[0] == 0:                                             # one scale along K
        y = jax.lax.dot_general(xq, wk, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        y = y * xs * w.scale.astype(F32)
    else:
        G = K // GROUP
        xg = xq.reshape(-1, G, GROUP)
        wg = wk.reshape(N, G, GROUP)
        p = jax.lax.dot_general(xg, wg, (((2,), (2,)), ((1,), (1,))), preferred_element_type=F32)   # [G, M, N]
        sw = jnp.repeat(w.scale.astype(F32), GROUP, axis=-1)[:, :N]                                  # [G, N]
        y = jnp.sum(p * xs.T[:, :, None] * sw[:, None, :], axis=0)
    return y.astype(x.dtype).reshape(lead + (N,))
