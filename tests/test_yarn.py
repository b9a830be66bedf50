"""YaRN rope_scaling (SPEC §5.3) against transformers' DeepSeek-V3 (code no one here wrote): the rotary
tables (inverse frequencies and cos/sin factor), the MLA softmax scale (mscale^2), MLA in the naive, absorbed
and engine-step forms, the linear layers' NeoX table, and the tiny model scored through the engine.

Tolerances: float32, relative 1e-5 (as tests/test_reference_modules.py: float32 rounding over a few matmuls of
width <= 256 lands near 1e-7..1e-6); the tables themselves to 1e-6 (HF rounds its float32 pow/blend at each
step, we round once from float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lingjax.batch import StepBatch
from lingjax.config import BailingConfig, ConfigError
from lingjax.engine import Engine
from lingjax.model import rope
from lingjax.model.mla import MLA
from lingjax.testing import tiny_config, write_tiny_checkpoint
from lingjax.weights import load_hf
from tests.test_reference_modules import bailing_cfg, ds_cfg, randomize, rel, t

jax.config.update("jax_default_matmul_precision", "highest")

# Positions run past original_max_position_embeddings (64) so that the interpolated frequencies matter.
YARNS = {
    # DeepSeek-V3 style: mscale == mscale_all_dim -> cos/sin factor 1, softmax scale x mscale^2
    "deepseek": dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
                     mscale=1.0, mscale_all_dim=1.0),
    # SGLang's Ling 256K override shape: factor only -> cos/sin x (0.1 ln f + 1), softmax scale unchanged
    "sglang": dict(type="yarn", factor=2.0, original_max_position_embeddings=64),
    # everything different: both factors != 1, untruncated ramp, other betas
    "mixed": dict(rope_type="yarn", factor=8, original_max_position_embeddings=64, beta_fast=16, beta_slow=2,
                  mscale=0.9, mscale_all_dim=0.6, truncate=False),
    "explicit_attention_factor": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                      attention_factor=1.3, mscale_all_dim=1.0),
}


def ds_yarn_cfg(c: BailingConfig):
    d = ds_cfg(c)
    params = {k: v for k, v in c.rope_scaling.items() if k != "type"}
    params.update(rope_type="yarn", rope_theta=c.rope_theta)
    d.rope_parameters = params
    return d


@pytest.mark.parametrize("name", list(YARNS))
def test_tables_and_softmax_scale_match_deepseek_v3(name):
    cfg = bailing_cfg(rope_scaling=YARNS[name], max_position_embeddings=4096)
    cfg.validate()
    ref = ds.DeepseekV3RotaryEmbedding(ds_yarn_cfg(cfg))
    freqs, factor = rope.frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.yarn)
    np.testing.assert_allclose(np.asarray(freqs), ref.inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(ref.attention_scaling, rel=1e-12)
    attn = ds.DeepseekV3Attention(ds_yarn_cfg(cfg), layer_idx=0)
    assert MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)).scaling == pytest.approx(attn.scaling, rel=1e-12)
    # The test can fail: YaRN really changed the table (and, where mscale_all_dim is set, the scale).
    assert not np.allclose(np.asarray(freqs), np.asarray(rope.inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta)))
    assert (attn.scaling != cfg.qk_head_dim ** -0.5) == bool(cfg.yarn["mscale_all_dim"])


@pytest.mark.parametrize("name,q_lora", [("deepseek", 24), ("mixed", None), ("sglang", 24)])
def test_mla_yarn_matches_deepseek_v3_attention(name, q_lora):
    cfg = bailing_cfg(rope_scaling=YARNS[name], q_lora_rank=q_lora, max_position_embeddings=4096)
    ours = MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomize(ours, np.random.default_rng(1))
    ref = ds.DeepseekV3Attention(ds_yarn_cfg(cfg), layer_idx=0).eval()
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
    def hf(x, pos):
        cos, sin = ds.DeepseekV3RotaryEmbedding(ds_yarn_cfg(cfg))(t(x), torch.from_numpy(pos.copy()))
        B, T = pos.shape
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
        with torch.no_grad():
            return ref(t(x), (cos, sin), mask)[0].numpy()

    B, T = 2, 11
    x = np.random.default_rng(2).standard_normal((B, T, cfg.hidden_size)).astype(np.float32)
    pos = np.stack([np.arange(T) + 3, np.arange(T) + 700])          # inside and far past the original context
    want = hf(x, pos)
    assert rel(ours(jnp.asarray(x), jnp.asarray(pos)), want) <= 1e-5

    # Absorbed form through the engine step over a latent cache: a 90-token request in two chunks (0..59,
    # then 60..89 packed with an 11-token request in another slot), against HF over whole sequences.
    N = 90
    xl = np.random.default_rng(3).standard_normal((1, N, cfg.hidden_size)).astype(np.float32)
    want_long, want_short = hf(xl, np.arange(N)[None])[0], hf(x[:1], np.arange(T)[None])[0]

    def step(x_tok, positions, seqs, slots, cache):
        cu = np.cumsum([0] + seqs)
        batch = StepBatch(tokens=jnp.zeros(len(x_tok), jnp.int32), positions=jnp.asarray(positions, jnp.int32),
                          token_seq=jnp.asarray(np.repeat(np.arange(len(seqs)), seqs), jnp.int32),
                          slots=jnp.asarray(slots, jnp.int32), cu_seqlens=jnp.asarray(cu, jnp.int32),
                          fresh=jnp.ones(len(seqs), bool))
        return ours.step(jnp.asarray(x_tok), batch, cache)

    junk = 100 * np.random.default_rng(4).standard_normal((2, 128, ours.latent_dim))
    cache = jnp.asarray(junk, jnp.float32)                          # rows not yet written are never read
    out1, cache = step(xl[0, :60], np.arange(60), [60], [1], cache)
    out2, cache = step(np.concatenate([x[0], xl[0, 60:]]), np.concatenate([np.arange(T), np.arange(60, N)]),
                       [T, N - 60], [0, 1], cache)
    assert rel(np.concatenate([out1, out2[T:]]), want_long) <= 1e-5
    assert rel(out2[:T], want_short) <= 1e-5

    # The comparison can fail: the same weights without YaRN give another answer.
    plain = MLA(bailing_cfg(q_lora_rank=q_lora), dtype=jnp.float32, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(ours))
    assert rel(plain(jnp.asarray(x), jnp.asarray(pos)), want) > 1e-3


def test_linear_layer_rope_yarn_matches_hf_rotate_half():
    """Linear layers: HF builds their table from the same config (SPEC §5.3), NeoX pairs on the first
    head_dim * partial_rotary_factor dims; transformers' rotate_half `apply_rotary_pos_emb` is the oracle."""
    cfg = tiny_config(rope_scaling=YARNS["mixed"])
    rot = cfg.linear_rope_dim
    assert rot < cfg.head_dim                                       # a pass-through part exists
    hf_cfg = ds_cfg(bailing_cfg(qk_rope_head_dim=rot, rope_scaling=YARNS["mixed"]))
    hf_cfg.rope_parameters = dict(YARNS["mixed"], rope_theta=cfg.rope_theta)
    T, H = 9, cfg.num_attention_heads
    pos = np.arange(T)[None] * 37
    x = np.random.default_rng(3).standard_normal((1, T, H, cfg.head_dim)).astype(np.float32)
    cos, sin = ds.DeepseekV3RotaryEmbedding(hf_cfg)(t(x), torch.from_numpy(pos))
    xt = t(x).transpose(1, 2)                                       # [B, H, T, D]
    q_rot, _ = apply_rotary_pos_emb(xt[..., :rot], xt[..., :rot], cos, sin)
    want = torch.cat([q_rot, xt[..., rot:]], -1).transpose(1, 2).numpy()
    got = rope.apply_neox(jnp.asarray(x), jnp.asarray(pos), rot, cfg.rope_theta, cfg.yarn)
    assert rel(got, want) <= 1e-6


@pytest.fixture(scope="module")
def yarn_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("yarn")
    # original context 16, positions up to 43: interpolated, ramped and extrapolated frequencies all used
    ys = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.7)
    write_tiny_checkpoint(str(d), tiny_config(rope_scaling=ys), seed=0, dtype=np.float32, shards=1)
    return str(d), ys


def test_tiny_model_with_yarn_engine_score_equals_full_forward(yarn_ckpt):
    path, ys = yarn_ckpt
    cfg, yarn_model = load_hf(path, dtype=jnp.float32, mtp=False)
    assert cfg.rope_scaling == ys                                    # the config.json round trip keeps it
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, yarn_model.cfg.vocab_size, n).tolist() for n in (44, 5)]
    T = max(map(len, seqs))
    tokens = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    full = np.asarray(nnx.jit(lambda m, x: m(x))(yarn_model, jnp.asarray(tokens)))
    refs = [full[i, :len(s)] for i, s in enumerate(seqs)]
    out = Engine(yarn_model, max_batch=2, prefill_chunk=32, max_len=48).score(seqs)
    err = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(out, refs))
    assert err <= 1e-5
    # ... and YaRN is in effect: the same weights with plain RoPE score the long sequence differently.
    plain = load_hf(path, dtype=jnp.float32, mtp=False, rope_scaling=None)[1]
    other = np.asarray(nnx.jit(lambda m, x: m(x))(plain, jnp.asarray(tokens[:1])))[0]
    assert float(np.abs(other - refs[0]).max() / np.abs(refs[0]).max()) > 1e-3


GOOD = dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=131072)


@pytest.mark.parametrize("rs", [
    None, {"rope_type": "default"}, {"type": "default"}, GOOD, dict(GOOD, rope_type=None, type="yarn"),
    dict(GOOD, rope_theta=10000.0, partial_rotary_factor=0.5),      # SGLang's override repeats these
    dict(GOOD, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.0, attention_factor=None, truncate=False),
    {"rope_type": "yarn", "factor": 1},                             # original context defaults to max_position
])
def test_valid_rope_scaling(rs):
    cfg = tiny_config(rope_scaling=rs)
    assert (cfg.yarn is None) == (rs is None or "default" in (rs.get("rope_type"), rs.get("type")))
    if rs == {"rope_type": "yarn", "factor": 1}:
        assert cfg.yarn["original_max_position_embeddings"] == cfg.max_position_embeddings
    BailingConfig.from_dict(dict(cfg.to_dict()))                    # the JSON form parses back


@pytest.mark.parametrize("rs,needle", [
    ({"rope_type": "linear", "factor": 2.0}, "rope_scaling type 'linear' is not supported (only 'yarn')"),
    ({"rope_type": "dynamic"}, "rope_scaling type 'dynamic' is not supported"),
    (dict(GOOD, type="linear"), "rope_scaling has rope_type='yarn' but type='linear'"),
    ({"rope_type": "default", "factor": 2.0}, "rope_scaling of type 'default' takes no factor"),
    (dict(GOOD, factor=0.5), "rope_scaling.factor must be a finite number >= 1, got 0.5"),
    ({"rope_type": "yarn"}, "rope_scaling.factor must be a finite number >= 1, got None"),
    (dict(GOOD, factor="2"), "rope_scaling.factor must be a finite number >= 1, got '2'"),
    (dict(GOOD, original_max_position_embeddings=0), "original_max_position_embeddings must be an integer >= 1"),
    (dict(GOOD, original_max_position_embeddings=1.5), "original_max_position_embeddings must be an integer >= 1"),
    (dict(GOOD, beta_fast=-1), "rope_scaling.beta_fast must be null or a finite number > 0, got -1"),
    (dict(GOOD, beta_slow=float("inf")), "rope_scaling.beta_slow must be null or a finite number > 0"),
    (dict(GOOD, beta_fast=1, beta_slow=4), "rope_scaling.beta_fast=1 must be >= beta_slow=4"),
    (dict(GOOD, mscale=-0.1), "rope_scaling.mscale must be null or a finite number >= 0"),
    (dict(GOOD, mscale_all_dim="1"), "rope_scaling.mscale_all_dim must be null or a finite number >= 0"),
    (dict(GOOD, attention_factor=0), "rope_scaling.attention_factor must be null or a finite number > 0"),
    (dict(GOOD, truncate="no"), "rope_scaling.truncate must be true or false, got 'no'"),
    (dict(GOOD, low_freq_factor=1.0), "rope_scaling: unknown YaRN key 'low_freq_factor'"),
    (dict(GOOD, rope_theta=6e6), "rope_scaling.rope_theta=6000000.0 differs from rope_theta=10000.0"),
    (dict(GOOD, partial_rotary_factor=1.0), "rope_scaling.partial_rotary_factor=1.0 differs"),
])
def test_invalid_rope_scaling(rs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        tiny_config(rope_scaling=rs)
