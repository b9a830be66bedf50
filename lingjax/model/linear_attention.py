"""Lightning linear-attention layer (SPEC §2): fused QKV, qk-norm, NeoX partial RoPE, the simple-GLA
recurrence with a per-head constant decay, GroupRMSNorm + sigmoid gate, output projection."""
import jax
import jax.numpy as jnp
from flax import nnx

from lingjax.config import BailingConfig, alibi_slopes, layer_decay_factor
from lingjax.kernels import linear_attention as la
from lingjax.model import rope
from lingjax.model.common import Dense, GroupRMSNormGate, RMSNorm
from lingjax.model.parallel import tp_index, tp_psum

F32 = jnp.float32


def log_decay(cfg: BailingConfig, layer: int, num_heads: int | None = None):
    """g = -lambda for each head of this layer (float32, <= 0)."""
    base = jnp.asarray(alibi_slopes(num_heads or cfg.num_attention_heads), F32)
    return -base * jnp.float32(layer_decay_factor(layer, cfg.num_hidden_layers, cfg.slope_layer_offset))


class LinearAttention(nnx.Module):
    def __init__(self, cfg: BailingConfig, layer: int, *, dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 kernels: str | None = None):
        self.cfg, self.layer = cfg, layer
        self.kernels = kernels          # kernel backend (lingjax.kernels.linear_attention); None: by backend
        d, H, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.q_proj = Dense(d, H * D, use_bias=cfg.use_qkv_bias, dtype=dtype, rngs=rngs, kernels=kernels)
        self.k_proj = Dense(d, H * D, use_bias=cfg.use_qkv_bias, dtype=dtype, rngs=rngs, kernels=kernels)
        self.v_proj = Dense(d, H * D, use_bias=cfg.use_qkv_bias, dtype=dtype, rngs=rngs, kernels=kernels)
        self.query_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps, dtype=dtype)
        self.key_layernorm = RMSNorm(D, eps=cfg.rms_norm_eps, dtype=dtype)
        self.g_proj = Dense(d, H * D, dtype=dtype, rngs=rngs, kernels=kernels)
        self.g_norm = GroupRMSNormGate(H * D, cfg.group_norm_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.dense = Dense(H * D, d, use_bias=cfg.use_bias, dtype=dtype, rngs=rngs, kernels=kernels)

    def qkv(self, x, positions):
        """x [..., T, d] -> q, k, v [..., T, H_local, D] in x's dtype (SPEC §2.2 order).

        Projections' outputs are cast to float32 for SiLU, RMSNorm and RoPE (SPEC §2.2); the
        result is handed to the attention in the model's activation dtype, as HF hands it to
        fla: a bf16 model runs the 16-bit tensor-core prefill kernel (on H200 5x faster than
        float32 inputs, run 12 of scripts/bench_notes_linear_attention.md); a float32 model keeps
        float32 (fp32-accurate products). The state and all sums stay float32 either way."""
        D = self.cfg.head_dim
        q, k, v = (p(x).astype(F32) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.cfg.linear_silu:
            q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
        q, k, v = (t.reshape(t.shape[:-1] + (t.shape[-1] // D, D)) for t in (q, k, v))
        if self.cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        rot = self.cfg.linear_rope_dim
        q = rope.apply_neox(q, positions, rot, self.cfg.rope_theta, self.cfg.yarn)    # YaRN too (SPEC §5.3)
        k = rope.apply_neox(k, positions, rot, self.cfg.rope_theta, self.cfg.yarn)
        return q.astype(x.dtype), k.astype(x.dtype), v.astype(x.dtype)

    def output(self, o, x):
        """o [..., T, H_local, D] -> [..., T, d] (norm, gate from the same normed input x, dense)."""
        o = o.reshape(o.shape[:-2] + (-1,)).astype(x.dtype)
        return tp_psum(self.dense(self.g_norm(o, self.g_proj(x)), partial=True))

    def decay(self, num_heads=None, head_offset=None):
        """Log-decays of `num_heads` heads from `head_offset` (default: all heads; under tensor
        parallelism this device's heads, offset tp_index() * num_heads)."""
        g = log_decay(self.cfg, self.layer)
        if num_heads is None or (num_heads == g.shape[0] and head_offset is None):
            return g
        if head_offset is None:
            head_offset = tp_index() * num_heads
        return jax.lax.dynamic_slice_in_dim(g, head_offset, num_heads)

    @property
    def scale(self):
        return self.cfg.head_dim ** -0.5

    def __call__(self, x, positions, initial_state=None):
        """Full sequences, no cache. x [B, T, d] -> (out [B, T, d], final state [B, H, D, D])."""
        q, k, v = self.qkv(x, positions)
        o, state = la.chunked(q, k, v, self.decay(q.shape[-2]), initial_state, scale=self.scale)
        return self.output(o, x), state

    def step(self, x, batch, state_pool, head_offset=None):
        """Engine step over a packed batch. x [T, d]; state_pool [num_slots, H_local, D, D]."""
        q, k, v = self.qkv(x, batch.positions)
        g = self.decay(q.shape[-2], head_offset)
        if batch.decode_only:
            o, state_pool = la.decode(q, k, v, g, state_pool, batch.slots, batch.fresh, scale=self.scale,
                                      impl=self.kernels)
        else:
            o, state_pool = la.prefill(q, k, v, g, state_pool, batch.slots, batch.cu_seqlens, batch.fresh,
                                       scale=self.scale, impl=self.kernels)
        return self.output(o, x), state_pool
