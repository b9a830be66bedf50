"""The GPU path of the MoE layer (lingjax/kernels/moe/gpu.py) without a GPU: experts(impl='gpu') traced
on the CPU at the Ling-2.6-flash shapes (d 4096, I 1024, E 256, top-8), its jax-triton calls checked
(kernels, block size, grid, schedule) and compiled for sm_90 by jax-triton's own compile function
(Triton -> PTX): every launch fits the H200's shared memory, the large-block products run on the
tensor cores (wgmma). The decode-size layout is built without a sort, the large one with it; T <=
gpu.DECODE_MAX_TOKENS runs the decode kernels (triton_decode.py) without a layout. The
persistent schedule's launch (programs per SM) is the default at large blocks and compiles, with the
half-height tiles too; the
split-K kernels (decode sizes) launch split_k programs per tile and compile. Values: tests/test_moe_triton_interpret.py
(Triton interpreter) and scripts/bench_moe.py (on the device, against a float64 oracle)."""
import jax
import jax.numpy as jnp
import pytest

from lingjax.kernels import moe
from lingjax.kernels.moe import gpu, make_layout, num_blocks
# jax-triton loaded past its GPU check, and its sm_90 compile (shared with the linear-attention tests)
from test_linear_attention_kernels import SM90_SMEM, _compile_call, _eqns, _triton_calls, jax_triton_call  # noqa: F401

E, K, D, I = 256, 8, 4096, 1024
sd = jax.ShapeDtypeStruct


def args(T, dt=jnp.bfloat16):
    return (sd((T, D), dt), sd((T, K), jnp.int32), sd((T, K), jnp.float32), sd((E, D, I), dt), sd((E, D, I), dt),
            sd((E, I, D), dt))


@pytest.mark.parametrize("T,bm,sort", [(16, 16, False), (4096, 128, True)])
def test_gpu_experts_trace_and_compile_for_sm90(jax_triton_call, T, bm, sort):
    jaxpr = jax.make_jaxpr(lambda *a: moe.experts(*a, impl="gpu"))(*args(T)).jaxpr
    calls = _triton_calls(jax_triton_call, jaxpr)
    assert [c.params["fn"].fn.__name__ for c in calls] == ["gate_up_kernel", "down_kernel"]
    assert bool(_eqns(jaxpr, "sort")) == sort          # T = 16: the comparison-built layout
    nb = num_blocks(T * K, E, bm)
    for c, n in zip(calls, (I, D)):
        p = c.params
        assert p["BLOCK_M"] == bm and p["NUM_BLOCKS"] == nb
        if bm >= 128:               # the large-block default (gpu.LARGE_*): persistent, 1 program per SM,
            assert p["PERSISTENT"] and p["grid"] == (p["NUM_PROGRAMS"],) == (gpu.num_sms(),)   # full-height
            assert not p["SHORT"] and p["N_TOKENS"] == T                                        # tiles
        else:
            assert not p["PERSISTENT"] and p["grid"] == (nb * (n // p["BLOCK_N"]),)
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        assert 0 < shared <= SM90_SMEM
        if bm >= 64:
            assert "wgmma" in ptx


@pytest.mark.parametrize("T,decode", [(1, None), (8, None), (16, True)])
def test_gpu_decode_path_trace_and_compile_for_sm90(jax_triton_call, T, decode):
    """T <= gpu.DECODE_MAX_TOKENS (or decode=True): the decode kernels on the pairs (no layout: no sort, no
    grouped matmul), by default the dot form with h fused into the gate/up kernel (h [T * k, I] bf16, float32
    down partials), launched n tiles first from T = 4; a split gate/up config runs the partial-sum kernels instead; decode=False (and the
    default above DECODE_MAX_TOKENS) runs the grouped matmul. Every launch compiles for sm_90 within shared
    memory, the dot form on the tensor cores."""
    jaxpr = jax.make_jaxpr(lambda *a: moe.experts(*a, impl="gpu", decode=decode))(*args(T)).jaxpr
    calls = _triton_calls(jax_triton_call, jaxpr)
    assert [c.params["fn"].fn.__name__ for c in calls] == ["gate_up_h_decode_kernel", "down_h_decode_kernel"]
    assert not _eqns(jaxpr, "sort")
    n = T * K
    for c, (kk, nn) in zip(calls, ((D, I), (I, D))):
        p = c.params
        cfg = gpu.pick_decode_config("gate_up" if nn == I else "down", T, n, kk, nn, gpu.num_sms())
        assert p["DOT"] == cfg.dot and p["PAIRS"] == n and p["M"] == 16 and p["Q"] >= n
        assert p["N_FIRST"] == cfg.n_first == (T >= 4)
        assert p["grid"] == cfg.grid(n, nn) == ((nn // cfg.block_n, n, 1) if cfg.n_first else (n, nn // cfg.block_n, 1))
        out = c.outvars[0].aval
        assert (out.dtype, out.shape) == ((jnp.bfloat16, (n, I)) if nn == I else (jnp.float32, (cfg.split_k, n, D)))
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        assert 0 < shared <= SM90_SMEM and "mma" in ptx
    assert T <= gpu.DECODE_MAX_TOKENS or decode                  # the default takes the decode path up to there
    split = gpu.DecodeConfig(block_n=128, block_k=32, split_k=4, dot=False)
    jaxpr = jax.make_jaxpr(lambda *a: gpu.experts_decode(*a, gate_up_config=split))(*args(T)).jaxpr
    calls = _triton_calls(jax_triton_call, jaxpr)
    assert [c.params["fn"].fn.__name__ for c in calls] == ["gate_up_decode_kernel", "down_decode_kernel"]
    assert calls[1].params["SPLIT_GU"] == 4 and calls[0].params["grid"] == (n, I // 128, 4)
    for dec in ((False, None) if T > gpu.DECODE_MAX_TOKENS else (False,)):
        grouped = jax.make_jaxpr(lambda *a: moe.experts(*a, impl="gpu", decode=dec))(*args(T)).jaxpr
        assert [c.params["fn"].fn.__name__ for c in _triton_calls(jax_triton_call, grouped)] == [
            "gate_up_kernel", "down_kernel"]
    with pytest.raises(ValueError, match="split_k"):
        gpu._fit_decode(gpu.DecodeConfig(block_n=128, block_k=32, split_k=3), D, I)


def test_persistent_schedule_launch_compiles_for_sm90(jax_triton_call):
    cfg = gpu.Config(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3, persistent=2, short_blocks=True)

    def f(x, idx, w, wg, wu, wd):
        lay = make_layout(idx, E, 128)
        return gpu.down(gpu.gate_up(x, lay, wg, wu, config=cfg), lay, wd, config=cfg)
    calls = _triton_calls(jax_triton_call, jax.make_jaxpr(f)(*args(4096)).jaxpr)
    assert len(calls) == 2
    for c in calls:
        p = c.params
        assert p["PERSISTENT"] and p["NUM_PROGRAMS"] == 2 * gpu.num_sms() and p["grid"] == (p["NUM_PROGRAMS"],)
        assert p["SHORT"] and p["N_TOKENS"] == 4096        # half-height tiles: both heights compiled
        shared, ptx, _ = _compile_call(jax_triton_call, c)
        assert 0 < shared <= SM90_SMEM and "wgmma" in ptx


def test_split_k_launch_compiles_for_sm90(jax_triton_call):
    """T = 1 (8 blocks of 16 rows): split_k 4 gate/up, 2 down -> 4x / 2x the programs, float32 partials."""
    cg = gpu.Config(block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4, split_k=4)
    cd = gpu.Config(block_n=128, block_k=64, group_m=1, num_warps=4, num_stages=4, split_k=2)

    def f(x, idx, w, wg, wu, wd):
        lay = make_layout(idx, E, 16, "compare")
        return gpu.down(gpu.gate_up(x, lay, wg, wu, config=cg), lay, wd, config=cd)
    calls = _triton_calls(jax_triton_call, jax.make_jaxpr(f)(*args(1)).jaxpr)
    assert [c.params["fn"].fn.__name__ for c in calls] == ["gate_up_split_kernel", "down_split_kernel"]
    nb = num_blocks(K, E, 16)
    for c, n, cfg in zip(calls, (I, D), (cg, cd)):
        p = c.params
        assert p["SPLIT_K"] == cfg.split_k and p["grid"] == (nb * (n // cfg.block_n) * cfg.split_k,)
        assert all(v.aval.dtype == jnp.float32 and v.aval.shape[0] == cfg.split_k for v in c.outvars)
        shared, _, _ = _compile_call(jax_triton_call, c)
        assert 0 < shared <= SM90_SMEM
    with pytest.raises(ValueError, match="split_k"):
        gpu._fit(gpu.Config(block_n=64, block_k=128, split_k=3), D, I)     # 32 k steps
    with pytest.raises(ValueError, match="persistent"):
        gpu._fit(gpu.Config(block_n=64, block_k=128, split_k=2, persistent=1), D, I)


def test_decode_combine_masks_dropped_pairs():
    """gpu.combine_pairs (the decode path's combine): slices summed, pairs weighted and summed in float32;
    the unwritten partial rows of dropped pairs (NaN here) add nothing."""
    import numpy as np
    rng = np.random.default_rng(0)
    T, k, E, d, S = 3, 4, 8, 16, 2
    idx = rng.integers(0, E, (T, k)).astype(np.int32)
    idx[0, 1], idx[2, 3] = -1, E + 2
    y = rng.standard_normal((S, T * k, d)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    valid = (idx >= 0) & (idx < E)
    y[:, ~valid.reshape(-1)] = np.nan
    want = np.einsum("tk,tkd->td", np.where(valid, w, 0.0), np.nan_to_num(y.astype(np.float64).sum(0)).reshape(T, k, d))
    got = np.asarray(gpu.combine_pairs(jnp.asarray(y), jnp.asarray(idx), jnp.asarray(w), E))
    assert got.dtype == np.float32 and np.allclose(got, want, rtol=1e-5, atol=1e-6)
