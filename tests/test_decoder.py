"""decoder.py directly: DecoderLayer's wiring (pre-norm residuals, layer kinds) against a composition of
its parts, and the MTP layer numerically against a float64 numpy reimplementation of SPEC §5.2 (with
MLA per SPEC §3.2-3.3 and the MoE per SPEC §4.2, written here, independent of lingjax's modules).

Tolerance: the model runs in float32 with float32 accumulation; the reference in float64. The MTP
path is ~10 matmuls deep with a softmax and two norms, so 1e-5 of the output's scale (fp32 rounding
~6e-8 per op, times depth and fan-in) leaves ample margin while a wrong order (e.g. [hidden, embedding]
in the concat), a missing norm or an unscaled routed sum is off by O(1)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lingjax.model.decoder import DecoderLayer
from lingjax.testing import tiny_config, write_tiny_checkpoint
from lingjax.weights import load_hf

jax.config.update("jax_default_matmul_precision", "highest")


def f64(v):
    return np.asarray(v[...], np.float64)


# ------------------------------------------------------------------------------------------ reference
def rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def rope_interleaved(x, pos, theta):
    """x [T, ..., R]: pairs (x_2i, x_2i+1) rotated by pos * theta^(-2i/R) (SPEC §3.3)."""
    R = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, R, 2) / R)                 # [T, R/2]
    ang = ang.reshape((ang.shape[0],) + (1,) * (x.ndim - 2) + (R // 2,))
    c, s = np.cos(ang), np.sin(ang)
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = xe * c - xo * s, xo * c + xe * s
    return out


def mla_ref(p, cfg, x, pos):
    """SPEC §3.2 naive form, one sequence x [T, d]."""
    T, H = x.shape[0], cfg.num_attention_heads
    nope, rd, vd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q = rms(x @ f64(p.q_a_proj.kernel), f64(p.q_a_layernorm.weight), 1e-6) @ f64(p.q_b_proj.kernel)
    q = q.reshape(T, H, nope + rd)
    ckv = x @ f64(p.kv_a_proj_with_mqa.kernel)
    c, k_pe = rms(ckv[:, :r], f64(p.kv_a_layernorm.weight), 1e-6), ckv[:, r:]
    kv = (c @ f64(p.kv_b_proj.kernel)).reshape(T, H, nope + vd)
    q_pe = rope_interleaved(q[..., nope:], pos, cfg.rope_theta)
    k_pe = rope_interleaved(k_pe, pos, cfg.rope_theta)
    Q = np.concatenate([q[..., :nope], q_pe], -1)                                   # [T, H, 192]
    K = np.concatenate([kv[..., :nope], np.broadcast_to(k_pe[:, None], (T, H, rd))], -1)
    s = np.einsum("thd,shd->hts", Q, K) * (nope + rd) ** -0.5
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", a, kv[..., nope:]).reshape(T, H * vd)
    return o @ f64(p.dense.kernel)


def moe_ref(p, cfg, x):
    """SPEC §4.2: float scores, biased group-limited selection, unbiased renormalised weights, scaled
    routed sum, unscaled shared expert."""
    T, E = x.shape[0], cfg.num_experts
    prob = 1 / (1 + np.exp(-(x @ f64(p.gate))))
    b = prob + f64(p.expert_bias)
    grp = np.sort(b.reshape(T, cfg.n_group, -1), -1)[..., -2:].sum(-1)
    keep = np.argsort(-grp, -1, kind="stable")[:, :cfg.topk_group]
    in_kept = np.zeros((T, cfg.n_group), bool)
    np.put_along_axis(in_kept, keep, True, -1)
    bm = np.where(np.repeat(in_kept, E // cfg.n_group, -1), b, -np.inf)
    idx = np.argsort(-bm, -1, kind="stable")[:, :cfg.num_experts_per_tok]
    w = np.take_along_axis(prob, idx, -1)
    w = w / (w.sum(-1, keepdims=True) + 1e-20) * cfg.routed_scaling_factor
    silu = lambda z: z / (1 + np.exp(-z))                                            # noqa: E731
    wg, wu, wd = f64(p.w_gate), f64(p.w_up), f64(p.w_down)
    y = np.zeros_like(x)
    for t in range(T):
        for j, e in enumerate(idx[t]):
            y[t] += w[t, j] * ((silu(x[t] @ wg[e]) * (x[t] @ wu[e])) @ wd[e])
    s = p.shared_experts
    y += (silu(x @ f64(s.gate_proj.kernel)) * (x @ f64(s.up_proj.kernel))) @ f64(s.down_proj.kernel)
    return y


def mtp_ref(m, cfg, next_embeds, hidden, pos):
    """SPEC §5.2 for one sequence."""
    eps = cfg.rms_norm_eps
    e, h = rms(next_embeds, f64(m.enorm.weight), eps), rms(hidden, f64(m.hnorm.weight), eps)
    z = np.concatenate([e, h], -1) @ f64(m.eh_proj.kernel)
    blk = m.block
    z = z + mla_ref(blk.attention, cfg, rms(z, f64(blk.input_layernorm.weight), eps), pos)
    z = z + moe_ref(blk.mlp, cfg, rms(z, f64(blk.post_attention_layernorm.weight), eps))
    return rms(z, f64(m.final_layernorm.weight), eps)


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random float32 weights (testing.py: matrices N(0, 1/fan_in), norms near 1, expert_bias N(0, 0.1))."""
    path = str(tmp_path_factory.mktemp("dec"))
    write_tiny_checkpoint(path, tiny_config(n_group=2, topk_group=1, num_experts_per_tok=3), seed=5,
                          dtype=np.float32, shards=1)
    return load_hf(path, dtype=jnp.float32, mtp=True)[1]


@nnx.jit
def _layer_and_parts(layer, x, pos):
    """(the layer's output, the same composed here from its parts)"""
    a = layer.attention(layer.input_layernorm(x), pos)
    h = x + (a if layer.is_mla else a[0])
    return layer(x, pos), h + layer.mlp(layer.post_attention_layernorm(h))


def test_mtp_layer_matches_float64_reference(model):
    """mtp_logits (the MTP layer, then the shared lm_head) on random main hidden states."""
    cfg = model.cfg
    rng = np.random.default_rng(1)
    T = 11
    tokens = rng.integers(0, cfg.vocab_size, (2, T))
    hidden = rng.standard_normal((2, T, cfg.hidden_size))
    emb = f64(model.word_embeddings)
    pos = np.arange(T, dtype=np.float64)
    nxt = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], -1)       # SPEC App. B: id 0 last
    want = np.stack([mtp_ref(model.mtp[0], cfg, emb[nxt[b]], hidden[b], pos) for b in range(2)]) @ f64(model.lm_head)
    got = nnx.jit(lambda m, t, h: m.mtp_logits(t, h))(model, jnp.asarray(tokens), jnp.asarray(hidden, jnp.float32))
    assert got.dtype == jnp.float32 and np.abs(want).max() > 0.5                     # not a vanishing signal
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_decoder_layer_is_prenorm_residual_of_its_parts(model):
    """Each layer kind (linear + dense MLP, MLA + MoE, linear + MoE): out = h + mlp(norm2(h)) with
    h = x + attn(norm1(x)), and the kinds config.py assigns."""
    cfg = model.cfg
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    for l, layer in enumerate(model.layers):
        assert isinstance(layer, DecoderLayer)
        assert (layer.is_mla, layer.is_moe) == (cfg.is_mla(l), cfg.is_moe(l))
        assert type(layer.attention).__name__ == ("MLA" if cfg.is_mla(l) else "LinearAttention")
        assert type(layer.mlp).__name__ == ("MoE" if cfg.is_moe(l) else "MLP")
    assert [(m.is_mla, m.is_moe) for m in model.layers[:3]] == [(False, False), (True, True), (False, True)]
    for layer in model.layers[:3]:
        got, want = _layer_and_parts(layer, x, pos)
        assert np.abs(np.asarray(got - x)).max() > 0.1                             # the layer does something
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_score_mtp_logits_match_float64_reference(model):
    """`lingjax score --mtp` (speculative.mtp_score): row t from the main model's final-norm hidden at t and
    the embedding of token t+1 (id 0 at the last row), causal over the MTP positions; same tolerance as
    above. The hidden states come from the model itself (they are the input under test's definition)."""
    from lingjax.speculative import mtp_score
    cfg = model.cfg
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (9, 4)]
    got = mtp_score(model, seqs, bucket=16)       # one compiled shape for both
    emb = f64(model.word_embeddings)
    for s, g in zip(seqs, got):
        hidden = np.asarray(nnx.jit(lambda m, t: m.hidden(t))(model, jnp.asarray([s]))[0], np.float64)
        nxt = np.asarray(s[1:] + [0])
        want = mtp_ref(model.mtp[0], cfg, emb[nxt], hidden, np.arange(len(s), dtype=np.float64)) @ f64(model.lm_head)
        assert g.dtype == np.float32 and g.shape == (len(s), cfg.vocab_size)
        np.testing.assert_allclose(g.astype(np.float64), want, rtol=0, atol=1e-5 * np.abs(want).max())
