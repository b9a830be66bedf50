"""The MLA prefill Triton kernel body (prefill_kernel in lingjax/kernels/mla/triton_kernels.py, launched with
gpu_prefill.launch's grid and sizes) in Triton's CPU interpreter, against the float64 numpy oracle of
tests/test_mla_kernels.py (position by position through the page table).

As for the decode kernel (tests/test_mla_triton_interpret.py), jax-triton cannot run on a CPU-only JAX: the
body runs on torch CPU tensors with TRITON_INTERPRET=1 in a child process, which saves each case's inputs and
output. One packed ragged batch per case: a fresh prompt, a chunk continuing after 21 cached tokens, one
after 40 (a prefix-cache hit), one-token requests, padding tokens in the middle and at the end, rows not in
increasing order and one row in two places, so request boundaries fall inside token blocks. Pages are
scattered and shuffled, page tables hold garbage past each row's pages and every row nobody may read is
NaN. Cases: key blocks smaller than, equal to and spanning pages; value columns split over programs; a
rope width padded up to 16; heads not a power of two. float32 pages within 1e-5 relative, float16 1e-2.
bfloat16 loads are wrong in the interpreter: bf16 is checked on the device (scripts/bench_mla.py); here the
bf16 step is traced and compiled for sm_90 (no GPU) to check that it is one call that fits."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")
from tests.test_linear_attention_kernels import (SM90_SMEM, _compile_call, _triton_calls,  # noqa: E402,F401
                                                 jax_triton_call)
from tests.triton_interpreter import run_child  # noqa: E402

R, H = 32, 6
# (page_size, rope, block_m, block_n, block_r, dtype, precision, tol)
CASES = [(16, 16, 16, 16, 0, "float32", "ieee", 1e-5), (8, 8, 32, 16, 16, "float32", "tf32x3", 1e-5),
         (32, 16, 16, 16, 0, "float16", "", 1e-2)]
# the packed batch: (row, first position, count); row -1: padding tokens
PIECES = [(2, 0, 13), (0, 21, 11), (-1, 0, 3), (4, 5, 1), (1, 0, 1), (3, 40, 9), (0, 32, 2), (-1, 0, 5)]


def _key(case):
    return "-".join(map(str, case[:7]))


def _inputs(case):
    from tests.test_mla_kernels import make_cache
    ps, rope = case[0], case[1]
    rng = np.random.default_rng(ps + rope)
    lengths = [0] * 5
    for s, p0, n in PIECES:
        if s >= 0:
            lengths[s] = max(lengths[s], p0 + n)
    pages, table, _ = make_cache(rng, lengths, np.dtype(case[5]), ps=ps, r=R, rope=rope)
    rows = np.concatenate([np.full(n, s) for s, _, n in PIECES]).astype(np.int32)
    positions = np.concatenate([np.arange(p0, p0 + n) if s >= 0 else np.arange(n) * 7 for s, p0, n in PIECES])
    T = len(rows)
    q_lat = rng.standard_normal((T, H, R)).astype(np.float32)
    q_pe = rng.standard_normal((T, H, rope)).astype(np.float32)
    return dict(q_lat=q_lat, q_pe=q_pe, pages=pages, table=table, rows=rows, positions=positions.astype(np.int32))


def _run(tk, case, x):
    import torch
    from lingjax.kernels.mla.gpu_prefill import Config, launch
    ps, rope, bm, bn, br, dtype, precision, _ = case
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))           # noqa: E731
    T = len(x["rows"])
    grid, sizes = launch(T, H, R, rope, ps, x["table"].shape[1], Config(block_m=bm, block_n=bn, block_r=br))
    o = torch.full((T, H, R), 1027.0)
    qd = np.dtype(dtype)                                             # the wrapper casts q to the pages' dtype
    tk.prefill_kernel[grid](tt(x["q_lat"].astype(qd)), tt(x["q_pe"].astype(qd)), tt(x["pages"]), tt(x["table"]),
                            tt(x["rows"]), tt(x["positions"]), o, SCALE=0.3, PRECISION=precision, **sizes)
    return o.numpy(), sizes


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mla_prefill_interp")
    run_child(__file__, out)
    return {_key(c): dict(np.load(out / f"{_key(c)}.npz")) for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_prefill_kernel_matches_float64(results, case):
    from tests.test_mla_kernels import oracle, rel
    r = results[_key(case)]
    rows, pos = r["rows"], r["positions"]
    assert r["block_t"] > 1 and r["grid"][2] == (R // case[4] if case[4] else 1)
    # request boundaries fall inside token blocks (else this case would not test the per-row segments)
    bt = int(r["block_t"])
    assert any(len(set(rows[i:i + bt])) > 1 for i in range(0, len(rows), bt))
    got = r["o"]
    want = oracle(r["q_lat"].astype(case[5]), r["q_pe"].astype(case[5]), r["pages"], r["table"], rows, pos + 1, 0.3)
    assert np.all(np.isfinite(got)) and np.all(got[rows < 0] == 0)   # no NaN row read; padding -> 0
    live = rows >= 0
    assert rel(got[live], want[live]) <= case[7]
    for t in np.flatnonzero(live):                                   # each token on its own, not only overall
        assert rel(got[t], want[t]) <= 10 * case[7], (t, rows[t], pos[t])


def test_launch_names_sizes_it_cannot_take():
    from lingjax.kernels.mla.gpu_prefill import Config, head_block, launch
    assert head_block(32, 64) == 32 and head_block(20, 64) == 4 and head_block(6, 16) == 2 and head_block(7, 16) == 1
    grid, sizes = launch(100, 32, 512, 64, 64, 10, Config())
    assert grid == (50, 1, 1) and sizes["BLOCK_T"] * sizes["BLOCK_H"] == 64 and sizes["ROPE_P"] == 64
    with pytest.raises(ValueError, match="MLA GPU prefill: kv_lora_rank=96"):
        launch(8, 4, 96, 64, 64, 10, Config())
    with pytest.raises(ValueError, match="block_m=24"):
        launch(8, 4, 512, 64, 64, 10, Config(block_m=24))


def test_step_paged_traces_one_prefill_call_that_compiles_for_sm90(jax_triton_call):
    """MLA.step_paged with kernels 'gpu' at Ling-2.6-flash's MLA shapes (32 heads, kv_lora_rank 512, rope 64),
    bf16, a packed prefill step of 4096 tokens: the traced step holds exactly ONE jax-triton call (the whole
    batch; no lax.map blocks) with the default config, and jax-triton's own compile function builds it for
    sm_90 (no GPU) within shared memory, with every product on wgmma and pipelined (cp.async) key loads."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from lingjax.batch import StepBatch
    from lingjax.config import BailingConfig
    from lingjax.model.mla import MLA
    cfg = BailingConfig(hidden_size=256, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=8,
                        layer_group_size=8, group_norm_size=1, head_dim=128, vocab_size=8, intermediate_size=16,
                        num_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=16,
                        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    layer = MLA(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), kernels="gpu")
    sd = jax.ShapeDtypeStruct
    T, B, ps, mp = 4096, 3, 64, 80
    i32 = jnp.int32
    batch = StepBatch(tokens=sd((T,), i32), positions=sd((T,), i32), token_seq=sd((T,), i32), slots=sd((B,), i32),
                      cu_seqlens=sd((B + 1,), i32), fresh=sd((B,), jnp.bool_), page_table=sd((B, mp), i32))
    jx = jax.make_jaxpr(lambda x, b, p: layer.step_paged(x, b, p))(
        sd((T, 256), jnp.bfloat16), batch, sd((B * mp, ps, 576), jnp.bfloat16))
    eqn, = _triton_calls(jax_triton_call, jx.jaxpr)
    p = eqn.params
    assert p["grid"] == (T // 2, 1, 1) and (p["BLOCK_T"], p["BLOCK_H"], p["BLOCK_N"], p["BLOCK_R"]) == (2, 32, 64, 512)
    assert p["num_warps"] == 8 and p["PRECISION"] == "" and eqn.outvars[0].aval.shape == (T, 32, 512)
    shared, ptx, _ = _compile_call(jax_triton_call, eqn)
    assert 0 < shared <= SM90_SMEM and "wgmma.mma_async" in ptx and "cp.async" in ptx
    assert "mma.sync" not in ptx                                     # every product on the Hopper tensor cores


def test_prefill_under_shard_map_varies_like_its_inputs(jax_triton_call):
    """Heads split over a mesh axis (tensor parallelism): the kernel's output varies over that axis like the
    queries (jax-triton's outputs vary over none), so it can meet the sharded W_UV and loop carries."""
    import jax
    import jax.numpy as jnp
    from lingjax.kernels import mla
    sd, P = jax.ShapeDtypeStruct, jax.sharding.PartitionSpec
    mesh = jax.make_mesh((1,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    seen = {}

    def body(q, qp, pages, table, rows, pos):
        out = mla.prefill(q, qp, pages, table, rows, pos, 0.1, impl="gpu")
        seen["vma"] = jax.typeof(out).manual_axis_type.varying
        return out
    hs = P(None, "tensor")
    f = jax.shard_map(body, mesh=mesh, in_specs=(hs, hs, P(), P(), P(), P()), out_specs=hs)
    i32 = jnp.int32
    jx = jax.make_jaxpr(f)(sd((64, 4, 512), jnp.float32), sd((64, 4, 64), jnp.float32),
                           sd((8, 64, 576), jnp.bfloat16), sd((2, 4), i32), sd((64,), i32), sd((64,), i32))
    assert seen["vma"] == frozenset({"tensor"})
    assert len(_triton_calls(jax_triton_call, jx.jaxpr)) == 1


if __name__ == "__main__":          # the child process
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from lingjax.kernels.mla import triton_kernels
    out = Path(sys.argv[1])
    for c in CASES:
        x = _inputs(c)
        o, sizes = _run(triton_kernels, c, x)
        np.savez(out / f"{_key(c)}.npz", o=o, block_t=sizes["BLOCK_T"], grid=np.array(
            [-(-len(x["rows"]) // sizes["BLOCK_T"]), -(-H // sizes["BLOCK_H"]), R // sizes["BLOCK_R"]]), **x)
    print(json.dumps([_key(c) for c in CASES]))
