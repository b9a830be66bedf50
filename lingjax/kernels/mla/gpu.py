"""MLA decode on GPUs: the Triton kernel of triton_kernels.py called through jax-triton, plus the jnp
merge of its context splits. Same interface as reference.decode (see lingjax/kernels/mla/__init__.py).

The kernel reads only the pages each request holds, up to its length (bf16 latents, float32 softmax and
accumulation). The context of each request is split NUM_SPLITS ways (`pick_config`): at small batches
one program per (request, head block) would leave most SMs idle, so the splits run in parallel and
`combine_splits` merges their (o, lse) pairs. jax_triton is imported inside `decode` (through
lingjax.kernels.jax_triton_lib): it cannot be imported on a CPU-only JAX.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from lingjax.kernels.jax_triton_lib import dot_precision

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    block_h: int = 16        # heads per program (tl.dot needs >= 16; extra heads are masked)
    block_n: int = 64        # context tokens per inner step; divides the page size
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def pick_config(batch: int, num_heads: int, page_size: int, max_pages: int, sm_count: int = 132) -> Config:
    """Enough programs to fill the GPU (about 2 per SM) without splitting contexts needlessly: split the
    context only when batch x head blocks is below that, and never into splits shorter than 4 blocks.
    Not tuned on a GPU yet (scripts/bench_mla.py sweeps it)."""
    block_n = min(64, page_size)
    head_blocks = -(-num_heads // 16)
    programs = batch * head_blocks
    max_splits = max(1, (max_pages * page_size) // (4 * block_n))
    splits = max(1, min(max_splits, -(-2 * sm_count // programs), 64))
    return Config(block_h=16, block_n=block_n, num_splits=splits)


def combine_splits(o, lse):
    """o [B, S, H, R] float32 (each split normalised), lse [B, S, H] (-inf: empty split) -> [B, H, R]:
    sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max_s lse_s); 0 where every split is empty."""
    top = jnp.max(lse, axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top)                                             # 0 for empty splits
    total = w.sum(1)
    out = jnp.einsum('bsh,bshr->bhr', w, o)
    return jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)


def decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, *, config: Config | None = None,
           f32_dot: str = "tf32x3"):
    """As reference.decode: [B, H, r] float32. `scale` must be a Python number (a kernel constant)."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.mla.triton_kernels import decode_kernel
    jt = jax_triton()
    B, H, R = q_lat.shape
    ROPE = q_pe.shape[-1]
    num_pages, page_size, _ = pages.shape
    max_pages = page_table.shape[1]
    c = config or pick_config(B, H, page_size, max_pages)
    if page_size % c.block_n or R % 16 or ROPE % 16 or c.block_n < 16:
        raise ValueError(f"MLA GPU decode: page_size={page_size} must be a multiple of block_n={c.block_n} (>= 16), "
                         f"kv_lora_rank={R} and qk_rope_head_dim={ROPE} multiples of 16")
    S = c.num_splits
    o, lse = jt.triton_call(
        q_lat.astype(F32), q_pe.astype(F32), pages, page_table.astype(jnp.int32), slots.astype(jnp.int32),
        lengths.astype(jnp.int32),
        kernel=decode_kernel,
        out_shape=(jax.ShapeDtypeStruct((B, S, H, R), F32), jax.ShapeDtypeStruct((B, S, H), F32)),
        grid=(B, -(-H // c.block_h), S), num_warps=c.num_warps, num_stages=c.num_stages, name="mla_decode",
        SCALE=float(scale), H=H, R=R, ROPE=ROPE, PAGE_SIZE=page_size, MAX_PAGES=max_pages, NUM_SPLITS=S, BLOCK_H=c.block_h,
        BLOCK_N=c.block_n, PRECISION=dot_precision(pages.dtype, f32_dot))
    return combine_splits(o, lse)
