"""Paged MLA attention (lingjax/kernels/mla) against an independent float64 numpy oracle that reads each
token's latent row by its page-table address one position at a time.

Page tables are random: each slot's pages are scattered over a shuffled pool, tables hold garbage past a
slot's length, and every latent row no query may read is NaN, so a read of another slot's page (or of an
unwritten row) poisons the result. Lengths 1, page_size - 1, page_size, page_size + 1, long, and padding rows.
Tolerances: float32 pages 1e-5 relative (float32 rounding of sums over <= a few hundred keys), bf16 pages
1e-2 (the oracle reads the same bf16 values; the kernel's float32 softmax and accumulation leave only
float32 rounding, so 1e-2 is loose; it is the bf16 budget of the brief)."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lingjax.kernels import mla
from tests.test_linear_attention_kernels import jax_triton_call  # noqa: F401  (the fixture)

jax.config.update("jax_default_matmul_precision", "highest")
PS = 16                        # page size
R, ROPE, H = 32, 16, 4


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def make_cache(rng, lengths, dtype, extra_pages=5, ps=PS, r=R, rope=ROPE):
    """pages [P, ps, r + rope] with every row NaN except the first lengths[s] rows of slot s; a page table
    of scattered shuffled pages, garbage (large or negative ids) past each slot's pages."""
    need = [-(-n // ps) for n in lengths]
    P = sum(need) + extra_pages
    max_pages = max(need + [1]) + 2
    ids = rng.permutation(P)
    table = rng.integers(-5, 10 * P, (len(lengths), max_pages)).astype(np.int32)   # garbage by default
    pages = np.full((P, ps, r + rope), np.nan)
    rows, k = [], 0
    for s, n in enumerate(lengths):
        table[s, :need[s]] = ids[k:k + need[s]]
        k += need[s]
        lat = rng.standard_normal((n, r + rope))
        for i in range(n):
            pages[table[s, i // ps], i % ps] = lat[i]
        rows.append(lat)
    return pages.astype(dtype), table, rows


def oracle(q_lat, q_pe, pages, table, slots, lengths, scale):
    """float64, position by position through the page table."""
    ps, r = pages.shape[1], q_lat.shape[-1]
    out = np.zeros(q_lat.shape, np.float64)
    p64 = pages.astype(np.float64)
    for b, (s, n) in enumerate(zip(slots, lengths)):
        if s < 0 or n == 0:
            continue
        keys = np.stack([p64[table[s, i // ps], i % ps] for i in range(n)])          # [n, r + rope]
        sc = (q_lat[b].astype(np.float64) @ keys[:, :r].T + q_pe[b].astype(np.float64) @ keys[:, r:].T) * scale
        w = np.exp(sc - sc.max(-1, keepdims=True))
        out[b] = (w / w.sum(-1, keepdims=True)) @ keys[:, :r]
    return out


LENGTHS = [1, PS - 1, PS, PS + 1, 7 * PS + 5, 3]


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (ml_dtypes.bfloat16, 1e-2)])
def test_decode_matches_oracle(dtype, tol):
    rng = np.random.default_rng(0)
    pages, table, _ = make_cache(rng, LENGTHS, dtype)
    # requests in another order than the slots, one slot read twice, one padding row
    slots = np.array([4, 0, 2, 5, 1, 3, -1, 2], np.int32)
    lengths = np.array([LENGTHS[s] if s >= 0 else 9 for s in slots], np.int32)
    lengths[-1] = 5                                                  # a shorter read of slot 2
    B = len(slots)
    q_lat = rng.standard_normal((B, H, R)).astype(np.float32)
    q_pe = rng.standard_normal((B, H, ROPE)).astype(np.float32)
    scale = 0.3
    got = jax.jit(mla.decode, static_argnames="impl")(
        jnp.asarray(q_lat), jnp.asarray(q_pe), jnp.asarray(pages), jnp.asarray(table), jnp.asarray(slots),
        jnp.asarray(lengths), scale, impl="reference")
    want = oracle(q_lat, q_pe, pages, table, slots, lengths, scale)
    assert got.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(got)))                      # no NaN row was read
    assert np.all(np.asarray(got)[slots < 0] == 0)
    for b in range(B):
        if slots[b] >= 0:
            assert rel(got[b], want[b]) <= tol, (b, slots[b], lengths[b])


def test_prefill_is_causal_per_slot_and_write_places_rows():
    """Write a packed chunk of three requests into the pages, then prefill-attend: each token sees its own
    slot's positions <= its own (earlier chunks included), nothing else."""
    rng = np.random.default_rng(1)
    before = [10, 0, PS]                                             # tokens already cached per slot
    pages, table, rows = make_cache(rng, [n + 30 for n in before], np.float32)
    # forget the rows this chunk will write (NaN again), keep the older ones
    chunk = [(0, 10, 7), (1, 0, PS + 2), (2, PS, 1)]                 # (slot, first position, count)
    for s, p0, n in chunk:
        for i in range(p0, p0 + n):
            pages[table[s, i // PS], i % PS] = np.nan
    tok_slots = np.concatenate([np.full(n, s) for s, _, n in chunk] + [[-1, -1]]).astype(np.int32)
    positions = np.concatenate([np.arange(p0, p0 + n) for _, p0, n in chunk] + [[0, 3]]).astype(np.int32)
    lat = np.concatenate([rows[s][p0:p0 + n] for s, p0, n in chunk] + [np.full((2, R + ROPE), 7.0)])
    new = mla.write(jnp.asarray(pages), jnp.asarray(table), jnp.asarray(tok_slots), jnp.asarray(positions),
                    jnp.asarray(lat, jnp.float32))
    want_pages = pages.copy()
    for t, (s, p) in enumerate(zip(tok_slots, positions)):
        if s >= 0:
            want_pages[table[s, p // PS], p % PS] = lat[t]
    np.testing.assert_array_equal(np.asarray(new), want_pages)       # padding tokens dropped, rest untouched
    T = len(tok_slots)
    q_lat = rng.standard_normal((T, H, R)).astype(np.float32)
    q_pe = rng.standard_normal((T, H, ROPE)).astype(np.float32)
    got = jax.jit(mla.prefill)(jnp.asarray(q_lat), jnp.asarray(q_pe), new, jnp.asarray(table),
                               jnp.asarray(tok_slots), jnp.asarray(positions), 0.25)
    want = oracle(q_lat, q_pe, want_pages, table, tok_slots, positions + 1, 0.25)
    assert np.all(np.asarray(got)[tok_slots < 0] == 0)
    live = tok_slots >= 0
    assert rel(np.asarray(got)[live], want[live]) <= 1e-5


def test_bad_shapes_and_impl_are_named():
    z = jnp.zeros
    with pytest.raises(ValueError, match="unknown MLA kernel implementation 'cuda'"):
        mla.decode(z((1, H, R)), z((1, H, ROPE)), z((2, PS, R + ROPE)), z((1, 2), jnp.int32), z((1,), jnp.int32),
                   z((1,), jnp.int32), 1.0, impl="cuda")
    with pytest.raises(ValueError, match="mla.decode: q_lat"):
        mla.decode(z((1, H, R)), z((1, H, ROPE)), z((2, PS, R)), z((1, 2), jnp.int32), z((1,), jnp.int32),
                   z((1,), jnp.int32), 1.0)
    assert mla.resolve("mosaic_gpu") == "gpu" and mla.resolve(None) == "reference"


def test_gpu_pick_config_covers_all_heads_and_fills_the_sms():
    """gpu.pick_config (pure Python; the kernel runs in test_mla_triton_interpret.py): one head block for up
    to 64 heads, so each request's latents are read once per split; splits fill the 132 SMs at small batches
    without splits shorter than 4 blocks, and none at large batches."""
    from lingjax.kernels.mla import gpu
    c = gpu.pick_config(16, 32, 64, 8192 // 64)          # 2 programs per SM: up to 264 resident
    assert (c.block_h, c.block_n, c.swap) == (32, 64, False) and 200 <= 16 * c.num_splits <= 264
    assert gpu.pick_config(256, 32, 64, 131072 // 64).num_splits == 1
    assert gpu.pick_config(64, 32, 64, 8192 // 64).num_splits == 4                     # 256 programs <= 264
    one = gpu.pick_config(1, 32, 64, 131072 // 64)
    assert 64 <= one.num_splits <= 132
    c = gpu.pick_config(4, 64, 64, 1024 // 64)
    assert (c.block_h, c.block_n, c.swap) == (64, 32, True) and c.num_splits <= (1024 // 32) // 4
    assert gpu.pick_config(2, 128, 64, 4).block_h == 64                                 # 2 head blocks
    assert gpu.pick_config(1, 16, 64, 1).num_splits == 1                               # 1 block: no split
    assert gpu.pick_config(16, 32, 64, 128, itemsize=4).block_n == 16                  # float32: less smem
    c = gpu.Config(block_h=32, block_n=64, num_splits=3, num_warps=8, num_stages=5, swap=True)
    assert c.tag() == "h32n64s3w8st5swap" and gpu.Config.from_tag(c.tag()) == c
    assert gpu.Config.from_tag("h16n32s-1w4st2").num_splits == -1
    c = gpu.Config.from_tag("h32n64s16w4st2pb")
    assert c.low_partials and c.tag() == "h32n64s16w4st2pb"
    assert gpu.pick_config(16, 32, 64, 8192 // 64).low_partials                        # bf16 partials by default
    per_sm = {t: gpu.programs_per_sm(gpu.Config.from_tag(t)) for t in ("h32n64s1w4st3", "h32n64s1w8st3",
                                                                       "h32n32s1w4st3", "h32n64s1w4st2",
                                                                       "h32n64s1w4st2swap")}
    assert per_sm == {"h32n64s1w4st3": 1, "h32n64s1w8st3": 1, "h32n32s1w4st3": 2, "h32n64s1w4st2": 2,
                      "h32n64s1w4st2swap": 1}          # as scripts/compile_mla_kernels.py's per_sm column
    two = gpu.with_splits(gpu.Config.from_tag("h32n32s0w4st3"), 16, 32, 64, 8192 // 64)     # 2 programs per SM:
    assert 132 < 16 * two.num_splits <= 264                                                 # twice the splits
    rp = gpu.Config.from_tag("h32n64s8w8st1swaprp")
    assert rp.reg_prefetch and rp.swap and rp.tag() == "h32n64s8w8st1swaprp"
    fc = gpu.Config.from_tag("h32n32s8w4st5fc")
    assert fc.combine and not fc.swap and fc.num_stages == 5 and fc.tag() == "h32n32s8w4st5fc"
    with pytest.raises(ValueError, match="'h16n32' is not"):
        gpu.Config.from_tag("h16n32")


def test_mla_step_paged_matches_full_forward(monkeypatch):
    """MLA.step_paged (write + paged prefill/decode) over two requests in three steps (a mixed prefill, a
    second chunk, a decode-only step with a padding row) equals the naive full forward of each sequence.
    Pages scattered and shuffled, every unwritten row NaN; YaRN on, so the softmax scale carries mscale^2.
    Then the first step again with the MLA kernels 'gpu': step_paged must call mla.prefill ONCE on the whole
    packed batch (the reference path cuts it into lax.map blocks of `block` tokens). gpu_prefill.prefill is
    replaced by a recorder running the reference (jax-triton cannot run here; the kernel itself is tested in
    tests/test_mla_prefill_triton_interpret.py)."""
    from flax import nnx
    from lingjax.batch import StepBatch
    from lingjax.model.mla import MLA
    from lingjax.testing import tiny_config
    from tests.test_reference_modules import randomize
    cfg = tiny_config(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                        mscale=1.0, mscale_all_dim=0.7))
    layer = MLA(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    randomize(layer, np.random.default_rng(5))
    rng = np.random.default_rng(6)
    lens = {0: 37, 2: 5}                                             # slot -> sequence length
    xs = {s: rng.standard_normal((n, cfg.hidden_size)).astype(np.float32) for s, n in lens.items()}
    ps, P = 8, 16
    table = rng.integers(-3, 99, (3, 6)).astype(np.int32)
    ids = rng.permutation(P)
    table[0, :5], table[2, :1] = ids[:5], ids[5:6]
    pages = jnp.full((P, ps, layer.latent_dim), jnp.nan, jnp.float32)

    def step(pieces, decode_only=False, pad_rows=0):
        """pieces: (slot, first position, count)."""
        x = np.concatenate([xs[s][p0:p0 + n] for s, p0, n in pieces])
        pos = np.concatenate([np.arange(p0, p0 + n) for _, p0, n in pieces])
        counts = [n for *_, n in pieces] + [0] * pad_rows
        slots = [s for s, *_ in pieces] + [-1] * pad_rows
        if decode_only and pad_rows:                                 # a padding token for the padding row
            x, pos, counts = np.concatenate([x, x[:1]]), np.concatenate([pos, [0]]), counts[:-1] + [1]
        batch = StepBatch(tokens=jnp.zeros(len(x), jnp.int32), positions=jnp.asarray(pos, jnp.int32),
                          token_seq=jnp.asarray(np.repeat(np.arange(len(counts)), counts), jnp.int32),
                          slots=jnp.asarray(slots, jnp.int32), cu_seqlens=jnp.asarray(np.cumsum([0] + counts),
                                                                                      jnp.int32),
                          fresh=jnp.zeros(len(counts), bool), page_table=jnp.asarray(table[slots]),
                          decode_only=decode_only)             # page-table rows of the request rows (-1: any row)
        return nnx.jit(lambda m, x, b, p: m.step_paged(x, b, p))(layer, jnp.asarray(x), batch, pages)

    o1, pages = step([(0, 0, 20), (2, 0, 5)])
    o2, pages = step([(0, 20, 16)])
    o3, pages = step([(0, 36, 1)], decode_only=True, pad_rows=1)
    assert np.all(np.isfinite(np.asarray(o3)))
    got_a = np.concatenate([np.asarray(o1)[:20], np.asarray(o2), np.asarray(o3)[:1]])
    want_a = np.asarray(layer(jnp.asarray(xs[0])[None], jnp.arange(37)[None]))[0]
    want_b = np.asarray(layer(jnp.asarray(xs[2])[None], jnp.arange(5)[None]))[0]
    assert rel(got_a, want_a) <= 1e-5
    assert rel(np.asarray(o1)[20:], want_b) <= 1e-5

    from lingjax.kernels.mla import gpu_prefill, reference
    calls = []

    def recorder(q_lat, q_pe, pages, table, rows, positions, scale):
        calls.append(q_lat.shape[0])
        return reference.prefill(q_lat, q_pe, pages, table, rows, positions, scale)
    monkeypatch.setattr(gpu_prefill, "prefill", recorder)
    monkeypatch.setattr(layer, "kernels", "gpu")
    x = np.concatenate([xs[0][:20], xs[2]])
    batch = StepBatch(tokens=jnp.zeros(25, jnp.int32), positions=jnp.asarray(np.r_[np.arange(20), np.arange(5)]),
                      token_seq=jnp.asarray([0] * 20 + [1] * 5, jnp.int32), slots=jnp.asarray([0, 2], jnp.int32),
                      cu_seqlens=jnp.asarray([0, 20, 25], jnp.int32), fresh=jnp.ones(2, bool),
                      page_table=jnp.asarray(table[[0, 2]]))
    o1k, _ = nnx.jit(lambda m, x, b, p: m.step_paged(x, b, p, block=8))(layer, jnp.asarray(x), batch, pages)
    assert calls == [25]
    assert rel(np.asarray(o1k)[:20], want_a[:20]) <= 1e-5 and rel(np.asarray(o1k)[20:], want_b) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (ml_dtypes.bfloat16, 1e-2)])
def test_tpu_decode_in_interpret_mode_matches_oracle(dtype, tol):
    rng = np.random.default_rng(2)
    pages, table, _ = make_cache(rng, LENGTHS, dtype)
    slots = np.array([4, 0, 2, -1, 5, 1, 3, 4], np.int32)
    lengths = np.array([LENGTHS[s] if s >= 0 else 9 for s in slots], np.int32)
    lengths[-1] = 2 * PS + 1
    q_lat = rng.standard_normal((len(slots), H, R)).astype(np.float32)
    q_pe = rng.standard_normal((len(slots), H, ROPE)).astype(np.float32)
    got = np.asarray(mla.decode(jnp.asarray(q_lat), jnp.asarray(q_pe), jnp.asarray(pages), jnp.asarray(table),
                                jnp.asarray(slots), jnp.asarray(lengths), 0.3, impl="tpu_interpret"))
    want = oracle(q_lat, q_pe, pages, table, slots, lengths, 0.3)
    assert np.all(np.isfinite(got)) and np.all(got[slots < 0] == 0)
    assert rel(got[slots >= 0], want[slots >= 0]) <= tol


def test_gpu_decode_launch_traces_and_compiles_for_sm90(jax_triton_call):
    """mla.decode(impl='gpu') traced on the CPU at Ling-2.6-flash shapes (32 heads, r 512, rope 64, bf16
    pages of 64): one kernel launch over (head blocks, requests, splits) with pick_config's options; with one
    split no combine follows (the kernel's output is the result). The launch compiles for sm_90 through
    jax-triton's own compile function with one 64-token latent buffer + the queries, small enough for two
    programs per SM (the next block of one loads while the other computes; bench_notes_mla.md round 3).
    Values: test_mla_triton_interpret.py (interpreter) and scripts/bench_mla.py (device)."""
    from lingjax.kernels.mla import gpu
    from tests.test_linear_attention_kernels import SM90_SMEM, _compile_call, _eqns, _triton_calls
    sd = jax.ShapeDtypeStruct
    for B, L in ((16, 8192), (256, 1024)):
        n = L // 64
        shapes = (sd((B, 32, 512), jnp.float32), sd((B, 32, 64), jnp.bfloat16), sd((B * n, 64, 576), jnp.bfloat16),
                  sd((B, n), jnp.int32), sd((B,), jnp.int32), sd((B,), jnp.int32))
        jaxpr = jax.make_jaxpr(lambda *a: mla.decode(*a, 0.07, impl="gpu"))(*shapes).jaxpr
        (call,) = _triton_calls(jax_triton_call, jaxpr)
        c = gpu.pick_config(B, 32, 64, n)
        p = call.params
        assert p["grid"] == (1, B, c.num_splits) and (p["num_warps"], p["num_stages"]) == (4, 2)
        assert (p["BLOCK_H"], p["BLOCK_N"], p["SWAP"], p["NUM_SPLITS"]) == (32, 64, False, c.num_splits)
        assert jaxpr.outvars[0].aval.shape == (B, 32, 512)
        assert (len(_eqns(jaxpr, "reduce_sum")) > 0) == (c.num_splits > 1)             # combine only if split
        if c.num_splits > 1:                            # the splits merged in the kernel: no combine pass after it
            fc = dataclasses.replace(c, combine=True)
            jaxpr = jax.make_jaxpr(lambda *a: gpu.decode(*a, 0.07, config=fc))(*shapes).jaxpr
            (call,) = _triton_calls(jax_triton_call, jaxpr)
            assert call.params["COMBINE"] and call.params["zeroed_outputs"] == (3,)      # the counters start at 0
            assert not _eqns(jaxpr, "reduce_sum") and not _eqns(jaxpr, "exp")
            assert jaxpr.outvars[0].aval.shape == (B, 32, 512)
            jaxpr = jax.make_jaxpr(lambda *a: gpu.decode_profiled(*a, 0.07, config=fc))(*shapes).jaxpr
            (call,) = _triton_calls(jax_triton_call, jaxpr)                       # the benchmark's timestamps
            assert call.params["PROFILE"] and jaxpr.outvars[1].aval.shape == (B * c.num_splits, 9)
            jaxpr = jax.make_jaxpr(lambda *a: gpu.decode(*a, 0.07, config=c))(*shapes).jaxpr
            (call,) = _triton_calls(jax_triton_call, jaxpr)
            assert call.outvars[0].aval.dtype == jnp.bfloat16                            # 16-bit partials
            assert jaxpr.outvars[0].aval.dtype == jnp.float32                            # merged in float32
            sk = gpu.with_splits(gpu.Config.from_tag("h32n32s0w4st5sk"), B, 32, 64, n)          # stream-K runs:
            assert sk.num_splits == 132                                                  # one per SM
            jaxpr = jax.make_jaxpr(lambda *a: gpu.decode(*a, 0.07, config=sk))(*shapes).jaxpr
            (call,) = _triton_calls(jax_triton_call, jaxpr)
            assert call.params["grid"] == (132,) and call.params["zeroed_outputs"] == (0, 3)
            assert not _eqns(jaxpr, "reduce_sum") and jaxpr.outvars[0].aval.shape == (B, 32, 512)
            with pytest.raises(ValueError, match="stream needs block_h >= heads"):
                jax.eval_shape(lambda *a: gpu.decode(*a, 0.07, config=dataclasses.replace(sk, block_h=16)), *shapes)
    assert c.num_splits == 1
    shared, ptx, _ = _compile_call(jax_triton_call, call)
    assert (64 + 32) * 576 * 2 <= shared and 2 * shared <= SM90_SMEM and ".target sm_90" in ptx  # 2 per SM
    rp = gpu.Config.from_tag("h32n64s1w8st1swaprp")                                  # register prefetch
    (call,) = _triton_calls(jax_triton_call, jax.make_jaxpr(lambda *a: gpu.decode(*a, 0.07, config=rp))(*shapes).jaxpr)
    assert call.params["REG_PREFETCH"] and call.params["SWAP"] and call.params["num_stages"] == 1
    for bad, msg in ((dict(num_splits=0), "num_splits=0 must be >= 1"), (dict(block_n=48), "block_n=48 and"),
                     (dict(block_n=128, reg_prefetch=True), "reg_prefetch needs block_n=128 to divide")):
        with pytest.raises(ValueError, match=msg):
            jax.eval_shape(lambda *a: gpu.decode(*a, 0.07, config=dataclasses.replace(c, **bad)), *shapes)


def test_gpu_profile_summary_reads_the_kernel_words():
    """gpu.profile_summary: int32 (low, high) words of %globaltimer per program (the low word wrapping past
    2^31 and 2^32 between programs), SM ids -> spans in microseconds."""
    from lingjax.kernels.mla import gpu
    t0 = np.array([2**32 - 1000, 2**32 + 4000, 2**32 - 1000], np.int64) + 7 * 2**32     # ns
    t1 = t0 + np.array([10_000, 12_000, 30_000])
    lo = lambda t: (t & 0xFFFFFFFF).astype(np.uint32).view(np.int32)             # noqa: E731  (as the kernel stores)
    hi = lambda t: (t >> 32).astype(np.int32)                                    # noqa: E731
    prof = np.stack([lo(t0), hi(t0), lo(t1), hi(t1), np.array([3, 5, 3], np.int32)], 1)
    got = gpu.profile_summary(prof)
    assert got == dict(span_us=30.0, start_spread_us=5.0, end_spread_us=20.0, prog_min_us=10.0, prog_med_us=12.0,
                       prog_max_us=30.0, sms=2, programs=3)
    phases = np.array([[1000, 1500, 3000, 9000], [2000, 2500, 4000, 10000], [1000, 1000, 2000, 26000]], np.int32)
    got = gpu.profile_summary(np.concatenate([prof, phases], 1), blocks=5)     # the phase words: ns since start
    assert (got["q_us"], got["table_us"], got["first_us"], got["loop_us"]) == (1.0, 1.5, 3.0, 6.0)
    assert got["tail_us"] == 2.0 and got["per_block_us"] == 1.5 and got["span_us"] == 30.0


def test_gpu_impl_runs_the_reference_for_latent_sizes_its_kernels_cannot_tile():
    """The tiny test models (kv_lora_rank 32, rope 8) run on a GPU too: impl='gpu' falls back to the
    reference for sizes gpu.supports / gpu_prefill.supports refuse (on the CPU, a kernel launch would fail,
    so equality here shows no kernel was called)."""
    from lingjax.kernels.mla import gpu, gpu_prefill
    assert gpu.supports(512, 64) and gpu.supports(32, 16) and not gpu.supports(32, 8) and not gpu.supports(48, 16)
    assert gpu_prefill.supports(512) and gpu_prefill.supports(32) and not gpu_prefill.supports(24)
    rng = np.random.default_rng(5)
    rope = 8
    pages, table, _ = make_cache(rng, [5, PS + 3], np.float32, rope=rope)
    slots, lengths = np.array([1, 0], np.int32), np.array([PS + 3, 5], np.int32)
    q_lat = jnp.asarray(rng.standard_normal((2, H, R)), jnp.float32)
    q_pe = jnp.asarray(rng.standard_normal((2, H, rope)), jnp.float32)
    args = (q_lat, q_pe, jnp.asarray(pages), jnp.asarray(table), jnp.asarray(slots), jnp.asarray(lengths), 0.3)
    np.testing.assert_array_equal(np.asarray(mla.decode(*args, impl="gpu")), np.asarray(mla.decode(*args)))
    r2 = 24                                                          # not a power of two: prefill falls back
    pages2, table2, _ = make_cache(rng, [PS + 3], np.float32, r=r2, rope=rope)
    pos = np.arange(PS + 3, dtype=np.int32)
    args2 = (jnp.asarray(rng.standard_normal((PS + 3, H, r2)), jnp.float32),
             jnp.asarray(rng.standard_normal((PS + 3, H, rope)), jnp.float32), jnp.asarray(pages2),
             jnp.asarray(table2), jnp.zeros(PS + 3, jnp.int32), jnp.asarray(pos), 0.3)
    np.testing.assert_array_equal(np.asarray(mla.prefill(*args2, impl="gpu")), np.asarray(mla.prefill(*args2)))
