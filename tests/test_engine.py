"""Engine: invariance of score logits to chunking, batching and packing order (the mixed-batch bug of
SPEC §7.1), slot hygiene, greedy generate vs score, sampling (and its all-greedy fast path), bounded
compilations, bad input.

One tiny random model (the HF-layout test checkpoint, float32) is shared by every test; engines of
one model share their compiled steps, so the file compiles each step shape once."""
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lingjax.cache import SlotAllocator
from lingjax.engine import Engine, EngineError, SamplingParams, check_tokens, sample
from lingjax.testing import full_forward_logits, rel_err, write_tiny_checkpoint
from lingjax.weights import load_hf

MAX_LEN = 160
LENGTHS = (1, 65, 8, 30, 15, 3, 22, 9)          # chunk 7 and 64 leave 1-token pieces; > 4 requests queue


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    write_tiny_checkpoint(str(d), seed=0, dtype=np.float32, shards=1)
    return str(d)


@pytest.fixture(scope="module")
def model(ckdir):
    return load_hf(ckdir, dtype=jnp.float32, mtp=False)[1]


@pytest.fixture(scope="module")
def seqs(model):
    rng = np.random.default_rng(1)
    return [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def refs(model, seqs):
    return full_forward_logits(model, seqs)


def recording(engine):
    """Wrap engine._pack to record each step's piece sizes in packed order."""
    steps = []
    orig = engine._pack

    def pack(pieces):
        steps.append([n for _, n in pieces])
        return orig(pieces)

    engine._pack = pack
    return steps


# ------------------------------------------------------------------------------------------ 1. invariance
@pytest.mark.parametrize("order", ["first", "last"])
@pytest.mark.parametrize("max_batch", [1, 4])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_score_equals_full_forward(model, seqs, refs, chunk, max_batch, order):
    eng = Engine(model, max_batch=max_batch, prefill_chunk=chunk, max_len=MAX_LEN, decode_order=order)
    steps = recording(eng)
    out = eng.score(seqs)
    assert [o.shape for o in out] == [(n, model.cfg.vocab_size) for n in LENGTHS]
    assert all(o.dtype == np.float32 for o in out)
    assert rel_err(out, refs) <= 1e-5
    # The schedule really is what the test claims: chunks of `chunk`, mixed steps in the asked order.
    assert max(max(s) for s in steps) == min(chunk, max(LENGTHS))
    assert max(len(s) for s in steps) == min(max_batch, len(LENGTHS))
    if chunk == 1:
        assert all(set(s) == {1} for s in steps)                     # everything through the decode path
    if max_batch > 1 and chunk > 1:
        mixed = [s for s in steps if 1 in s and any(n > 1 for n in s)]
        assert len(mixed) >= 2
        for s in mixed:
            ones = [n == 1 for n in s]
            assert ones == sorted(ones, reverse=(order == "first"))  # decodes packed first / last


def _corrupt(kind):
    """Reproduce the vLLM mixed-batch bug family: decode pieces read another request's slot (wrong
    slot offsets) or another request's rows (wrong token offsets)."""
    def corrupt(b):
        cu = b["cu_seqlens"]
        n_rows = int((b["slots"] >= 0).sum())
        lens = np.diff(cu)[:n_rows]
        dec = np.flatnonzero(lens == 1)
        if b["decode_only"] or len(dec) == 0 or n_rows < 2:
            return b
        b = dict(b)
        for i in dec:
            j = (i + 1) % n_rows
            if kind == "slot":
                b["slots"] = b["slots"].copy()
                b["slots"][i] = b["slots"][j]
            else:
                b["token_seq"] = b["token_seq"].copy()
                b["token_seq"][cu[i]] = j
        return b
    return corrupt


@pytest.mark.parametrize("kind", ["slot", "rows"])
def test_invariance_check_catches_misrouted_decodes(model, seqs, refs, kind):
    """The invariance test above is able to fail: route decode tokens of mixed steps wrongly."""
    eng = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN)
    orig = eng._pack
    eng._pack = lambda pieces: _corrupt(kind)(orig(pieces))
    assert rel_err(eng.score(seqs), refs) > 1e-3


# ------------------------------------------------------------------------------------------ 2. slot hygiene
def test_slot_reuse_gives_same_logits(model, seqs, refs):
    a, b = seqs[1], seqs[3]                 # A (65 tokens) leaves state and latents beyond B's length
    alone = Engine(model, max_batch=1, prefill_chunk=7, max_len=MAX_LEN).score([b])[0]
    eng = Engine(model, max_batch=1, prefill_chunk=7, max_len=MAX_LEN)      # one slot: B must reuse A's
    out = eng.score([a, b])
    assert rel_err([out[1]], [alone]) <= 1e-6 and rel_err([out[1]], [refs[3]]) <= 1e-5
    eng.generate([a], SamplingParams(max_new_tokens=5))                     # across calls, after a generate
    assert rel_err(eng.score([b]), [alone]) <= 1e-6


def test_slot_hygiene_check_can_fail(model, seqs):
    """Without the `fresh` flag, B inherits A's linear state: the hygiene check above must notice."""
    a, b = seqs[1], seqs[3]
    alone = Engine(model, max_batch=1, prefill_chunk=7, max_len=MAX_LEN).score([b])[0]
    eng = Engine(model, max_batch=1, prefill_chunk=7, max_len=MAX_LEN)
    orig = eng._pack

    def stale(pieces):
        out = orig(pieces)
        out["fresh"] = np.zeros_like(out["fresh"])
        return out

    eng._pack = stale
    assert rel_err([eng.score([a, b])[1]], [alone]) > 1e-3


def test_slot_allocator():
    s = SlotAllocator(3)
    assert [s.alloc(), s.alloc(), s.alloc(), s.alloc()] == [0, 1, 2, None]
    s.free(1)
    s.free(0)
    assert s.num_free == 2 and s.alloc() == 0
    with pytest.raises(ValueError):
        s.free(1)                                                            # already free
    with pytest.raises(ValueError):
        s.free(7)


# ------------------------------------------------------------------------------------------ 3. greedy generate
def test_greedy_generate_equals_argmax_of_score(model, seqs):
    prompts = [seqs[i] for i in (2, 5, 0, 4, 6)]                             # 8, 3, 1, 15, 22 tokens
    n_new = 6
    eng = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN)       # 5 requests, 4 slots: decodes of
    steps = recording(eng)                                                   # running ones mix with prefills
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=n_new, ignore_eos=True))
    assert any(1 in s and any(n > 1 for n in s) for s in steps)
    scorer = Engine(model, max_batch=1, prefill_chunk=64, max_len=MAX_LEN)
    for p, o in zip(prompts, outs):
        assert o.prompt_token_ids == p and o.finish_reason == "length" and len(o.token_ids) == n_new
        seq = list(p)
        for t in o.token_ids:                                                # one score call per new token
            seq.append(int(np.argmax(scorer.score([seq])[0][-1])))
        assert seq[len(p):] == o.token_ids


def test_stop_token_and_context_limit(model, seqs):
    eng = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN)
    p = seqs[4]
    base = eng.generate([p], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    stop = base[3]
    first = base.index(stop)
    o = eng.generate([p], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))[0]
    assert o.token_ids == base[:first + 1] and o.finish_reason == "stop"
    long = (seqs[1] * 3)[:MAX_LEN - 5]                                       # room for 5 new tokens
    o = eng.generate([long], SamplingParams(max_new_tokens=100, ignore_eos=True))[0]
    assert o.token_ids == eng.generate([long], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids
    assert o.finish_reason == "length" and len(long) + len(o.token_ids) == MAX_LEN


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_reproducible_and_batch_independent(model, seqs):
    prompts = [seqs[i] for i in (2, 5, 4)]
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.95, seed=7, ignore_eos=True)
    one = Engine(model, max_batch=1, prefill_chunk=64, max_len=MAX_LEN).generate(prompts, sp)
    four = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN).generate(prompts, sp)
    assert [o.token_ids for o in one] == [o.token_ids for o in four]
    other = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN).generate(
        prompts, dataclasses.replace(sp, seed=8))
    assert [o.token_ids for o in one] != [o.token_ids for o in other]
    greedy = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN)
    g = greedy.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    k1 = greedy.generate(prompts, dataclasses.replace(sp, top_k=1, top_p=1.0))
    p0 = greedy.generate(prompts, dataclasses.replace(sp, top_k=0, top_p=1e-6))
    assert [o.token_ids for o in g] == [o.token_ids for o in k1] == [o.token_ids for o in p0]
    # one SamplingParams per prompt == each prompt run with its own
    per = [SamplingParams(max_new_tokens=3, ignore_eos=True), sp, dataclasses.replace(sp, seed=8, max_new_tokens=2)]
    mixed = greedy.generate(prompts, per)
    assert [o.token_ids for o in mixed] == [g[0].token_ids[:3], one[1].token_ids, other[2].token_ids[:2]]
    with pytest.raises(EngineError, match="2 SamplingParams for 3 prompts"):
        greedy.generate(prompts, per[:2])


def test_all_greedy_steps_take_the_argmax_path(model, seqs, monkeypatch):
    """A decode-only step whose sampled rows are all greedy is the "greedy" kind (argmax alone, no sort);
    one drawing row makes it the "sample" kind, as every step with prompt chunks is. The tokens are the
    sampler's: greedy == top_k=1 through `sample`, and a drawing request among greedy ones draws what it
    draws among drawing ones."""
    from lingjax import engine as engine_module
    shapes, step = [], engine_module._step_fn

    def recording_step(*args, mode, **kw):                     # the kind and shape of every step dispatched
        batch = args[2]
        shapes.append((engine_module._kind(mode), batch.tokens.shape[0], batch.decode_only))
        return step(*args, mode=mode, **kw)

    monkeypatch.setattr(engine_module, "_step_fn", recording_step)
    prompts = [seqs[i] for i in (2, 5, 4)]
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    drawn = SamplingParams(max_new_tokens=6, temperature=2.0, seed=3, ignore_eos=True)
    eng = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN)     # the shapes of the tests above

    def run(params):
        """-> (tokens of each prompt, kinds of its decode-only steps, kinds of its other sampling steps)"""
        shapes.clear()
        outs = eng.generate(prompts, params)
        assert set(shapes) <= set(eng.buckets()) | set(eng.buckets("score+sample"))
        return ([o.token_ids for o in outs], {k for k, _, d in shapes if d}, {k for k, _, d in shapes if not d} - {""})

    g, decode, other = run(greedy)
    assert decode == {"greedy"} and other == {"sample"}
    k1, decode, other = run(dataclasses.replace(drawn, top_k=1))           # greedy through the full sampler
    assert decode == other == {"sample"} and k1 == g
    all_drawn, decode, _ = run(drawn)
    assert decode == {"sample"} and all_drawn[1] != g[1]    # a draw at temperature 2, not the argmax
    mixed, decode, _ = run([greedy, drawn, greedy])
    assert "sample" in decode and mixed == [g[0], all_drawn[1], g[2]]
    assert ("greedy", 4, True) in eng.buckets() and len(eng.buckets()) == 2 * (len(eng.t_buckets) + 1) + 1


def test_sample_distribution():
    """Empirical frequencies of the on-device sampler against the filtered softmax, computed here."""
    V, N = 6, 20000
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.25, 0.15, 0.05], np.float32))
    run = jax.jit(sample)

    def freqs(temp, k, p):
        toks = run(jnp.tile(logits, (N, 1)), jnp.full(N, temp, jnp.float32), jnp.full(N, k, jnp.int32),
                   jnp.full(N, p, jnp.float32), jnp.full(N, 3, jnp.uint32), jnp.zeros(N, jnp.int32),
                   jnp.arange(N, dtype=jnp.int32))
        return np.bincount(np.asarray(toks), minlength=V) / N

    def expect(temp, keep):
        w = np.exp(logits / temp) * np.isin(np.arange(V), keep)
        return w / w.sum()

    np.testing.assert_allclose(freqs(1.0, 0, 1.0), expect(1.0, range(V)), atol=0.015)
    np.testing.assert_allclose(freqs(0.5, 0, 1.0), expect(0.5, range(V)), atol=0.015)
    np.testing.assert_allclose(freqs(1.0, 2, 1.0), expect(1.0, [1, 3]), atol=0.015)        # top-k 2
    np.testing.assert_allclose(freqs(1.0, 0, 0.7), expect(1.0, [1, 3, 4]), atol=0.015)     # .4+.25 < .7
    np.testing.assert_allclose(freqs(1.0, 0, 0.65), expect(1.0, [1, 3]), atol=0.015)       # .4+.25 >= .65
    assert (freqs(0.0, 0, 1.0) == np.eye(V)[1]).all()                                      # greedy


# ------------------------------------------------------------------------------------------ 4. compilations
def test_fifty_requests_compile_at_most_the_buckets(ckdir):
    # A structurally different model (another config value), so no step of it was compiled before:
    # the counters below see every compilation of the run.
    model = load_hf(ckdir, dtype=jnp.float32, mtp=False, max_position_embeddings=1000)[1]
    eng = Engine(model, max_batch=4, prefill_chunk=16, max_len=MAX_LEN)
    rng = np.random.default_rng(3)
    V = model.cfg.vocab_size
    prompts = [rng.integers(0, V, int(n)).tolist() for n in rng.integers(1, 60, 50)]
    backend_compiles = collections.Counter()

    def listener(event, duration, **kw):
        backend_compiles[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.8, seed=1, ignore_eos=True))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(len(o.token_ids) == 4 for o in outs)
    shapes = eng.compiled_shapes()
    n_buckets = len(eng.buckets("sample"))
    assert set(shapes) <= set(eng.buckets("sample"))
    assert all(n == 1 for n in shapes.values())                              # each shape compiled once
    assert 3 <= eng.compile_count <= n_buckets < eng.steps / 4
    assert backend_compiles["/jax/core/compile/backend_compile_duration"] <= n_buckets
    print(f"\n50 requests: {eng.steps} steps, {eng.compile_count} compilations, {n_buckets} buckets")


# ------------------------------------------------------------------------------------------ 5. bad input
@pytest.mark.parametrize("seqs_in, msg", [
    ([[]], "sequence 0 is empty"),
    ([[1, 2], [1] * (MAX_LEN + 1)], "sequence 1 has 161 tokens"),
    ([[1, 98]], "token id 98 at position 1 is outside the vocabulary"),
    ([[-1]], "token id -1"),
    ([[1, 2.5]], "not an integer id"),
    ("abc", "expected a list of token-id lists"),
])
def test_score_rejects_bad_input(model, seqs_in, msg):
    eng = Engine(model, max_batch=2, prefill_chunk=7, max_len=MAX_LEN)
    with pytest.raises(EngineError, match=msg):
        eng.score(seqs_in)
    assert eng.slots.num_free == 2


def test_check_tokens_plain_and_numpy_ints():
    """Plain int lists take check_tokens' fast path; numpy ints, bools and floats the per-token one."""
    assert check_tokens([3, 0, 97], vocab_size=98, max_len=8) == [3, 0, 97]
    got = check_tokens(np.array([3, 5], np.int64), vocab_size=98, max_len=8)
    assert got == [3, 5] and all(type(t) is int for t in got)
    assert check_tokens([np.int32(4), 2], vocab_size=98, max_len=8) == [4, 2]
    for bad, msg in (([1, True], "token 1 is True, not an integer id"), ([2, 98], "token id 98 at position 1"),
                     ([1.0], "not an integer id"), ([1] * 9, "has 9 tokens")):
        with pytest.raises(EngineError, match=msg):
            check_tokens(bad, vocab_size=98, max_len=8)


def test_generate_rejects_bad_input(model):
    eng = Engine(model, max_batch=2, prefill_chunk=7, max_len=MAX_LEN)
    with pytest.raises(EngineError, match="prompt 0 has 160 tokens"):
        eng.generate([[1] * MAX_LEN])                                        # no room for a new token
    with pytest.raises(EngineError, match="prompt 1 is empty"):
        eng.generate([[1], []])
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0),
                dict(top_p=1.5), dict(temperature=float("nan"))):
        with pytest.raises(EngineError):
            eng.generate([[1]], SamplingParams(**bad))
    for bad in (dict(max_batch=0), dict(prefill_chunk=0), dict(max_len=10 ** 6), dict(num_slots=1, max_batch=2),
                dict(decode_order="middle"), dict(max_tokens=1, max_batch=2)):
        with pytest.raises(EngineError):
            Engine(model, **{"max_len": MAX_LEN, **bad})


def test_more_requests_than_slots_queue(model, seqs, refs):
    eng = Engine(model, max_batch=4, prefill_chunk=7, max_len=MAX_LEN)
    steps = recording(eng)
    out = eng.score(seqs)                                                    # 8 requests, 4 slots
    assert rel_err(out, refs) <= 1e-5
    assert max(len(s) for s in steps) == 4 and eng.slots.num_free == 4
    outs = eng.generate(seqs, SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [2] * len(seqs) and eng.slots.num_free == 4
