"""MLA and MoE against transformers' own DeepseekV3Attention / DeepseekV3MoE (code no one here
wrote): same weights copied in, float32, relative error <= 1e-5 (float32 rounding over a few
matmuls of width <= 256 lands near 1e-7..1e-6; 1e-5 leaves room without hiding a wrong formula)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

from lingjax.config import BailingConfig
from lingjax.model.mla import MLA
from lingjax.model.moe import MoE

jax.config.update("jax_default_matmul_precision", "highest")
torch.manual_seed(0)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def t(x):
    return torch.from_numpy(np.array(x, np.float32))


def bailing_cfg(**kw):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=4,
                layer_group_size=2, group_norm_size=2, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, rope_theta=10000.0, num_experts=16, num_experts_per_tok=4,
                n_group=4, topk_group=2, moe_intermediate_size=24, num_shared_experts=1, routed_scaling_factor=2.5)
    base.update(kw)
    return BailingConfig(**base)


def ds_cfg(c: BailingConfig):
    return DeepseekV3Config(
        hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, rope_interleave=True,
        attention_bias=False, n_routed_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
        n_group=c.n_group, topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor,
        norm_topk_prob=True, moe_intermediate_size=c.moe_intermediate_size, n_shared_experts=c.num_shared_experts,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=4096, attn_implementation="eager")


def randomize(module, rng):
    """Random weights (norm weights near 1) so that no test passes on a degenerate init."""
    for path, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param) and var.get_value() is not None:
            shape = var.get_value().shape
            scale = 0.1 if len(shape) == 1 else 1.0 / np.sqrt(shape[-2])
            base = 1.0 if len(shape) == 1 and "expert_bias" not in path else 0.0
            var.set_value(jnp.asarray(base + scale * rng.standard_normal(shape), var.get_value().dtype))


@pytest.mark.parametrize("q_lora", [24, None])
def test_mla_matches_deepseek_v3_attention(q_lora):
    cfg = bailing_cfg(q_lora_rank=q_lora)
    ours = MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomize(ours, np.random.default_rng(1))
    ref = ds.DeepseekV3Attention(ds_cfg(cfg), layer_idx=0).eval()
    with torch.no_grad():
        if q_lora:
            ref.q_a_proj.weight.copy_(t(ours.q_a_proj.kernel[...]).T)
            ref.q_a_layernorm.weight.copy_(t(ours.q_a_layernorm.weight[...]))
            ref.q_b_proj.weight.copy_(t(ours.q_b_proj.kernel[...]).T)
        else:
            ref.q_proj.weight.copy_(t(ours.q_proj.kernel[...]).T)
        ref.kv_a_proj_with_mqa.weight.copy_(t(ours.kv_a_proj_with_mqa.kernel[...]).T)
        ref.kv_a_layernorm.weight.copy_(t(ours.kv_a_layernorm.weight[...]))
        ref.kv_b_proj.weight.copy_(t(ours.kv_b_proj.kernel[...]).T)
        ref.o_proj.weight.copy_(t(ours.dense.kernel[...]).T)
    B, T = 2, 13
    x = np.random.default_rng(2).standard_normal((B, T, cfg.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(T) + 5, (B, T))          # non-zero start: RoPE offsets matter
    rope = ds.DeepseekV3RotaryEmbedding(ds_cfg(cfg))
    cos, sin = rope(t(x), torch.from_numpy(pos.copy()))
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    with torch.no_grad():
        want, _ = ref(t(x), (cos, sin), mask)
    got = ours(jnp.asarray(x), jnp.asarray(pos))
    assert rel(got, want.numpy()) <= 1e-5

    # The absorbed form over a latent cache equals the naive form (SPEC §3.4).
    q_nope, q_pe = ours.query(jnp.asarray(x[0]), jnp.asarray(pos[0]))
    lat = ours.latent(jnp.asarray(x[0]), jnp.asarray(pos[0]))
    keys = jnp.broadcast_to(lat[None], (T, T, lat.shape[-1]))
    mask_abs = jnp.tril(jnp.ones((T, T), bool))
    o = ours.attend_latent(q_nope, q_pe, keys, mask_abs)
    absorbed = ours.dense(o.reshape(T, -1))
    assert rel(absorbed, want.numpy()[0]) <= 1e-5


# (3, 11): 33 tokens x top-k >> experts; (1, 3): 3 tokens x top-k < experts (decode-like, most experts
# empty); kernels: the reference path and the TPU kernels in interpret mode
@pytest.mark.parametrize("tokens,kernels", [((3, 11), None), ((1, 3), None), ((1, 3), "tpu_interpret")])
def test_moe_matches_deepseek_v3_moe(tokens, kernels):
    cfg = bailing_cfg()
    ours = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), kernels=kernels)
    randomize(ours, np.random.default_rng(3))
    ref = ds.DeepseekV3MoE(ds_cfg(cfg)).eval()
    I = cfg.moe_intermediate_size
    with torch.no_grad():
        ref.gate.weight.copy_(t(ours.gate[...]).T)
        ref.gate.e_score_correction_bias.copy_(t(ours.expert_bias[...]))
        ref.experts.gate_up_proj.copy_(torch.cat([t(ours.w_gate[...]).transpose(1, 2),
                                                  t(ours.w_up[...]).transpose(1, 2)], dim=1))
        ref.experts.down_proj.copy_(t(ours.w_down[...]).transpose(1, 2))
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(ref.shared_experts, name).weight.copy_(t(getattr(ours.shared_experts, name).kernel[...]).T)
    assert ref.experts.gate_up_proj.shape[1] == 2 * I
    x = np.random.default_rng(4).standard_normal(tokens + (cfg.hidden_size,)).astype(np.float32)
    with torch.no_grad():
        _, w_ref, idx_ref = ref.gate(t(x))
        want = ref(t(x))
    idx, w = ours.route(jnp.asarray(x.reshape(-1, cfg.hidden_size)))
    # Same experts picked for every token (order-free: torch.topk(sorted=False)).
    np.testing.assert_array_equal(np.sort(np.asarray(idx), -1), np.sort(idx_ref.numpy(), -1))
    order, order_ref = np.argsort(np.asarray(idx), -1), np.argsort(idx_ref.numpy(), -1)
    assert rel(np.take_along_axis(np.asarray(w), order, -1),
               np.take_along_axis(w_ref.numpy(), order_ref, -1)) <= 1e-6
    got = ours(jnp.asarray(x))
    assert rel(got, want.numpy()) <= 1e-5


def test_router_uses_bias_for_selection_only():
    from lingjax.model.moe import route
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    w = rng.standard_normal((32, 16)).astype(np.float32) / 6
    bias = (0.3 * rng.standard_normal(16)).astype(np.float32)
    kw = dict(top_k=4, n_group=4, topk_group=2, scale=2.5)
    idx_b, w_b = route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), **kw)
    idx_0, _ = route(jnp.asarray(x), jnp.asarray(w), jnp.zeros(16), **kw)
    assert (np.sort(np.asarray(idx_b), -1) != np.sort(np.asarray(idx_0), -1)).any()   # bias moves selection
    p = 1 / (1 + np.exp(-(x.astype(np.float64) @ w)))
    sel = np.take_along_axis(p, np.asarray(idx_b), -1)
    np.testing.assert_allclose(np.asarray(w_b), 2.5 * sel / sel.sum(-1, keepdims=True), rtol=1e-5)
