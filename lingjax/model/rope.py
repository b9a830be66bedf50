"""Rotary embeddings (SPEC §2.3, §3.3). cos/sin are built in float32 from absolute positions.

- Linear-attention layers: NeoX ("rotate_half") pairs (x_i, x_{i+r/2}) on the first r dims of each head.
- MLA: interleaved (GPT-J) pairs (x_{2i}, x_{2i+1}) on all qk_rope_head_dim dims. We keep the
  interleaved order (HF de-interleaves first); q and k are treated alike, so scores are identical.
"""
import jax.numpy as jnp

F32 = jnp.float32


def inv_freq(rot_dim, theta):
    return 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=F32) / rot_dim))


def _angles(positions, rot_dim, theta):
    return positions.astype(F32)[..., None] * inv_freq(rot_dim, theta)     # [..., rot/2]


def apply_neox(x, positions, rot_dim, theta):
    """x [..., T, H, D]; positions [..., T]. Rotates x[..., :rot_dim]; the rest passes through."""
    ang = _angles(positions, rot_dim, theta)[..., None, :]                  # [..., T, 1, rot/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(F32)
    x1, x2, rest = xf[..., : rot_dim // 2], xf[..., rot_dim // 2: rot_dim], xf[..., rot_dim:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)


def apply_interleaved(x, positions, theta):
    """x [..., T, H, R] (R = qk_rope_head_dim, all rotated); positions [..., T]."""
    R = x.shape[-1]
    ang = _angles(positions, R, theta)[..., None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(F32)
    xe, xo = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([xe * cos - xo * sin, xo * cos + xe * sin], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)
