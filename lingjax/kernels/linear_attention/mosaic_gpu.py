"""Linear attention decode as a Pallas *Mosaic GPU* kernel (Hopper), the backend JAX supports.

Same interface and semantics as ``reference.decode`` (SPEC §2.4, §2.9). The prefill kernels are
still the Pallas-Triton ones of gpu.py (see its docstring for why: ragged, run-time chunk offsets);
decode has no ragged access -- every copy is one whole [D, BV] state tile at a run-time slot, or
one token's q/k/v row -- so it maps onto Mosaic GPU's TMA copies directly.

One program (one warpgroup, 128 threads) per (value block, head, request), grid (D/BV, H, B), the
value-block axis fastest so that the programs launched together sweep one slot's [H, D, D] state
in address order (as gpu.py's tiles_first and fla's grid do):

  1. read the request's slot and fresh flag (scalars from GMEM); slot < 0 (a padding row): write
     zeros to its output and touch no slot;
  2. TMA: the state tile pool[slot, h, :, vblock] (f32 [D, BV]) and q/k/v[b, h] into shared memory,
     each on its own barrier;
  3. S = a S + k vᵀ with a = 0 if fresh else e^g; o = scale qᵀ S. In registers, in the WGMMA
     fragment layout (rows = key dim, 64-row tiles; k, q broadcast along rows, v along columns; the
     qᵀS sum is a cross-warp column reduction);
  4. TMA: S back to the same tile, o to its output row.

The pool is aliased input -> output: under donation a step moves only the touched slots' bytes. The state tile in
shared memory is tiled (8, 32) and 128-byte swizzled, which the WGMMA-layout register loads and
stores need to be free of bank conflicts (the TMA engine applies the swizzle on the way in and out).

Needs D a multiple of 64 (WGMMA row tiles) and BV a multiple of 32 (the swizzle width in f32).
``interpret=True`` runs it on the CPU in Pallas' Mosaic GPU interpret mode (how the tests check it).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.pallas import mpmd as _mpmd

from lingjax.kernels.linear_attention.gpu import _like

F32 = jnp.float32


def _decode_kernel(slots_g, fresh_g, g_g, q_g, k_g, v_g, pool_g, o_g, pool_out_g,
                   s_smem, qkv_smem, o_smem, bars, *, BV, scale):
    jv, h, b = lax.axis_index('v'), lax.axis_index('h'), lax.axis_index('b')
    vcols = pl.ds(jv * BV, BV)
    D = s_smem.shape[0]
    rows, cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)   # 1-D: along D / BV
    slot = slots_g[b]

    def write_o(o):
        o_smem[...] = o.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_g.at[b, h, vcols])

    @pl.when(slot < 0)
    def _():
        write_o(plgpu.layout_cast(jnp.zeros((BV,), F32), cols))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(slot >= 0)
    def _():
        plgpu.copy_gmem_to_smem(pool_g.at[slot, h, :, vcols], s_smem, bars.at[0])
        plgpu.copy_gmem_to_smem(q_g.at[b, h], qkv_smem.at[0], bars.at[1])
        plgpu.copy_gmem_to_smem(k_g.at[b, h], qkv_smem.at[1], bars.at[2])
        plgpu.copy_gmem_to_smem(v_g.at[b, h, vcols], qkv_smem.at[2, pl.ds(0, BV)], bars.at[3])
        a = jnp.where(fresh_g[b] != 0, jnp.float32(0.0), jnp.exp(g_g[h]))
        for i in (1, 2, 3):
            plgpu.barrier_wait(bars.at[i])
        q = plgpu.load(qkv_smem.at[0], layout=rows).astype(F32)
        k = plgpu.load(qkv_smem.at[1], layout=rows).astype(F32)
        v = plgpu.load(qkv_smem.at[2, pl.ds(0, BV)], layout=cols).astype(F32)
        plgpu.barrier_wait(bars.at[0])
        S = plgpu.load(s_smem, layout=plgpu.Layout.WGMMA)
        S = a * S + lax.broadcast_in_dim(k, (D, BV), [0]) * lax.broadcast_in_dim(v, (D, BV), [1])
        s_smem[...] = S
        write_o(scale * jnp.sum(lax.broadcast_in_dim(q, (D, BV), [0]) * S, axis=0))
        plgpu.copy_smem_to_gmem(s_smem, pool_out_g.at[slot, h, :, vcols])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=('scale', 'block_v', 'interpret'))
def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale, block_v=64, interpret=False):
    """See reference.decode. q, k, v [B, H, D] (D a multiple of 64); state_pool [P, H, D, D] f32
    (pass it donated for the in-place update); fresh bool or integer."""
    B, H, D = q.shape
    BV = min(block_v, D)
    if D % 64 or D % BV or BV % 32:
        raise ValueError(f'Mosaic GPU decode needs the head dim ({D}) a multiple of 64 and of '
                         f'block_v ({BV}), and block_v a multiple of 32')
    if state_pool.dtype != F32:
        raise ValueError(f'the state pool must be float32, got {state_pool.dtype}')
    scratch = [
        plgpu.SMEM((D, BV), F32, transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))),
        plgpu.SMEM((3, D), q.dtype),
        plgpu.SMEM((BV,), q.dtype),
        plgpu.Barrier(num_arrivals=1, num_barriers=4),
    ]

    def body(*refs):
        pl.run_scoped(functools.partial(_decode_kernel, *refs, BV=BV, scale=float(scale)), *scratch)

    # plgpu.kernel (the public entry point over a named grid) takes no input_output_aliases, and
    # its other way to update in place, a mutable ref (jax.new_ref), is refused inside shard_map
    # (a ref varying over a manual axis). So: the mpmd_map under it, with the pool aliased
    # (input 6 -> output 1). A named grid (not pallas_call's) because Pallas' Mosaic GPU interpret
    # mode, which the tests use, gives program_id 0 everywhere but knows the axis_index of a mesh.
    mesh = plgpu.Mesh(grid=(D // BV, H, B), grid_names=('v', 'h', 'b'))
    o, pool = _mpmd._mpmd_map(
        [(mesh, body)], out_types=(_like(q), _like(state_pool)), input_output_aliases={6: 1},
        interpret=plgpu.InterpretGPUParams(uninitialized_memory='zero') if interpret else False,
        name='lingjax_linear_attention_decode_mgpu',
    )(slots.astype(jnp.int32), fresh, log_decay.astype(F32), q, k, v, state_pool)
    return o, pool
