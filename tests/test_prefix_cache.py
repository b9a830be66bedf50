"""Prefix caching (issue 17): the engine with the cache on gives what it gives with the cache off.

Compared: greedy tokens (identical) and, for every generated token, the log-softmax of the raw float32
logits at the top 20 tokens (logprobs=20), within 1e-5 absolute: the cache changes only which step
shapes compute a prefix (float rounding, ~1e-6 here), never what is computed. Workloads: random shared
prefixes of random lengths (page-aligned and not), exact repeats, a prompt that is a prefix of another,
concurrent requests sharing a prefix, evictions under a small page pool and few state rows, aborts, and a
slot reused right after a hit (the bug class of a hit reading another request's stale state). Cached
states and pages are checked bit for bit after the requests that read them have run, and a hit whose steps
line up with the cache-off engine's is equal to it bit for bit.

The cache-off engines get num_slots = max_batch + state rows, so that their caches have the cache-on
engines' shapes and both share the compiled steps."""
import jax.numpy as jnp
import numpy as np
import pytest

from lingjax.engine import Engine, SamplingParams
from lingjax.prefix_cache import PrefixCache
from lingjax.paging import PageAllocator
from lingjax.testing import write_tiny_checkpoint
from lingjax.weights import load_hf

PS, MAX_LEN, B, ROWS, PAGES = 8, 96, 3, 2, 24      # 24 pages: about 3 requests; the cache must evict
SP = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=20)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    write_tiny_checkpoint(str(d), seed=0, dtype=np.float32, shards=1)
    return load_hf(str(d), dtype=jnp.float32, mtp=False)[1]


def engines(model):
    """(cache on, cache off), one configuration for the whole file (one set of compiled steps)."""
    common = dict(max_batch=B, prefill_chunk=8, max_len=MAX_LEN, page_size=PS, num_pages=PAGES)
    on = Engine(model, prefix_cache=True, prefix_cache_states=ROWS, page_shuffle_seed=5, **common)
    off = Engine(model, num_slots=B + ROWS, **common)
    return on, off


def workload(rng, vocab, n):
    """n prompts over a few shared prefixes (lengths 16: page-aligned, 21, 37), random tails (0-11 tokens),
    with exact repeats and a prompt that is a prefix of a later one."""
    prefixes = [rng.integers(3, vocab, k).tolist() for k in (16, 21, 37)]
    out = []
    for i in range(n):
        if i >= 2 and rng.random() < 0.2:
            out.append(list(out[int(rng.integers(len(out)))]))                 # a repeat
            continue
        p = prefixes[int(rng.integers(len(prefixes)))]
        out.append(p + rng.integers(3, vocab, int(rng.integers(0, 12))).tolist())
    out.append(out[-1] + rng.integers(3, vocab, 9).tolist())                   # extends an earlier prompt
    return out


def same(a, b):
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        for tx, ty in zip(x.top_logprobs, y.top_logprobs):
            assert [t for t, _ in tx] == [t for t, _ in ty]
            np.testing.assert_allclose([v for _, v in tx], [v for _, v in ty], atol=1e-5, rtol=0)


def settled(eng):
    """Every page is held by the prefix cache or free; no node pinned; no promise left."""
    pc = eng.prefix
    assert pc._pinned == 0 and eng._promised == 0
    assert eng.pages.num_free + pc.num_nodes == eng.num_pages
    assert all(eng.pages.refs(nd.page) == 1 for nd in pc._nodes())


# ------------------------------------------------------------------------------------------ unit
def test_trie_lookup_insert_evict():
    pages = PageAllocator(8)
    pc = PrefixCache(4, pages, [10, 11])
    toks = list(range(20))
    assert pc.lookup(toks) == ([], 0)
    a = pc.insert(pc.root, pc.block(toks, 0), pages.alloc())
    b = pc.insert(a, pc.block(toks, 1), pages.alloc())
    assert pc.take_row(b) in (10, 11)
    path, hit = pc.lookup(toks)
    assert path == [a, b] and hit == 2
    assert pc.lookup(toks[:8]) == ([a], 0)              # at most (len - 1) // 4 blocks: one token is left
    assert pc.lookup([99] + toks[1:]) == ([], 0)        # compared by tokens
    assert pc.evictable == 0                            # both pinned by their inserter
    pc.unpin(b)
    pc.unpin(a)
    assert pc.evictable == 2
    for nd in (a, b):
        pages.unref(nd.page)                            # the inserting request ends: the cache's refs remain
    assert pages.num_free == 6
    assert pc.evict(1) == 1 and pc.lookup(toks) == ([a], 0) and pc.rows_used == 0   # leaf first, its state too
    assert pc.evict(5) == 1 and pages.num_free == 8 and pc.num_nodes == 0


# ------------------------------------------------------------------------------------------ equivalence
def test_random_shared_prefixes_on_equals_off(model):
    rng = np.random.default_rng(0)
    prompts = workload(rng, model.cfg.vocab_size, 14)
    on, off = engines(model)
    want = off.generate(prompts, SP)
    got = on.generate(prompts, SP)
    same(got, want)
    st = on.stats()
    assert st["prefix_cache_hits"] >= 4 and st["prefix_cache_hit_tokens"] >= 4 * PS
    assert 0 < st["prefix_cache_hit_rate"] < 1
    assert st["prefix_cache_evicted_pages"] > 0                       # under the small pool, evictions happen
    settled(on)
    again = on.generate(prompts[::-1], SP)[::-1]                        # now mostly hits, other slots
    same(again, want)
    assert on.stats()["prefix_cache_hits"] > st["prefix_cache_hits"]
    settled(on)


def test_aborts_and_concurrent_sharers(model):
    """Requests sharing a prefix run together; some are aborted mid-prefill or mid-decode, by the
    incremental API. The others' results equal the cache-off engine's, and nothing leaks."""
    rng = np.random.default_rng(2)
    V = model.cfg.vocab_size
    shared = rng.integers(3, V, 29).tolist()
    prompts = [shared + rng.integers(3, V, int(k)).tolist() for k in rng.integers(1, 10, 10)]
    on, off = engines(model)
    want = off.generate(prompts, SP)
    ids = {on.add_request(p, SP, sample_index=i): i for i, p in enumerate(prompts)}
    toks = {i: [] for i in range(len(prompts))}
    aborted, step = set(), 0
    while on.has_unfinished():
        for o in on.step():
            if o.finish_reason != "abort":
                toks[ids[o.request_id]] += o.new_token_ids
        step += 1
        if step in (2, 5, 9):                                        # abort a running request
            rid = next(r.id for r in on._running if r.id not in aborted)
            aborted.add(rid)
            on.abort(rid)
    kept = [i for rid, i in ids.items() if rid not in aborted]
    assert len(kept) == len(prompts) - 3
    assert all(toks[i] == want[i].token_ids for i in kept)
    assert on.stats()["prefix_cache_hits"] >= 1
    settled(on)


def test_slot_reused_right_after_a_hit(model):
    """One slot: request A saves the prefix state, request X (another prompt) runs in the slot and leaves
    its state there, then request B, a hit on A's prefix, takes the slot at once: B must read A's saved
    state, not X's leftovers. The check can fail: without the copy into the slot, B's result changes."""
    rng = np.random.default_rng(3)
    V = model.cfg.vocab_size
    a = rng.integers(3, V, 27).tolist()
    x = rng.integers(3, V, 30).tolist()
    b = a[:24] + rng.integers(3, V, 5).tolist()
    on, off = engines(model)
    want = [off.generate([p], SP)[0] for p in (a, x, b)]

    def run(eng):                    # one at a time: each takes the lowest free slot, slot 0
        out = []
        for p in (a, x, b):
            out.append(eng.generate([p], SP)[0])
            assert eng.slots.num_free == B
        return out
    got = run(on)
    assert on.stats()["prefix_cache_hits"] == 1 and on.stats()["prefix_cache_hit_tokens"] == 24
    same(got, want)
    broken, _ = engines(model)
    copy = broken._copy_states
    broken._copy_states = lambda pairs: copy([(s, d) for s, d in pairs if d >= broken.num_slots])  # saves only
    bad = run(broken)
    assert bad[2].top_logprobs != got[2].top_logprobs


def test_cached_state_and_pages_never_modified_by_readers(model):
    rng = np.random.default_rng(4)
    V = model.cfg.vocab_size
    base = rng.integers(3, V, 33).tolist()                           # saves at 32 (4 blocks)
    on, _ = engines(model)
    on.generate([base], SP)
    (node,) = [nd for nd in on.prefix._nodes() if nd.state_row is not None]
    row = node.state_row
    path = on.prefix.lookup(base)[0]
    saved_states = [np.asarray(lin[row]) for lin in on.caches.linear]
    ids = np.array([nd.page for nd in path])
    saved_pages = [np.asarray(m[ids]) for m in on.caches.mla]
    readers = [base[:32] + rng.integers(3, V, int(k)).tolist() for k in (1, 7, 20)] + [list(base)]
    on.generate(readers, SP)
    assert on.stats()["prefix_cache_hits"] == 4 and node.state_row == row
    for lin, want in zip(on.caches.linear, saved_states):
        np.testing.assert_array_equal(np.asarray(lin[row]), want)
    for m, want in zip(on.caches.mla, saved_pages):
        np.testing.assert_array_equal(np.asarray(m[ids]), want)


def test_admission_pins_only_shared_nodes_when_the_whole_path_does_not_fit(model):
    """A pool of one request's size, the cache holding a 10-block path without a state: pinning the whole
    path (to save a state where the prompt leaves it) would leave too few pages, so the request pins only
    what it shares (nothing here) and is admitted; the cache then gives its pages up as the request grows.
    (Pinning the whole path regardless stalled the engine.) No step runs: admission and page taking only."""
    eng = Engine(model, max_batch=1, max_len=MAX_LEN, page_size=PS, num_pages=12, prefix_cache=True,
                 prefix_cache_states=1)
    pc, toks = eng.prefix, list(range(3, 93))
    parent = pc.root
    for j in range(10):
        p = eng.pages.alloc()
        parent = pc.insert(parent, pc.block(toks, j), p)
        eng.pages.unref(p)
        pc.unpin(parent)
    assert eng.pages.num_free == 2 and pc.evictable == 10
    eng.add_request(toks[:85], SamplingParams(max_new_tokens=8))          # 92 positions: 12 pages
    eng._admit_waiting()
    (r,) = eng._running
    assert r.chain == [] and r.fed == 0 and r.promised == 12
    eng._grow(r, 92)
    assert len(r.pages) == 12 and pc.num_nodes == 0 and pc.evicted == 10


def test_save_near_the_end_lies_where_a_chunk_ends(model):
    """A 30-token prompt's save near its end (admission only, no step): the start of its last chunk (16 with
    chunks of 16; none with one chunk of 32, which holds it all); the last whole block (24) when chunks of 10
    are not whole pages of 8."""
    for chunk, snaps in ((16, [16]), (32, []), (10, [24])):
        eng = Engine(model, max_batch=1, prefill_chunk=chunk, max_len=MAX_LEN, page_size=PS, num_pages=PAGES,
                     prefix_cache=True, prefix_cache_states=1)
        eng.add_request(list(range(3, 33)), SamplingParams(max_new_tokens=2))
        eng._admit_waiting()
        assert eng._running[0].snaps == snaps, chunk


def test_saves_cost_no_step_and_a_repeat_resumes_near_its_end(model):
    """Prompts of 17 tokens that share a 12-token prefix and differ after it (chunk 16, page 8). The second
    saves the state where it branches off (8); the later ones hit there and prefill their 9 other tokens in
    one step, with or without the save near a prompt's end (prefix_cache_save_last): that save lies at the
    start of the prompt's last chunk, where a chunk ends anyway (for these hits: the hit itself, nothing
    more to save). An exact repeat of the first prompt then resumes at 16 (its last chunk's start, saved by
    its first run) with the save, at the branch point 8 without. Results equal the cache-off engine's."""
    rng = np.random.default_rng(4)
    V = model.cfg.vocab_size
    shared = rng.integers(3, V, 12).tolist()
    prompts = [shared + rng.integers(3, V, 5).tolist() for _ in range(4)]
    _, off = engines(model)
    want = off.generate(prompts, SP)
    common = dict(max_batch=B, prefill_chunk=16, max_len=MAX_LEN, page_size=PS, num_pages=PAGES)
    for save_last, repeat_hit in ((False, PS), (True, 2 * PS)):
        on = Engine(model, prefix_cache=True, prefix_cache_states=ROWS, prefix_cache_save_last=save_last, **common)
        for p, w in zip(prompts[:2], want):                                 # fill, then the branch save at 8
            same(on.generate([p], SP), [w])
        for p, w in zip(prompts[2:], want[2:]):
            before = (on.steps, on.stats()["prefix_cache_hit_tokens"])
            same(on.generate([p], SP), [w])                                # + 3 decode steps
            assert (on.steps - before[0], on.stats()["prefix_cache_hit_tokens"] - before[1]) == (1 + 3, PS)
        assert on.stats()["prefix_cache_states"] == (1 if not save_last else 2)
        before = on.stats()["prefix_cache_hit_tokens"]
        same(on.generate([prompts[0]], SP), [want[0]])                     # an exact repeat
        assert on.stats()["prefix_cache_hit_tokens"] - before == repeat_hit
        settled(on)
    with pytest.raises(Exception, match="prefix_cache_save_last"):
        Engine(model, prefix_cache=True, prefix_cache_save_last="no", **common)


def test_a_hit_whose_steps_line_up_with_the_off_engine_is_bit_for_bit(model):
    """bench_prefix's device check, on the CPU (chunk 16, page 8, prompts of 29 tokens sharing 16). The fill
    saves its state at 16, the start of its last chunk. A hit of another prompt restores it and prefills the
    13 others in one step, as the cache-off engine's second chunk does: the same compiled steps over the same
    numbers, so tokens and top-20 logprobs are equal bit for bit. The fill's own prompt again walks its cached
    tail block too and saves a state where it leaves that path (24), so its prefill splits (16..24, 24..29):
    other steps, equal within the file's 1e-5 only."""
    rng = np.random.default_rng(7)
    V = model.cfg.vocab_size
    shared = rng.integers(3, V, 16).tolist()
    a, b = (shared + rng.integers(3, V, 13).tolist() for _ in range(2))
    common = dict(max_batch=B, prefill_chunk=16, max_len=MAX_LEN, page_size=PS, num_pages=PAGES)
    on = Engine(model, prefix_cache=True, prefix_cache_states=ROWS, **common)
    off = Engine(model, num_slots=B + ROWS, **common)
    want_a, want_b = off.generate([a], SP), off.generate([b], SP)
    same(on.generate([a], SP), want_a)                                     # the fill: its state saved at 16
    for prompt, want, prefill_steps, exact in ((b, want_b, 1, True), (a, want_a, 2, False)):
        before = (on.steps, on.stats()["prefix_cache_hit_tokens"])
        got = on.generate([prompt], SP)
        assert (on.steps - before[0], on.stats()["prefix_cache_hit_tokens"] - before[1]) == (prefill_steps + 3, 16)
        same(got, want)
        if exact:
            assert got[0].top_logprobs == want[0].top_logprobs
