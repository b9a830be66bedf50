"""Multi-head latent attention (SPEC §3): DeepSeek-V3 MLA with interleaved full RoPE on the 64
rope dims. `__call__` is the naive form (= HF) over full sequences; `step` is the absorbed form
(SPEC §3.4) over the per-slot latent cache [c (kv_lora_rank, post-norm) | k_pe (post-RoPE)].
`step_paged` is the absorbed form over the paged latent cache of lingjax/kernels/mla (pages + page table):
the engine's path; `step` (a per-slot [slots, max_len] cache) is kept as a second, independent form for tests.
YaRN (rope_scaling, SPEC §5.3) enters through the rotary table and `scaling`, so every form gets it."""
import jax
import jax.numpy as jnp
from flax import nnx

from lingjax.config import BailingConfig
from lingjax import quant
from lingjax.kernels import mla as mla_kernels
from lingjax.model import rope
from lingjax.model.common import Dense, RMSNorm
from lingjax.model.parallel import tp_psum

F32 = jnp.float32
QUERY_BLOCK = 64         # query tokens per block in the cached attention of a step
MLA_SUBNORM_EPS = 1e-6   # HF q_a_layernorm / kv_a_layernorm use the class default (SPEC App. B)


class MLA(nnx.Module):
    def __init__(self, cfg: BailingConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, kernels: str | None = None):
        self.cfg = cfg
        self.kernels = kernels          # kernel backend of step_paged (lingjax.kernels.mla); None: by backend
        d, H = cfg.hidden_size, cfg.num_attention_heads
        qk, r = cfg.qk_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = Dense(d, cfg.q_lora_rank, use_bias=cfg.use_qkv_bias, dtype=dtype, rngs=rngs, kernels=kernels)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=MLA_SUBNORM_EPS, dtype=dtype)
            self.q_b_proj = Dense(cfg.q_lora_rank, H * qk, dtype=dtype, rngs=rngs, kernels=kernels)
            self.q_proj = None
        else:
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.q_proj = Dense(d, H * qk, dtype=dtype, rngs=rngs, kernels=kernels)
        self.kv_a_proj_with_mqa = Dense(d, r + cfg.qk_rope_head_dim, use_bias=cfg.use_qkv_bias, dtype=dtype, rngs=rngs, kernels=kernels)
        self.kv_a_layernorm = RMSNorm(r, eps=MLA_SUBNORM_EPS, dtype=dtype)
        self.kv_b_proj = Dense(r, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), dtype=dtype, rngs=rngs, kernels=kernels)
        self.dense = Dense(H * cfg.v_head_dim, d, use_bias=cfg.use_qkv_bias, dtype=dtype, rngs=rngs, kernels=kernels)

    @property
    def scaling(self):
        """Softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (SPEC §3.2)."""
        return self.cfg.qk_head_dim ** -0.5 * rope.softmax_mscale(self.cfg.yarn)

    @property
    def latent_dim(self):
        return self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim

    def query(self, x, positions):
        """-> q_nope [..., T, H, nope], q_pe [..., T, H, rope] (rotated)."""
        c = self.cfg
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(q.shape[:-1] + (-1, c.qk_head_dim))
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        return q_nope, rope.apply_interleaved(q_pe, positions, c.rope_theta, c.yarn)

    def latent(self, x, positions):
        """-> [..., T, kv_lora_rank + rope]: the normed latent c and the rotated shared k_pe."""
        ckv = self.kv_a_proj_with_mqa(x)
        c, k_pe = ckv[..., : self.cfg.kv_lora_rank], ckv[..., self.cfg.kv_lora_rank:]
        k_pe = rope.apply_interleaved(k_pe[..., None, :], positions, self.cfg.rope_theta, self.cfg.yarn)[..., 0, :]
        return jnp.concatenate([self.kv_a_layernorm(c), k_pe], axis=-1)

    def _kv_b(self):
        c = self.cfg
        # An FP8 kv_b_proj is dequantized whole, then split (exact, whatever its block layout; the
        # absorbed form multiplies W_UK / W_UV into q and the context, so no activation scaling here).
        w = quant.dequantize(self.kv_b_proj.kernel.get_value(), self.kv_a_layernorm.weight.get_value().dtype)
        w = w.reshape(c.kv_lora_rank, -1, c.qk_nope_head_dim + c.v_head_dim)
        return w[..., : c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]        # W_UK, W_UV [r, H, 128]

    def __call__(self, x, positions):
        """Naive form over full causal sequences. x [B, T, d]; positions [B, T]."""
        c = self.cfg
        q_nope, q_pe = self.query(x, positions)
        lat = self.latent(x, positions)
        cc, k_pe = lat[..., : c.kv_lora_rank], lat[..., c.kv_lora_rank:]
        kv = self.kv_b_proj(cc)
        kv = kv.reshape(kv.shape[:-1] + (-1, c.qk_nope_head_dim + c.v_head_dim))
        k_nope, v = kv[..., : c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
        s = jnp.einsum('bthd,bshd->bhts', q_nope, k_nope, preferred_element_type=F32)
        s = s + jnp.einsum('bthd,bsd->bhts', q_pe, k_pe, preferred_element_type=F32)
        T = x.shape[-2]
        causal = jnp.tril(jnp.ones((T, T), bool))
        p = jax.nn.softmax(jnp.where(causal, s * self.scaling, -jnp.inf), axis=-1)
        o = jnp.einsum('bhts,bshd->bthd', p.astype(x.dtype), v, preferred_element_type=F32).astype(x.dtype)
        return tp_psum(self.dense(o.reshape(o.shape[:-2] + (-1,)), partial=True))

    def attend_latent(self, q_nope, q_pe, keys, mask):
        """Absorbed attention. q_nope [T,H,nope], q_pe [T,H,rope], keys [T,S,r+rope] (each token's own
        cache rows), mask [T,S] -> [T, H, v_head_dim]."""
        r = self.cfg.kv_lora_rank
        w_uk, w_uv = self._kv_b()
        q_lat = jnp.einsum('thn,rhn->thr', q_nope, w_uk.astype(q_nope.dtype), preferred_element_type=F32)
        cs, kpe = keys[..., :r], keys[..., r:]
        s = jnp.einsum('thr,tsr->ths', q_lat, cs.astype(F32), preferred_element_type=F32)
        s = s + jnp.einsum('thd,tsd->ths', q_pe.astype(F32), kpe.astype(F32), preferred_element_type=F32)
        p = jax.nn.softmax(jnp.where(mask[:, None, :], s * self.scaling, -jnp.inf), axis=-1)
        ctx = jnp.einsum('ths,tsr->thr', p, cs.astype(F32), preferred_element_type=F32)
        return jnp.einsum('thr,rhv->thv', ctx, w_uv.astype(F32), preferred_element_type=F32)

    def step(self, x, batch, cache):
        """Engine step over a packed batch. x [T, d]; cache [num_slots, max_len, r + rope]."""
        num_slots = cache.shape[0]
        q_nope, q_pe = self.query(x, batch.positions)
        lat = self.latent(x, batch.positions).astype(cache.dtype)
        tok_slot = batch.token_slots
        write = jnp.where(tok_slot >= 0, tok_slot, num_slots)                    # padding -> dropped
        cache = cache.at[write, batch.positions].set(lat, mode='drop')
        o = self._attend_cache(q_nope, q_pe, cache, jnp.clip(tok_slot, 0, num_slots - 1), batch.positions)
        return tp_psum(self.dense(o.astype(x.dtype).reshape(o.shape[0], -1), partial=True)), cache

    def _attend_cache(self, q_nope, q_pe, cache, tok_slot, positions, block=QUERY_BLOCK):
        """Each token attends to its own slot's cache rows at positions <= its own. Tokens go in
        blocks of `block` so the gathered keys stay [block, max_len, r + rope], not [T, ...]."""
        max_len = cache.shape[1]

        def attend(args):
            qn, qp, sl, pos = args
            mask = jnp.arange(max_len)[None, :] <= pos[:, None]
            return self.attend_latent(qn, qp, cache[sl], mask)

        T = q_nope.shape[0]
        if T <= block:
            return attend((q_nope, q_pe, tok_slot, positions))
        n = -(-T // block)
        pad = lambda a: jnp.pad(a, [(0, n * block - T)] + [(0, 0)] * (a.ndim - 1)).reshape((n, block) + a.shape[1:])
        o = jax.lax.map(attend, (pad(q_nope), pad(q_pe), pad(tok_slot), pad(positions)))
        return o.reshape((n * block,) + o.shape[2:])[:T]

    def step_paged(self, x, batch, pages, block=QUERY_BLOCK, rows=None):
        """Engine step over a packed batch with the paged latent cache (lingjax/kernels/mla/__init__.py).
        x [T, d]; pages [num_pages, page_size, r + rope]; batch.page_table [R, max_pages] (row r: the pages of
        request row r) must already hold pages for every position the batch writes. Writes the tokens'
        latents, then each token attends to its own request's positions <= its own (decode-only batches:
        the decode kernel; otherwise the paged prefill: the GPU kernel once over the whole packed batch, the
        jnp reference `block` query tokens at a time, see mla_kernels.prefill). -> (out [T, d], new pages).
        rows [N] (optional): every token's latent is written, but only the tokens at these rows attend (the
        decode kernel, one query row each with its own length, in any batch) -> (out [N, d], new pages)."""
        toks, table = batch.token_rows, batch.page_table
        pages = mla_kernels.write(pages, table, toks, batch.positions, self.latent(x, batch.positions),
                                  impl=self.kernels)
        w_uk, w_uv = self._kv_b()
        if rows is not None:
            pos = batch.positions[rows]
            q_nope, q_pe = self.query(x[rows], pos)
            q_lat = jnp.einsum('thn,rhn->thr', q_nope, w_uk.astype(q_nope.dtype), preferred_element_type=F32)
            ctx = mla_kernels.decode(q_lat, q_pe, pages, table, toks[rows], pos + 1, self.scaling, impl=self.kernels)
            o = jnp.einsum('thr,rhv->thv', ctx, w_uv.astype(F32), preferred_element_type=F32)
            return tp_psum(self.dense(o.astype(x.dtype).reshape(o.shape[0], -1), partial=True)), pages
        q_nope, q_pe = self.query(x, batch.positions)
        q_lat = jnp.einsum('thn,rhn->thr', q_nope, w_uk.astype(q_nope.dtype), preferred_element_type=F32)
        if batch.decode_only:
            ctx = mla_kernels.decode(q_lat, q_pe, pages, table, toks, batch.positions + 1, self.scaling,
                                     impl=self.kernels)
        else:
            ctx = mla_kernels.prefill(q_lat, q_pe, pages, table, toks, batch.positions, self.scaling,
                                      impl=self.kernels, block=block)
        o = jnp.einsum('thr,rhv->thv', ctx, w_uv.astype(F32), preferred_element_type=F32)
        return tp_psum(self.dense(o.astype(x.dtype).reshape(o.shape[0], -1), partial=True)), pages
