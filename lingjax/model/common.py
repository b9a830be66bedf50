"""Building blocks shared by the layers: dense projections, RMSNorm, the gated GroupRMSNorm, SwiGLU MLP."""
import jax
import jax.numpy as jnp
from flax import nnx

F32 = jnp.float32


def init_normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel is [in, out] (the transpose of PyTorch's weight)."""

    def __init__(self, d_in, d_out, *, use_bias=False, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.kernel = nnx.Param(init_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if use_bias else None

    def __call__(self, x):
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def rms_normalize(x, eps):
    """x * rsqrt(mean(x^2) + eps) over the last axis, in float32, cast back to x.dtype."""
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """HF BailingMoeV2_5RMSNorm: normalise in float32, cast to the activation dtype, then scale."""

    def __init__(self, dim, *, eps, dtype=jnp.bfloat16):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x):
        return rms_normalize(x, self.eps) * self.weight[...].astype(x.dtype)


class GroupRMSNormGate(nnx.Module):
    """Output norm of the linear-attention layer (SPEC §2.7): RMSNorm over `groups` groups of the
    H*D channels (`group_norm_size` is the NUMBER of groups), times weight, times sigmoid(gate)."""

    def __init__(self, dim, groups, *, eps, dtype=jnp.bfloat16):
        self.groups, self.eps = groups, eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, o, gate_logits):
        shape = o.shape
        og = o.reshape(shape[:-1] + (self.groups, shape[-1] // self.groups))
        y = rms_normalize(og, self.eps).reshape(shape) * self.weight[...].astype(o.dtype)
        return y * jax.nn.sigmoid(gate_logits.astype(F32)).astype(o.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers, the shared expert."""

    def __init__(self, d, width, *, use_bias=False, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.gate_proj = Dense(d, width, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(d, width, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(width, d, use_bias=use_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
