"""Linear attention (simple GLA) GPU kernels: raw Triton (triton_kernels.py) launched from JAX
through jax-triton. The GPU default (impl='gpu').

Same interface and semantics as ``reference.prefill`` / ``reference.decode`` (SPEC §2.4, §2.8, §2.9).
The kernels are a port of the former default, pallas_triton.py (Pallas lowered through its Triton
backend, which JAX 0.11 deprecates): same algorithm, grids, block shapes, pipelining depths and
float32 product modes. jax-triton compiles them with the `triton` package installed next to JAX
and calls them as one XLA custom call each, the state pool aliased input -> output.
``import jax_triton`` needs a CUDA build of JAX, so it is imported inside the launch function only;
``interpret=True`` instead runs the same kernel bodies in Triton's CPU interpreter through a host
callback (tests only: slow; float32/float16 only, the interpreter misreads bfloat16 loads).

Why Triton: both kernels are built on masked, ragged accesses at run-time offsets -- a chunk
starts wherever its sequence starts in the packed token array and ends at the sequence's true
length, and the state tile lives at a run-time slot of the pool. In Triton these are one masked
load each (wgmma for the chunk products, cp.async pipelining of the loads).

Prefill: one program per (sequence, head, block of BV value columns); it walks its sequence in
chunks of C tokens starting at the sequence's first token, carrying the f32 state tile
S[:, vblock] (D x BV) in registers, and writes the final tile to the sequence's slot. Per chunk of
m tokens: o = scale (tril(q kᵀ ∘ gamma^(i-j)) v + gamma^(i+1) q S), then S = gamma^m S + kᵀ (w ∘ v)
with w_t = gamma^(m-1-t) applied to the v rows (decay_v, the bf16/f16 default: kᵀ feeds the tensor
cores from shared memory) or to the k rows, (w ∘ k)ᵀ v (float32's default). The grid has
R + 1 rows: row R zero-fills the padding tokens past cu_seqlens[-1]; a skipped sequence (length
0 or negative slot) zero-fills its own tokens and touches no slot. Grid order (value blocks, rows,
H) by default (tiles_first): the D/BV programs that read the same q/k tokens launch side by side,
so the second one finds them in L2. Pipelining depth auto (gpu_common.pick_stages).

Segment split (few, long sequences). With R * H * D/BV programs well under the GPU's width (one
32k-token sequence at H=32: 64 programs for 132 SMs, each walking 512 chunks in series; the
auto rule splits at <= 64 programs, gpu_common.pick_segment) each sequence is cut into segments
of L tokens (L static, a power-of-two multiple of C, chosen from the static shapes T, R, H so
that about 1024 programs run; `segment=` overrides, 0 disables). NSEG = ceil(T / L) bounds the
segment count of any sequence; sequence r has n_r = ceil(len_r / L) segments at run time,
programs past it do nothing. Two launches:
  1. increments, grid (D/BV, R * NSEG, H): program (r, 0) copies the initial state (slot tile,
     or 0 if fresh) to x[r, 0]; program (r, i), 1 <= i < n_r, writes the zero-start state of the
     full segment i-1, x[r, i] = sum_t gamma^(L-1-t) k_t v_tᵀ (one accumulating product, all
     exponents <= 0, f32).
  2. output pass, grid (D/BV, (R + 1) * NSEG, H): program (r, j) folds its start state
     S = x[r, 0]; S = gamma^L S + x[r, i] for i = 1..j (exact: every segment before the last
     is exactly L tokens), then runs the unsplit chunk loop over [s_r + jL, min(e_r, s_r +
     (j+1)L)) and, only for the sequence's last segment, writes the final state to the slot.
The pool is read only by launch 1 and written only by launch 2 (aliased in -> out), so no slot is
read after being written. x is a scratch output of R * NSEG * H * D * D f32 (33 MB for one 32k
sequence at H=32). Extra cost: one more read of k and v, and the fold.

Decode: one program per (request, head, value block): gather the slot's tile, S = e^g S + k vᵀ,
o = scale qᵀ S, scatter back. Grid (value blocks, H, B) by default (tiles_first): programs
launched together sweep one slot's [H, D, D] block in address order. `fresh` is read in the
kernel as given (bool or int), so a call launches this one kernel and no XLA conversion before
it (block_k < D adds one XLA sum after it).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lingjax.kernels.linear_attention import triton_kernels as tk
from lingjax.kernels.linear_attention.gpu_common import pick_segment, pick_stages

F32 = jnp.float32

# How float32 q/k/v are multiplied (Triton's dot input_precision; bf16/f16 inputs: one
# tensor-core product, f32 sum): 'ieee': fp32 FMAs, no tensor cores; 'tf32x3': three tf32
# tensor-core products with error correction, about fp32 accuracy (the default); 'tf32': one tf32
# product (10-bit mantissa), what Triton kernels given fp32 inputs do by default (vLLM's,
# SGLang's, fla's). Only 'ieee' and 'tf32x3' meet the f32 path's 1e-5 relative bound.
F32_DOTS = ('ieee', 'tf32x3', 'tf32')


def _vary_like(out, *refs):
    """Cast a kernel output up to the shard_map axes its inputs vary over (jax-triton's outputs
    vary over none; the pool must keep its type when it is a loop carry)."""
    want = frozenset().union(*(jax.typeof(r).manual_axis_type.varying for r in refs))
    missing = tuple(sorted(want - jax.typeof(out).manual_axis_type.varying))
    return jax.lax.pcast(out, missing, to='varying') if missing else out


def _launch(kernel, args, out_shape, *, grid, aliases, num_warps, num_stages, name, interpret,
            **meta):
    """One kernel launch: args (arrays, in the kernel's pointer order), then one pointer per
    out_shape entry; meta = the kernel's constexpr arguments. Returns the outputs (a tuple)."""
    out_shape = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shape)
    if not interpret:
        from lingjax.kernels.jax_triton_lib import jax_triton      # needs a CUDA build of JAX
        outs = jax_triton().triton_call(
            *args, kernel=kernel, out_shape=out_shape, grid=grid, input_output_aliases=aliases,
            num_warps=num_warps, num_stages=num_stages, name=name, **meta)
    else:
        outs = jax.pure_callback(
            functools.partial(_interpret_host, kernel, out_shape, aliases, grid, meta),
            out_shape, *args)
    return tuple(_vary_like(o, *args) for o in outs)


def _interpret_host(kernel, out_shape, aliases, grid, meta, *arrays):
    """Host side of interpret=True: the kernel body in Triton's interpreter on torch CPU tensors.
    Aliased outputs start as copies of their inputs (as on the GPU); the others start as NaN (or
    -1), so an element the kernel fails to write shows in the tests."""
    import torch
    from triton.runtime.interpreter import InterpretedFunction
    ins = [torch.from_numpy(np.array(a)) for a in arrays]
    outs = []
    for j, s in enumerate(out_shape):
        src = [i for i, o in aliases.items() if o == j]
        if src:
            outs.append(ins[src[0]].clone())
        else:
            fill = np.nan if jnp.issubdtype(s.dtype, jnp.floating) else -1
            outs.append(torch.from_numpy(np.full(s.shape, fill, s.dtype)))
    InterpretedFunction(kernel.fn)[grid](*ins, *outs, **meta)
    return tuple(o.numpy() for o in outs)


def _check_interpret_dtype(x, interpret):
    if interpret and x.dtype == jnp.bfloat16:
        raise ValueError('interpret=True takes float32 or float16 q/k/v: Triton\'s CPU interpreter '
                         'misreads bfloat16 loads')


# --------------------------------------------------------------------------------------------
# Prefill


@functools.partial(jax.jit, static_argnames=('scale', 'chunk', 'block_v', 'num_warps',
                                             'num_stages', 'segment', 'tiles_first', 'f32_dot',
                                             'decay_v', 'intra_in_loop', 'interpret'))
def prefill(q, k, v, log_decay, state_pool, slots, cu_seqlens, fresh, *, scale, chunk=64,
            block_v=64, num_warps=4, num_stages=None, segment=None, tiles_first=True,
            f32_dot='tf32x3', decay_v=None, intra_in_loop=False, interpret=False):
    """See reference.prefill. cu_seqlens[0] must be 0.

    segment: None = split long sequences automatically when the grid would be small (see the
    module docstring); 0 = never split; L (a multiple of chunk) = split into L-token segments.
    num_stages: None = 3 for bf16/f16 unsplit with at most 132 programs, else 2 (pick_stages).
    tiles_first: the value-block axis is the first (fastest-launched) grid axis, so the D/BV
    programs of one (segment, head), which read the same q and k, run side by side.
    f32_dot: how float32 q/k/v are multiplied, 'ieee', 'tf32x3' or 'tf32' (see F32_DOTS); the
    CPU interpreter computes every mode in fp32.
    decay_v: how the state updates (output pass and the split's increments) apply the per-token
    decay: True scales the [chunk, block_v] v tile, S += kᵀ (decay * v), with kᵀ read by the
    tensor cores straight from shared memory; False scales the [chunk, D] k tile,
    S += (decay * k)ᵀ v (the Pallas kernels' form). None = True for bf16/f16 q/k/v, False for
    float32. Same sum, one input-dtype rounding of the scaled tile either way. sm_90, bf16, D=128,
    BV=64 (Triton 3.6, ptxas 12.8; scripts/compare_triton_ir.py): output pass at 2 stages, 16
    bytes of register spill instead of 68 and 599 instead of 718 PTX instructions per chunk; at 3
    stages 0 bytes instead of 68, 634 instead of 777 (the Pallas kernels: 48 bytes at both);
    8 KiB more shared memory. Increments: 168 instead of 221 registers, 213 instead of 432 PTX
    instructions per chunk. SASS figures: scripts/bench_notes_linear_attention.md, round 9.
    intra_in_loop: recompute the [chunk, chunk] causal decay matrix in every chunk instead of
    keeping it in 32 registers per thread across the loop (more exps, less register pressure).
    fresh may be bool or integer (read in the kernel as is). chunk, block_v and the head dim are
    powers of two >= 16 (Triton's block shapes and tensor-core products)."""
    T, H, D = q.shape
    R = slots.shape[0]
    BV = min(block_v, D)
    if D % BV:
        raise ValueError(f'head dim {D} is not a multiple of block_v={BV}')
    if f32_dot not in F32_DOTS:
        raise ValueError(f'f32_dot={f32_dot!r}: expected one of {sorted(F32_DOTS)}')
    _check_interpret_dtype(q, interpret)
    NV = D // BV
    dot_prec = f32_dot if q.dtype == jnp.float32 else 'tf32'   # 'tf32': Triton's default
    L = pick_segment(T, R, H, NV, chunk, segment)
    NSEG = 1 if L is None else -(-T // L)
    if num_stages is None:
        num_stages = pick_stages(L, R * H * NV, f32=q.dtype == jnp.float32)
    cu = cu_seqlens.astype(jnp.int32)
    slots = slots.astype(jnp.int32)
    g = log_decay.astype(F32)
    launch = functools.partial(_launch, num_warps=num_warps, num_stages=num_stages,
                               interpret=interpret, H=H, D=D, BV=BV, C=chunk,
                               TILES_FIRST=tiles_first, DOT_PREC=dot_prec,
                               DECAY_V=bool(q.dtype != jnp.float32 if decay_v is None else decay_v))
    if L is not None:
        x, = launch(tk.prefill_increments_kernel, (cu, slots, fresh, g, k, v, state_pool),
                    (jax.ShapeDtypeStruct((R, NSEG, H, D, D), F32),),
                    grid=(NV, R * NSEG, H) if tiles_first else (R * NSEG, H, NV), aliases={},
                    name='lingjax_linear_attention_prefill_increments', L=L, NSEG=NSEG)
    else:
        x = g                                  # unused by the unsplit kernel (any f32 array)
    o, pool = launch(tk.prefill_kernel, (cu, slots, fresh, g, q, k, v, state_pool, x),
                     (q, state_pool),
                     grid=(NV, (R + 1) * NSEG, H) if tiles_first else ((R + 1) * NSEG, H, NV),
                     aliases={7: 1}, name='lingjax_linear_attention_prefill',
                     R=R, T=T, SCALE=float(scale), L=L or 0, NSEG=NSEG, SPLIT=L is not None,
                     INTRA_IN_LOOP=bool(intra_in_loop))
    return o, pool


# --------------------------------------------------------------------------------------------
# Decode


@functools.partial(jax.jit, static_argnames=('scale', 'block_k', 'block_v', 'num_warps',
                                             'tiles_first', 'interpret'))
def decode(q, k, v, log_decay, state_pool, slots, fresh, *, scale, block_k=None, block_v=64,
           num_warps=4, tiles_first=True, interpret=False):
    """See reference.decode. block_k < D splits the key dim over programs (f32 partial outputs
    summed afterwards), for more programs in flight at small batch.
    tiles_first: grid (tiles, H, B), so that programs launched together sweep one slot's
    [H, D, D] state in address order (as fla's grid does); False: grid (B, H, tiles).
    fresh may be bool or integer (read in the kernel as is; no conversion kernel)."""
    B, H, D = q.shape
    BV = min(block_v, D)
    BK = min(block_k or D, D)
    if D % BV or D % BK:
        raise ValueError(f'head dim {D} is not a multiple of block_v={BV} / block_k={BK}')
    _check_interpret_dtype(q, interpret)
    NV, NK = D // BV, D // BK
    split = NK > 1
    o_struct = jax.ShapeDtypeStruct((NK,) + q.shape, F32) if split else q
    o, pool = _launch(
        tk.decode_kernel,
        (slots.astype(jnp.int32), fresh, log_decay.astype(F32), q, k, v, state_pool),
        (o_struct, state_pool),
        grid=(NK * NV, H, B) if tiles_first else (B, H, NK * NV), aliases={6: 1},
        num_warps=num_warps, num_stages=1, name='lingjax_linear_attention_decode',
        interpret=interpret, B=B, H=H, D=D, BK=BK, BV=BV, NV=NV, SCALE=float(scale),
        SPLIT=split, TILES_FIRST=tiles_first)
    if split:
        o = o.sum(0).astype(q.dtype)
    return o, pool
