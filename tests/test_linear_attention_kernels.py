"""Linear-attention kernels (issue 6, item 1) against a float64 numpy recurrence (SPEC §2.4).

Every implementation behind lingjax.kernels.linear_attention -- the jnp reference, the Triton GPU
kernels (triton_gpu.py, bodies in Triton's CPU interpreter), the Pallas TPU kernels (TPU interpret
mode) and the Pallas Mosaic GPU kernels (Mosaic GPU interpret mode) -- gets:
random initial states, decays over the real slope range (λ 0.004 … 0.92), sequence lengths 1,
C-1, C, C+1 and long, several sequences of different lengths packed together, fresh and
continuing slots, a zero-length sequence, a padding sequence (slot -1), padding tokens past
cu_seqlens[-1], unused slots poisoned with NaN that must come back bit-identical, and fresh slots
holding NaN (a fresh start must never read the slot's old contents).
Tolerance: relative 1e-5 for float32 inputs, 1e-2 for bfloat16 and 2e-3 for float16 (oracle fed the
same rounded inputs; the kernels round decayed keys and intra-chunk scores to the input dtype before
the tensor-core products, 2^-9 / 2^-12 relative each). The Triton interpreter runs float32 and
float16 (its bfloat16 loads are wrong), so the Triton kernels' bfloat16 path is checked on the GPU
by scripts/bench_linear_attention.py's oracle checks. The Triton kernels are also compiled for
sm_90 here by jax-triton's own compile function (no GPU needed), and their jax-triton calls traced.
The deprecated Pallas-Triton fallback (pallas_triton.py) is tested only with
LINGJAX_TEST_PALLAS_TRITON=1 (its GPU lowering warns; the bench checks it on the device).
"""
import os
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lingjax.kernels import linear_attention as la
from lingjax.kernels.linear_attention import (gpu_common, mosaic_gpu, pallas_triton, reference, tpu,
                                              triton_gpu)

TOL = {'float32': 1e-5, 'bfloat16': 1e-2, 'float16': 2e-3}
H, D = 4, 32
LAMBDAS = np.array([0.92, 0.3, 0.05, 0.004])     # ends of the real slope range (H=64: .917 … .0039)
NUM_SLOTS = 12


# ---------------------------------------------------------------------------------------------
# float64 oracle: the recurrence of SPEC §2.4, token by token

def oracle_prefill(q, k, v, lam, pool, slots, cu, fresh, scale):
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    pool = np.asarray(pool, np.float64).copy()
    gam = np.exp(-np.asarray(lam, np.float64))[:, None, None]
    o = np.zeros(q.shape[:2] + (v.shape[-1],))
    for r in range(len(slots)):
        s, e = int(cu[r]), int(cu[r + 1])
        if e <= s or slots[r] < 0:
            continue
        S = np.zeros(pool.shape[1:]) if fresh[r] else pool[slots[r]].copy()
        for t in range(s, e):
            S = gam * S + k[t][:, :, None] * v[t][:, None, :]
            o[t] = scale * np.einsum('hk,hkv->hv', q[t], S)
        pool[slots[r]] = S
    return o, pool


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_pool(rng, used):
    pool = rng.standard_normal((NUM_SLOTS, H, D, D)) * 0.3
    unused = np.array([s for s in range(NUM_SLOTS) if s not in set(used)])
    pool[unused] = np.nan                                   # poison: must never be read or written
    return pool.astype(np.float32), unused


def check_untouched(new_pool, pool, unused):
    new_pool = np.asarray(new_pool)
    assert np.isnan(new_pool[unused]).all(), 'an unused (poisoned) slot was written'
    assert np.array_equal(new_pool[unused], pool[unused], equal_nan=True)


def check_prefill(o, new_pool, o_ref, pool_ref, pool, slots, cu, unused, tol):
    """Per sequence (short ones count too): outputs and final slot state within tol of the float64
    recurrence; skipped sequences and padding output 0; unused slots keep their poison."""
    o = np.asarray(jnp.asarray(o, jnp.float32))
    assert not np.isnan(o).any()
    for r in range(len(slots)):
        s, e = cu[r], cu[r + 1]
        if e > s and slots[r] >= 0:
            assert rel(o[s:e], o_ref[s:e]) <= tol, (r, rel(o[s:e], o_ref[s:e]))
            assert rel(np.asarray(new_pool)[slots[r]], pool_ref[slots[r]]) <= tol, r
        else:
            assert np.all(o[s:e] == 0), f'skipped sequence {r} must output 0'
    assert np.all(o[cu[-1]:] == 0), 'padding tokens must output 0'
    check_untouched(new_pool, pool, unused)


# ---------------------------------------------------------------------------------------------
# implementations under test (kernels called directly, with a small chunk so that the
# chunk-boundary lengths stay cheap in interpret mode)

C = 16
IMPLS = {
    'reference': (reference.prefill, reference.decode),
    'gpu_interpret': (functools.partial(triton_gpu.prefill, chunk=C, block_v=16, interpret=True),
                      functools.partial(triton_gpu.decode, block_v=16, interpret=True)),
    'tpu_interpret': (functools.partial(tpu.prefill, chunk=C, interpret=pltpu.InterpretParams()),
                      functools.partial(tpu.decode, interpret=pltpu.InterpretParams())),
}
# (impl, dtype): the Triton interpreter takes float16 where the others take bfloat16
CASES = [(i, d) for i in IMPLS for d in ('float32', 'float16' if i == 'gpu_interpret' else 'bfloat16')]


def prefill_case(rng, dtype):
    # sequences: 1, C-1, C, C+1, long, zero-length, padding (slot -1), a second short one
    lens = [1, C - 1, C, C + 1, 5 * C + 3, 0, 6, 9]
    slots = np.array([3, 0, 7, 1, 5, 9, -1, 10], np.int32)
    fresh = np.array([0, 1, 0, 0, 1, 0, 0, 0], bool)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1]) + 7                                     # 7 padding tokens past cu_seqlens[-1]
    q, k, v = (jnp.asarray(rng.standard_normal((T, H, D)) * 0.5, dtype) for _ in range(3))
    written = slots[(np.diff(cu) > 0) & (slots >= 0)]
    pool, unused = make_pool(rng, written)
    pool[slots[fresh & (slots >= 0)]] = np.nan        # a fresh slot's old contents must not be read
    return q, k, v, pool, unused, slots, cu, fresh


@pytest.mark.parametrize('impl,dtype', CASES)
def test_prefill_matches_float64_recurrence(impl, dtype):
    rng = np.random.default_rng(0)
    q, k, v, pool, unused, slots, cu, fresh = prefill_case(rng, dtype)
    scale = D ** -0.5
    o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool, slots, cu, fresh, scale)
    fn = jax.jit(functools.partial(IMPLS[impl][0], scale=scale), donate_argnums=4)
    o, new_pool = fn(q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(pool),
                     jnp.asarray(slots), jnp.asarray(cu), jnp.asarray(fresh))
    assert o.dtype == q.dtype and o.shape == q.shape
    check_prefill(o, new_pool, o_ref, pool_ref, pool, slots, cu, unused, TOL[dtype])


@pytest.mark.parametrize('impl,dtype', CASES)
def test_decode_matches_float64_recurrence(impl, dtype):
    rng = np.random.default_rng(1)
    slots = np.array([4, -1, 0, 11, 2, 6, -1, 8], np.int32)
    fresh = np.array([0, 0, 1, 0, 0, 1, 0, 0], bool)
    B = len(slots)
    q, k, v = (jnp.asarray(rng.standard_normal((B, H, D)) * 0.5, dtype) for _ in range(3))
    pool, unused = make_pool(rng, slots[slots >= 0])
    pool[slots[fresh]] = np.nan                       # a fresh slot's old contents must not be read
    scale = D ** -0.5
    o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool, slots, np.arange(B + 1), fresh, scale)
    fn = jax.jit(functools.partial(IMPLS[impl][1], scale=scale), donate_argnums=4)
    state = jnp.asarray(pool)
    # three steps in a row, each continuing from the last (fresh only on the first)
    for step in range(3):
        o, state = fn(q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), state, jnp.asarray(slots),
                      jnp.asarray(fresh if step == 0 else np.zeros_like(fresh)))
        if step:
            o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool_ref, slots, np.arange(B + 1),
                                             np.zeros_like(fresh), scale)
        o32 = np.asarray(jnp.asarray(o, jnp.float32))
        live = slots >= 0
        assert rel(o32[live], o_ref[live]) <= TOL[dtype]
        assert rel(np.asarray(state)[slots[live]], pool_ref[slots[live]]) <= TOL[dtype]
        assert np.all(o32[~live] == 0)
        check_untouched(state, pool, unused)


# ---------------------------------------------------------------------------------------------
# GPU prefill with long sequences split into segments (triton_gpu.py: increments in parallel,
# exact gamma^L fold, output pass per segment). Forced with a small segment so it is cheap here.


def split_case(rng, dtype, kind):
    if kind == 'single':       # one long continuing sequence, padding after it
        lens, slots, fresh = [9 * C + 5], np.array([4], np.int32), np.array([0], bool)
    else:                      # ragged: multi-segment, empty, padding row, fresh, exact multiple
        lens = [7 * C + 5, 0, 9, 3, 4 * C + 1, 2 * C, 4 * C, 1]
        slots = np.array([2, 6, -1, 8, 0, 5, 11, 9], np.int32)
        fresh = np.array([0, 0, 0, 1, 1, 0, 0, 0], bool)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1]) + 11
    q, k, v = (jnp.asarray(rng.standard_normal((T, H, D)) * 0.5, dtype) for _ in range(3))
    written = slots[(np.diff(cu) > 0) & (slots >= 0)]
    pool, unused = make_pool(rng, written)
    return q, k, v, pool, unused, slots, cu, fresh


@pytest.mark.parametrize('dtype,kind,segment', [('float32', 'single', C), ('float32', 'ragged', 2 * C),
                                               ('float16', 'ragged', 4 * C), ('float16', 'single', 2 * C)])
def test_gpu_prefill_segment_split_matches_float64_recurrence(dtype, kind, segment):
    rng = np.random.default_rng(7)
    q, k, v, pool, unused, slots, cu, fresh = split_case(rng, dtype, kind)
    scale = D ** -0.5
    assert gpu_common.pick_segment(q.shape[0], len(slots), H, D // 16, C, segment) == segment
    o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool, slots, cu, fresh, scale)
    fn = jax.jit(functools.partial(triton_gpu.prefill, scale=scale, chunk=C, block_v=16,
                                   segment=segment, interpret=True), donate_argnums=4)
    args = (q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(pool), jnp.asarray(slots),
            jnp.asarray(cu), jnp.asarray(fresh))
    text = str(jax.make_jaxpr(fn)(*args))                  # two launches: increments, output pass
    assert 'prefill_increments_kernel' in text and text.count('pure_callback') == 2
    o, new_pool = fn(*args)
    check_prefill(o, new_pool, o_ref, pool_ref, pool, slots, cu, unused, TOL[dtype])


@pytest.mark.parametrize('tiles_first,fresh_dtype,segment', [(True, 'int32', 0), (False, 'bool', 0),
                                                             (False, 'int32', 2 * C)])
def test_gpu_prefill_grid_orders_match_float64_recurrence(tiles_first, fresh_dtype, segment):
    """Both grid orders (value-block axis first, the default, or last), unsplit and split (both
    passes); fresh given as bool (read in the kernel as is) or as int32."""
    rng = np.random.default_rng(8)
    q, k, v, pool, unused, slots, cu, fresh = split_case(rng, 'float32', 'ragged')
    scale = D ** -0.5
    o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool, slots, cu, fresh, scale)
    fn = jax.jit(functools.partial(triton_gpu.prefill, scale=scale, chunk=C, block_v=16,
                                   segment=segment, tiles_first=tiles_first, interpret=True),
                 donate_argnums=4)
    o, new_pool = fn(q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(pool),
                     jnp.asarray(slots), jnp.asarray(cu), jnp.asarray(fresh.astype(fresh_dtype)))
    check_prefill(o, new_pool, o_ref, pool_ref, pool, slots, cu, unused, TOL['float32'])


@pytest.mark.parametrize('dtype,decay_v,intra_in_loop,segment', [
    ('float32', True, True, 0), ('float16', False, True, 0), ('float16', False, False, 0)])
def test_gpu_prefill_state_update_variants_match_float64_recurrence(dtype, decay_v, intra_in_loop,
                                                                    segment):
    """The output pass's state-update forms (decay_v: scale v instead of k; intra_in_loop: the
    causal decay matrix recomputed per chunk), each against the oracle, in the combinations the
    dtype defaults do not reach (float16 defaults to decay_v, float32 not; the split tests above
    run both defaults through the split's output pass)."""
    rng = np.random.default_rng(9)
    q, k, v, pool, unused, slots, cu, fresh = split_case(rng, dtype, 'ragged')
    scale = D ** -0.5
    o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool, slots, cu, fresh, scale)
    fn = jax.jit(functools.partial(triton_gpu.prefill, scale=scale, chunk=C, block_v=16,
                                   segment=segment, decay_v=decay_v, intra_in_loop=intra_in_loop,
                                   interpret=True), donate_argnums=4)
    o, new_pool = fn(q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(pool),
                     jnp.asarray(slots), jnp.asarray(cu), jnp.asarray(fresh))
    check_prefill(o, new_pool, o_ref, pool_ref, pool, slots, cu, unused, TOL[dtype])


@pytest.mark.parametrize('cfg', [dict(block_v=8, block_k=16), dict(block_v=16, block_k=16, tiles_first=False)],
                         ids=['key_split', 'key_split_grid_bht'])
@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_gpu_decode_variants_match_float64_recurrence(dtype, cfg):
    """Decode with the key dim split over programs (partial sums), in both grid orders; int32 fresh."""
    rng = np.random.default_rng(9)
    slots = np.array([4, -1, 0, 11, 2, 6, -1, 8], np.int32)
    fresh = np.array([0, 0, 1, 0, 0, 1, 0, 0], np.int32)
    B = len(slots)
    q, k, v = (jnp.asarray(rng.standard_normal((B, H, D)) * 0.5, dtype) for _ in range(3))
    pool, unused = make_pool(rng, slots[slots >= 0])
    scale = D ** -0.5
    o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool, slots, np.arange(B + 1), fresh, scale)
    fn = jax.jit(functools.partial(triton_gpu.decode, scale=scale, interpret=True, **cfg), donate_argnums=4)
    o, state = fn(q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(pool), jnp.asarray(slots),
                  jnp.asarray(fresh))
    o32 = np.asarray(jnp.asarray(o, jnp.float32))
    live = slots >= 0
    assert o.dtype == q.dtype
    assert rel(o32[live], o_ref[live]) <= TOL[dtype]
    assert rel(np.asarray(state)[slots[live]], pool_ref[slots[live]]) <= TOL[dtype]
    assert np.all(o32[~live] == 0)
    check_untouched(state, pool, unused)


@pytest.mark.parametrize('block_v', [32, 64])
@pytest.mark.parametrize('fresh_dtype', [np.bool_, np.int32])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_mosaic_gpu_decode_matches_float64_recurrence(dtype, fresh_dtype, block_v):
    """The Mosaic GPU decode kernel (Mosaic GPU interpret mode; it needs D a multiple of 64, so
    D=128 here): padding rows, fresh and continuing slots, two steps in a row, poisoned slots."""
    rng = np.random.default_rng(11)
    h, d, n = 2, 128, 9
    lam = np.array([0.917, 0.0039])
    slots = np.array([4, -1, 0, 8, 2], np.int32)
    fresh = np.array([0, 0, 1, 0, 1], fresh_dtype)
    B = len(slots)
    q, k, v = (jnp.asarray(rng.standard_normal((B, h, d)) * 0.5, dtype) for _ in range(3))
    pool = (rng.standard_normal((n, h, d, d)) * 0.3).astype(np.float32)
    unused = np.array([s for s in range(n) if s not in set(slots)])
    pool[unused] = np.nan
    pool[slots[fresh.astype(bool)]] = np.nan          # a fresh slot's old contents must not be read
    scale = d ** -0.5
    fn = jax.jit(functools.partial(mosaic_gpu.decode, scale=scale, block_v=block_v, interpret=True),
                 donate_argnums=4)
    state, ref_pool, live = jnp.asarray(pool), pool, slots >= 0
    for step in range(2):
        f = fresh if step == 0 else np.zeros_like(fresh)
        o_ref, ref_pool = oracle_prefill(q, k, v, lam, ref_pool, slots, np.arange(B + 1), f.astype(bool), scale)
        o, state = fn(q, k, v, jnp.asarray(-lam, jnp.float32), state, jnp.asarray(slots), jnp.asarray(f))
        o32 = np.asarray(jnp.asarray(o, jnp.float32))
        assert o.dtype == q.dtype
        assert rel(o32[live], o_ref[live]) <= TOL[dtype]
        assert rel(np.asarray(state)[slots[live]], ref_pool[slots[live]]) <= TOL[dtype]
        assert np.all(o32[~live] == 0)
        check_untouched(state, pool, unused)


@pytest.mark.parametrize('segment', [0, 64], ids=['unsplit', 'split'])
def test_mosaic_gpu_prefill_matches_float64_recurrence(segment):
    """The Mosaic GPU prefill kernel (interpret mode; bf16 only: its products run on the tensor
    cores; D=128, chunks of 64): lengths 1, C-1, C, C+1 and long, sequences starting off the
    8-token grid, a zero-length and a padding sequence, fresh and continuing slots, padding
    tokens past cu_seqlens[-1] with a token count that is not a multiple of 8, poisoned slots.
    split: 64-token segments run in parallel (increments + exact gamma^L fold), so the 65- and
    131-token sequences span 2 and 3 segments, each starting off the 8-token grid."""
    rng = np.random.default_rng(12)
    h, d, n, c = 2, 128, 10, 64
    lam = np.array([0.917, 0.0039])
    lens = [1, c - 1, c, c + 1, 2 * c + 3, 0, 6]
    slots = np.array([3, 0, 7, 1, 5, 8, -1], np.int32)
    fresh = np.array([0, 0, 1, 0, 0, 0, 0], bool)      # continuing sequences start at tokens 1 and 193
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1]) + 7
    q, k, v = (jnp.asarray(rng.standard_normal((T, h, d)) * 0.5, jnp.bfloat16) for _ in range(3))
    pool = (rng.standard_normal((n, h, d, d)) * 0.3).astype(np.float32)
    written = slots[(np.diff(cu) > 0) & (slots >= 0)]
    unused = np.array([i for i in range(n) if i not in set(written)])
    pool[unused] = np.nan
    pool[slots[fresh]] = np.nan                       # a fresh slot's old contents must not be read
    scale = d ** -0.5
    o_ref, pool_ref = oracle_prefill(q, k, v, lam, pool, slots, cu, fresh, scale)
    fn = jax.jit(functools.partial(mosaic_gpu.prefill, scale=scale, segment=segment, interpret=True),
                 donate_argnums=4)
    o, new_pool = fn(q, k, v, jnp.asarray(-lam, jnp.float32), jnp.asarray(pool), jnp.asarray(slots),
                     jnp.asarray(cu), jnp.asarray(fresh))
    assert o.dtype == q.dtype and o.shape == q.shape
    check_prefill(o, new_pool, o_ref, pool_ref, pool, slots, cu, unused, TOL['bfloat16'])
    # per head too: with the fast decay (λ = 0.917) an error in the inter-chunk decay reaches only
    # the first few rows of a chunk, too few to show in the norm over both heads
    o = np.asarray(jnp.asarray(o, jnp.float32))
    for r in np.flatnonzero((np.diff(cu) > 0) & (slots >= 0)):
        for j in range(h):
            sl = slice(cu[r], cu[r + 1])
            assert rel(o[sl, j], o_ref[sl, j]) <= TOL['bfloat16'], (r, j, rel(o[sl, j], o_ref[sl, j]))


def test_mosaic_gpu_kernels_reject_unsupported_inputs():
    x = jnp.zeros((1, 1, 32), jnp.bfloat16)
    pool, i32, b = jnp.zeros((2, 1, 32, 32)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), bool)
    with pytest.raises(ValueError, match='multiple of 64'):
        mosaic_gpu.decode(x, x, x, jnp.zeros((1,)), pool, i32, b, scale=1.0)
    with pytest.raises(ValueError, match='multiple of 64'):
        mosaic_gpu.prefill(x, x, x, jnp.zeros((1,)), pool, i32, jnp.zeros((2,), jnp.int32), b, scale=1.0)
    x = jnp.zeros((1, 1, 128), jnp.float32)
    with pytest.raises(ValueError, match='bfloat16/float16'):
        mosaic_gpu.prefill(x, x, x, jnp.zeros((1,)), jnp.zeros((2, 1, 128, 128)), i32,
                           jnp.zeros((2,), jnp.int32), b, scale=1.0)


def test_gpu_prefill_auto_segment_choice():
    """The split is picked statically from (T, R, H, D/BV): only for grids of <= 64 programs
    (under half of an H100/H200), with power-of-two segments of at least 16 chunks; 0 disables."""
    pick = gpu_common.pick_segment
    assert pick(32768, 1, 32, 2, 64, None) == 2048
    assert pick(4096, 1, 32, 2, 64, None) == 1024
    assert pick(2048, 1, 32, 2, 64, None) == 1024
    assert pick(2000, 1, 32, 2, 64, None) is None        # under two minimum segments
    assert pick(32768, 1, 16, 2, 64, None) == 1024
    assert pick(32768, 1, 64, 2, 64, None) is None       # 128 programs: measured slower split
    assert pick(32768, 16, 32, 2, 64, None) is None      # 1024 programs already
    assert pick(300, 1, 32, 2, 64, None) is None         # too short to split
    assert pick(32768, 1, 32, 2, 64, 0) is None
    assert gpu_common.pick_stages(None, 128) == 3 and gpu_common.pick_stages(None, 1024) == 2
    assert gpu_common.pick_stages(2048, 64) == 2 and gpu_common.pick_stages(None, 128, f32=True) == 2
    with pytest.raises(ValueError, match='multiple of chunk'):
        pick(4096, 1, 32, 2, 64, 100)


def test_oracle_is_not_trivial():
    """The oracle distinguishes γ^(i+1) from vLLM's γ^i inter-chunk weighting (SPEC §2.8)."""
    rng = np.random.default_rng(2)
    q, k, v, pool, unused, slots, cu, fresh = prefill_case(rng, 'float32')
    scale = D ** -0.5
    o_ref, _ = oracle_prefill(q, k, v, LAMBDAS, pool, slots, cu, fresh, scale)
    o_shift, _ = oracle_prefill(q, k, v, LAMBDAS, np.where(np.isnan(pool), np.nan,
                                                               pool * np.exp(LAMBDAS)[:, None, None]),
                                slots, cu, fresh, scale)
    assert rel(o_shift[:cu[-1]], o_ref[:cu[-1]]) > 1e-2


def test_reference_chunked_matches_oracle():
    rng = np.random.default_rng(3)
    B, T = 2, 3 * C + 5
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, D)) * 0.5, jnp.float32) for _ in range(3))
    h0 = rng.standard_normal((B, H, D, D)).astype(np.float32) * 0.3
    scale = D ** -0.5
    o, s = reference.chunked(q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(h0),
                             scale=scale, chunk=C)
    cu = np.arange(B + 1) * T
    o_ref, pool_ref = oracle_prefill(q.reshape(B * T, H, D), k.reshape(B * T, H, D),
                                     v.reshape(B * T, H, D), LAMBDAS, h0, np.arange(B), cu,
                                     np.zeros(B, bool), scale)
    assert rel(o.reshape(B * T, H, D), o_ref) <= 1e-5
    assert rel(s, pool_ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# dispatch point


@pytest.mark.parametrize('impl', ['reference', 'gpu_interpret', 'tpu_interpret', 'mosaic_gpu_interpret'])
def test_dispatch_default_chunks_inside_shard_map(impl):
    """Through the dispatch (impl=, production chunk sizes, D=128), inside jit+shard_map."""
    rng = np.random.default_rng(4)
    h, d = 2, 128
    lens = [130, 1, 129]
    slots = np.array([2, 0, 1], np.int32)
    fresh = np.array([0, 1, 0], bool)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1]) + 3
    lam = np.array([0.917, 0.0039])
    q, k, v = (jnp.asarray(rng.standard_normal((T, h, d)) * 0.5, jnp.float32) for _ in range(3))
    pool = (rng.standard_normal((4, h, d, d)) * 0.3).astype(np.float32)
    pool[3] = np.nan
    o_ref, pool_ref = oracle_prefill(q, k, v, lam, pool, slots, cu, fresh, d ** -0.5)
    mesh = jax.make_mesh((1,), ('tensor',), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec

    def body(q, k, v, g, pool, slots, cu, fresh):
        o, pool = la.prefill(q, k, v, g, pool, slots, cu, fresh, scale=d ** -0.5, impl=impl)
        o2, pool = la.decode(q[:3], k[:3], v[:3], g, pool, slots, jnp.zeros_like(fresh),
                             scale=d ** -0.5, impl=impl)
        return o, o2, pool

    f = jax.jit(jax.shard_map(body, mesh=mesh,
                              in_specs=(P(None, 'tensor'),) * 3 + (P('tensor'), P(None, 'tensor'),
                                                                   P(), P(), P()),
                              out_specs=(P(None, 'tensor'), P(None, 'tensor'), P(None, 'tensor'))),
                donate_argnums=4)
    o, o2, new_pool = f(q, k, v, jnp.asarray(-lam, jnp.float32), jnp.asarray(pool),
                        jnp.asarray(slots), jnp.asarray(cu), jnp.asarray(fresh))
    assert rel(o[:cu[-1]], o_ref[:cu[-1]]) <= 1e-5
    o2_ref, pool_ref = oracle_prefill(q[:3], k[:3], v[:3], lam, pool_ref, slots, np.arange(4),
                                      np.zeros(3, bool), d ** -0.5)
    assert rel(o2, o2_ref) <= 1e-5
    assert rel(np.asarray(new_pool)[:3], pool_ref[:3]) <= 1e-5
    assert np.isnan(np.asarray(new_pool)[3]).all()


def test_dispatch_rejects_unknown_impl():
    with pytest.raises(ValueError, match='unknown linear-attention kernel'):
        la.decode(*([None] * 7), scale=1.0, impl='cuda')


# ---------------------------------------------------------------------------------------------
# the kernels lower for the real targets (Pallas -> Triton IR / Mosaic TPU IR) and alias the pool


def _abstract(platform, kind):
    from jax._src.mesh import AbstractDevice, AbstractMesh
    return jax.sharding.use_abstract_mesh(AbstractMesh(
        (1,), ('x',), abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform=platform)))


@pytest.mark.parametrize('target', [('tpu', 'TPU v5 lite', tpu), ('tpu', 'TPU v6 lite', tpu)],
                         ids=['v5e', 'v6e'])
def test_kernels_lower_for_target_with_pool_aliased(target):
    platform, kind, mod = target
    sd = jax.ShapeDtypeStruct
    T, h, d, n, r, b = 512, 4, 128, 8, 3, 16
    pre = (sd((T, h, d), jnp.bfloat16),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),
                                               sd((r,), jnp.int32), sd((r + 1,), jnp.int32),
                                               sd((r,), jnp.bool_))
    dec = (sd((b, h, d), jnp.bfloat16),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),
                                               sd((b,), jnp.int32), sd((b,), jnp.bool_))
    with _abstract(platform, kind):
        for fn, args in ((mod.prefill, pre), (mod.decode, dec)):
            text = jax.jit(functools.partial(fn, scale=0.1), donate_argnums=4).trace(*args).lower(
                lowering_platforms=(platform,)).as_text()
            assert 'output_operand_aliases' in text, 'state pool must be aliased in -> out'


def test_mosaic_gpu_kernels_lower_for_h100_as_one_kernel_with_pool_aliased():
    """Pallas -> Mosaic GPU IR for an H100 (layouts, swizzles, TMA shapes and alignment are
    checked here): one custom call, no XLA op around it (bool fresh read in the kernel), the pool
    aliased in -> out."""
    sd = jax.ShapeDtypeStruct
    h, d, n, b, T, r = 4, 128, 8, 16, 512, 3
    dec = (sd((b, h, d), jnp.bfloat16),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),
                                               sd((b,), jnp.int32), sd((b,), jnp.bool_))
    pre = (sd((T, h, d), jnp.bfloat16),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),
                                               sd((r,), jnp.int32), sd((r + 1,), jnp.int32), sd((r,), jnp.bool_))
    with _abstract('cuda', 'NVIDIA H100 80GB HBM3'):
        for fn, args, cfgs in ((mosaic_gpu.decode, dec, [dict(block_v=b) for b in (32, 64, 128)]),
                               (mosaic_gpu.prefill, pre, [dict(segment=0), dict(segment=128)])):
            for cfg in cfgs:
                text = jax.jit(functools.partial(fn, scale=0.1, **cfg), donate_argnums=4).trace(
                    *args).lower(lowering_platforms=('cuda',)).as_text()
                ops = [line.split('=', 1)[1].split('(')[0].strip() for line in text.splitlines()
                       if ' = stablehlo.' in line and 'stablehlo.constant' not in line]
                split = cfg.get('segment', 0) > 0          # + the increments pass
                assert ops == ['stablehlo.custom_call @mosaic_gpu_v2'] * (1 + split), (fn.__name__, cfg, ops)
                assert 'output_operand_aliases' in text, 'state pool must be aliased in -> out'


# ---------------------------------------------------------------------------------------------
# the Triton kernels compile for Hopper (Triton's own compiler on the CPU: no GPU needed), and the
# jax-triton call is what the GPU will run (traced here; jax-triton refuses a CPU-only JAX at
# import, so its call module is loaded without the package's GPU check, for this test only)

SM90_SMEM = 227 * 1024          # shared memory a block may use on H100/H200
_CALL_PARAMS = ('fn', 'scalar_args', 'name', 'custom_call_target_name', 'out_shapes', 'grid', 'num_warps',
                'num_stages', 'num_ctas', 'compute_capability', 'enable_fp_fusion', 'input_output_aliases',
                'zeroed_outputs', 'debug', 'serialized_metadata')


def _eqns(jaxpr, primitive_name):
    """The equations of one primitive in a jaxpr, nested jaxprs included, in order."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive_name:
            found.append(eqn)
        for p in eqn.params.values():
            inner = getattr(p, 'jaxpr', p)
            if hasattr(inner, 'eqns'):
                found += _eqns(inner, primitive_name)
    return found


def _triton_calls(lib, jaxpr):
    """The jax-triton calls of a jaxpr, in order."""
    return [e for e in _eqns(jaxpr, lib.triton_kernel_call_p.name) if e.primitive is lib.triton_kernel_call_p]


def _compile_call(lib, eqn):
    """Compile one traced call for sm_90 through jax-triton's own compile function (its argument
    types, alignment specialization and constexprs): (shared memory bytes, PTX, TTIR)."""
    p = eqn.params
    dtypes = [lib.get_triton_type(v.aval) for v in eqn.invars + eqn.outvars]
    (_, _, _, shared, ptx, ttir, _), _ = lib.get_or_create_triton_kernel(
        lib.get_cuda_backend, 'cuda', p['fn'], dtypes, p['scalar_args'], num_warps=p['num_warps'],
        num_stages=p['num_stages'], num_ctas=1, compute_capability=90, enable_fp_fusion=True,
        metaparams={k: v for k, v in p.items() if k not in _CALL_PARAMS}, dump=False)
    return shared, ptx, ttir


@pytest.fixture
def jax_triton_call(monkeypatch):
    """jax_triton with its call module loaded past the package's GPU check: its calls trace, and
    its compile function (Triton -> PTX, what the GPU runs) works for an explicit sm_90."""
    import importlib
    import importlib.util
    import sys
    import types
    spec = importlib.util.find_spec('jax_triton')
    assert spec is not None, 'jax-triton is a declared dependency'
    pkg = types.ModuleType('jax_triton')
    pkg.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, 'jax_triton', pkg)
    monkeypatch.setenv('TRITON_CACHE_DIR', os.environ.get('TRITON_CACHE_DIR', ''))  # it sets this
    monkeypatch.delitem(sys.modules, 'jax_triton.triton_lib', raising=False)
    lib = importlib.import_module('jax_triton.triton_lib')
    pkg.triton_call = lib.triton_call
    # compile without a GPU: the kernel handle jaxlib would build from the PTX is a tuple here
    monkeypatch.setattr(lib.triton_kernel_call_lib, 'TritonKernel', lambda *a: a, raising=False)
    return lib


def test_triton_kernels_compile_for_sm90_within_shared_memory(jax_triton_call):
    """The kernels the wrapper launches at production shapes (D=128, chunks of 64, BV=64), traced,
    then compiled for sm_90 by jax-triton's own compile function (Triton -> PTX, no GPU needed):
    bf16 unsplit at 3 stages (16 x 256 tokens: 128 programs; loads pipelined, cp.async), float32
    as 3xTF32 at 2 stages (the largest shared-memory user), decode with a bool fresh flag. Each
    fits in sm_90's shared memory and the prefill products run on the tensor cores (wgmma). The
    split's two launches are compiled in the shard_map test below."""
    sd = jax.ShapeDtypeStruct
    T, h, d, n, r, b = 4096, 4, 128, 8, 16, 64

    def pre(dt):
        return (sd((T, h, d), dt),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),
                                           sd((r,), jnp.int32), sd((r + 1,), jnp.int32), sd((r,), jnp.bool_))
    dec = (sd((b, h, d), jnp.bfloat16),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),
                                               sd((b,), jnp.int32), sd((b,), jnp.bool_))
    cases = [('bf16 unsplit', triton_gpu.prefill, pre(jnp.bfloat16), 3),
             ('f32 tf32x3', triton_gpu.prefill, pre(jnp.float32), 2),
             ('decode', triton_gpu.decode, dec, 1)]
    for name, fn, args, stages in cases:
        eqn, = _triton_calls(jax_triton_call, jax.make_jaxpr(functools.partial(fn, scale=0.1))(*args).jaxpr)
        assert eqn.params['num_stages'] == stages, name
        shared, ptx, ttir = _compile_call(jax_triton_call, eqn)
        assert 0 <= shared <= SM90_SMEM, (name, shared)
        if name != 'decode':
            assert 'wgmma' in ptx, name                             # tensor-core products
        if name == 'bf16 unsplit':
            assert 'cp.async' in ptx, 'the chunk loads are not pipelined'
        if name == 'f32 tf32x3':
            assert 'tf32x3' in ttir, 'float32 products must be 3xTF32'


def test_triton_calls_traced_in_shard_map_alias_the_pool(jax_triton_call):
    """Through the dispatch (impl='gpu'), inside jit + shard_map over the heads: bf16 prefill
    (auto split: one long sequence -> increments + output pass) and decode are jax-triton calls
    with the pool aliased in -> out, the static choices of the wrapper (grid, stages, constexprs),
    and outputs that vary over the mesh axis like their inputs (a loop may carry the pool). The
    split's two launches compile for sm_90 (pipelined loads, wgmma, shared memory)."""
    sd = jax.ShapeDtypeStruct
    T, h, d, n, b = 4096, 4, 128, 8, 16
    mesh = jax.make_mesh((1,), ('tensor',), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec

    def body(q, k, v, g, pool, slots, cu, fresh, dslots, dfresh):
        o, pool = la.prefill(q, k, v, g, pool, slots, cu, fresh, scale=0.1, impl='gpu')
        o2, pool = la.decode(q[:b], k[:b], v[:b], g, pool, dslots, dfresh, scale=0.1, impl='gpu')
        return o, o2, pool

    hs = P(None, 'tensor')
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(hs,) * 3 + (P('tensor'), hs) + (P(),) * 5,
                              out_specs=(hs, hs, hs)), donate_argnums=4)
    args = (sd((T, h, d), jnp.bfloat16),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),
                                                sd((1,), jnp.int32), sd((2,), jnp.int32), sd((1,), jnp.bool_),
                                                sd((b,), jnp.int32), sd((b,), jnp.bool_))
    jaxpr = jax.make_jaxpr(f)(*args).jaxpr
    calls = _triton_calls(jax_triton_call, jaxpr)
    body, = [e.params['jaxpr'] for e in _eqns(jaxpr, 'shard_map')]
    names = [c.params['fn'].fn.__name__ for c in calls]
    assert names == ['prefill_increments_kernel', 'prefill_kernel', 'decode_kernel'], names
    inc, pre, dec = (c.params for c in calls)
    L = gpu_common.pick_segment(T, 1, h, 2, 64, None)
    assert L == 1024 and inc['L'] == L and pre['L'] == L and pre['SPLIT']
    assert inc['input_output_aliases'] == () and inc['grid'] == (2, T // L, h)
    assert pre['input_output_aliases'] == ((7, 1),) and pre['grid'] == (2, 2 * (T // L), h)
    assert pre['num_stages'] == 2 and pre['DOT_PREC'] == 'tf32' and pre['SCALE'] == 0.1
    assert dec['input_output_aliases'] == ((6, 1),) and dec['grid'] == (2, h, b)
    assert dec['num_stages'] == 1 and not dec['SPLIT']
    for c in calls[1:]:
        assert c.outvars[-1].aval.shape == (n, h, d, d)            # the pool comes back
    body_out = body.outvars
    assert all('tensor' in v.aval.manual_axis_type.varying for v in body_out), \
        [v.aval for v in body_out]
    for c in calls[:2]:                                             # the split's launches compile
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        assert 0 <= shared <= SM90_SMEM and 'wgmma' in ptx and 'cp.async' in ptx


@pytest.mark.parametrize('mode', ['tf32x3', 'ieee', 'tf32'])
def test_triton_prefill_f32_modes_reach_the_kernel(mode, jax_triton_call):
    """float32 q/k/v: f32_dot becomes the kernel's dot input precision; 16-bit inputs ignore it.
    An unknown mode is refused with a one-line error."""
    sd = jax.ShapeDtypeStruct
    T, h, d, n, r = 512, 4, 128, 8, 3
    args = lambda dt: (sd((T, h, d), dt),) * 3 + (sd((h,), jnp.float32), sd((n, h, d, d), jnp.float32),  # noqa: E731
                       sd((r,), jnp.int32), sd((r + 1,), jnp.int32), sd((r,), jnp.bool_))

    def params(dt):
        jx = jax.make_jaxpr(functools.partial(triton_gpu.prefill, scale=0.1, f32_dot=mode))(*args(dt))
        eqn, = _triton_calls(jax_triton_call, jx.jaxpr)
        return eqn.params
    p = params(jnp.float32)
    assert p['DOT_PREC'] == mode and p['num_stages'] == 2 and not p['DECAY_V']
    p = params(jnp.bfloat16)
    assert p['DOT_PREC'] == 'tf32' and p['num_stages'] == 3 and p['DECAY_V']
    with pytest.raises(ValueError, match="f32_dot='fp16'"):
        triton_gpu.prefill(*(jnp.zeros(s.shape, s.dtype) for s in args(jnp.float32)), scale=0.1,
                           f32_dot='fp16', interpret=True)


def test_triton_interpret_refuses_bfloat16():
    x = jnp.zeros((2, 1, 16), jnp.bfloat16)
    pool = jnp.zeros((2, 1, 16, 16))
    with pytest.raises(ValueError, match='bfloat16'):
        triton_gpu.decode(x, x, x, jnp.zeros((1,)), pool, jnp.zeros((2,), jnp.int32),
                          jnp.zeros((2,), bool), scale=1.0, interpret=True)


# ---------------------------------------------------------------------------------------------
# the deprecated Pallas-Triton fallback (pallas_triton.py): opt-in, LINGJAX_TEST_PALLAS_TRITON=1

@pytest.mark.skipif(not os.environ.get('LINGJAX_TEST_PALLAS_TRITON'),
                    reason='deprecated Pallas-Triton fallback: run with LINGJAX_TEST_PALLAS_TRITON=1')
@pytest.mark.parametrize('segment', [0, C])
def test_pallas_triton_fallback_matches_float64_recurrence(segment):
    rng = np.random.default_rng(13)
    q, k, v, pool, unused, slots, cu, fresh = split_case(rng, 'float32', 'ragged')
    scale = D ** -0.5
    o_ref, pool_ref = oracle_prefill(q, k, v, LAMBDAS, pool, slots, cu, fresh, scale)
    o, new_pool = la.prefill(q, k, v, jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(pool),
                             jnp.asarray(slots), jnp.asarray(cu), jnp.asarray(fresh), scale=scale,
                             impl='pallas_triton_interpret')
    check_prefill(o, new_pool, o_ref, pool_ref, pool, slots, cu, unused, TOL['float32'])
    fn = functools.partial(pallas_triton.decode, scale=scale, block_v=16, interpret=True)
    B = 8
    pool = np.where(np.isnan(pool), np.float32(0.2), pool)     # every slot is read in this decode
    o, state = fn(q[:B], k[:B], v[:B], jnp.asarray(-LAMBDAS, jnp.float32), jnp.asarray(pool),
                  jnp.asarray(slots), jnp.asarray(fresh))
    o_ref, pool_ref = oracle_prefill(q[:B], k[:B], v[:B], LAMBDAS, pool, slots, np.arange(B + 1),
                                     fresh, scale)
    live = slots >= 0
    assert rel(np.asarray(o)[live], o_ref[live]) <= TOL['float32']
    assert rel(np.asarray(state)[slots[live]], pool_ref[slots[live]]) <= TOL['float32']
