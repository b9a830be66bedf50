"""Small checkpoints made here, in the exact HF layout, for tests, benchmarks and examples.

No model hub is reachable, so tests build their own: a random tiny BailingMoE V2.5 model written as
bf16 safetensors (sharded + index, MTP layer included) with a character-level tokenizer.
"""
from __future__ import annotations

import json
import string

import ml_dtypes
import numpy as np

from lingjax.config import BailingConfig
from lingjax.weights import rules_for, write_hf

SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHARS = list(string.printable[:95])   # digits, letters, punctuation, space


def tiny_config(**overrides) -> BailingConfig:
    """Every feature on: linear + MLA layers (MLA at 1, 3), q_lora, a dense first layer, MoE with
    groups, MTP. vocab = 3 specials + 95 printable characters."""
    base = dict(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_experts=8, num_experts_per_tok=2,
                n_group=4, topk_group=2, moe_intermediate_size=32, layer_group_size=2, group_norm_size=2,
                kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                num_nextn_predict_layers=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                max_position_embeddings=2048, rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    base.update(overrides)
    cfg = BailingConfig(**base)
    cfg.validate()
    return cfg


def random_hf_tensors(cfg: BailingConfig, seed: int = 0, dtype=ml_dtypes.bfloat16, mtp: bool = True):
    """Random tensors for every name the config describes: matrices N(0, 1/fan_in), norm weights
    near 1, a non-zero float32 expert_bias (so that it changes routing)."""
    rng = np.random.default_rng(seed)
    for rule in rules_for(cfg, mtp=mtp):
        for name, shape in zip(rule.hf, rule.hf_shapes):
            if rule.float32:
                t = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            elif len(shape) == 1 and name.endswith(".bias"):
                t = (0.02 * rng.standard_normal(shape)).astype(dtype)
            elif len(shape) == 1:
                t = (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
            elif name.endswith("word_embeddings.weight"):
                t = rng.standard_normal(shape).astype(dtype)
            else:
                t = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(dtype)
            yield name, t


def char_tokenizer_json() -> str:
    """A character-level tokenizers.Tokenizer (one token per printable character)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def tokenizer_files() -> dict[str, str]:
    return {
        "tokenizer.json": char_tokenizer_json(),
        "tokenizer_config.json": json.dumps({"eos_token": "<eos>", "pad_token": "<pad>", "bos_token": "<bos>",
                                             "chat_template": CHAT_TEMPLATE}, indent=2),
        "generation_config.json": json.dumps({"eos_token_id": 1, "pad_token_id": 0}, indent=2),
    }


def write_tiny_checkpoint(path: str, cfg: BailingConfig | None = None, seed: int = 0, *, dtype=ml_dtypes.bfloat16,
                          shards: int = 2, mtp: bool = True, tokenizer: bool = True) -> BailingConfig:
    """Write a random tiny model at `path` in the exact HF layout; returns its config."""
    cfg = cfg or tiny_config()
    tensors = list(random_hf_tensors(cfg, seed, dtype, mtp=mtp))
    write_hf(cfg, tensors, path, num_shards=shards, extra_files=tokenizer_files() if tokenizer else None)
    return cfg


def tiny_float32_model(path: str, seed: int = 0):
    """The tiny random model as the engine tests use it: written to `path` as a float32 HF checkpoint (one
    shard, no MTP) and loaded back with lingjax.weights.load_hf (a float32 BailingModel)."""
    import jax.numpy as jnp
    from lingjax.weights import load_hf
    write_tiny_checkpoint(path, seed=seed, dtype=np.float32, shards=1)
    return load_hf(path, dtype=jnp.float32, mtp=False)[1]


def full_forward_logits(model, seqs):
    """The model-core full forward pass (no cache, no engine), the engine tests' reference: all token lists in
    `seqs` right-padded into one causal batch, so row t of sequence i sees only its own first t+1 tokens.
    -> one [len(s), vocab] logits array per sequence."""
    import jax.numpy as jnp
    from flax import nnx
    T = max(map(len, seqs))
    tokens = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


def rel_err(out, ref):
    """Worst, over paired arrays, of max |out - ref| / max |ref|."""
    return max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(out, ref))


def quantize_hf_tensors(cfg: BailingConfig, tensors, scheme: str, mtp: bool = True):
    """HF tensors -> the same checkpoint in an FP8 format (lingjax.quant.SCHEMES: "fp8-block",
    "fp8-channel"): each attention / MLP / expert projection weight becomes float8_e4m3fn plus its
    scale tensor, quantized by lingjax.quant; everything else is unchanged."""
    from lingjax import quant
    fmt = quant.SCHEMES[scheme]
    tensors = dict(tensors)
    out = []
    for rule in rules_for(cfg, mtp=mtp):
        for name in rule.hf:
            t = tensors[name]
            if quant.quantizable(rule):
                q, s = fmt.quantize(np.asarray(t, np.float32))
                out += [(name, q), (name[: -len("weight")] + fmt.scale_suffix, s)]
            else:
                out.append((name, t))
    return fmt, out


def write_fp8_checkpoint(path: str, scheme: str, cfg: BailingConfig | None = None, seed: int = 0, *,
                         shards: int = 2, mtp: bool = True) -> BailingConfig:
    """A random tiny model (as write_tiny_checkpoint) written in an FP8 format by lingjax's quantizer."""
    cfg = cfg or tiny_config()
    fmt, tensors = quantize_hf_tensors(cfg, random_hf_tensors(cfg, seed, mtp=mtp), scheme, mtp=mtp)
    write_hf(cfg, tensors, path, num_shards=shards, extra_files=tokenizer_files())
    set_quantization_config(path, fmt.to_config())
    return cfg


def set_quantization_config(path: str, qc: dict | None) -> None:
    """Put (or, for None, remove) config.json's quantization_config."""
    import os
    p = os.path.join(path, "config.json")
    with open(p) as f:
        d = json.load(f)
    d.pop("quantization_config", None)
    if qc is not None:
        d["quantization_config"] = qc
    with open(p, "w") as f:
        json.dump(d, f, indent=2)
