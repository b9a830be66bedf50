"""Issue 20 test gaps: the per-layer decay of the released shapes, and the router under bfloat16.

Decay: the expected g[l, h] = -slope_h * (1 - (l - offset)/(L - 1) + 1e-5) (SPEC §2.5, §2.6) is
computed here in float64 from the closed form slope_h = 2^(-8 (h + 1) / H) (H a power of two, as in
both released shapes), not with lingjax's alibi_slopes / layer_decay_factor / log_decay. lingjax keeps
g in float32: two float32 roundings (slope, factor) and one product, so 3e-7 relative is the bound.

Router: bfloat16 activations and a bfloat16 gate kernel (a bf16 checkpoint) must route exactly as the
float32 computation of the same (upcast) values, SPEC §4.2: here that computation is done in float64
numpy; the selection must be identical and the weights equal to float32 rounding (1e-6 relative).
The inputs are built so that a bf16 cast of expert_bias (bias differences of 1e-3 around 1.0, below
bf16's 2^-7 spacing there, decide the selection) or of the gate logits (|logits| ~ 2, where bf16
spacing is 2^-7..2^-6) inside `route` changes the selection or the weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lingjax.config import BailingConfig
from lingjax.model.linear_attention import LinearAttention, log_decay
from lingjax.model.moe import MoE, route
from lingjax.testing import tiny_config

jax.config.update("jax_default_matmul_precision", "highest")

SHAPES = {"Ling-2.6-flash": dict(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096),
          "Ling-2.5-1T": dict(num_hidden_layers=80, num_attention_heads=64, hidden_size=8192)}


def expected_log_decay(L, H, layer, offset):
    slope = 2.0 ** (-8.0 * np.arange(1, H + 1, dtype=np.float64) / H)
    return -slope * (1.0 - (layer - offset) / (L - 1) + 1e-5)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decay_of_every_layer(shape, offset):
    kw = SHAPES[shape]
    cfg = BailingConfig(**kw, layer_group_size=8, head_dim=128, group_norm_size=4, slope_layer_offset=offset)
    cfg.validate()
    L, H = kw["num_hidden_layers"], kw["num_attention_heads"]
    assert len(cfg.linear_layers) == L - L // 8
    for layer in range(L):                     # linear layers use it; checked for every index
        got = np.asarray(log_decay(cfg, layer))
        assert got.dtype == np.float32 and got.shape == (H,)
        np.testing.assert_allclose(got, expected_log_decay(L, H, layer, offset), rtol=3e-7, atol=0,
                                   err_msg=f"{shape} layer {layer} offset {offset}")
    # spot values of SPEC §2.6
    f = -expected_log_decay(L, H, 0, offset)[0] / 2.0 ** (-8.0 / H)
    assert f == pytest.approx({(80, 0): 1.00001, (80, 1): 1.01267, (32, 0): 1.00001, (32, 1): 1.03227}[(L, offset)],
                              abs=1e-5)


def test_layer_uses_its_own_decay():
    """The module's decay is the formula at its own layer index (tiny model: L = 4, H = 4, both offsets)."""
    for offset in (0, 1):
        cfg = tiny_config(slope_layer_offset=offset)
        for layer in cfg.linear_layers:
            m = nnx.eval_shape(lambda: LinearAttention(cfg, layer, dtype=jnp.float32, rngs=nnx.Rngs(0)))
            np.testing.assert_allclose(np.asarray(m.decay()), expected_log_decay(4, 4, layer, offset), rtol=3e-7)


def route_f64(x, w, bias, k, n_group, topk_group, scale):
    x, w, bias = (np.asarray(a, np.float64) for a in (x, w, bias))
    T, E = x.shape[0], w.shape[1]
    p = 1 / (1 + np.exp(-(x @ w)))
    b = p + bias
    grp = np.sort(b.reshape(T, n_group, -1), -1)[..., -2:].sum(-1)
    keep = np.argsort(-grp, -1, kind="stable")[:, :topk_group]
    mask = np.zeros((T, n_group), bool)
    np.put_along_axis(mask, keep, True, -1)
    bm = np.where(np.repeat(mask, E // n_group, -1), b, -np.inf)
    idx = np.argsort(-bm, -1, kind="stable")[:, :k]
    sel = np.take_along_axis(p, idx, -1)
    return idx, sel / (sel.sum(-1, keepdims=True) + 1e-20) * scale, bm


def bf16_inputs(case, T=64, d=64, E=16, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, d)), jnp.bfloat16)
    if case == "bias decides":       # logits ~ 0.003: p ~ 0.5 +- 1e-3; bias steps of 1e-3 around 1.0
        w = jnp.asarray(rng.standard_normal((d, E)) * 3e-4, jnp.bfloat16)
        bias = jnp.asarray(1.0 + 1e-3 * rng.permutation(E), jnp.float32)
    else:                            # "logits decide": |logits| ~ 2, a small bias
        w = jnp.asarray(rng.standard_normal((d, E)) * 0.25, jnp.bfloat16)
        bias = jnp.asarray(0.01 * rng.standard_normal(E), jnp.float32)
    return x, w, bias


@pytest.mark.parametrize("case", ["bias decides", "logits decide"])
def test_router_bf16_equals_float32_computation(case):
    x, w, bias = bf16_inputs(case)
    k, n_group, topk_group, scale = 4, 4, 2, 2.5
    want_idx, want_w, bm = route_f64(x, w, bias, k, n_group, topk_group, scale)
    srt = -np.sort(-bm, -1)
    assert (srt[:, k - 1] - srt[:, k]).min() > 1e-6           # no near-ties: the selection is well defined
    idx, wt = jax.jit(lambda x, w, b: route(x, w, b, top_k=k, n_group=n_group, topk_group=topk_group,
                                            scale=scale))(x, w, bias)
    assert wt.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(wt), want_w, rtol=1e-6, atol=0)
    # the module (bf16 model: bf16 gate kernel, float32 expert_bias) routes the same
    cfg = tiny_config(num_experts=16, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
                      routed_scaling_factor=scale)
    moe = MoE(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert moe.gate[...].dtype == jnp.bfloat16 and moe.expert_bias[...].dtype == jnp.float32
    moe.gate.set_value(w)
    moe.expert_bias.set_value(bias)
    idx2, wt2 = nnx.jit(lambda m, x: m.route(x))(moe, x)
    np.testing.assert_array_equal(np.asarray(idx2), want_idx)
    np.testing.assert_allclose(np.asarray(wt2), want_w, rtol=1e-6, atol=0)
