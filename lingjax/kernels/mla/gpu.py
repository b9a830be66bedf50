"""MLA decode on GPUs: the Triton kernel of triton_kernels.py called through jax-triton, plus the jnp
merge of its context splits. Same interface as reference.decode (see lingjax/kernels/mla/__init__.py).

The kernel reads only the pages each request holds, up to its length (bf16 latents, float32 softmax and
accumulation). Decode is bound by reading the latents, so one program covers all heads of a request
(Config.block_h) and reads them once. The context of each request is split num_splits ways
(`pick_config`): at small batches one program per request would leave most SMs idle, so the splits run in
parallel and `combine_splits` merges their (o, lse) pairs (with one split the kernel's output is the
result). Config.stream runs decode_stream_kernel instead: the blocks of the whole batch cut into equal runs,
one per program, whatever the requests' lengths (stream-K; the runs over one request merged in the kernel).
jax_triton is imported inside `decode` (through lingjax.kernels.jax_triton_lib): it cannot be
imported on a CPU-only JAX.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from lingjax.kernels.jax_triton_lib import dot_precision

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch options of decode_kernel (triton_kernels.py). block_h: heads per program (a power of 2 >= 16;
    each head block reads the request's latents, so block_h >= heads reads them once); block_n: tokens per
    step (a power of 2 >= 16); num_splits: context splits per request (merged by combine_splits); swap:
    tokens / latent columns as the tensor-core M dimension; reg_prefetch: the next block loaded into registers
    during this block's products instead of Triton's pipelined shared buffers (run with num_stages 1; block_n
    must divide the page size); combine: with num_splits > 1, the last program of each request merges the
    splits in the kernel (an atomic counter per request) instead of combine_splits' separate pass; stream:
    decode_stream_kernel instead, the blocks of all requests cut into num_splits equal runs, one per program
    (num_splits = the programs, not splits per request; with_splits: SMs x programs per SM), whatever the
    lengths (one head block, not swapped, block_n dividing the page size); low_partials: the splits' outputs
    written in the pages' dtype (16-bit: half the bytes of the partials and of their merge's read; one more
    rounding of each split's normalised output), not float32. The kernels' docstrings have each."""
    block_h: int = 32
    block_n: int = 64
    num_splits: int = 1
    num_warps: int = 8
    num_stages: int = 2
    swap: bool = False
    reg_prefetch: bool = False
    combine: bool = False
    stream: bool = False
    low_partials: bool = False

    def tag(self) -> str:
        """Short name for tables: h<block_h> n<block_n> s<splits> w<warps> st<stages> [swap] [rp] [fc] [sk] [pb]."""
        return (f"h{self.block_h}n{self.block_n}s{self.num_splits}w{self.num_warps}st{self.num_stages}"
                + ("swap" if self.swap else "") + ("rp" if self.reg_prefetch else "")
                + ("fc" if self.combine else "") + ("sk" if self.stream else "")
                + ("pb" if self.low_partials else ""))

    @classmethod
    def from_tag(cls, tag: str) -> "Config":
        """The inverse of tag(): 'h32n64s4w8st5', 'h32n32s1w8st5swap', 'h32n64s8w8st1swaprp', 'h32n64s8w4st3fc'
        (s may be 0 or negative: a placeholder the benchmark resolves); ValueError naming the tag otherwise."""
        m = re.fullmatch(r"h(\d+)n(\d+)s(-?\d+)w(\d+)st(\d+)(swap)?(rp)?(fc)?(sk)?(pb)?", tag)
        if not m:
            raise ValueError(f"MLA decode config tag {tag!r} is not "
                             "h<block_h>n<block_n>s<splits>w<warps>st<stages>[swap][rp][fc][sk][pb]")
        h, n, s, w, st = (int(g) for g in m.groups()[:5])
        return cls(block_h=h, block_n=n, num_splits=s, num_warps=w, num_stages=st, swap=bool(m.group(6)),
                   reg_prefetch=bool(m.group(7)), combine=bool(m.group(8)), stream=bool(m.group(9)),
                   low_partials=bool(m.group(10)))


def supports(kv_lora_rank: int, rope_dim: int) -> bool:
    """Whether the decode kernel can tile these latent sizes: both powers of two >= 16 (every released
    V2.5 model: 512 and 64; not the tiny test models, whose MLA the dispatch runs on the reference)."""
    return all(n >= 16 and _pow2(n) == n for n in (kv_lora_rank, rope_dim))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def pick_splits(programs: int, n_blocks: int, block_h: int, block_n: int, r: int = 512, d: int = 576,
                slots: int = 132, max_splits: int = 128) -> int:
    """Context splits per request that minimise a simple time model, in units of one block's load:
    waves x (blocks per split + 2 of fixed cost per program) + the combine pass (each extra split writes and
    re-reads a [block_h, r] float32 output, spread over the GPU). `programs`: requests x head blocks;
    `slots`: programs resident at once (SMs x programs per SM). No split shorter than 4 blocks."""
    combine = block_h * r * 4 * 2 / (block_n * d * 2)           # one split's output, in blocks of latents
    best, best_t = 1, None
    for s in range(1, max(1, min(max_splits, n_blocks // 4)) + 1):
        waves = -(-programs * s // slots)
        t = waves * (-(-n_blocks // s) + 2) + (programs * s * combine / slots if s > 1 else 0.0)
        if best_t is None or t < best_t - 1e-9:
            best, best_t = s, t
    return best


def programs_per_sm(c: Config, r: int = 512, d: int = 576, itemsize: int = 2, smem: int = 227 * 1024) -> int:
    """Programs of config c resident per SM (H100/H200): shared memory ~ latent buffers of [block_n, d]
    + the queries [block_h, d], against 227 KiB; registers: up to 255 per thread, so 4 warps
    allow 2 programs and 8 warps 1 (65536 per SM). An estimate; scripts/compile_mla_kernels.py prints the
    compiler's figures."""
    # latent tiles in shared memory: reg_prefetch stages one; the swapped (wgmma) form keeps at least two
    # (Triton's pipeliner, also at num_stages 2); otherwise num_stages - 1
    bufs = 1 if c.reg_prefetch else max(2 if c.swap else 1, c.num_stages - 1)
    shared = (bufs * c.block_n + c.block_h) * d * itemsize
    return max(1, min(smem // shared, 65536 // (32 * c.num_warps * 255)))


def pick_config(batch: int, num_heads: int, page_size: int, max_pages: int, sm_count: int = 132,
                itemsize: int = 2) -> Config:
    """All heads of a request in one program (block_h up to 64), so its latents are read once per split;
    the context split so that requests x splits fill the SMs (pick_splits over programs_per_sm x SMs).
    Heads <= 32 (bench_notes_mla.md, round 3): 64-token blocks, 4 warps, 2 stages = one latent buffer per
    program and TWO programs per SM (108 KiB of shared memory each): while one program computes a block, the
    other's next block is loading, and B=256 runs in one wave of 256 programs on 264 slots. The products are
    mma.sync with all warps side by side along the tokens, so every warp reads all the queries from shared
    memory once per block: shared-memory bytes read per latent byte ~ 2 + warps x block_h / block_n (4 here;
    the 32-token forms, 6, measured ~60%). Measured on the H200 (CUPTI kernel time, round 3): 87% of the copy
    bandwidth at B=64 and B=256 x 32k, 79.7% at B=16 x 32k, against 77-78% / 74% for round 2's h32n64w4st3
    (two buffers, one program per SM). Session 6: the splits' partials in bf16 (low_partials; half of the 64 KiB
    each program writes at its end and of the merge's read): +3-5 points at B=16 4k-32k and B=64 4k, and no
    spills where it applies (splits > 1; 8 bytes before).
    64 heads: [64, 512] accumulator, blocks of 32, swapped products (wgmma), two buffers.
    float32 latents (itemsize 4: parity checks, not speed; tf32x3 products spill at every configuration):
    16 heads x 16 tokens, the smallest shared memory.
    Compiled for sm_90 by scripts/compile_mla_kernels.py (spills, buffers); scripts/bench_mla.py --sweep times
    the alternatives on the device."""
    block_h = min(64, max(16, _pow2(num_heads)))
    if itemsize > 2:
        c = Config(block_h=16, block_n=16, num_warps=4, num_stages=2)
    elif block_h == 64:
        c = Config(block_h=64, block_n=32, num_warps=8, num_stages=3, swap=True)
    else:
        c = Config(block_h=block_h, block_n=64, num_warps=4, num_stages=2, low_partials=True)
    return with_splits(c, batch, num_heads, page_size, max_pages, sm_count, itemsize)


def with_splits(c: Config, batch: int, num_heads: int, page_size: int, max_pages: int, sm_count: int = 132,
                itemsize: int = 2) -> Config:
    """c with the context splits pick_splits chooses for it: (requests x head blocks) x splits over
    sm_count x programs_per_sm(c) resident programs."""
    programs = batch * -(-num_heads // c.block_h)
    n_blocks = -(-max_pages * page_size // c.block_n)
    slots = sm_count * programs_per_sm(c, itemsize=itemsize)
    if c.stream:                                    # one run of the blocks per resident program
        return dataclasses.replace(c, num_splits=slots)
    return dataclasses.replace(c, num_splits=pick_splits(programs, n_blocks, c.block_h, c.block_n, slots=slots))


def combine_splits(o, lse):
    """o [B, S, H, R] float32 or 16-bit (each split normalised), lse [B, S, H] (-inf: empty split) -> [B, H, R]:
    sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max_s lse_s); 0 where every split is empty.
    A multiply and a sum over s (one reduction pass over o), not an einsum, which XLA may lower to a batched
    matmul with o transposed first."""
    top = jnp.max(lse, axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top)                                             # 0 for empty splits
    total = w.sum(1, keepdims=True)
    w = w / jnp.where(total > 0, total, 1.0)                           # all 0 where every split is empty
    return jnp.sum(w[..., None] * o.astype(F32), axis=1)


def decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, *, config: Config | None = None,
           f32_dot: str = "tf32x3"):
    """As reference.decode: [B, H, r] float32. `scale` must be a Python number (a kernel constant). The
    queries go to the kernel in their dtype (it casts them to the pages' dtype): no conversion pass."""
    return _decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, config, f32_dot, profile=False)[0]


def decode_profiled(q_lat, q_pe, pages, page_table, slots, lengths, scale, *, config: Config | None = None):
    """decode with the kernel's PROFILE timestamps (a benchmark tool: scripts/bench_mla.py --profile) ->
    (out, prof [programs, 9] int32: start ns low / high word, end ns low / high word, SM id, then ns since the
    start: queries ready, first page id ready, first block done, last block done; program = (hb * B + b) * S
    + sp; profile_summary reads it)."""
    if config is not None and config.stream:
        raise ValueError("MLA GPU decode_profiled: the stream kernel (Config.stream) has no PROFILE timestamps")
    return _decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, config, "tf32x3", profile=True)


def profile_summary(prof, blocks: int | None = None) -> dict:
    """decode_profiled's prof -> microseconds: span (first start to last end), start_spread / end_spread (last
    minus first), program time min / median / max, and SMs used; with the phase words (9 per program), the
    median over programs of: q_us (start to queries ready), table_us (start to first page id), first_us
    (start to first block's products done), loop_us (first block done to last block done), tail_us (last block
    done to the end: the partial's store); with `blocks` (per program, > 1), per_block_us = loop_us /
    (blocks - 1)."""
    import numpy as np
    p = np.asarray(prof).astype(np.int64)
    word = lambda lo, hi: (p[:, hi] << 32) | (p[:, lo] & 0xFFFFFFFF)     # noqa: E731
    t0, t1 = word(0, 1), word(2, 3)
    base = t0.min()
    t0, t1 = (t0 - base) / 1e3, (t1 - base) / 1e3
    dur = t1 - t0
    out = dict(span_us=round(float(t1.max()), 2), start_spread_us=round(float(t0.max()), 2),
               end_spread_us=round(float(t1.max() - t1.min()), 2), prog_min_us=round(float(dur.min()), 2),
               prog_med_us=round(float(np.median(dur)), 2), prog_max_us=round(float(dur.max()), 2),
               sms=int(len(np.unique(p[:, 4]))), programs=int(len(p)))
    if p.shape[1] >= 9:
        med = lambda x: round(float(np.median(x)), 2)                    # noqa: E731
        q, table, first, last = (p[:, k] / 1e3 for k in (5, 6, 7, 8))
        out.update(q_us=med(q), table_us=med(table), first_us=med(first), loop_us=med(last - first),
                   tail_us=med(dur - last))
        if blocks and blocks > 1:
            out["per_block_us"] = round(out["loop_us"] / (blocks - 1), 3)
    return out


def _decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, config, f32_dot, profile):
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.mla.triton_kernels import PROFILE_WORDS, decode_kernel
    B, H, R = q_lat.shape
    ROPE = q_pe.shape[-1]
    num_pages, page_size, _ = pages.shape
    max_pages = page_table.shape[1]
    c = config or pick_config(B, H, page_size, max_pages, itemsize=pages.dtype.itemsize)
    if not supports(R, ROPE):
        raise ValueError(f"MLA GPU decode: kv_lora_rank={R} and qk_rope_head_dim={ROPE} must be powers of 2 >= 16")
    if c.block_n < 16 or _pow2(c.block_n) != c.block_n or c.block_h < 16 or _pow2(c.block_h) != c.block_h:
        raise ValueError(f"MLA GPU decode: block_n={c.block_n} and block_h={c.block_h} must be powers of 2 >= 16")
    if c.reg_prefetch and page_size % c.block_n:
        raise ValueError(f"MLA GPU decode: reg_prefetch needs block_n={c.block_n} to divide page_size={page_size}")
    if c.num_splits < 1:
        raise ValueError(f"MLA GPU decode: num_splits={c.num_splits} must be >= 1")
    if c.stream:
        return _decode_stream(q_lat, q_pe, pages, page_table, slots, lengths, scale, c, f32_dot), None
    S = c.num_splits
    fused = c.combine and S > 1
    head_blocks = -(-H // c.block_h)
    # out [B, H, R] and the per-(request, head block) counters (zeroed by jax-triton before the launch) are
    # used only when the kernel merges the splits; otherwise one-element placeholders
    extra = ((jax.ShapeDtypeStruct((B, H, R), F32), jax.ShapeDtypeStruct((B * head_blocks,), jnp.int32)) if fused
             else (jax.ShapeDtypeStruct((1,), F32), jax.ShapeDtypeStruct((1,), jnp.int32)))
    extra += (jax.ShapeDtypeStruct((head_blocks * B * S, PROFILE_WORDS.value) if profile else (1,), jnp.int32),)
    # the splits' outputs: float32, or the pages' 16-bit dtype (low_partials); with one split o is the result
    o_dtype = pages.dtype if c.low_partials and S > 1 and pages.dtype.itemsize == 2 else F32
    o, lse, out, _, prof = jax_triton().triton_call(
        q_lat, q_pe, pages, page_table.astype(jnp.int32), slots.astype(jnp.int32),
        lengths.astype(jnp.int32),
        kernel=decode_kernel,
        out_shape=(jax.ShapeDtypeStruct((B, S, H, R), o_dtype), jax.ShapeDtypeStruct((B, S, H), F32)) + extra,
        zeroed_outputs=(3,) if fused else (),
        grid=(head_blocks, B, S), num_warps=c.num_warps, num_stages=c.num_stages, name="mla_decode",
        SCALE=float(scale), H=H, R=R, ROPE=ROPE, PAGE_SIZE=page_size, MAX_PAGES=max_pages, NUM_SPLITS=S,
        BLOCK_H=c.block_h, BLOCK_N=c.block_n, PRECISION=dot_precision(pages.dtype, f32_dot), SWAP=c.swap,
        REG_PREFETCH=c.reg_prefetch, COMBINE=fused, PROFILE=profile)
    if S == 1:
        return o[:, 0], prof
    return (out if fused else combine_splits(o, lse)), prof


def _decode_stream(q_lat, q_pe, pages, page_table, slots, lengths, scale, c: Config, f32_dot):
    """decode with Config.stream: decode_stream_kernel over c.num_splits programs (runs of the blocks)."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    from lingjax.kernels.mla.triton_kernels import decode_stream_kernel
    B, H, R = q_lat.shape
    ROPE = q_pe.shape[-1]
    _, page_size, _ = pages.shape
    P = c.num_splits
    if c.block_h < H or c.swap or c.reg_prefetch or page_size % c.block_n:
        raise ValueError(f"MLA GPU decode: stream needs block_h >= heads ({c.block_h} < {H}?), no swap / "
                         f"reg_prefetch, and block_n={c.block_n} dividing page_size={page_size}")
    out, _, _, _ = jax_triton().triton_call(
        q_lat, q_pe, pages, page_table.astype(jnp.int32), slots.astype(jnp.int32), lengths.astype(jnp.int32),
        kernel=decode_stream_kernel,
        out_shape=(jax.ShapeDtypeStruct((B, H, R), F32), jax.ShapeDtypeStruct((P, 2, H, R), F32),
                   jax.ShapeDtypeStruct((P, 2, H), F32), jax.ShapeDtypeStruct((B,), jnp.int32)),
        zeroed_outputs=(0, 3), grid=(P,), num_warps=c.num_warps, num_stages=c.num_stages, name="mla_decode_stream",
        SCALE=float(scale), B=B, B_P2=max(16, _pow2(B)), H=H, R=R, ROPE=ROPE, PAGE_SIZE=page_size,
        MAX_PAGES=page_table.shape[1], BLOCK_H=c.block_h, BLOCK_N=c.block_n, P_P2=max(16, _pow2(P)),
        PRECISION=dot_precision(pages.dtype, f32_dot))
    return out
