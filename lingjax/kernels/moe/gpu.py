"""MoE grouped matmul on Hopper GPUs: the Triton kernels of triton_kernels.py called through jax-triton.

Same interface as reference.py (see lingjax/kernels/moe/__init__.py): `pick_block_m`,
`pick_layout_method`, `gate_up`, `down` over the expert-sorted row layout (layout.py). Each kernel
reads every touched expert's weight panel once per block of rows and none of the untouched experts, straight from the stored [E, d, I] /
[E, I, d] layout (no transposes, no weight copies). Tile shapes are picked per block size by
`pick_config` (measured on H200: scripts/bench_moe.py); `config=` overrides them for sweeps.
jax_triton is imported inside the functions: it cannot be imported on a CPU-only JAX.
"""
from __future__ import annotations

import dataclasses

import jax
from lingjax.kernels.jax_triton_lib import dot_precision
from lingjax.kernels.moe.layout import COMPARE_MAX_PAIRS


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiles and schedule of one kernel: [block_m (the layout's), block_n] output tiles, block_k-deep
    steps; group_m blocks per n tile in the tile order (L2 reuse); persistent 0: one program per
    (block, n tile), p > 0: p programs per SM looping over the used blocks' tiles (triton_kernels.py)."""
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    persistent: int = 0

    def tag(self) -> str:
        """Short name of the config for tables: n64k128g8w4s3 (+ p2 when persistent)."""
        t = f"n{self.block_n}k{self.block_k}g{self.group_m}w{self.num_warps}s{self.num_stages}"
        return t + (f"p{self.persistent}" if self.persistent else "")


def num_sms() -> int:
    """Streaming multiprocessors of the first device (132 on an H200; 132 if the device does not say)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _schedule(c: Config, nb: int, num_n: int):
    """(grid, PERSISTENT, NUM_PROGRAMS) of a launch over nb blocks x num_n n tiles."""
    if c.persistent <= 0:
        return (nb * num_n,), False, 1
    programs = max(1, min(c.persistent * num_sms(), nb * num_n))
    return (programs,), True, programs


def pick_layout_method(n_pairs: int) -> str:
    """'compare' (layout.py: comparisons and reductions, a few fused kernels) up to
    COMPARE_MAX_PAIRS pairs, where a sort and its scatters are a fixed cost larger than the work;
    'sort' above (the comparisons grow as n_pairs^2)."""
    return "compare" if n_pairs <= COMPARE_MAX_PAIRS else "sort"


def pick_block_m(n_pairs: int, n_experts: int) -> int:
    """Rows per block: about the rows an expert gets on average (16 at decode sizes, up to 128), so
    that padding stays a small share of the work and blocks are large enough for the tensor cores."""
    avg = n_pairs / max(n_experts, 1)
    for bm in (16, 32, 64):
        if avg <= bm:
            return bm
    return 128


def pick_config(kind: str, block_m: int, K: int, N: int, itemsize: int = 2) -> Config:
    """Tile shapes by rows per block, the fastest of scripts/bench_moe.py's sweep on H200 (run 2 of
    scripts/bench_notes_moe.md): small blocks (decode) stream weights, 64-wide gate/up tiles and
    128-wide down tiles with deep pipelines (T = 16: 654 us, 64: 1319 us at the flash shapes);
    large blocks: 64-wide gate/up and 128-wide down tiles, 64-deep k steps, 4 warps, 3 stages
    (T = 4096: 2324 us). float32 inputs (3xTF32 products) take 64-deep k steps and at most 3 stages,
    so the double-size tiles stay inside the 227 KiB of shared memory."""
    if block_m <= 32:
        c = Config(block_n=128 if kind == "down" else 64, block_k=64 if kind == "down" else 128, group_m=1,
                   num_warps=4, num_stages=4)
    else:
        c = Config(block_n=128 if kind == "down" else 64, block_k=64, group_m=8, num_warps=4, num_stages=3)
    if itemsize >= 4:
        c = dataclasses.replace(c, block_k=min(c.block_k, 64), num_stages=min(c.num_stages, 3))
    return _fit(c, K, N)


def _fit(c: Config, K: int, N: int) -> Config:
    """Shrink tiles to small dims (tiny test models); dims must be multiples of 16."""
    bn, bk = min(c.block_n, N), min(c.block_k, K)
    if N % bn or K % bk or bn < 16 or bk < 16:
        raise ValueError(f"MoE GPU kernel: dims K={K}, N={N} must be multiples of 16 and of the tile "
                         f"({c.block_k}, {c.block_n})")
    return dataclasses.replace(c, block_n=bn, block_k=bk)


def gate_up(x, layout, w_gate, w_up, *, config: Config | None = None, f32_dot: str = "tf32x3"):
    """h [P, I] = silu(x[row_token] @ Wg[e]) * (x[row_token] @ Wu[e]), float32 accumulation, x.dtype."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    jt = jax_triton()
    from lingjax.kernels.moe.triton_kernels import gate_up_kernel
    T, d = x.shape
    I = w_gate.shape[-1]
    nb, bm = layout.block_expert.shape[0], layout.block_m
    c = _fit(config, d, I) if config else pick_config("gate_up", bm, d, I, x.dtype.itemsize)
    grid, persistent, programs = _schedule(c, nb, I // c.block_n)
    return jt.triton_call(
        x, layout.row_token, layout.block_expert, layout.num_used_blocks.reshape(1), w_gate.astype(x.dtype),
        w_up.astype(x.dtype), kernel=gate_up_kernel, out_shape=jax.ShapeDtypeStruct((nb * bm, I), x.dtype),
        grid=grid, num_warps=c.num_warps, num_stages=c.num_stages, name="moe_gate_up",
        N_TOKENS=T, K=d, N=I, NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=c.group_m, PRECISION=dot_precision(x.dtype, f32_dot), PERSISTENT=persistent,
        NUM_PROGRAMS=programs)


def down(h, layout, w_down, *, config: Config | None = None, f32_dot: str = "tf32x3"):
    """y [P, d] = h @ Wd[e] per block, float32 accumulation, h.dtype."""
    from lingjax.kernels.jax_triton_lib import jax_triton
    jt = jax_triton()
    from lingjax.kernels.moe.triton_kernels import down_kernel
    P, I = h.shape
    d = w_down.shape[-1]
    nb, bm = layout.block_expert.shape[0], layout.block_m
    c = _fit(config, I, d) if config else pick_config("down", bm, I, d, h.dtype.itemsize)
    grid, persistent, programs = _schedule(c, nb, d // c.block_n)
    return jt.triton_call(
        h, layout.block_expert, layout.num_used_blocks.reshape(1), w_down.astype(h.dtype),
        kernel=down_kernel, out_shape=jax.ShapeDtypeStruct((P, d), h.dtype),
        grid=grid, num_warps=c.num_warps, num_stages=c.num_stages, name="moe_down",
        K=I, N=d, NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        GROUP_M=c.group_m, PRECISION=dot_precision(h.dtype, f32_dot), PERSISTENT=persistent,
        NUM_PROGRAMS=programs)
