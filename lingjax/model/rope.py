"""Rotary embeddings (SPEC §2.3, §3.3, §5.3). cos/sin are built in float32 from absolute positions.

- Linear-attention layers: NeoX ("rotate_half") pairs (x_i, x_{i+r/2}) on the first r dims of each head.
- MLA: interleaved (GPT-J) pairs (x_{2i}, x_{2i+1}) on all qk_rope_head_dim dims. We keep the
  interleaved order (HF de-interleaves first); q and k are treated alike, so scores are identical.
- YaRN (`rope_scaling` type "yarn", SPEC §5.3) applies to both rotary tables, as in HF where both are
  built from the same config: blended inverse frequencies and cos/sin multiplied by an attention factor,
  computed as transformers' `_compute_yarn_parameters` does, each table from its own rotated width
  (MLA: qk_rope_head_dim; linear: head_dim * partial_rotary_factor; both 64 in released configs).
  MLA's softmax scale is further multiplied by `softmax_mscale` (DeepSeek-V3's `yarn_apply_mscale`).
"""
import math

import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def inv_freq(rot_dim, theta):
    return 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=F32) / rot_dim))


def yarn_get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_frequencies(rot_dim, theta, yarn: dict):
    """YaRN inverse frequencies [rot_dim/2] (float32) and the cos/sin multiplier. `yarn` is
    `BailingConfig.yarn` (HF's defaults already filled in). Computed in float64, rounded once."""
    factor = yarn["factor"]
    attention_factor = yarn["attention_factor"]
    if attention_factor is None:
        if yarn["mscale"] and yarn["mscale_all_dim"]:
            attention_factor = yarn_get_mscale(factor, yarn["mscale"]) / yarn_get_mscale(factor, yarn["mscale_all_dim"])
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(rotations):       # the dim whose wavelength fits `rotations` times in the original context
        return rot_dim * math.log(yarn["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn["beta_fast"]), correction_dim(yarn["beta_slow"])
    if yarn["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp                                   # 1: keep the original frequency (high freqs)
    base = theta ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
    freqs = (1.0 / (factor * base)) * (1.0 - extrapolate) + (1.0 / base) * extrapolate
    return freqs.astype(np.float32), float(attention_factor)


def frequencies(rot_dim, theta, yarn: dict | None = None):
    """(inverse frequencies [rot_dim/2] float32, cos/sin multiplier): plain RoPE or YaRN."""
    if yarn is None:
        return inv_freq(rot_dim, theta), 1.0
    f, a = yarn_frequencies(rot_dim, theta, yarn)
    return jnp.asarray(f), a


def softmax_mscale(yarn: dict | None) -> float:
    """Multiplier of the MLA softmax scale: mscale(factor, mscale_all_dim)^2 when YaRN gives a non-zero
    mscale_all_dim, else 1 (transformers' DeepSeek-V3 `yarn_apply_mscale`; SPEC §3.2, §10 item 9)."""
    if yarn is None or not yarn["mscale_all_dim"]:
        return 1.0
    m = yarn_get_mscale(yarn["factor"], yarn["mscale_all_dim"])
    return m * m


def _cos_sin(positions, rot_dim, theta, yarn):
    freqs, attention_factor = frequencies(rot_dim, theta, yarn)
    ang = positions.astype(F32)[..., None, None] * freqs                    # [..., T, 1, rot/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


def apply_neox(x, positions, rot_dim, theta, yarn: dict | None = None):
    """x [..., T, H, D]; positions [..., T]. Rotates x[..., :rot_dim]; the rest passes through."""
    cos, sin = _cos_sin(positions, rot_dim, theta, yarn)
    xf = x.astype(F32)
    x1, x2, rest = xf[..., : rot_dim // 2], xf[..., rot_dim // 2: rot_dim], xf[..., rot_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def apply_interleaved(x, positions, theta, yarn: dict | None = None):
    """x [..., T, H, R] (R = qk_rope_head_dim, all rotated); positions [..., T]."""
    cos, sin = _cos_sin(positions, x.shape[-1], theta, yarn)
    xf = x.astype(F32)
    xe, xo = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([xe * cos - xo * sin, xo * cos + xe * sin], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)
