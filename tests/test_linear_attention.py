"""The linear-attention recurrence and layer against float64 numpy and against fla's naive simple-GLA
reference (flash-linear-attention 0.6.0, PyPI; pure torch, runs on CPU).

Tolerance: 1e-5 relative in float32. The chunked form sums <= 64 products per chunk plus a carried
state; float32 rounding lands near 1e-7 relative, so 1e-5 passes any correct formula and fails a
wrong decay exponent (gamma^i instead of gamma^(i+1) errs by ~e^lambda - 1 >= 4e-3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

from lingjax.config import BailingConfig
from lingjax.kernels.linear_attention import chunked
from lingjax.model.common import GroupRMSNormGate
from lingjax.model.linear_attention import LinearAttention, log_decay
from lingjax.model import rope

jax.config.update("jax_default_matmul_precision", "highest")
LAMBDAS = np.array([0.004, 0.05, 0.3, 0.92])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def recurrence64(q, k, v, g, S0, scale):
    """SPEC §2.4, token by token, float64. q,k,v [T,H,D]; g [H]; S0 [H,D,D]."""
    S, out = S0.astype(np.float64), []
    for i in range(q.shape[0]):
        S = np.exp(g)[:, None, None] * S + k[i][:, :, None] * v[i][:, None, :]
        out.append(scale * np.einsum("hk,hkv->hv", q[i], S))
    return np.stack(out), S


@pytest.mark.parametrize("T", [1, 64, 128, 65])
def test_chunked_matches_float64_recurrence_and_fla(T):
    rng = np.random.default_rng(T)
    H, D = 4, 32
    q, k, v = (rng.standard_normal((T, H, D)) for _ in range(3))
    S0 = rng.standard_normal((H, D, D))
    g = -LAMBDAS
    scale = D ** -0.5
    o_ref, S_ref = recurrence64(q, k, v, g, S0, scale)
    f32 = lambda a: jnp.asarray(a[None], jnp.float32)
    o, S = chunked(f32(q), f32(k), f32(v), jnp.asarray(g, jnp.float32), f32(S0), scale=scale)
    assert rel(o[0], o_ref) <= 1e-5 and rel(S[0], S_ref) <= 1e-5
    # A second implementation no one here wrote: fla's naive simple-GLA (g per token, [B,T,H]).
    tq = lambda a: torch.from_numpy(a[None].astype(np.float32))
    o_fla, S_fla = naive_recurrent_simple_gla(tq(q), tq(k), tq(v), torch.from_numpy(
        np.broadcast_to(g, (1, T, H)).astype(np.float32).copy()), scale=scale,
        initial_state=torch.from_numpy(S0[None].astype(np.float32)), output_final_state=True)
    assert rel(o[0], o_fla[0].numpy()) <= 1e-5 and rel(S[0], S_fla[0].numpy()) <= 1e-5


def test_chunk_size_does_not_matter():
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 100, 4, 16)), jnp.float32) for _ in range(3))
    g = jnp.asarray(-LAMBDAS, jnp.float32)
    a, Sa = chunked(q, k, v, g, scale=0.25, chunk=64)
    b, Sb = chunked(q, k, v, g, scale=0.25, chunk=7)
    assert rel(a, b) <= 1e-5 and rel(Sa, Sb) <= 1e-5


def test_group_rmsnorm_uses_group_count():
    """group_norm_size is the NUMBER of groups (SPEC §2.7): 2 groups of 32 channels here, not 32
    groups of 2 channels (or 2 channels per group)."""
    rng = np.random.default_rng(0)
    o = rng.standard_normal((3, 64)).astype(np.float32) * np.linspace(0.1, 5, 64, dtype=np.float32)
    gate = rng.standard_normal((3, 64)).astype(np.float32)
    norm = GroupRMSNormGate(64, 2, eps=1e-6, dtype=jnp.float32)
    got = np.asarray(norm(jnp.asarray(o), jnp.asarray(gate)))
    og = o.astype(np.float64).reshape(3, 2, 32)
    want = (og / np.sqrt((og ** 2).mean(-1, keepdims=True) + 1e-6)).reshape(3, 64) / (1 + np.exp(-gate))
    assert rel(got, want) <= 1e-6
    og_wrong = o.astype(np.float64).reshape(3, 32, 2)
    wrong = (og_wrong / np.sqrt((og_wrong ** 2).mean(-1, keepdims=True) + 1e-6)).reshape(3, 64) / (1 + np.exp(-gate))
    assert rel(got, wrong) > 1e-2


def test_neox_partial_rope_matches_rotate_half():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 16))
    pos = np.arange(5) + 11
    rot, theta = 8, 600000.0
    inv = 1.0 / theta ** (np.arange(0, rot, 2) / rot)
    ang = pos[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    xr = x[..., :rot]
    rotate_half = np.concatenate([-xr[..., rot // 2:], xr[..., : rot // 2]], -1)
    want = np.concatenate([xr * cos + rotate_half * sin, x[..., rot:]], -1)
    got = rope.apply_neox(jnp.asarray(x, jnp.float32), jnp.asarray(pos), rot, theta)
    assert rel(got, want) <= 1e-6


def layer64(layer: LinearAttention, x, pos, S0):
    """SPEC §2.2 in float64 numpy from the layer's own weights (no lingjax code on this path)."""
    cfg = layer.cfg
    W = lambda m: np.asarray(m.kernel[...], np.float64)
    H, D = cfg.num_attention_heads, cfg.head_dim
    q, k, v = (x @ W(p) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    q, k, v = (a.reshape(len(x), H, D) for a in (q, k, v))
    rms = lambda a, w: a / np.sqrt((a ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w
    q = rms(q, np.asarray(layer.query_layernorm.weight[...], np.float64))
    k = rms(k, np.asarray(layer.key_layernorm.weight[...], np.float64))
    rot = cfg.linear_rope_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, rot, 2) / rot)
    ang = np.concatenate([pos[:, None] * inv] * 2, -1)[:, None]

    def rope_np(a):
        ar = a[..., :rot]
        rh = np.concatenate([-ar[..., rot // 2:], ar[..., : rot // 2]], -1)
        return np.concatenate([ar * np.cos(ang) + rh * np.sin(ang), a[..., rot:]], -1)
    q, k = rope_np(q), rope_np(k)
    g = np.asarray(log_decay(cfg, layer.layer), np.float64)
    o, _ = recurrence64(q, k, v, g, S0, D ** -0.5)
    G = cfg.group_norm_size
    og = o.reshape(len(x), G, -1)
    on = (og / np.sqrt((og ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps)).reshape(len(x), -1)
    on = on * np.asarray(layer.g_norm.weight[...], np.float64) / (1 + np.exp(-(x @ W(layer.g_proj))))
    return on @ W(layer.dense)


@pytest.mark.parametrize("T", [1, 64, 65])
def test_layer_matches_float64_spec(T):
    cfg = BailingConfig(hidden_size=48, num_attention_heads=4, head_dim=16, num_hidden_layers=4, layer_group_size=2,
                        group_norm_size=2, rope_theta=10000.0, num_experts=8, n_group=4, topk_group=2,
                        num_experts_per_tok=2)
    layer = LinearAttention(cfg, 0, dtype=jnp.float32, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(4)
    for m in (layer.query_layernorm, layer.key_layernorm, layer.g_norm):
        m.weight.set_value(jnp.asarray(1 + 0.1 * rng.standard_normal(m.weight.shape), jnp.float32))
    for m in (layer.q_proj, layer.k_proj, layer.v_proj, layer.g_proj, layer.dense):
        m.kernel.set_value(jnp.asarray(rng.standard_normal(m.kernel.shape) / np.sqrt(m.kernel.shape[0]), jnp.float32))
    x = rng.standard_normal((T, 48))
    pos = np.arange(T) + 3
    S0 = rng.standard_normal((4, 16, 16))
    got, _ = layer(jnp.asarray(x[None], jnp.float32), jnp.asarray(pos[None]), jnp.asarray(S0[None], jnp.float32))
    assert rel(got[0], layer64(layer, x, pos, S0)) <= 1e-5


def test_slope_offset_changes_decay():
    cfg0 = BailingConfig(num_hidden_layers=20, num_attention_heads=16)
    cfg1 = BailingConfig(num_hidden_layers=20, num_attention_heads=16, slope_layer_offset=1)
    g0, g1 = np.asarray(log_decay(cfg0, 0)), np.asarray(log_decay(cfg1, 0))
    np.testing.assert_allclose(g0[0], -(2 ** -0.5) * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(g1[0], -(2 ** -0.5) * (1 + 1 / 19 + 1e-5), rtol=1e-6)
