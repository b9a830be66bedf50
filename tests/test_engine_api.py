"""The incremental engine API (issue 15): add_request / abort / step, re-entrant calls, overlapped
scheduling against the non-overlapped engine, EngineLoop from several threads, logprobs.

Same tiny float32 model and engine shapes as tests/test_engine.py (max_batch 4, chunk 7, max_len 160),
so the two files share compiled steps when they run in one process."""
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lingjax.engine import Engine, EngineError, SamplingParams
from lingjax.engine_loop import EngineLoop
from lingjax.testing import tiny_float32_model

MAX_LEN = 160
LENGTHS = (9, 1, 23, 4, 15, 2, 8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_float32_model(str(tmp_path_factory.mktemp("ck")))


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(5)
    return [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in LENGTHS]


def engine(model, **kw):
    return Engine(model, **{"max_batch": 4, "prefill_chunk": 7, "max_len": MAX_LEN, **kw})


GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=30, top_p=0.9, seed=11, ignore_eos=True)


def record(got, outs):
    """Accumulate step outputs into got: {request_id: (tokens, finish_reason)}."""
    for o in outs:
        toks, _ = got.get(o.request_id, ([], None))
        got[o.request_id] = (toks + o.new_token_ids, o.finish_reason)
        assert o.num_generated == len(got[o.request_id][0]) and o.prompt_len > 0
    return outs


def drain(eng, on_step=None, got=None):
    """Step to the end -> {request_id: (tokens, finish_reason)}; on_step(step_no, outputs) each step."""
    got, n = {} if got is None else got, 0
    while eng.has_unfinished():
        outs = record(got, eng.step())
        if on_step is not None:
            on_step(n, outs)
        n += 1
    return got


# ------------------------------------------------------------------------------------------ incremental API
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_requests_added_while_running_equal_generate(model, prompts, params):
    ref = engine(model).generate(prompts, params)
    eng = engine(model)
    ids = {eng.add_request(prompts[0], params, sample_index=0): 0}
    late = list(enumerate(prompts))[1:]

    def add_more(step, outs):                   # two more requests after each step, while others run
        for _ in range(2):
            if late:
                i, p = late.pop(0)
                ids[eng.add_request(p, params, request_id=f"r{i}", sample_index=i)] = i
        assert eng.num_running <= 4 and eng.num_running + eng.num_waiting <= len(ids)

    got = drain(eng, add_more)
    assert not late and len(got) == len(prompts)
    for rid, i in ids.items():
        assert got[rid] == (ref[i].token_ids, "length"), i
    s = eng.stats()
    assert s["running"] == s["waiting"] == 0 and s["free_slots"] == 4
    assert s["generated_tokens"] == 6 * len(prompts) and s["prompt_tokens"] == sum(LENGTHS)


def test_abort_frees_the_slot_and_the_next_request_takes_it(model, prompts):
    eng = engine(model)
    first = [eng.add_request(p, GREEDY) for p in prompts[:4]]        # fill the 4 slots
    queued = eng.add_request(prompts[4], GREEDY)
    got = {}
    while not any(o.request_id == first[1] and o.new_token_ids for o in record(got, eng.step())):
        pass
    assert eng.num_running == 4 and eng.num_waiting == 1 and eng.slots.num_free == 0
    assert eng.abort(first[1]) and not eng.abort(first[1]) and not eng.abort("no-such-id")
    assert eng.slots.num_free == 1 and eng.num_running == 3                        # at once
    outs = record(got, eng.step())
    assert [(o.finished, o.finish_reason) for o in outs if o.request_id == first[1]] == [(True, "abort")]
    assert eng.num_waiting == 0 and eng.num_running == 4                           # the queued one took it
    drain(eng, got=got)
    assert got[first[1]][1] == "abort" and 1 <= len(got[first[1]][0]) < 6
    assert got[queued] == (engine(model).generate([prompts[4]], GREEDY)[0].token_ids, "length")
    assert eng.slots.num_free == 4 and not eng.has_unfinished()
    with pytest.raises(EngineError, match="already in use"):
        eng.add_request([1], GREEDY, request_id="x") and eng.add_request([1], GREEDY, request_id="x")
    assert eng.abort("x") and drain(eng) == {"x": ([], "abort")}


def test_score_requests_and_bad_requests(model, prompts):
    eng = engine(model)
    short = [prompts[i] for i in (3, 1, 5)]                 # 4, 1, 2 tokens: one T bucket for the mixed step
    ref = eng.score(short)
    a = eng.add_request(short[0], score=True)
    eng.add_request(short[1], GREEDY)                      # a sample request in the same steps
    c = eng.add_request(short[2], score=True)
    logits = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.logits is not None:
                assert o.finished and o.finish_reason == "length" and o.request_id not in logits
                logits[o.request_id] = o.logits
    for rid, r in ((a, ref[0]), (c, ref[2])):
        assert logits[rid].shape == r.shape and np.abs(logits[rid] - r).max() <= 1e-5 * np.abs(r).max()
    for bad, msg in (([], "prompt is empty"), ([1] * MAX_LEN, "prompt has 160 tokens"), ([1, 10 ** 6], "token id"),
                     ("abc", "expected a list of token ids")):
        with pytest.raises(EngineError, match=msg):
            eng.add_request(bad, GREEDY)
    for bad in (dict(logprobs=21), dict(logprobs=-1), dict(top_k=1.5), dict(temperature="1"), dict(seed=None),
                dict(stop_token_ids="ab")):
        with pytest.raises(EngineError):
            eng.add_request([1], SamplingParams(**bad))
    assert eng.add_request([1], SamplingParams(top_k=10 ** 10, max_new_tokens=1))      # top_k >= V is off
    assert not eng.has_unfinished() or drain(eng)
    with pytest.raises(EngineError, match="request_id must be"):
        eng.add_request([1], GREEDY, request_id=3)


# ------------------------------------------------------------------------------------------ re-entry
def test_reentrant_calls_raise(model, prompts):
    """Issue 20 item 5: generate from an on_token callback used to spin forever in empty steps."""
    eng = engine(model)
    calls = {"generate": lambda: eng.generate([[1]]), "score": lambda: eng.score([[1]]),
             "add_request": lambda: eng.add_request([1]), "step": eng.step, "abort": lambda: eng.abort("x")}
    for name, call in calls.items():
        def on_token(i, t, call=call):
            call()
        with pytest.raises(EngineError, match=rf"Engine.{name}\(\) called while Engine.generate\(\) is running"):
            eng.generate(prompts[:2], GREEDY, on_token=on_token)
        assert eng.slots.num_free == 4 and not eng.has_unfinished()          # usable again
    # step() while a step runs (e.g. from another thread): here from inside the step itself
    orig = eng._dispatch
    eng._dispatch = lambda pieces: (eng.step(), orig(pieces))[1]
    eng.add_request(prompts[0], GREEDY)
    with pytest.raises(EngineError, match=r"Engine.step\(\) called while Engine.step\(\) is running"):
        eng.step()
    eng._dispatch = orig
    with pytest.raises(EngineError, match="needs an idle engine"):
        eng.generate([[1]])
    drain(eng)
    assert eng.generate(prompts[:1], GREEDY)[0].token_ids == engine(model).generate(prompts[:1], GREEDY)[0].token_ids


# ------------------------------------------------------------------------------------------ overlap
def test_overlapped_equals_non_overlapped(model, prompts):
    """Greedy and seeded sampling, stop tokens met mid-run (a stopped request's extra in-flight token
    is discarded), more requests than slots: the same tokens with and without overlap, and the
    overlapped engine really feeds decodes from the device (take >= 0)."""
    mixed = ([GREEDY, SAMPLED] * 4)[:len(prompts)]
    base = engine(model, overlap=False).generate(prompts, mixed)
    stops = [SamplingParams(**{**dataclasses.asdict(sp), "ignore_eos": False, "max_new_tokens": 8,
                               "stop_token_ids": (o.token_ids[2],)})
             for sp, o in zip(mixed, base)]
    runs = {}
    for overlap, depth in ((False, 1), (True, 1), (True, 3)):
        eng = engine(model, overlap=overlap, overlap_depth=depth)
        taken, orig = [], eng._pack
        eng._pack = lambda pieces: (lambda b: (taken.append(int((b["take"] >= 0).sum())), b)[1])(orig(pieces))
        runs[overlap, depth] = ([o.token_ids for o in eng.generate(prompts, mixed)],
                                [(o.token_ids, o.finish_reason) for o in eng.generate(prompts, stops)], sum(taken))
        assert eng.slots.num_free == 4 and eng.stats()["overlap"] == overlap
    assert runs[True, 1][:2] == runs[False, 1][:2] == runs[True, 3][:2]      # 3 steps in flight: the same
    assert runs[False, 1][0] == [o.token_ids for o in base]
    assert all(r == "stop" for _, r in runs[True, 1][1]) and runs[False, 1][2] == 0 and runs[True, 1][2] > 20


# ------------------------------------------------------------------------------------------ EngineLoop
def test_engine_loop_from_several_threads(model, prompts):
    eng = engine(model)
    ref = {i: o.token_ids for i, o in enumerate(engine(model).generate(prompts, GREEDY))}
    loop = EngineLoop(eng).start()
    results, done, lock = {}, threading.Event(), threading.Lock()
    expected = 3 * len(prompts) + 1

    def on_output(o):
        with lock:
            toks, _ = results.get(o.request_id, ([], None))
            results[o.request_id] = (toks + o.new_token_ids, o.finish_reason)
            if o.finished and sum(r is not None for _, r in results.values()) == expected:
                done.set()

    errors = []
    ids = {}

    def client(k):
        try:
            for i, p in enumerate(prompts):
                ids[loop.submit(p, GREEDY, on_output, request_id=f"t{k}-{i}")] = i
        except Exception as e:       # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    long = loop.submit(prompts[2], dataclasses.replace(GREEDY, max_new_tokens=100), on_output)
    for t in threads:
        t.start()
    loop.abort(long)
    for t in threads:
        t.join()
    with pytest.raises(EngineError, match="prompt is empty"):
        loop.submit([], GREEDY, on_output)                                 # refused in the caller's thread
    with pytest.raises(EngineError, match="already in use"):
        loop.submit([1], GREEDY, on_output, request_id=next(iter(results), "t0-0"))
    assert done.wait(120), results
    loop.stop()
    assert not errors and not loop.running
    assert results[long][1] == "abort" and len(results[long][0]) < 100
    assert all(results[rid] == (ref[i], "length") for rid, i in ids.items())
    assert eng.slots.num_free == 4 and not eng.has_unfinished()
    # stop() ends what is still running with "abort"; a stopped loop refuses new requests
    loop = EngineLoop(eng).start()
    ends = []
    loop.submit(prompts[0], dataclasses.replace(GREEDY, max_new_tokens=150), lambda o: o.finished and ends.append(o))
    loop.stop(timeout=60)
    assert [o.finish_reason for o in ends] == ["abort"] and not loop.running and eng.slots.num_free == 4
    with pytest.raises(EngineError, match="not running"):
        loop.submit([1], GREEDY, on_output)


def test_engine_loop_survives_a_failed_step(model, prompts):
    """A step that raises ends every request with "abort" (loop.error keeps the exception); the loop
    and the engine keep serving."""
    eng = engine(model)
    loop = EngineLoop(eng).start()
    orig, fail = eng._dispatch, [True]

    def dispatch(pieces):
        if fail.pop() if fail else False:
            raise RuntimeError("device lost")
        return orig(pieces)

    eng._dispatch = dispatch
    results, done = {}, threading.Event()

    def on_output(o):
        results.setdefault(o.request_id, []).extend(o.new_token_ids)
        if o.finished:
            results[o.request_id].append(o.finish_reason)
            done.set()

    loop.submit(prompts[0], GREEDY, on_output, request_id="a")
    assert done.wait(60) and results["a"] == ["abort"] and "device lost" in str(loop.error)
    done.clear()
    loop.submit(prompts[0], GREEDY, on_output, request_id="b")
    assert done.wait(60)
    loop.stop()
    assert results["b"] == engine(model).generate([prompts[0]], GREEDY)[0].token_ids + ["length"]


# ------------------------------------------------------------------------------------------ logprobs
def test_logprobs_equal_log_softmax_of_score(model, prompts):
    """Each new token's logprob, and the top-n, equal log_softmax of score()'s float32 logits at that
    position (prompt + the tokens before it). Tolerance 1e-4 absolute on logprobs of magnitude ~1-5:
    the two runs batch differently (float32 rounding, ~1e-6 relative)."""
    eng = engine(model)
    n = 5
    params = [dataclasses.replace(GREEDY, logprobs=n), dataclasses.replace(SAMPLED, logprobs=n),
              dataclasses.replace(GREEDY, logprobs=0), GREEDY]
    short = [prompts[i] for i in (0, 1, 3, 5)]              # 9, 1, 4, 2 tokens: few T buckets to compile
    outs = eng.generate(short, params)
    assert outs[3].logprobs is None and outs[3].top_logprobs is None
    assert outs[2].top_logprobs == [[]] * 6 and len(outs[2].logprobs) == 6
    scores = eng.score([p + o.token_ids[:-1] for p, o in zip(short[:3], outs)])
    for p, o, s in zip(short[:3], outs[:3], scores):
        lsm = np.asarray(jax.nn.log_softmax(jnp.asarray(s[len(p) - 1:]), axis=-1))
        want = lsm[np.arange(len(o.token_ids)), o.token_ids]
        np.testing.assert_allclose(o.logprobs, want, atol=1e-4, rtol=0)
        if o.top_logprobs[0]:
            for row, top in zip(lsm, o.top_logprobs):
                ids = [t for t, _ in top]
                np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:n], atol=1e-4, rtol=0)
                np.testing.assert_allclose(row[ids], [v for _, v in top], atol=1e-4, rtol=0)
    assert max(max(o.logprobs) - min(o.logprobs) for o in outs[:3]) > 0.1      # not a constant


def test_xla_options_reach_the_step_executables(model):
    """Engine(xla_options=...) lowers its steps with those XLA options (jax.jit compiler_options; the
    command-buffer setting here, which only the GPU backend reads: scripts/probe_launch.py measures it
    there); a bad option fails at construction with one clear line. Lowering only: no compilation."""
    from lingjax import engine as engine_lib
    opts = {"xla_gpu_enable_command_buffer": ""}
    eng = engine(model, xla_options=opts)
    assert eng._fns() == engine_lib._jitted_with(tuple(opts.items())) != (engine_lib._step_fn, engine_lib._multi_step_fn)
    assert engine(model)._fns() == (engine_lib._step_fn, engine_lib._multi_step_fn)
    lowered = eng._lower("greedy", 4, True)
    assert dict(lowered._lowering._compiler_options_kvs) == opts       # what XLA compiles this step with
    with pytest.raises(EngineError, match="not a valid enum value"):
        engine(model, xla_options={"xla_gpu_enable_command_buffer": "BOGUS"})
    with pytest.raises(EngineError, match="xla_options must be a dict"):
        engine(model, xla_options=["xla_gpu_enable_command_buffer"])


def test_default_xla_options_are_the_models(model, monkeypatch):
    """xla_options None takes the model's defaults (kernels.fp8.step_xla_options: on the CPU, none); {} is
    XLA's own settings whatever the model."""
    from lingjax.kernels import fp8 as fp8_kernels
    assert engine(model).xla_options == ()
    monkeypatch.setattr(fp8_kernels, "step_xla_options", lambda m: {"xla_disable_hlo_passes": "dot-merger"})
    assert engine(model).xla_options == (("xla_disable_hlo_passes", "dot-merger"),)
    assert engine(model, xla_options={}).xla_options == ()
