"""Linear attention (simple GLA) Pallas kernels for TPU (Mosaic TPU).

Same interface and semantics as ``reference.prefill`` / ``reference.decode`` (SPEC §2.4, §2.8, §2.9).
Checked on the CPU with ``interpret=pltpu.InterpretParams()``; not yet run on TPU hardware.

Prefill. The packed token array is cut into fixed blocks of C tokens (block b = tokens
[bC, bC+C)), so q/k/v/o move through ordinary BlockSpec pipelines over a [T, H*D] view (block
(C, D) at column block h: no transposes). Grid (H, T/C): heads parallel, blocks in order. A block
can hold the tail of one sequence, whole short sequences and the head of another; the kernel walks
the sequences that intersect the block (the range comes in by scalar prefetch) and for each
segment [a, b) of sequence r within the block applies SPEC §2.8 with the segment's own masks:
    A   = (Q Kᵀ) ⊙ γ^(i-j) [j<=i, both in the segment]
    O  += A V + γ^(i-a+1) Q S
    S   = γ^(b-a) S + (K ⊙ γ^(b-1-j))ᵀ V
S comes from the slot (or zero) at the sequence's first token, is carried in VMEM scratch across
blocks (only one sequence can span a block boundary), and is DMA'd to the slot after its last
token. Tokens of skipped sequences (length 0 or negative slot) and tokens past cu_seqlens[-1]
belong to no segment and get 0. The pool stays in HBM (memory_space ANY), aliased in -> out.

Decode. Grid over (request, head block), sequential so that the next step's state tile is
DMA'd from its slot while this step computes (double buffering); the updated tile is DMA'd back
to the same slot. Only touched slots move; padding rows (negative slot) move nothing.
"""
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

log = logging.getLogger(__name__)
F32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))   # a @ b.T
_TN = (((0,), (0,)), ((), ()))   # a.T @ b
_NN = (((1,), (0,)), ((), ()))   # a @ b


def _like(x, shape=None, dtype=None):
    """Output struct varying over the same shard_map axes as x (needed under check_vma)."""
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape if shape is None else shape,
                                aval.dtype if dtype is None else dtype,
                                manual_axis_type=aval.manual_axis_type)


def _dot(a, b, dims, exact):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=F32,
                               precision=jax.lax.Precision.HIGHEST if exact else None)


# --------------------------------------------------------------------------------------------
# Prefill


def _prefill_kernel(cu_ref, slots_ref, fresh_ref, g_ref, lo_ref, hi_ref,      # scalar prefetch
                    q_ref, k_ref, v_ref, pool_ref,                            # inputs
                    o_ref, pool_out_ref,                                      # outputs
                    carry_ref, sbuf_ref, sem,                                 # scratch
                    *, C, scale, exact):
    del pool_ref  # aliased with pool_out_ref; read and write through the output ref
    h = pl.program_id(0)
    blk = pl.program_id(1)
    D = q_ref.shape[-1]
    g = g_ref[h]
    io_dtype = q_ref.dtype
    pos = blk * C + jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0)             # [C, 1]
    pos_row = blk * C + jax.lax.broadcasted_iota(jnp.int32, (1, C), 1)         # [1, C]
    diff = (pos - pos_row).astype(F32)                                        # i - j
    intra = jnp.exp(g * jnp.maximum(diff, 0.0))                               # [C, C]
    q_all, k_all, v_all = q_ref[...], k_ref[...], v_ref[...]

    def segment(r, o_acc):
        s = cu_ref[r]
        e = cu_ref[r + 1]
        slot = slots_ref[r]
        live = (e > s) & (slot >= 0)
        a = jnp.maximum(s, blk * C)
        b = jnp.minimum(e, blk * C + C)
        in_col = (pos >= a) & (pos < b)                                       # [C, 1]
        in_row = (pos_row >= a) & (pos_row < b)                               # [1, C]

        def run():
            first = a == s

            @pl.when(first & (fresh_ref[r] == 0))
            def _():
                cp = pltpu.make_async_copy(pool_out_ref.at[slot, h], sbuf_ref, sem.at[0])
                cp.start()
                cp.wait()
                carry_ref[...] = sbuf_ref[...].astype(F32)

            @pl.when(first & (fresh_ref[r] != 0))
            def _():
                carry_ref[...] = jnp.zeros_like(carry_ref)

            S = carry_ref[...]
            zero = jnp.zeros((), io_dtype)
            qs = jnp.where(in_col, q_all, zero)
            ks = jnp.where(in_col, k_all, zero)
            vs = jnp.where(in_col, v_all, zero)
            att = _dot(qs, ks, _NT, exact)
            att = jnp.where(in_col & in_row & (diff >= 0), att * intra, 0.0)
            o = _dot(att.astype(io_dtype), vs, _NN, exact)
            q_decay = jnp.exp(g * (pos - a + 1).astype(F32))                  # γ^(i-a+1)
            o = o + q_decay * _dot(qs, S.astype(io_dtype), _NN, exact)
            k_decay = jnp.where(in_col, jnp.exp(g * jnp.maximum(b - 1 - pos, 0).astype(F32)), 0.0)
            kd = (ks.astype(F32) * k_decay).astype(io_dtype)
            S = jnp.exp(g * (b - a).astype(F32)) * S + _dot(kd, vs, _TN, exact)
            carry_ref[...] = S

            @pl.when(b == e)
            def _():
                sbuf_ref[...] = S.astype(sbuf_ref.dtype)
                cp = pltpu.make_async_copy(sbuf_ref, pool_out_ref.at[slot, h], sem.at[1])
                cp.start()
                cp.wait()

            return o_acc + jnp.where(in_col, o, 0.0)

        return jax.lax.cond(live & (b > a), run, lambda: o_acc)

    o = jax.lax.fori_loop(lo_ref[blk], hi_ref[blk], segment, jnp.zeros((C, D), F32))
    o_ref[...] = (o * scale).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=('scale', 'chunk', 'interpret'))
def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, chunk=128,
            interpret=None):
    """See reference.prefill. cu_seqlens[0] must be 0. interpret: None or pltpu.InterpretParams."""
    T, H, D = q.shape
    R = slots.shape[0]
    C = chunk
    nb = pl.cdiv(T, C)
    cu = cu_seqlens.astype(jnp.int32)
    starts = jnp.arange(nb, dtype=jnp.int32) * C
    end_tok = jnp.minimum(starts + C, cu[-1])
    # sequences intersecting block b: [lo, hi) (zero-length ones in between are skipped in-kernel)
    lo = jnp.searchsorted(cu[1:], starts, side='right').astype(jnp.int32)
    hi = jnp.where(end_tok > starts,
                   jnp.searchsorted(cu[1:], end_tok - 1, side='right') + 1, lo).astype(jnp.int32)
    hi = jnp.minimum(hi, R)
    exact = q.dtype == jnp.float32
    tok_spec = pl.BlockSpec((C, D), lambda h, b, *_: (b, h))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(H, nb),
        in_specs=[tok_spec, tok_spec, tok_spec, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[tok_spec, pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM((D, D), F32), pltpu.VMEM((D, D), state_pool.dtype),
                        pltpu.SemaphoreType.DMA((2,))],
    )
    kernel = functools.partial(_prefill_kernel, C=C, scale=float(scale), exact=exact)
    o, pool = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(_like(q, (T, H * D)), _like(state_pool)),
        input_output_aliases={9: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
        interpret=interpret if interpret is not None else False,
        name='lingjax_linear_attention_prefill_tpu',
    )(cu, slots.astype(jnp.int32), fresh.astype(jnp.int32), log_decay.astype(F32), lo, hi,
      q.reshape(T, H * D), k.reshape(T, H * D), v.reshape(T, H * D), state_pool)
    return o.reshape(T, H, D), pool


# --------------------------------------------------------------------------------------------
# Decode


def _decode_kernel(slots_ref, fresh_ref, g_ref, q_ref, k_ref, v_ref, pool_ref, o_ref,
                   pool_out_ref, ibuf, obuf, rsem, wsem, *, nhb, hb, scale, exact):
    del pool_ref  # aliased with pool_out_ref
    i = pl.program_id(0)
    n = pl.num_programs(0)

    def row(step):
        return step // nhb, (step % nhb) * hb

    def slot_of(step):
        return slots_ref[row(step)[0]]

    def need_read(step):
        return (slot_of(step) >= 0) & (fresh_ref[row(step)[0]] == 0)

    def read(step, buf):
        _, h0 = row(step)
        return pltpu.make_async_copy(pool_out_ref.at[slot_of(step), pl.ds(h0, hb)], ibuf.at[buf],
                                     rsem.at[buf])

    def write(step, buf):
        _, h0 = row(step)
        return pltpu.make_async_copy(obuf.at[buf], pool_out_ref.at[slot_of(step), pl.ds(h0, hb)],
                                     wsem.at[buf])

    cur = i % 2
    nxt = 1 - cur

    @pl.when((i == 0) & need_read(0))
    def _():
        read(0, 0).start()

    @pl.when((i + 1 < n) & need_read(jnp.minimum(i + 1, n - 1)))
    def _():
        read(i + 1, nxt).start()

    # obuf[cur] was last written back by step i-2: that write must land before we overwrite it.
    @pl.when((i >= 2) & (slot_of(jnp.maximum(i - 2, 0)) >= 0))
    def _():
        write(i - 2, cur).wait()

    @pl.when(need_read(i))
    def _():
        read(i, cur).wait()

    slot = slot_of(i)
    _, h0 = row(i)

    @pl.when(slot >= 0)
    def _():
        fresh = fresh_ref[row(i)[0]] != 0
        for hh in range(hb):                                   # static: one [D, D] tile per head
            D = q_ref.shape[-1]
            qv = q_ref[0, pl.ds(hh, 1), :].astype(F32)         # [1, D]
            kv = k_ref[0, pl.ds(hh, 1), :].astype(F32)
            vv = v_ref[0, pl.ds(hh, 1), :].astype(F32)
            gam = jnp.exp(g_ref[h0 + hh])
            S = jnp.where(fresh, 0.0, gam * ibuf[cur, hh].astype(F32))
            kcol = jnp.broadcast_to(kv, (D, D)).T                # kcol[a, :] = k[a]
            S = S + kcol * vv
            obuf[cur, hh] = S.astype(obuf.dtype)
            o_ref[0, pl.ds(hh, 1), :] = (scale * _dot(qv, S, _NN, exact)).astype(o_ref.dtype)
        write(i, cur).start()

    @pl.when(slot < 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    # drain: the last step waits for the writes still in flight (steps n-2 and n-1)
    @pl.when((i == n - 1) & (n >= 2) & (slot_of(jnp.maximum(i - 1, 0)) >= 0))
    def _():
        write(i - 1, nxt).wait()

    @pl.when((i == n - 1) & (slot >= 0))
    def _():
        write(i, cur).wait()


def _head_block(H, D, itemsize, budget=2 << 20):
    if H * D * D * itemsize <= budget:
        return H
    for hb in range(H - 1, 0, -1):
        if H % hb == 0 and hb % 8 == 0 and hb * D * D * itemsize <= budget:
            return hb
    return H


@functools.partial(jax.jit, static_argnames=('scale', 'head_block', 'interpret'))
def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale, head_block=None,
           interpret=None):
    """See reference.decode. Slots within one batch must be distinct (as for the reference)."""
    B, H, D = q.shape
    hb = head_block or _head_block(H, D, state_pool.dtype.itemsize)
    if H % hb:
        raise ValueError(f'head_block={hb} does not divide H={H}')
    nhb = H // hb
    io_spec = pl.BlockSpec((1, hb, D), lambda i, *_: (i // nhb, i % nhb, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B * nhb,),
        in_specs=[io_spec, io_spec, io_spec, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[io_spec, pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM((2, hb, D, D), state_pool.dtype),
                        pltpu.VMEM((2, hb, D, D), state_pool.dtype),
                        pltpu.SemaphoreType.DMA((2,)), pltpu.SemaphoreType.DMA((2,))],
    )
    kernel = functools.partial(_decode_kernel, nhb=nhb, hb=hb, scale=float(scale),
                               exact=q.dtype == jnp.float32)
    o, pool = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(_like(q), _like(state_pool)),
        input_output_aliases={6: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=('arbitrary',)),
        interpret=interpret if interpret is not None else False,
        name='lingjax_linear_attention_decode_tpu',
    )(slots.astype(jnp.int32), fresh.astype(jnp.int32), log_decay.astype(F32), q, k, v,
      state_pool)
    return o, pool
