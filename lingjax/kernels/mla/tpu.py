"""MLA decode over the paged latent cache as a Pallas Mosaic TPU kernel. Same interface as
reference.decode (cache format: lingjax/kernels/mla/__init__.py). Checked on the CPU with
``interpret=pltpu.InterpretParams()``; not yet run on TPU hardware.

Grid (request b, page index j). The page table, slots and lengths are scalar-prefetched; the pages
BlockSpec's index map looks up page table[slot_b, j], so the pipeline DMAs exactly the request's pages
in order (for j past the request's last page it repeats the last page's block index, which the
pipeline does not fetch again, and the step computes nothing). Per step: scores of all H heads
against the page's rows (MQA: one shared [page_size, r + rope] block), masked past the length, and a
running max / sum / [H, r] accumulator in float32 VMEM scratch; the output block is written at the
last page index. Rows past the length are zeroed before the products, so unwritten rows never matter.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32


def _kernel(table_ref, slots_ref, lengths_ref, q_ref, qp_ref, pages_ref, o_ref, m_ref, l_ref, acc_ref, *,
            page_size, r, scale):
    b, j = pl.program_id(0), pl.program_id(1)
    length = jnp.where(slots_ref[b] >= 0, lengths_ref[b], 0)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, F32)
        l_ref[...] = jnp.zeros(l_ref.shape, F32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

    @pl.when(j * page_size < length)
    def _():
        pos = j * page_size + jax.lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)
        keys = jnp.where(pos < length, pages_ref[0].astype(F32), 0.0)                  # [ps, r + rope]
        q, qp = q_ref[0].astype(F32), qp_ref[0].astype(F32)                            # [H, r], [H, rope]
        s = (jax.lax.dot_general(q, keys[:, :r], (((1,), (1,)), ((), ())), preferred_element_type=F32)
             + jax.lax.dot_general(qp, keys[:, r:], (((1,), (1,)), ((), ())), preferred_element_type=F32))
        cols = j * page_size + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(cols < length, s * scale, -jnp.inf)                               # [H, ps]
        m_old = m_ref[...]                                                              # [H, 1]
        m_new = jnp.maximum(m_old, s.max(-1, keepdims=True))                            # finite: row 0 valid
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_old - m_new)
        l_ref[...] = l_ref[...] * alpha + p.sum(-1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + jnp.dot(p, keys[:, :r], preferred_element_type=F32)
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        l = l_ref[...]
        o_ref[0] = jnp.where(l > 0, acc_ref[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=('scale', 'interpret'))
def decode(q_lat, q_pe, pages, page_table, slots, lengths, scale, *, interpret=None):
    """See reference.decode: [B, H, r] float32. interpret: None or pltpu.InterpretParams."""
    B, H, r = q_lat.shape
    rope = q_pe.shape[-1]
    num_pages, page_size, D = pages.shape
    max_pages = page_table.shape[1]

    def page_block(b, j, table, slots, lengths):
        length = jnp.where(slots[b] >= 0, lengths[b], 0)
        last = jnp.maximum((length + page_size - 1) // page_size - 1, 0)
        page = table[jnp.maximum(slots[b], 0) * max_pages + jnp.minimum(j, last)]
        return jnp.clip(page, 0, num_pages - 1), 0, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, max_pages),
        in_specs=[pl.BlockSpec((1, H, r), lambda b, j, *_: (b, 0, 0)),
                  pl.BlockSpec((1, H, rope), lambda b, j, *_: (b, 0, 0)),
                  pl.BlockSpec((1, page_size, D), page_block)],
        out_specs=pl.BlockSpec((1, H, r), lambda b, j, *_: (b, 0, 0)),
        scratch_shapes=[pltpu.VMEM((H, 1), F32), pltpu.VMEM((H, 1), F32), pltpu.VMEM((H, r), F32)],
    )
    return pl.pallas_call(
        functools.partial(_kernel, page_size=page_size, r=r, scale=float(scale)),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, H, r), F32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
        interpret=interpret if interpret is not None else False,
        name='lingjax_mla_decode_tpu',
    )(page_table.reshape(-1).astype(jnp.int32), slots.astype(jnp.int32), lengths.astype(jnp.int32),
      q_lat, q_pe, pages)
