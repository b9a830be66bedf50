"""DeepSeek-V3-style MoE with the exact HF router (SPEC §4.2): float32 logits and sigmoid, float32
expert_bias for selection only, group-limited top-k, renormalised unbiased weights times
routed_scaling_factor, plus an always-on unscaled shared expert."""
import jax
import jax.numpy as jnp
from flax import nnx

from lingjax.config import BailingConfig
from lingjax.kernels import moe as moe_kernels
from lingjax.model.common import MLP, init_normal
from lingjax.model.parallel import tp_index, tp_psum

F32 = jnp.float32


def route(x, gate_kernel, expert_bias, *, top_k, n_group, topk_group, scale):
    """x [T, d]; gate_kernel [d, E]; expert_bias [E] f32 -> (expert ids [T, k], weights [T, k] f32)."""
    logits = jnp.dot(x.astype(F32), gate_kernel.astype(F32), precision='highest')
    p = jax.nn.sigmoid(logits)
    b = p + expert_bias.astype(F32)
    T, E = b.shape
    grouped = b.reshape(T, n_group, E // n_group)
    group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                      # [T, n_group]
    _, keep = jax.lax.top_k(group_score, topk_group)                         # [T, topk_group]
    group_mask = jnp.zeros((T, n_group), bool).at[jnp.arange(T)[:, None], keep].set(True)
    b_masked = jnp.where(jnp.repeat(group_mask, E // n_group, axis=1), b, -jnp.inf)
    _, idx = jax.lax.top_k(b_masked, top_k)
    w = jnp.take_along_axis(p, idx, axis=-1)
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * scale


class MoE(nnx.Module):
    def __init__(self, cfg: BailingConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, kernels: str | None = None):
        self.cfg = cfg
        self.kernels = moe_kernels.resolve(kernels) if kernels is not None else None   # None: by backend at trace
        d, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.gate = nnx.Param(init_normal(rngs, (d, E), dtype))                   # router kernel [d, E]
        self.expert_bias = nnx.Param(jnp.zeros((E,), F32))                        # always float32
        self.w_gate = nnx.Param(init_normal(rngs, (E, d, I), dtype))
        self.w_up = nnx.Param(init_normal(rngs, (E, d, I), dtype))
        self.w_down = nnx.Param(init_normal(rngs, (E, I, d), dtype))
        self.shared_experts = (MLP(d, cfg.shared_intermediate_size, use_bias=cfg.use_bias, dtype=dtype, rngs=rngs, kernels=kernels)
                               if cfg.num_shared_experts > 0 else None)

    def route(self, x2):
        c = self.cfg
        return route(x2, self.gate[...], self.expert_bias[...], top_k=c.num_experts_per_tok,
                     n_group=c.n_group, topk_group=c.topk_group, scale=c.routed_scaling_factor)

    def experts(self, x2, idx, w):
        """Routed experts through the grouped-matmul dispatch (lingjax.kernels.moe, impl=self.kernels),
        combined with the float32 routing weights and summed in float32 (HF combine precision, SPEC
        App. B). Expert parallel under tensor parallelism: this device holds experts
        [off, off + E_local) and returns their share of the sum; ids of other devices' experts fall
        outside [0, E_local) after the offset and are dropped by the layout (the routing itself is
        computed in full on every device)."""
        n_local = self.w_gate.shape[0]
        off = 0 if n_local == self.cfg.num_experts else tp_index() * n_local
        return moe_kernels.experts(x2, idx - off, w, self.w_gate.get_value(), self.w_up.get_value(),
                                   self.w_down.get_value(), impl=self.kernels)     # arrays or FP8Weights

    def __call__(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        idx, w = self.route(x2)
        y = self.experts(x2, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2, reduce=False)
        return tp_psum(y).reshape(shape)          # routed + shared partials: one all-reduce
