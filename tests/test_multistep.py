"""Multi-step decode (Engine(decode_steps=N), issue 15's host overhead): one dispatch runs up to N decode
steps on the device. Its tokens (greedy and seeded sampling), logprobs and finish reasons equal the
single-step engine's over a mix of requests (all with logprobs: one set of step kinds, few compilations) with different max_new_tokens and stop ids, more requests
than slots, the paged cache (scattered small pages) and the prefix cache on; a request arriving while a
window runs is served. Same tiny float32 model and engine shapes as tests/test_engine_api.py, so the
single-step shapes are shared with it."""
import dataclasses

import numpy as np
import pytest

from lingjax.engine import Engine, EngineError, SamplingParams
from lingjax.testing import tiny_float32_model

MAX_LEN = 160
N = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_float32_model(str(tmp_path_factory.mktemp("ck")))


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(7)
    shared = rng.integers(0, model.cfg.vocab_size, 12).tolist()            # a prefix the cache can hit
    tails = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (5, 1, 9, 3, 14, 2)]
    return [shared + t for t in tails[:3]] + tails[3:] + [shared + tails[0]]


def engine(model, **kw):
    return Engine(model, **{"max_batch": 4, "prefill_chunk": 4, "max_tokens": 8, "max_len": MAX_LEN,
                            "page_size": 4, "page_shuffle_seed": 3, "prefix_cache": True, **kw})


def params_mix():
    g = dict(ignore_eos=True)
    s = dict(temperature=1.0, top_k=30, top_p=0.9, seed=11, ignore_eos=True)
    return [SamplingParams(max_new_tokens=m, **(s if i % 2 else g), logprobs=2)
            for i, m in enumerate((3, 11, 14, 6, 2, 9, 13))]


def run(eng, prompts, params):
    outs = eng.generate(prompts, params)
    return [(o.token_ids, o.finish_reason) for o in outs], [o.logprobs for o in outs]


def test_multi_step_equals_single_steps(model, prompts):
    mix = params_mix()
    base = engine(model).generate(prompts, mix)
    # stop ids met mid-window (a stopped request's later window tokens are dropped), some never met
    stops = [dataclasses.replace(sp, ignore_eos=False, stop_token_ids=(o.token_ids[min(4, len(o.token_ids) - 1)],))
             if i % 3 else sp for i, (sp, o) in enumerate(zip(mix, base))]
    got, stats = {}, {}
    for steps in (1, N):
        eng = engine(model, decode_steps=steps)
        got[steps] = run(eng, prompts, stops)
        s = stats[steps] = eng.stats()
        assert s["running"] == s["waiting"] == 0 and s["free_slots"] == 4
        assert s["free_pages"] + s["prefix_cache_pages"] == s["num_pages"]      # every request's pages back
        assert (s["windows"] > 0) == (steps > 1) and s["prefix_cache_hits"] > 0
    assert got[N][0] == got[1][0]
    for a, b in zip(got[1][1], got[N][1]):
        assert (a is None) == (b is None) and (a is None or np.allclose(a, b, rtol=1e-5, atol=1e-5))
    assert [t for t, _ in got[1][0]] == [o.token_ids[:len(t)] for (t, _), o in zip(got[1][0], base)]
    assert any(r == "stop" and len(t) < sp.max_new_tokens for (t, r), sp in zip(got[N][0], stops))
    assert any(r == "length" for t, r in got[N][0])
    assert stats[N]["dispatches"] < stats[1]["dispatches"] and stats[N]["steps"] >= stats[1]["steps"]
    # the window shapes compiled are among those the engine lists (the server's warm-up compiles them)
    kinds = {k for k, _, _ in eng.compiled_shapes() if "*" in k}
    listed = {k for kind in ("sample", "sample+top") for k, _, _ in eng.buckets(kind)}
    assert kinds and kinds <= listed, (kinds, listed)


def test_request_arriving_mid_window_is_served(model, prompts):
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, ignore_eos=True, logprobs=2)
    ref = engine(model).generate(prompts[:3], sp)
    eng = engine(model, decode_steps=N)
    ids = [eng.add_request(prompts[0], sp, sample_index=0)]
    got = {ids[0]: []}
    while eng.stats()["windows"] == 0:               # prefill, then the first window is dispatched
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    for i in (1, 2):                                  # arrive while it runs (it is in flight: overlap)
        ids.append(eng.add_request(prompts[i], sp, sample_index=i))
        got[ids[-1]] = []
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id] += o.new_token_ids
    assert [got[r] for r in ids] == [o.token_ids for o in ref]
    assert eng.stats()["windows"] >= 2


def test_bad_settings(model):
    with pytest.raises(EngineError, match="decode_steps must be an integer >= 1, got 0"):
        engine(model, decode_steps=0)
    with pytest.raises(EngineError, match="cannot be combined with speculative decoding"):
        engine(model, decode_steps=2, num_speculative_tokens=1)


def test_cli_refuses_decode_steps_with_speculative_decoding():
    import types
    from lingjax.cli.common import CLIError, build_engine
    with pytest.raises(CLIError, match="--decode-steps > 1 cannot be combined with --speculative-tokens"):
        build_engine(types.SimpleNamespace(decode_steps=2, speculative_tokens=1), "no-such-dir", 64)


def test_server_warm_up_runs_the_windows(model):
    from lingjax.server import warm_up_windows
    eng = engine(model, decode_steps=N)
    warm_up_windows(eng, tops=(2,))          # logprobs as in the tests above: their compiled shapes
    assert eng.stats()["windows"] == 2       # one greedy window, one drawing window
    # the warm-up's precompile list names the windows so that precompiling them finds the executables the
    # windows just ran (jit's cache is shared by engines of this model: compiled_shapes() may be empty here)
    from lingjax.server import compile_events, serving_shapes
    windows = [s for s in serving_shapes(eng, logprobs=True) if "+top*" in s[0]]
    assert windows == [(f"greedy+top*{N}", 4, True), (f"sample+top*{N}", 4, True)]
    pre = compile_events()
    eng.precompile(windows)
    assert (compile_events() - pre)["compiles"] == 0
