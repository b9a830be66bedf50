"""MLA prefill on GPUs: the Triton kernel `prefill_kernel` of triton_kernels.py called through jax-triton.
Same interface as reference.prefill (see lingjax/kernels/mla/__init__.py): a packed ragged batch of T query
tokens, token t causal over positions [0, positions[t]] of page-table row token_slots[t] (-1: padding).

The whole packed batch goes to ONE kernel call (no per-block lax.map as for the reference). A program takes
BLOCK_T consecutive tokens of the packed array x BLOCK_H heads (M = BLOCK_T * BLOCK_H query rows sharing
the keys: MQA) and walks their row's pages from position 0 to its last token's position. The caller need
not align sequences to BLOCK_T: a block holding tokens of several rows (a request boundary, one-token
requests, padding) handles them one row after the other inside the program (triton_kernels.py says how),
so any token_slots / positions the reference accepts give its result. jax_triton is imported inside
`prefill` (through lingjax.kernels.jax_triton_lib): it cannot be imported on a CPU-only JAX.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from lingjax.kernels.jax_triton_lib import dot_precision

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    block_m: int = 64        # query rows per program = tokens x heads (tl.dot needs >= 16)
    block_n: int = 64        # key positions per inner step (any size >= 16; need not divide the page size)
    block_r: int = 0         # value columns per program (0: all of r; < r recomputes the scores per block)
    num_warps: int = 8
    num_stages: int = 2

    def tag(self):
        return f"m{self.block_m}n{self.block_n}r{self.block_r}w{self.num_warps}s{self.num_stages}"


F32_CONFIG = Config(block_m=16, block_n=16, block_r=0, num_warps=4, num_stages=1)


def head_block(num_heads: int, block_m: int) -> int:
    """Heads per program: the largest power of two dividing num_heads (no masked heads), at most block_m."""
    bh = 1
    while bh * 2 <= block_m and num_heads % (bh * 2) == 0:
        bh *= 2
    return bh


def pick_config(num_tokens: int, num_heads: int, r: int, itemsize: int = 2) -> Config:
    """16-bit pages: 64 query rows x 64 keys, the whole of r per program, 8 warps, 2 stages. On sm_90
    (scripts/compile_mla_prefill.py, local Triton 3.7) at r = 512, rope 64: 255 registers with ~200 bytes
    spilled, 216 KiB of shared memory (q [64, 512] + 2 stages of [64, 576] keys), every product a wgmma;
    the [64, 512] float32 accumulator alone is 128 registers a thread over 256 threads. float32 pages
    (float32 models: parity, not speed): 16 x 16 blocks, 4 warps, 1 stage (tf32x3 products; every float32
    config spills). Not tuned on a GPU yet: scripts/bench_mla.py --prefill-sweep times the alternatives."""
    del num_tokens, num_heads
    if itemsize > 2:
        return F32_CONFIG
    return Config(block_r=0 if r <= 512 else 512)


def supports(kv_lora_rank: int) -> bool:
    """Whether the prefill kernel can tile this latent size: a power of two >= 16 (any rope dim: it is
    padded in the kernel)."""
    return kv_lora_rank >= 16 and not kv_lora_rank & (kv_lora_rank - 1)


def launch(T, H, R, ROPE, page_size, max_pages, config: Config):
    """(grid, constexpr keywords) of prefill_kernel for these sizes; ValueError for sizes it cannot take."""
    c = config
    block_r = c.block_r or R
    bh = head_block(H, c.block_m)
    if R & (R - 1) or R < 16 or R % block_r or block_r & (block_r - 1) or block_r < 16 or c.block_n < 16 \
            or c.block_n & (c.block_n - 1) or c.block_m < 16 or c.block_m & (c.block_m - 1):
        raise ValueError(f"MLA GPU prefill: kv_lora_rank={R} must be a power of two >= 16 and a multiple of "
                         f"block_r={block_r} (a power of two >= 16); block_n={c.block_n} and block_m={c.block_m} "
                         f"must be powers of two >= 16")
    rope_p = max(16, 1 << (ROPE - 1).bit_length())
    grid = (-(-T // (c.block_m // bh)), -(-H // bh), R // block_r)
    return grid, dict(T=T, H=H, R=R, ROPE=ROPE, ROPE_P=rope_p, PAGE_SIZE=page_size, MAX_PAGES=max_pages,
                      BLOCK_T=c.block_m // bh, BLOCK_H=bh, BLOCK_N=c.block_n, BLOCK_R=block_r)


def prefill(q_lat, q_pe, pages, page_table, token_slots, positions, scale, *, config: Config | None = None,
            f32_dot: str = "tf32x3"):
    """As reference.prefill: [T, H, r] float32. `scale` must be a Python number (a kernel constant).
    f32_dot: the tl.dot input_precision for float32 pages (jax_triton_lib.dot_precision)."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.mla.triton_kernels import prefill_kernel
    jt = jax_triton()
    T, H, R = q_lat.shape
    if T == 0:
        return jnp.zeros((0, H, R), F32)
    c = config or pick_config(T, H, R, pages.dtype.itemsize)
    grid, sizes = launch(T, H, R, q_pe.shape[-1], pages.shape[1], page_table.shape[1], c)
    out = jt.triton_call(
        q_lat.astype(pages.dtype), q_pe.astype(pages.dtype), pages, page_table.astype(jnp.int32),
        token_slots.astype(jnp.int32), positions.astype(jnp.int32),
        kernel=prefill_kernel, out_shape=jax.ShapeDtypeStruct((T, H, R), F32), grid=grid,
        num_warps=c.num_warps, num_stages=c.num_stages, name="mla_prefill",
        SCALE=float(scale), PRECISION=dot_precision(pages.dtype, f32_dot), **sizes)
    # under shard_map (heads split over tp) the output varies over the mesh axes its inputs vary over;
    # jax-triton's outputs vary over none: cast it up
    want = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in (q_lat, q_pe, pages, page_table)))
    missing = tuple(sorted(want - jax.typeof(out).manual_axis_type.varying))
    return jax.lax.pcast(out, missing, to='varying') if missing else out
