import json

import numpy as np
import pytest

from lingjax.config import BailingConfig, ConfigError, alibi_slopes, layer_decay_factor

FLASH = dict(architectures=["BailingMoeV2_5ForCausalLM"], model_type="bailing_hybrid", vocab_size=157184,
             hidden_size=4096, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, head_dim=128, layer_group_size=8, group_norm_size=4, num_experts=256,
             num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=1024, q_lora_rank=1536,
             kv_lora_rank=512, routed_scaling_factor=2.5, rope_theta=6e6, num_nextn_predict_layers=1,
             max_position_embeddings=131072)


def test_flash_layer_kinds():
    cfg = BailingConfig.from_dict(FLASH)
    assert cfg.mla_layers == (7, 15, 23, 31)
    assert len(cfg.linear_layers) == 28
    assert cfg.is_mla(32)          # the MTP layer is always MLA + MoE
    assert not cfg.is_moe(0) and cfg.is_moe(1) and cfg.is_moe(32)


def test_1t_layer_kinds():
    cfg = BailingConfig.from_dict(dict(FLASH, num_hidden_layers=80, num_attention_heads=64, hidden_size=8192,
                                       group_norm_size=8))
    assert cfg.mla_layers == tuple(range(7, 80, 8))
    assert len(cfg.linear_layers) == 70


SIZES = {k: FLASH[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size")}


def test_defaults_and_aliases():
    cfg = BailingConfig.from_dict(dict(SIZES, use_linear_silu=True, scoring_func="sigmoid", layer_group_size=8))
    assert cfg.linear_silu is True
    assert cfg.head_dim == 128 and cfg.n_group == 8 and cfg.slope_layer_offset == 0
    assert BailingConfig.from_dict(dict(FLASH), slope_layer_offset=1).slope_layer_offset == 1


def test_slopes():
    s32, s64 = alibi_slopes(32), alibi_slopes(64)
    np.testing.assert_allclose([s32[0], s32[1], s32[3], s32[-1]], [0.840896, 0.707107, 0.5, 0.00390625], rtol=1e-6)
    np.testing.assert_allclose([s64[0], s64[1], s64[-1]], [0.917004, 0.840896, 0.00390625], rtol=1e-6)
    assert len(alibi_slopes(48)) == 48                        # non-power-of-two branch


def test_decay_factor_conventions():
    assert layer_decay_factor(0, 80, 0) == pytest.approx(1.00001)
    assert layer_decay_factor(0, 80, 1) == pytest.approx(1.01267, abs=1e-5)
    assert layer_decay_factor(30, 32, 0) == pytest.approx(0.03227, abs=1e-5)
    assert layer_decay_factor(30, 32, 1) == pytest.approx(0.06453, abs=1e-5)


@pytest.mark.parametrize("bad,needle", [
    (dict(num_hidden_layers=30), "not divisible by layer_group_size"),
    (dict(n_group=6), "does not divide num_experts"),
    (dict(group_norm_size=3), "does not divide H*D"),
    (dict(architectures=["LlamaForCausalLM"]), "unsupported architecture"),
    (dict(short_conv_kernel_size=4), "Ling-3.0"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(topk_group=9), "topk_group"),
    (dict(num_experts_per_tok=300), "num_experts_per_tok"),
    # issue 20, defect 4/7: every number's type and range, named
    (dict(rope_theta=0), "rope_theta must be a finite number > 0, got 0"),
    (dict(rope_theta=float("nan")), "rope_theta must be a finite number > 0"),
    (dict(rms_norm_eps="x"), "rms_norm_eps must be a finite number > 0, got 'x'"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a finite number > 0"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be an integer >= 1, got 0"),
    (dict(max_position_embeddings=1.5), "max_position_embeddings must be an integer >= 1"),
    (dict(routed_scaling_factor=None), "routed_scaling_factor must be a finite number > 0"),
    (dict(partial_rotary_factor="0.5"), "partial_rotary_factor must be a finite number > 0"),
    (dict(hidden_size="4096"), "hidden_size must be a positive integer, got '4096'"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be a positive integer"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace must be an integer >= 0"),
    (dict(use_qk_norm="yes"), "use_qk_norm must be true or false"),
    (dict(eos_token_id="x"), "eos_token_id must be null"),
    (dict(rope_scaling="yarn"), "rope_scaling must be null or an object"),
    # parsed fields that change the math: honoured or refused, never ignored
    (dict(router_dtype="bf16"), "router_dtype='bf16': only 'fp32' is supported"),
    (dict(moe_router_enable_expert_bias=False), "moe_router_enable_expert_bias=false is not supported"),
])
def test_invalid_configs(bad, needle):
    with pytest.raises(ConfigError, match=needle.replace("*", r"\*")):
        BailingConfig.from_dict(dict(FLASH, **bad))


def test_from_json_errors(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BailingConfig.from_json(str(tmp_path))
    with pytest.raises(ConfigError, match="no such file"):
        BailingConfig.from_json(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps(FLASH))
    assert BailingConfig.from_json(str(tmp_path)).num_hidden_layers == 32


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "num_experts"])
def test_missing_required_field_is_named(field):
    d = dict(FLASH)
    del d[field]
    with pytest.raises(ConfigError, match=f"missing required field {field}"):
        BailingConfig.from_dict(d)
    with pytest.raises(ConfigError, match="missing required fields vocab_size, hidden_size"):
        BailingConfig.from_dict({})


def test_router_dtype_float32_spellings_accepted():
    assert BailingConfig.from_dict(dict(FLASH, router_dtype="float32")).router_dtype == "float32"
