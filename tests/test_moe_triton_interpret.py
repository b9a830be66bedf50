"""The MoE Triton kernel bodies (lingjax/kernels/moe/triton_kernels.py) in Triton's CPU interpreter.

jax-triton cannot run on a CPU-only JAX, so the kernels are called here directly on torch CPU tensors
with TRITON_INTERPRET=1, in a child process (the variable must be set before triton is imported,
and must not leak into the other tests). Checked against a float64 numpy oracle over an expert-sorted layout built
independently here: float32 inputs (products 'ieee'; 'tf32x3' has no tf32 in the interpreter and runs
exactly too) within 1e-5 relative, float16 within 1e-2 (16-bit products, float32 accumulation).
bfloat16 loads are wrong in Triton's interpreter (numpy has no bfloat16), so bf16 is checked on the
device by scripts/bench_moe.py. Unused blocks must stay unwritten, padding rows must be zero. Both
schedules: one program per tile, and the persistent one (programs looping over the used tiles). The
split-K variants (gate_up_split_kernel / down_split_kernel: float32 partial sums per K slice, summed
and, for gate/up, put through silu(g) * u here as gpu.py does): the same oracle and tolerances, and the
unused blocks' partial rows left unwritten."""
import json
import os

import numpy as np
import pytest
from tests.triton_interpreter import run_child

pytest.importorskip("torch")
pytest.importorskip("triton")



def _load_interpreted():
    """Runs in the child process, where TRITON_INTERPRET=1 was set before triton was imported (triton's
    own tl.zeros etc. are decorated at import time, so the variable cannot be set later)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from lingjax.kernels.moe import triton_kernels
    return triton_kernels


@pytest.fixture(scope="module")
def results():
    """Run every case in one child process with the interpreter on; {case id: measured numbers}."""
    return json.loads(run_child(__file__).strip().splitlines()[-1])


def layout(idx, E, bm):
    """numpy: row_token [P] (T = padding), block_expert [NB] (-1 unused), pair_row [T, k] (P = dropped)."""
    T, k = idx.shape
    nb = -(-(T * k + E * (bm - 1)) // bm)
    P = nb * bm
    row_token = np.full(P, T, np.int32)
    block_expert = np.full(nb, -1, np.int32)
    pair_row = np.full((T, k), P, np.int32)
    r = 0
    for e in range(E):
        pairs = [(t, j) for t in range(T) for j in range(k) if idx[t, j] == e]
        if not pairs:
            continue
        nblk = -(-len(pairs) // bm)
        block_expert[r // bm: r // bm + nblk] = e
        for i, (t, j) in enumerate(pairs):
            row_token[r + i] = t
            pair_row[t, j] = r + i
        r += nblk * bm
    return row_token, block_expert, pair_row


def run(tk, x, idx, wg, wu, wd, bm, bn, bk, precision, group_m, programs=0, split=1, short=0):
    """programs 0: one program per (block, n tile); > 0: the persistent schedule with that many;
    split > 1: the split-K kernels with that many K slices (-> h, y, ..., and whether every unused
    block's partial rows kept the sentinel)."""
    import torch
    T, d = x.shape
    E, _, I = wg.shape
    row_token, block_expert, pair_row = layout(idx, E, bm)
    nb, P = len(block_expert), len(row_token)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))         # noqa: E731
    num_used = tt(np.array([(block_expert >= 0).sum()], np.int32))
    sentinel = 1027.0      # exact in float16
    if split > 1:
        common = dict(NUM_BLOCKS=nb, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, PRECISION=precision,
                      SPLIT_K=split)
        gp, up = (torch.full((split, P, I), sentinel, dtype=torch.float32) for _ in range(2))
        tk.gate_up_split_kernel[(nb * (I // bn) * split,)](
            tt(x), tt(row_token), tt(block_expert), tt(wg), tt(wu), gp, up, N_TOKENS=T, K=d, N=I, **common)
        g, u = gp.sum(0), up.sum(0)
        h = (g * torch.sigmoid(g) * u).to(tt(x).dtype)
        yp = torch.full((split, P, d), sentinel, dtype=torch.float32)
        tk.down_split_kernel[(nb * (d // bn) * split,)](h, tt(block_expert), tt(wd), yp, K=I, N=d, **common)
        y = yp.sum(0).to(tt(x).dtype)
        unused = np.repeat(block_expert < 0, bm)
        untouched = all(bool((a[:, unused] == sentinel).all()) for a in (gp, up, yp))
        return h.double().numpy(), y.double().numpy(), row_token, block_expert, untouched
    h = torch.full((P, I), sentinel, dtype=tt(x).dtype)
    y = torch.full((P, d), sentinel, dtype=tt(x).dtype)
    sched = dict(PERSISTENT=programs > 0, NUM_PROGRAMS=max(programs, 1), SHORT=short)
    tk.gate_up_kernel[(programs or nb * (I // bn),)](
        tt(x), tt(row_token), tt(block_expert), num_used, tt(wg), tt(wu), h, N_TOKENS=T, K=d, N=I, NUM_BLOCKS=nb,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, PRECISION=precision, **sched)
    tk.down_kernel[(programs or nb * (d // bn),)](
        h, tt(row_token), tt(block_expert), num_used, tt(wd), y, N_TOKENS=T, K=I, N=d, NUM_BLOCKS=nb, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=group_m, PRECISION=precision, **sched)
    return h.double().numpy(), y.double().numpy(), row_token, block_expert, sentinel


def oracle(x, wg, wu, wd, row_token, block_expert, bm):
    x64 = np.concatenate([x.astype(np.float64), np.zeros((1, x.shape[1]))])
    out_h, out_y = {}, {}
    for b, e in enumerate(block_expert):
        if e < 0:
            continue
        rows = np.arange(b * bm, (b + 1) * bm)
        a = x64[row_token[rows]]
        g, u = a @ wg[e].astype(np.float64), a @ wu[e].astype(np.float64)
        h = g / (1 + np.exp(-g)) * u
        for i, r in enumerate(rows):
            out_h[r] = h[i]
            out_y[r] = h[i] @ wd[e].astype(np.float64)
    return out_h, out_y


CASES = [  # (T, k, E, block_m, routing)
    (1, 2, 4, 16, "uniform"),          # decode: one token, most blocks unused
    (5, 2, 8, 16, "uniform"),          # T * k < E: empty experts
    (40, 2, 4, 16, "uniform"),         # T * k >> E: several blocks per expert
    (24, 2, 4, 16, "skewed"),          # every token's first choice is expert 3
    (33, 3, 4, 32, "uniform"),         # larger blocks
]


PARAMS = [("float32", "ieee", 1e-5), ("float32", "tf32x3", 1e-5), ("float16", "", 1e-2)]
# the persistent schedule (programs looping over the used tiles): 3 programs, fewer than the tiles, so
# each loops several times, and more programs than tiles (T = 1: 1 used block x 2 n tiles)
PERSISTENT = [("float32", "ieee", 1e-5, 3), ("float16", "", 1e-2, 5)]
# split K in 2 slices: decode (T = 1, most blocks unused), empty experts, a skewed routing
SPLIT_CASES = [CASES[0], CASES[1], CASES[3]]
SPLIT = [("float32", "ieee", 1e-5, 2), ("float16", "", 1e-2, 2)]
# short tiles for mostly-padding blocks (SHORT 1: half height; blocks of 32 rows: groups of more and
# fewer than 16 rows, and groups spilling a few rows into a second block)
SHORT_CASES = [(60, 2, 4, 32, "uniform"), (24, 2, 4, 32, "skewed")]
SHORT = [("float32", "ieee", 1e-5, 0), ("float32", "ieee", 1e-5, 3), ("float16", "", 1e-2, 0)]
# SHORT 2 (half and quarter height), blocks of 64 rows: ~30-row groups (half), a 40-row group and
# ~13-row groups (full, quarter)
SHORT2_CASES = [(60, 2, 4, 64, "uniform"), (40, 2, 4, 64, "skewed")]
SHORT2 = [("float32", "ieee", 1e-5, 0), ("float16", "", 1e-2, 3)]


def measure(tk, case, dtype, precision, programs=0, split=1, short=0):
    T, k, E, bm, routing = case
    d, I, bn, bk = 64, 32, 16, 32 if split == 1 else 16      # split: K = 32 in 2 slices of 16
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(T * 7 + E)
    if routing == "skewed":
        idx = np.stack([np.full(T, 3)] + [rng.integers(0, 3, T) for _ in range(k - 1)], 1)
    else:
        idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    idx = idx.astype(np.int32)
    x = rng.standard_normal((T, d)).astype(dtype)
    wg = (rng.standard_normal((E, d, I)) / np.sqrt(d)).astype(dtype)
    wu = (rng.standard_normal((E, d, I)) / np.sqrt(d)).astype(dtype)
    wd = (rng.standard_normal((E, I, d)) / np.sqrt(I)).astype(dtype)
    h, y, row_token, block_expert, sentinel = run(tk, x, idx, wg, wu, wd, bm, bn, bk, precision, group_m=2,
                                                  programs=programs, split=split, short=short)
    want_h, want_y = oracle(x, wg, wu, wd, row_token, block_expert, bm)
    rows = sorted(want_h)
    H, Y = np.stack([want_h[r] for r in rows]), np.stack([want_y[r] for r in rows])
    pad = [r for r in rows if row_token[r] == T]
    unused = [r for r in range(len(row_token)) if r not in want_h]
    if split > 1:       # run() checked the unused blocks' partial rows (h, y there are computed from them)
        untouched = sentinel
    else:
        untouched = bool(np.all(h[unused] == sentinel) and np.all(y[unused] == sentinel))
    return dict(rel_h=float(np.linalg.norm(h[rows] - H) / np.linalg.norm(H)),
                rel_y=float(np.linalg.norm(y[rows] - Y) / np.linalg.norm(Y)),
                n_rows=len(rows), n_pad=len(pad), n_unused=len(unused),
                pad_zero=bool(np.all(h[pad] == 0) and np.all(y[pad] == 0)), unused_untouched=untouched,
                half_padding_blocks=int(sum(row_token[b * bm + bm // 2] == T for b in range(len(block_expert))
                                            if block_expert[b] >= 0)),
                quarter_padding_blocks=int(sum(row_token[b * bm + bm // 4] == T for b in range(len(block_expert))
                                               if block_expert[b] >= 0)),
                used_blocks=int((block_expert >= 0).sum()))


def _key(case, dtype, precision, programs=0, split=1, short=0):
    return (f"{case}-{dtype}-{precision}-{programs}" + (f"-split{split}" if split > 1 else "")
            + (f"-short{short}" if short else ""))


@pytest.mark.parametrize("dtype,precision,tol", PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_gate_up_down_match_float64(results, case, dtype, precision, tol):
    r = results[_key(case, dtype, precision)]
    assert r["rel_h"] < tol and r["rel_y"] < tol, r
    assert r["pad_zero"], "padding rows must read zero tokens and produce zeros"
    assert r["unused_untouched"], "unused blocks must not be written"
    if case[4] == "skewed" or case[0] == 1:
        assert r["n_unused"] > 0 and r["n_pad"] > 0      # the case exercises both


@pytest.mark.parametrize("dtype,precision,tol,programs", PERSISTENT)
@pytest.mark.parametrize("case", CASES)
def test_persistent_schedule_matches_float64(results, case, dtype, precision, tol, programs):
    r = results[_key(case, dtype, precision, programs)]
    assert r["rel_h"] < tol and r["rel_y"] < tol, r
    assert r["pad_zero"] and r["unused_untouched"], r


@pytest.mark.parametrize("dtype,precision,tol,split", SPLIT)
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_k_kernels_match_float64(results, case, dtype, precision, tol, split):
    r = results[_key(case, dtype, precision, split=split)]
    assert r["rel_h"] < tol and r["rel_y"] < tol, r
    assert r["pad_zero"], "padding rows must read zero tokens and produce zeros"
    assert r["unused_untouched"] is True, "unused blocks' partial rows must not be written"
    assert r["n_unused"] > 0 and r["n_pad"] > 0      # the case exercises both


@pytest.mark.parametrize("dtype,precision,tol,programs", SHORT)
@pytest.mark.parametrize("case", SHORT_CASES)
def test_half_height_tiles_match_float64(results, case, dtype, precision, tol, programs):
    r = results[_key(case, dtype, precision, programs, short=1)]
    assert r["rel_h"] < tol and r["rel_y"] < tol, r
    assert r["pad_zero"] and r["unused_untouched"], r
    assert 0 < r["half_padding_blocks"] < r["used_blocks"], r      # both tile heights run


@pytest.mark.parametrize("dtype,precision,tol,programs", SHORT2)
def test_half_and_quarter_height_tiles_match_float64(results, dtype, precision, tol, programs):
    rs = [results[_key(case, dtype, precision, programs, short=2)] for case in SHORT2_CASES]
    for r in rs:
        assert r["rel_h"] < tol and r["rel_y"] < tol, r
        assert r["pad_zero"] and r["unused_untouched"], r
    quarter = sum(r["quarter_padding_blocks"] for r in rs)
    half = sum(r["half_padding_blocks"] for r in rs) - quarter
    full = sum(r["used_blocks"] for r in rs) - half - quarter
    assert quarter > 0 and half > 0 and full > 0, rs                 # all three tile heights run


# The decode kernels (triton_decode.py): (T, k, E, routing, dot, split of gate/up, split of down); a gate/up split
# of 0: the kernels with h fused into gate/up (gate_up_h_decode_kernel / down_h_decode_kernel). Both forms,
# split and unsplit K; duplicates (a token's pairs all to one expert: the dot form's one program per expert
# takes every row of it, 20 pairs of one expert at T = 10 fill two 16-row tiles, two leading programs; the
# multiply-add form one program per pair), dropped ids (-1, E + 3), a token with every pair dropped, more
# tokens than one; an 8th field True: the n-tiles-first launch order (N_FIRST, grid axes swapped).
DECODE_CASES = [(1, 4, 8, "uniform", False, 2, 1), (3, 2, 4, "one_expert", True, 2, 2), (3, 3, 8, "dropped", True, 2, 1),
                (1, 4, 8, "uniform", True, 0, 1), (3, 3, 8, "dropped", True, 0, 2, True), (10, 2, 4, "one_expert", True, 0, 1),
                (3, 3, 8, "dropped", False, 0, 1)]
DECODE = [("float32", "ieee", 1e-5), ("float16", "", 1e-2)]


def measure_decode(td, case, dtype, precision):
    """Run both decode kernels and the combine (as gpu.experts_decode: partial slices summed in order,
    dropped pairs masked) -> relative error of out [T, d] against the float64 oracle, whether the
    dropped pairs' rows (partials or h, and y) kept the sentinel (unwritten), and the dot form's leading
    programs (programs that wrote rows) per expert."""
    import torch
    T, k, E, routing, dot, sg, sd = case[:7]
    n_first = len(case) > 7 and case[7]
    d, I, bn, bk = 64, 32, 16, 16
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(T * 11 + E + k)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    if routing == "one_expert":
        idx[:] = E - 1
    elif routing == "dropped":
        idx[0] = -1
        idx[1, 0] = E + 3
    w = rng.uniform(0.1, 1.0, (T, k))
    x = rng.standard_normal((T, d)).astype(dtype)
    wg = (rng.standard_normal((E, d, I)) / np.sqrt(d)).astype(dtype)
    wu = (rng.standard_normal((E, d, I)) / np.sqrt(d)).astype(dtype)
    wd = (rng.standard_normal((E, I, d)) / np.sqrt(I)).astype(dtype)
    tt = lambda a: torch.from_numpy(np.ascontiguousarray(a))         # noqa: E731
    n = T * k
    sentinel = 1027.0
    flat = tt(idx.reshape(-1))
    M = max(16, 1 << (T - 1).bit_length())
    Q = 1 << (n - 1).bit_length()
    common = dict(PAIRS=n, E=E, M=M, Q=Q, BLOCK_N=bn, BLOCK_K=bk, DOT=dot, PRECISION=precision, N_FIRST=n_first)
    grid = (lambda cols, s: (cols // bn, n, s)) if n_first else (lambda cols, s: (n, cols // bn, s))  # noqa: E731
    y = torch.full((sd, n, d), sentinel, dtype=torch.float32)
    if sg == 0:
        h = torch.full((n, I), sentinel, dtype=tt(x).dtype)
        td.gate_up_h_decode_kernel[grid(I, 1)](tt(x), flat, tt(wg), tt(wu), h, TOP_K=k, K=d, N=I, **common)
        td.down_h_decode_kernel[grid(d, sd)](h, flat, tt(wd), y, K=I, N=d, SPLIT_K=sd, **common)
        written = [h, y]
    else:
        g, u = (torch.full((sg, n, I), sentinel, dtype=torch.float32) for _ in range(2))
        td.gate_up_decode_kernel[grid(I, sg)](tt(x), flat, tt(wg), tt(wu), g, u, TOP_K=k, K=d, N=I, SPLIT_K=sg,
                                             **common)
        td.down_decode_kernel[grid(d, sd)](g, u, flat, tt(wd), y, K=I, N=d, SPLIT_K=sd, SPLIT_GU=sg, **common)
        written = [g, u, y]
    valid = ((idx >= 0) & (idx < E)).reshape(-1)
    ysum = y.double().numpy().sum(0)
    out = np.zeros((T, d))
    want = np.zeros((T, d))
    x64 = x.astype(np.float64)
    for t in range(T):
        for j in range(k):
            q, e = t * k + j, idx[t, j]
            if not valid[q]:
                continue
            out[t] += w[t, j] * ysum[q]
            a, b = x64[t] @ wg[e].astype(np.float64), x64[t] @ wu[e].astype(np.float64)
            want[t] += w[t, j] * ((a / (1 + np.exp(-a)) * b) @ wd[e].astype(np.float64))
    dropped = ~valid
    untouched = bool(all((a.reshape(-1, n, a.shape[-1])[:, dropped] == sentinel).all() for a in written))
    return dict(rel=float(np.linalg.norm(out - want) / np.linalg.norm(want)), n_dropped=int(dropped.sum()),
                dropped_untouched=untouched, written_all=bool((y[:, valid] != sentinel).all()))


def _decode_key(case, dtype, precision):
    return f"decode-{case}-{dtype}-{precision}"


@pytest.mark.parametrize("dtype,precision,tol", DECODE)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernels_match_float64(results, case, dtype, precision, tol):
    r = results[_decode_key(case, dtype, precision)]
    assert r["rel"] < tol, r
    assert r["dropped_untouched"], "dropped pairs' partial rows must not be written"
    assert r["written_all"], "every routed pair's output row must be written"
    assert (r["n_dropped"] > 0) == (case[3] == "dropped"), r


if __name__ == "__main__":          # the child process
    tk = _load_interpreted()
    res = {_key(c, dt, pr): measure(tk, c, dt, pr) for c in CASES for dt, pr, _ in PARAMS}
    res.update({_key(c, dt, pr, n): measure(tk, c, dt, pr, n) for c in CASES for dt, pr, _, n in PERSISTENT})
    res.update({_key(c, dt, pr, split=n): measure(tk, c, dt, pr, split=n)
                for c in SPLIT_CASES for dt, pr, _, n in SPLIT})
    res.update({_key(c, dt, pr, n, short=1): measure(tk, c, dt, pr, n, short=1)
                for c in SHORT_CASES for dt, pr, _, n in SHORT})
    res.update({_key(c, dt, pr, n, short=2): measure(tk, c, dt, pr, n, short=2)
                for c in SHORT2_CASES for dt, pr, _, n in SHORT2})
    from lingjax.kernels.moe import triton_decode as td
    res.update({_decode_key(c, dt, pr): measure_decode(td, c, dt, pr) for c in DECODE_CASES for dt, pr, _ in DECODE})
    print(json.dumps(res))
