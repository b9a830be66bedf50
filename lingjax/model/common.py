"""Building blocks shared by the layers: dense projections, RMSNorm, the gated GroupRMSNorm, SwiGLU MLP."""
import jax
import jax.numpy as jnp
from flax import nnx

from lingjax.kernels import fp8 as fp8_kernels
from lingjax.model.parallel import tp_index, tp_psum

F32 = jnp.float32


def init_normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, F32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel is [in, out] (the transpose of PyTorch's weight), a plain array or
    an FP8 weight (lingjax.quant.FP8Weight, set by the FP8 loaders), multiplied through
    lingjax.kernels.fp8.matmul with impl=kernels (None: by backend; the GPU runs FP8 weights on the
    FP8 tensor cores)."""

    def __init__(self, d_in, d_out, *, use_bias=False, dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 kernels: str | None = None):
        self.kernels = kernels
        self.kernel = nnx.Param(init_normal(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if use_bias else None

    def __call__(self, x, *, partial=False):
        """partial=True marks a row-parallel projection: under tensor parallelism x holds this device's
        slice of the input features, the result is its partial sum and the bias is added on tp rank 0
        only, so that one psum over tp gives the full output (tp = 1: the plain projection)."""
        y = fp8_kernels.matmul(x, self.kernel.get_value(), impl=self.kernels)   # a plain array or an FP8Weight
        if self.bias is not None:
            b = self.bias[...].astype(x.dtype)
            if partial and not isinstance(tp_index(), int):
                b = jnp.where(tp_index() == 0, b, jnp.zeros_like(b))
            y = y + b
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
    H*D channels (`group_norm_size` is the NUMBER of groups), times weight, times sigmoid(gate).

    Under tensor parallelism `o` holds this device's contiguous slice of the channels. When tp divides
    the group count the slice is whole groups and the norm stays local; otherwise a group straddles
    devices and its sum of squares is completed by a psum of a [..., groups] array (SPEC §2.7)."""

    def __init__(self, dim, groups, *, eps, dtype=jnp.bfloat16):
        self.dim, self.groups, self.eps = dim, groups, eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, o, gate_logits):
        shape = o.shape
        local = shape[-1]
        if (self.groups * local) % self.dim == 0:                 # whole groups on this device
            groups = self.groups * local // self.dim
            og = o.reshape(shape[:-1] + (groups, local // groups))
            y = rms_normalize(og, self.eps).reshape(shape)
        else:
            y = self._straddling(o)
        y = y * self.weight[...].astype(o.dtype)
        return y * jax.nn.sigmoid(gate_logits.astype(F32)).astype(o.dtype)

    def _straddling(self, o):
        """Channels [off, off + local) of a norm whose groups span devices: per-group sums of squares
        of the local channels, completed across devices by one psum, then normalised as rms_normalize."""
        local, C = o.shape[-1], self.dim // self.groups
        gid = (tp_index() * local + jnp.arange(local)) // C                       # group of each channel
        onehot = (gid[:, None] == jnp.arange(self.groups)[None, :]).astype(F32)   # [local, groups]
        of = o.astype(F32)
        ss = tp_psum(jnp.dot(of * of, onehot, precision='highest'))                # [..., groups]
        inv = jax.lax.rsqrt(ss / C + self.eps)
        return (of * jnp.take(inv, gid, axis=-1)).astype(o.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers, the shared expert."""

    def __init__(self, d, width, *, use_bias=False, dtype=jnp.bfloat16, rngs: nnx.Rngs, kernels: str | None = None):
        self.gate_proj = Dense(d, width, use_bias=use_bias, dtype=dtype, rngs=rngs, kernels=kernels)
        self.up_proj = Dense(d, width, use_bias=use_bias, dtype=dtype, rngs=rngs, kernels=kernels)
        self.down_proj = Dense(width, d, use_bias=use_bias, dtype=dtype, rngs=rngs, kernels=kernels)

    def __call__(self, x, *, reduce=True):
        """Under tensor parallelism gate/up are column- and down row-parallel over the width: reduce=False
        returns this device's partial sum (the MoE adds it to its routed partial before one psum)."""
        y = self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), partial=True)
        return tp_psum(y) if reduce else y
