"""Flax NNX modules of the BailingMoE V2.5 decoder."""
from lingjax.model.decoder import BailingModel, DecoderLayer, MTPLayer  # noqa: F401
from lingjax.model.linear_attention import LinearAttention  # noqa: F401
from lingjax.model.mla import MLA  # noqa: F401
from lingjax.model.moe import MoE, route  # noqa: F401
