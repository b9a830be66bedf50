"""The BailingMoE V2.5 decoder: embedding, L pre-norm layers (linear attention or MLA; dense MLP or
MoE), final norm, untied lm_head with float32 logits, and the MTP (NextN) layer (SPEC §0, §5).

Matmul precision: a float32 model computes every XLA matmul and einsum in full float32 (precision
HIGHEST) on every backend. XLA's GPU default for float32 dots is TF32 (10-bit mantissa products,
about 1e-3 relative), which PyTorch does not use by default; bfloat16 models keep the backend's
default (bf16 products, float32 accumulation). The Pallas linear-attention kernels follow the same
rule on their own (float32 inputs: 3xTF32 on the GPU, float32-accurate)."""
import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from lingjax.config import BailingConfig
from lingjax.model.common import MLP, Dense, RMSNorm, init_normal
from lingjax.model.linear_attention import LinearAttention
from lingjax.model.mla import MLA
from lingjax.model.moe import MoE

F32 = jnp.float32


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: BailingConfig, layer: int, *, dtype, rngs: nnx.Rngs, kernels: str | None = None):
        self.kernels = kernels
        self.is_mla, self.is_moe = cfg.is_mla(layer), cfg.is_moe(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.attention = (MLA(cfg, dtype=dtype, rngs=rngs, kernels=kernels) if self.is_mla
                          else LinearAttention(cfg, layer, dtype=dtype, rngs=rngs, kernels=kernels))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = (MoE(cfg, dtype=dtype, rngs=rngs, kernels=kernels) if self.is_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.use_bias, dtype=dtype, rngs=rngs, kernels=kernels))

    def __call__(self, x, positions):
        h = self.input_layernorm(x)
        a = self.attention(h, positions)
        x = x + (a if self.is_mla else a[0])
        return x + self.mlp(self.post_attention_layernorm(x))

    def step(self, x, batch, cache, rows=None, attend_rows=False):
        """cache: this layer's MLA pages [num_pages, page_size, r + rope] or linear states [rows, H, D, D].
        rows [N] (optional): every row's attention runs (it writes the cache), the MLP only at these rows
        -> [N, d]. attend_rows (an MLA layer with rows): every row's latent is written, but only these rows
        attend (MLA.step_paged(rows=): the decode kernel at N rows, not the whole batch's attention)."""
        h = self.input_layernorm(x)
        if attend_rows and rows is not None and self.is_mla:
            a, cache = self.attention.step_paged(h, batch, cache, rows=rows)
            x = x[rows] + a
            return x + self.mlp(self.post_attention_layernorm(x)), cache
        a, cache = (self.attention.step_paged(h, batch, cache) if self.is_mla
                    else self.attention.step(h, batch, cache))
        x = x + a
        if rows is not None:
            x = x[rows]
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class MTPLayer(nnx.Module):
    """NextN layer at model.layers.{L}: MLA + MoE on eh_proj([enorm(embed(t+1)), hnorm(hidden_t)])."""

    def __init__(self, cfg: BailingConfig, layer: int, *, dtype, rngs: nnx.Rngs, kernels: str | None = None):
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.hnorm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
        self.eh_proj = Dense(2 * d, d, dtype=dtype, rngs=rngs)
        self.block = DecoderLayer(cfg, layer, dtype=dtype, rngs=rngs, kernels=kernels)
        self.final_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, next_embeds, hidden, positions):
        z = self.eh_proj(jnp.concatenate([self.enorm(next_embeds), self.hnorm(hidden)], axis=-1))
        return self.final_layernorm(self.block(z, positions))


MATMUL_PRECISIONS = ("default", "high", "highest")


def default_matmul_precision(dtype) -> str:
    """'highest' (full float32 products) for a float32 model; 'default' (the backend's) otherwise."""
    return "highest" if jnp.dtype(dtype) == jnp.float32 else "default"


class BailingModel(nnx.Module):
    """matmul_precision: precision of the XLA matmuls of the model's entry points (`__call__`, `hidden`,
    `mtp_logits`, `step`): 'highest' (full float32), 'high' (3xbf16/TF32-class) or 'default' (the
    backend's: TF32 for float32 dots on NVIDIA GPUs). None: `default_matmul_precision(dtype)`. A plain
    attribute (part of the graph definition), so it may also be set after loading.
    kernels: the kernel implementation every layer passes as impl= to its kernel dispatch (a name of
    lingjax.kernels.linear_attention.IMPLS; the MoE layers map it to their family); None picks by
    jax.default_backend() at trace time."""

    def __init__(self, cfg: BailingConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs | None = None, mtp=True,
                 kernels: str | None = None, matmul_precision: str | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.cfg, self.dtype, self.kernels = cfg, dtype, kernels
        if matmul_precision is None:
            matmul_precision = default_matmul_precision(dtype)
        if matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
        self.matmul_precision = matmul_precision
        self.word_embeddings = nnx.Param(init_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
        self.layers = nnx.List([DecoderLayer(cfg, l, dtype=dtype, rngs=rngs, kernels=kernels)
                                for l in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = nnx.Param(init_normal(rngs, (cfg.hidden_size, cfg.vocab_size), dtype))   # [d, V]
        L = cfg.num_hidden_layers
        self.mtp = nnx.List([MTPLayer(cfg, L + i, dtype=dtype, rngs=rngs, kernels=kernels)
                             for i in range(cfg.num_nextn_predict_layers if mtp else 0)])

    def precision(self):
        """Context manager that applies `matmul_precision` to the matmuls traced inside it."""
        p = getattr(self, "matmul_precision", None) or default_matmul_precision(self.dtype)
        if p == "default":
            return contextlib.nullcontext()
        return jax.default_matmul_precision(p)

    def embed(self, tokens):
        return self.word_embeddings[...][tokens].astype(self.dtype)

    def logits(self, y):
        """float32 logits from the final hidden state (float32 accumulation)."""
        return jnp.dot(y, self.lm_head[...].astype(y.dtype), preferred_element_type=F32)

    def hidden(self, tokens, positions=None):
        """tokens [B, T] -> final-normed hidden states [B, T, d]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        with self.precision():
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x, positions)
            return self.norm(x)

    def __call__(self, tokens, positions=None):
        """Full-sequence forward without a cache: tokens [B, T] -> float32 logits [B, T, V]."""
        with self.precision():
            return self.logits(self.hidden(tokens, positions))

    def mtp_logits(self, tokens, hidden, positions=None):
        """MTP logits [B, T, V]: row t predicts token t+2 (rows 0..T-2 are meaningful). The input at
        position t is the embedding of token t+1, and token id 0 at the last position (SPEC App. B)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        nxt = jnp.concatenate([tokens[..., 1:], jnp.zeros_like(tokens[..., :1])], axis=-1)
        with self.precision():
            return self.logits(self.mtp[0](self.embed(nxt), hidden, positions))

    def step(self, batch, caches, rows=None):
        """One engine step over a packed batch -> (float32 logits [T, V], new caches).
        caches (lingjax.cache.Caches): per linear layer [rows, H, D, D], per MLA layer the latent pages
        [num_pages, page_size, r + rope] (batch.page_table says which pages each request row holds). Each
        layer's buffer is updated by a scatter of the batch's rows: donated, the step updates it in place.
        rows [N] int32 (optional): compute logits only for these token rows -> [N, V] (sampling
        needs one row per request, not the whole [T, V])."""
        with self.precision():
            return self._step(batch, caches, rows)

    def _step(self, batch, caches, rows):
        x = self.embed(batch.tokens)
        lin, mla = list(caches.linear), list(caches.mla)
        i_lin = i_mla = 0
        for layer in self.layers:
            if layer.is_mla:
                x, mla[i_mla] = layer.step(x, batch, mla[i_mla])
                i_mla += 1
            else:
                x, lin[i_lin] = layer.step(x, batch, lin[i_lin])
                i_lin += 1
        y = self.norm(x)
        if rows is not None:
            y = y[rows]
        return self.logits(y), caches.replace(linear=tuple(lin), mla=tuple(mla))
