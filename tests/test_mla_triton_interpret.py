"""The MLA decode Triton kernel body (lingjax/kernels/mla/triton_kernels.py) in Triton's CPU interpreter.

jax-triton cannot run on a CPU-only JAX, so the kernel is called here directly on torch CPU tensors with
TRITON_INTERPRET=1, in a child process (the variable must be set before triton is imported and must not
leak into the other tests). The child saves each case's inputs and the kernel's per-split (o, lse); this
process merges the splits with gpu.combine_splits (the jnp code the GPU path runs) and checks the result
against the float64 numpy oracle of tests/test_mla_kernels.py: scattered, shuffled pages, garbage in the
page table past each slot's pages, NaN in every row no request may read, a slot read by two requests,
a padding row, heads not a multiple of the head block, one head block for all heads, swapped products,
context splits 1, 2 and 3, blocks smaller than a page, larger than a page, and not dividing the page size,
and the register-prefetch loop (REG_PREFETCH: the next block loaded during this block's products).
float32 pages within 1e-5 relative, float16 within 1e-2 (16-bit products, float32 softmax and sums).
bfloat16 loads are wrong in Triton's interpreter (numpy has no bfloat16): bf16 runs on the device
(scripts/bench_mla.py checks it against the reference)."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.triton_interpreter import run_child

pytest.importorskip("torch")
pytest.importorskip("triton")

R, ROPE, H = 32, 16, 20
# (page_size, block_n, num_splits, dtype, precision, tol, block_h, swap, reg_prefetch). block_h 16: two head blocks (the
# second half masked); 32: all heads in one program. block_n > page_size or not dividing it: each row looks
# up its own page id. One split: the kernel's o is the result (as gpu.decode returns it, no combine).
CASES = [(16, 16, 1, "float32", "ieee", 1e-5, 16, False, False), (32, 16, 3, "float32", "ieee", 1e-5, 16, False, False),
         (32, 16, 3, "float32", "tf32x3", 1e-5, 16, False, False), (16, 16, 3, "float16", "", 1e-2, 16, False, False),
         (16, 32, 1, "float32", "ieee", 1e-5, 32, False, False), (32, 16, 3, "float32", "ieee", 1e-5, 32, True, False),
         (16, 32, 2, "float16", "", 1e-2, 32, True, False), (24, 16, 2, "float32", "ieee", 1e-5, 16, True, False),
         (32, 16, 3, "float32", "ieee", 1e-5, 32, True, True), (16, 16, 2, "float16", "", 1e-2, 16, False, True),
         (32, 32, 1, "float32", "ieee", 1e-5, 32, False, True)]
# COMBINE (the splits merged in the kernel by the last program of each request and head block): the kernel's
# out is checked, and its partials must equal what the kernel wrote without COMBINE (same case, key + "-fc")
# stream (decode_stream_kernel): (page_size, block_n, programs, dtype, precision, tol, block_h); 3 programs: runs
# cross several requests; 40 > the 15 blocks of the batch: empty runs between the ones over a request
STREAM_CASES = [(16, 16, 3, "float32", "ieee", 1e-5, 32), (32, 16, 7, "float16", "", 1e-2, 32),
                (16, 16, 40, "float32", "ieee", 1e-5, 32)]
COMBINE_CASES = [(32, 16, 3, "float32", "ieee", 1e-5, 16, False, False),
                 (16, 32, 2, "float16", "", 1e-2, 32, True, False)]
# 16-bit partials (o in the pages' dtype, gpu.Config.low_partials): checked as CASES (key + "-pb"); float16
# partials within 1e-2 (one more rounding of each split's normalised output to float16, ~5e-4 relative)
LOW_CASES = [(16, 16, 3, "float16", "", 1e-2, 16, False, False)]


def _key(case):
    return "-".join(map(str, case[:5] + case[6:]))


def _inputs(case):
    from tests.test_mla_kernels import make_cache
    ps = case[0]
    rng = np.random.default_rng(ps + case[2])
    lengths = [1, ps - 1, ps, ps + 1, 6 * ps + 5]
    pages, table, _ = make_cache(rng, lengths, np.dtype(case[3]), ps=ps, r=R, rope=ROPE)
    slots = np.array([3, 0, 4, -1, 2, 1, 4], np.int32)
    lens = np.array([lengths[s] if s >= 0 else 7 for s in slots], np.int32)
    lens[-1] = 2 * ps + 3                                            # slot 4 again, a shorter read
    q_lat = rng.standard_normal((len(slots), H, R)).astype(np.float32)
    q_pe = rng.standard_normal((len(slots), H, ROPE)).astype(np.float32)
    return dict(q_lat=q_lat, q_pe=q_pe, pages=pages, table=table, slots=slots, lengths=lens)


def _run(tk, case, x, combine=False, low=False):
    import torch
    ps, block_n, S, dt, precision, _, block_h, swap, rp = case
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))           # noqa: E731
    B = len(x["slots"])
    o = torch.full((B, S, H, R), 1027.0, dtype=getattr(torch, dt) if low else torch.float32)
    lse = torch.full((B, S, H), 1027.0)
    out = torch.full((B, H, R), 1027.0)
    count = torch.zeros((B * -(-H // block_h),), dtype=torch.int32)
    tk.decode_kernel[(-(-H // block_h), B, S)](
        tt(x["q_lat"]), tt(x["q_pe"]), tt(x["pages"]), tt(x["table"]), tt(x["slots"]), tt(x["lengths"]), o, lse,
        out, count, torch.zeros((1,), dtype=torch.int32), SCALE=0.3, H=H, R=R, ROPE=ROPE, PAGE_SIZE=ps,
        MAX_PAGES=x["table"].shape[1], NUM_SPLITS=S, BLOCK_H=block_h, BLOCK_N=block_n, PRECISION=precision,
        SWAP=swap, REG_PREFETCH=rp, COMBINE=combine)
    if combine:
        assert np.all(count.numpy() == S)                            # every program counted once
    return o.numpy(), lse.numpy(), out.numpy()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mla_interp")
    run_child(__file__, out)
    keys = ([_key(c) for c in CASES] + [_key(c) + "-fc" for c in COMBINE_CASES]
            + [_skey(c) for c in STREAM_CASES] + [_key(c) + "-pb" for c in LOW_CASES])
    return {k: dict(np.load(out / f"{k}.npz")) for k in keys}


def _skey(case):
    return "sk-" + "-".join(map(str, case[:5] + case[6:]))


def _run_stream(tk, case, x):
    import torch
    ps, block_n, P, _, precision, _, block_h = case
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))           # noqa: E731
    B = len(x["slots"])
    out = torch.zeros((B, H, R))                                       # zeroed at launch, as gpu.py asks
    part_o = torch.full((P, 2, H, R), 1027.0)
    part_lse = torch.full((P, 2, H), 1027.0)                           # garbage in slots no run writes
    count = torch.zeros((B,), dtype=torch.int32)
    tk.decode_stream_kernel[(P,)](
        tt(x["q_lat"]), tt(x["q_pe"]), tt(x["pages"]), tt(x["table"]), tt(x["slots"]), tt(x["lengths"]), out, part_o,
        part_lse, count, SCALE=0.3, B=B, B_P2=16, H=H, R=R, ROPE=ROPE, PAGE_SIZE=ps, MAX_PAGES=x["table"].shape[1],
        BLOCK_H=block_h, BLOCK_N=block_n, P_P2=64, PRECISION=precision)
    return out.numpy(), count.numpy()


@pytest.mark.parametrize("case", CASES, ids=_key)
def test_decode_kernel_matches_float64(results, case):
    import jax.numpy as jnp
    from lingjax.kernels.mla.gpu import combine_splits
    from tests.test_mla_kernels import oracle, rel
    r = results[_key(case)]
    got = r["o"][:, 0] if case[2] == 1 else np.asarray(combine_splits(jnp.asarray(r["o"]), jnp.asarray(r["lse"])))
    want = oracle(r["q_lat"], r["q_pe"], r["pages"], r["table"], r["slots"], r["lengths"], 0.3)
    assert np.all(np.isfinite(got)) and np.all(got[r["slots"] < 0] == 0)
    assert np.all(r["lse"][r["slots"] < 0] == -np.inf)               # padding rows read nothing
    live = r["slots"] >= 0
    assert rel(got[live], want[live]) <= case[5]
    if case[2] > 1:                                                  # splits really split: one is empty
        assert np.any(np.isneginf(r["lse"][live]))                   # (a length-1 request has 1 block)


@pytest.mark.parametrize("case", LOW_CASES, ids=_key)
def test_decode_kernel_low_partials(results, case):
    """The partials o written in the pages' dtype (float16 here; gpu.Config.low_partials): combine_splits upcasts
    them; against the float64 oracle."""
    import jax.numpy as jnp
    from lingjax.kernels.mla.gpu import combine_splits
    from tests.test_mla_kernels import oracle, rel
    r = results[_key(case) + "-pb"]
    assert r["o"].dtype == np.float16
    got = np.asarray(combine_splits(jnp.asarray(r["o"]), jnp.asarray(r["lse"])))
    assert got.dtype == np.float32
    want = oracle(r["q_lat"], r["q_pe"], r["pages"], r["table"], r["slots"], r["lengths"], 0.3)
    live = r["slots"] >= 0
    assert np.all(np.isfinite(got)) and np.all(got[~live] == 0) and rel(got[live], want[live]) <= case[5]


@pytest.mark.parametrize("case", COMBINE_CASES, ids=_key)
def test_decode_kernel_combine_in_kernel(results, case):
    """COMBINE: the last program of each (request, head block) merges the splits into out; it must equal the
    float64 oracle, and gpu.combine_splits over the same partials (the separate pass it replaces)."""
    import jax.numpy as jnp
    from lingjax.kernels.mla.gpu import combine_splits
    from tests.test_mla_kernels import oracle, rel
    r, plain = results[_key(case) + "-fc"], results[_key(case)]
    np.testing.assert_array_equal(r["lse"], plain["lse"])           # the partials are the same as without COMBINE
    want = oracle(r["q_lat"], r["q_pe"], r["pages"], r["table"], r["slots"], r["lengths"], 0.3)
    got = r["out"]
    assert np.all(np.isfinite(got)) and np.all(got[r["slots"] < 0] == 0)
    live = r["slots"] >= 0
    assert rel(got[live], want[live]) <= case[5]
    merged = np.asarray(combine_splits(jnp.asarray(r["o"]), jnp.asarray(r["lse"])))
    np.testing.assert_allclose(got, merged, rtol=1e-5, atol=1e-6)   # float32: same formula, other summation order


@pytest.mark.parametrize("case", STREAM_CASES, ids=_skey)
def test_decode_stream_kernel_matches_float64(results, case):
    """decode_stream_kernel (Config.stream): equal runs of the batch's blocks, merged per request in the kernel."""
    from tests.test_mla_kernels import oracle, rel
    r = results[_skey(case)]
    want = oracle(r["q_lat"], r["q_pe"], r["pages"], r["table"], r["slots"], r["lengths"], 0.3)
    got = r["out"]
    assert np.all(np.isfinite(got)) and np.all(got[r["slots"] < 0] == 0)
    live = r["slots"] >= 0
    assert rel(got[live], want[live]) <= case[5]
    for b in np.flatnonzero(live):                                   # no request lost to a merge never done
        assert rel(got[b], want[b]) <= 10 * case[5], b
    assert r["count"].max() >= 2                                     # some request was split over runs


if __name__ == "__main__":          # the child process
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from lingjax.kernels.mla import triton_kernels
    out = Path(sys.argv[1])
    for c in CASES:
        x = _inputs(c)
        o, lse, _ = _run(triton_kernels, c, x)
        np.savez(out / f"{_key(c)}.npz", o=o, lse=lse, **x)
    for c in COMBINE_CASES:
        x = _inputs(c)
        o, lse, merged = _run(triton_kernels, c, x, combine=True)
        np.savez(out / f"{_key(c)}-fc.npz", o=o, lse=lse, out=merged, **x)
    for c in LOW_CASES:
        x = _inputs(c)
        o, lse, _ = _run(triton_kernels, c, x, low=True)
        np.savez(out / f"{_key(c)}-pb.npz", o=o, lse=lse, **x)
    for c in STREAM_CASES:
        x = _inputs(c[:2] + (1,) + c[3:])
        merged, count = _run_stream(triton_kernels, c, x)
        np.savez(out / f"{_skey(c)}.npz", out=merged, count=count, **x)
    print(json.dumps([_key(c) for c in CASES]))
