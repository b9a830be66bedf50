"""DeepSeek-V3-style MoE with the exact HF router (SPEC §4.2): float32 logits and sigmoid, float32
expert_bias for selection only, group-limited top-k, renormalised unbiased weights times
routed_scaling_factor, plus an always-on unscaled shared expert."""
import jax
import jax.numpy as jnp
from flax import nnx

from lingjax.config import BailingConfig
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


SORTED_MAX_WEIGHT_BYTES = 64 << 20     # "sorted" while its gathered per-block weights stay under this


def _block(n_pairs, n_experts):
    """Rows per block of the sorted form: 64, smaller when there are few pairs per expert (each
    expert's group is padded to a whole block)."""
    b = 64
    while b > 8 and n_pairs < 2 * b * n_experts:
        b //= 2
    return b


def _n_blocks(n_pairs, n_experts, block):
    # every expert's group padded to whole blocks: at most n_pairs + E * (block - 1) rows
    return -(-(n_pairs + n_experts * (block - 1)) // block)


def pick_form(T, k, n_local, d, I, itemsize=4):
    if T * k < n_local:
        return "gather"
    b = _block(T * k, n_local)
    if _n_blocks(T * k, n_local, b) * 3 * d * I * itemsize <= SORTED_MAX_WEIGHT_BYTES:
        return "sorted"
    return "dense"


def sorted_experts(x2, idx, w, w_gate, w_up, w_down):
    """Grouped expert FFN in plain jnp: x2 [T, d]; idx [T, k] expert ids in [0, E); w [T, k] f32
    combine weights (0 drops a pair); w_gate/w_up [E, d, I], w_down [E, I, d] (cast to x2's dtype
    after the gather, so only the blocks' weights are converted).
    The T * k (token, expert) pairs are sorted by expert (stable) and laid out in blocks of `block`
    rows, each expert's group padded to whole blocks, so every block belongs to one expert; padding
    rows read a zero token row and carry weight 0. Each block runs against its expert's gathered
    weights; the weighted outputs are scatter-added back to their tokens in float32 (per token in
    expert order). Static shapes throughout (the block count is the worst case over routings)."""
    T, k = idx.shape
    E, d, _ = w_gate.shape
    n = T * k
    block = _block(n, E)
    nb = _n_blocks(n, E, block)
    e = idx.reshape(-1)
    order = jnp.argsort(e, stable=True)
    e_sorted = e[order]
    counts = jnp.bincount(e, length=E)
    padded = -(-counts // block) * block
    pad_end = jnp.cumsum(padded)
    rank = jnp.arange(n) - (jnp.cumsum(counts) - counts)[e_sorted]           # index within its group
    row = (pad_end - padded)[e_sorted] + rank                                 # row in the block layout
    token = jnp.full((nb * block,), T, jnp.int32).at[row].set((order // k).astype(jnp.int32))
    weight = jnp.zeros((nb * block,), F32).at[row].set(w.reshape(-1)[order])
    expert = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(nb) * block, side='right'), E - 1)
    xb = jnp.concatenate([x2, jnp.zeros((1, d), x2.dtype)])[token].reshape(nb, block, d)
    dt = x2.dtype
    h = jax.nn.silu(jnp.einsum('bnd,bdi->bni', xb, w_gate[expert].astype(dt)))
    h = h * jnp.einsum('bnd,bdi->bni', xb, w_up[expert].astype(dt))
    y = jnp.einsum('bni,bid->bnd', h, w_down[expert].astype(dt)).reshape(nb * block, d)
    out = jnp.zeros((T + 1, d), F32).at[token].add(y.astype(F32) * weight[:, None])
    return out[:T].astype(x2.dtype)


class MoE(nnx.Module):
    def __init__(self, cfg: BailingConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        d, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.gate = nnx.Param(init_normal(rngs, (d, E), dtype))                   # router kernel [d, E]
        self.expert_bias = nnx.Param(jnp.zeros((E,), F32))                        # always float32
        self.w_gate = nnx.Param(init_normal(rngs, (E, d, I), dtype))
        self.w_up = nnx.Param(init_normal(rngs, (E, d, I), dtype))
        self.w_down = nnx.Param(init_normal(rngs, (E, I, d), dtype))
        self.shared_experts = (MLP(d, cfg.shared_intermediate_size, use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
                               if cfg.num_shared_experts > 0 else None)

    def route(self, x2):
        c = self.cfg
        return route(x2, self.gate[...], self.expert_bias[...], top_k=c.num_experts_per_tok,
                     n_group=c.n_group, topk_group=c.topk_group, scale=c.routed_scaling_factor)

    def experts(self, x2, idx, w):
        """Routed experts, combined with the float32 routing weights and summed in float32 (HF
        combine precision, SPEC App. B). Three exact forms of the same sum, `pick_form` chooses by the
        static shapes (each form casts only the expert weights it reads to the activation dtype):
        - "gather" (T * top_k < local experts: decode): gather just the picked experts' weights
          per (token, k) pair, so a step reads T * top_k expert matrices, not all E;
        - "sorted": the (token, k) pairs sorted by expert into fixed blocks of `_block(...)` rows,
          each block padded and run against its expert's weights (`sorted_experts`): work is the
          number of pairs, not T * E. Used while the gathered per-block weights stay small (tiny
          models, CPU, training);
        - "dense": every local expert on every token, weighted by a [T, E] combine matrix (zero
          for experts not picked); the grouped-matmul kernel replaces this at scale.
        Expert parallel under tensor parallelism: this device holds experts [off, off + E_local) and
        returns their share of the sum (the routing itself is computed in full on every device)."""
        T, k = idx.shape
        n_local, d, I = self.w_gate.shape
        off = 0 if n_local == self.cfg.num_experts else tp_index() * n_local
        dt = x2.dtype
        form = pick_form(T, k, n_local, d, I)
        local = idx - off
        mine = (local >= 0) & (local < n_local)
        local = jnp.clip(local, 0, n_local - 1)
        w = jnp.where(mine, w, 0.0)
        wg, wu, wd = self.w_gate[...], self.w_up[...], self.w_down[...]
        if form == "gather":
            h = jax.nn.silu(jnp.einsum('td,tkdi->tki', x2, wg[local].astype(dt)))
            h = h * jnp.einsum('td,tkdi->tki', x2, wu[local].astype(dt))
            y = jnp.einsum('tki,tkid->tkd', h, wd[local].astype(dt))
            return jnp.einsum('tkd,tk->td', y.astype(F32), w).astype(dt)
        if form == "sorted":
            return sorted_experts(x2, local, w, wg, wu, wd)
        assert form == "dense", form
        wg, wu, wd = wg.astype(dt), wu.astype(dt), wd.astype(dt)
        combine = jnp.zeros((T, n_local), F32).at[jnp.arange(T)[:, None], local].add(w)
        h = jax.nn.silu(jnp.einsum('td,edi->tei', x2, wg))
        h = h * jnp.einsum('td,edi->tei', x2, wu)
        y = jnp.einsum('tei,eid->ted', h, wd)
        return jnp.einsum('ted,te->td', y.astype(F32), combine).astype(dt)

    def __call__(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        idx, w = self.route(x2)
        y = self.experts(x2, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2, reduce=False)
        return tp_psum(y).reshape(shape)          # routed + shared partials: one all-reduce
