"""BailingConfig: parse and validate an HF config.json of the BailingMoE V2.5 family (SPEC §1).

The JSON is parsed by hand: transformers' own `bailing_hybrid` config class is Ling-3.0 (KDA), not
V2.5 (SPEC §1.1).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any


class ConfigError(ValueError):
    """A config that cannot describe a valid BailingMoE V2.5 model."""


ARCHITECTURE = "BailingMoeV2_5ForCausalLM"
# Fields a config.json must state: the model's size. The others have HF's class defaults (SPEC §1.2).
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size")
MODEL_TYPE = "bailing_hybrid"
# Keys of a YaRN rope_scaling (transformers' `_validate_yarn_rope_parameters`, plus the two that SGLang's
# 256K override repeats from the top level, SPEC §5.3).
YARN_KEYS = frozenset({"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta",
                       "partial_rotary_factor"})


@dataclasses.dataclass(frozen=True)
class BailingConfig:
    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.5
    rope_interleave: bool = True
    pad_token_id: int | None = 156892
    eos_token_id: int | list | None = 156892
    bos_token_id: int | None = None
    num_experts: int = 256
    num_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int | None = None
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 512
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    moe_router_enable_expert_bias: bool = True
    score_function: str = "sigmoid"
    router_dtype: str = "fp32"
    layer_group_size: int = 5
    group_norm_size: int = 4
    linear_silu: bool = False
    use_qk_norm: bool = True
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_nextn_predict_layers: int = 0
    # Not an HF field: 0 = vLLM/SGLang/training decay convention, 1 = HF remote code (SPEC §2.6).
    slope_layer_offset: int = 0

    def __hash__(self):
        # rope_scaling is a dict: hash the fields by value so that a config can key a jit cache.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=repr))

    # ---------------------------------------------------------------- derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def linear_rope_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_intermediate_size(self) -> int:
        if self.moe_shared_expert_intermediate_size:
            return self.moe_shared_expert_intermediate_size
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    def is_mla(self, layer: int) -> bool:
        """HF rule (SPEC §1.3), including the tail clause; MTP layers (layer >= L) are always MLA."""
        G, L = self.layer_group_size, self.num_hidden_layers
        if layer >= L:
            return True
        return (layer + 1) % G == 0 or layer >= (L // G) * G

    def is_moe(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace or layer >= self.num_hidden_layers

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple("mla" if self.is_mla(l) else "linear" for l in range(self.num_hidden_layers))

    @property
    def mla_layers(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.num_hidden_layers) if self.is_mla(l))

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.num_hidden_layers) if not self.is_mla(l))

    # ---------------------------------------------------------------- parsing
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "BailingConfig":
        archs = d.get("architectures") or [ARCHITECTURE]
        if ARCHITECTURE not in archs:
            raise ConfigError(f"unsupported architecture {archs}: lingjax runs {ARCHITECTURE}")
        if "short_conv_kernel_size" in d:
            raise ConfigError("config has short_conv_kernel_size: this is Ling-3.0 (KDA), not BailingMoE V2.5")
        mt = d.get("model_type", MODEL_TYPE)
        if mt not in (MODEL_TYPE, "bailing_moe_v2_5", "bailing_moe_linear"):
            raise ConfigError(f"unsupported model_type {mt!r}: expected {MODEL_TYPE!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        missing = [k for k in REQUIRED if k not in kw and k not in overrides]
        if missing:
            raise ConfigError(f"missing required field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        if "linear_silu" not in d and "use_linear_silu" in d:
            kw["linear_silu"] = d["use_linear_silu"]
        if "score_function" not in d and "scoring_func" in d:
            kw["score_function"] = d["scoring_func"]
        kw.update(overrides)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str, **overrides) -> "BailingConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({_first_line(e)})") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("slope_layer_offset")
        d["architectures"] = [ARCHITECTURE]
        d["model_type"] = MODEL_TYPE
        return d

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        # Types and ranges first, so that the checks below compare numbers.
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "partial_rotary_factor"):
            v = getattr(self, name)
            need(is_num(v) and v > 0, f"{name} must be a finite number > 0, got {v!r}")
        for name in ("max_position_embeddings", "num_key_value_heads"):
            v = getattr(self, name)
            need(is_int(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        for name in ("first_k_dense_replace", "num_nextn_predict_layers", "num_shared_experts", "slope_layer_offset"):
            v = getattr(self, name)
            need(is_int(v) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        for name in ("moe_shared_expert_intermediate_size", "q_lora_rank"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v > 0), f"{name} must be null or a positive integer, got {v!r}")
        for name in ("use_qkv_bias", "use_bias", "tie_word_embeddings", "rope_interleave",
                     "moe_router_enable_expert_bias", "linear_silu", "use_qk_norm"):
            v = getattr(self, name)
            need(isinstance(v, bool), f"{name} must be true or false, got {v!r}")
        for name in ("pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v >= 0), f"{name} must be null or an integer >= 0, got {v!r}")
        e = self.eos_token_id
        need(e is None or (is_int(e) and e >= 0) or (isinstance(e, list) and all(is_int(x) and x >= 0 for x in e)),
             f"eos_token_id must be null, an integer >= 0 or a list of them, got {e!r}")
        # Parsed fields that change the math: honoured, or refused when lingjax cannot honour them.
        need(self.router_dtype in ("fp32", "float32"),
             f"router_dtype={self.router_dtype!r}: only 'fp32' is supported (the router runs in float32, SPEC §4.2)")
        need(self.moe_router_enable_expert_bias,
             "moe_router_enable_expert_bias=false is not supported (V2.5 routers select with mlp.gate.expert_bias)")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "num_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_intermediate_size",
                     "layer_group_size", "group_norm_size", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")
        L, G = self.num_hidden_layers, self.layer_group_size
        need(L % G == 0, f"num_hidden_layers={L} is not divisible by layer_group_size={G}")
        need(self.num_experts % self.n_group == 0, f"n_group={self.n_group} does not divide num_experts={self.num_experts}")
        need(self.topk_group <= self.n_group, f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        need(self.num_experts_per_tok <= self.num_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}")
        per_group = self.num_experts // self.n_group
        need(per_group >= 2, f"each expert group needs >= 2 experts (group score = sum of top-2), got {per_group}")
        need(self.num_experts_per_tok <= self.topk_group * per_group,
             f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in topk_group={self.topk_group} groups")
        HD = self.num_attention_heads * self.head_dim
        need(HD % self.group_norm_size == 0,
             f"group_norm_size={self.group_norm_size} (number of groups) does not divide H*D={HD}")
        need(self.hidden_act == "silu", f"hidden_act={self.hidden_act!r}: only 'silu' is supported")
        need(self.score_function == "sigmoid", f"score_function={self.score_function!r}: only 'sigmoid' is supported")
        need(self.rope_interleave, "rope_interleave=False is not supported (the HF reference rejects it too)")
        rot = self.head_dim * self.partial_rotary_factor
        need(0 < self.partial_rotary_factor <= 1 and rot == int(rot) and int(rot) % 2 == 0,
             f"partial_rotary_factor={self.partial_rotary_factor} must give an even number of rotated dims of head_dim={self.head_dim}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"q_lora_rank must be null or a positive integer, got {self.q_lora_rank!r}")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace must be >= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(self.slope_layer_offset in (0, 1), f"slope_layer_offset must be 0 or 1, got {self.slope_layer_offset}")
        need(not self.tie_word_embeddings, "tie_word_embeddings=True is not supported (V2.5 checkpoints are untied)")
        self._validate_rope_scaling(need, is_int, is_num)

    def _validate_rope_scaling(self, need, is_int, is_num) -> None:
        """rope_scaling: null, {"rope_type": "default"}, or YaRN (SPEC §5.3) with HF's keys, each checked."""
        rs = self.rope_scaling
        if rs is None:
            return
        need(isinstance(rs, dict), "rope_scaling must be null or an object")
        rt, t = rs.get("rope_type"), rs.get("type")
        need(rt is None or t is None or rt == t, f"rope_scaling has rope_type={rt!r} but type={t!r}")
        rt = _rope_type(rs)
        if rt in ("default", None):
            extra = sorted(set(rs) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
            need(not extra, f"rope_scaling of type 'default' takes no {', '.join(extra)}")
        else:
            need(rt == "yarn", f"rope_scaling type {rt!r} is not supported (only 'yarn')")
            unknown = sorted(set(rs) - YARN_KEYS)
            need(not unknown, f"rope_scaling: unknown YaRN key {', '.join(map(repr, unknown))}")
            f = rs.get("factor")
            need(is_num(f) and f >= 1, f"rope_scaling.factor must be a finite number >= 1, got {f!r}")
            o = rs.get("original_max_position_embeddings")
            need(o is None or (is_int(o) and o >= 1),
                 f"rope_scaling.original_max_position_embeddings must be an integer >= 1, got {o!r}")
            for k in ("beta_fast", "beta_slow", "attention_factor"):
                v = rs.get(k)
                need(v is None or (is_num(v) and v > 0), f"rope_scaling.{k} must be null or a finite number > 0, got {v!r}")
            for k in ("mscale", "mscale_all_dim"):
                v = rs.get(k)
                need(v is None or (is_num(v) and v >= 0), f"rope_scaling.{k} must be null or a finite number >= 0, got {v!r}")
            y = self.yarn
            need(y["beta_fast"] >= y["beta_slow"],
                 f"rope_scaling.beta_fast={y['beta_fast']} must be >= beta_slow={y['beta_slow']}")
            tr = rs.get("truncate", True)
            need(isinstance(tr, bool), f"rope_scaling.truncate must be true or false, got {tr!r}")
        # SGLang's 256K override repeats these inside rope_scaling (SPEC §5.3); one value per model.
        for k in ("rope_theta", "partial_rotary_factor"):
            if k in rs:
                need(rs[k] == getattr(self, k),
                     f"rope_scaling.{k}={rs[k]!r} differs from {k}={getattr(self, k)!r}: set it at the top level")

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters with HF's defaults filled in (transformers `_compute_yarn_parameters`),
        or None when rope_scaling is null/default."""
        rs = self.rope_scaling
        if not isinstance(rs, dict) or _rope_type(rs) in ("default", None):
            return None
        o = rs.get("original_max_position_embeddings")
        return dict(factor=rs["factor"],
                    original_max_position_embeddings=o if o is not None else self.max_position_embeddings,
                    beta_fast=rs.get("beta_fast") or 32, beta_slow=rs.get("beta_slow") or 1,
                    mscale=rs.get("mscale"), mscale_all_dim=rs.get("mscale_all_dim"),
                    attention_factor=rs.get("attention_factor"), truncate=rs.get("truncate", True))


def _rope_type(rope_scaling: dict):
    """HF reads `rope_type`, falling back to the older `type`."""
    rt = rope_scaling.get("rope_type")
    return rt if rt is not None else rope_scaling.get("type")


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def alibi_slopes(n: int) -> list[float]:
    """ALiBi base slopes (SPEC §2.5)."""
    def pow2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + alibi_slopes(2 * c)[0::2][: n - c]


def layer_decay_factor(layer: int, num_layers: int, offset: int = 0) -> float:
    """factor(l) = 1 - (l - offset)/(L - 1) + 1e-5 (SPEC §2.6); single-layer models: 1 + 1e-5."""
    if num_layers <= 1:
        return 1.0 + 1e-5
    return 1.0 - (layer - offset) / (num_layers - 1) + 1e-5
