"""Speculative decoding with the MTP layer (lingjax/speculative.py, issue 16).

- rejection sampling on synthetic p / q: the emitted tokens follow p (chi-square goodness of fit);
- greedy speculative output == plain greedy output, token for token, for k = 1, 2, 3, several chunk
  sizes and queued batch mixes, on a random checkpoint (drafts mostly rejected: exercises the
  linear-state rollback) and on the shipped tiny model (drafts mostly accepted);
- sampling: the speculative engine's joint distribution of two sampled tokens equals the plain
  engine's (chi-square test of homogeneity over many seeds);
- rejected drafts leave no trace: the logprobs the speculative engine reports for its tokens equal
  those of scoring the final sequence with the plain engine.

Compile budget: every speculative engine here has max_batch 2 and max_tokens 2 (k + 1), so each k
compiles one step shape; the whole file a handful of steps.

Chi-square thresholds: the 1 - 1e-4 quantile (Wilson-Hilferty approximation), so a correct
implementation fails with probability ~1e-4 per test (the seeds are fixed, so the result is
deterministic); a wrong residual (e.g. resampling from p instead of max(p - q, 0)) shifts the
distributions by far more than that at these sample sizes (checked while writing the test by breaking it).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lingjax import speculative
from lingjax.engine import Engine, EngineError, SamplingParams
from lingjax.speculative import accept
from lingjax.testing import tiny_config, write_tiny_checkpoint
from lingjax.weights import load_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "checkpoints", "ling-tiny")
Z_1E4 = 3.719          # standard normal 1 - 1e-4 quantile


def chi2_crit(dof, z=Z_1E4):
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def gof(counts, probs):
    """Chi-square goodness of fit statistic and its threshold (categories with expected count >= 5)."""
    n = counts.sum()
    e = n * probs
    m = e >= 5
    assert counts[~m].sum() <= max(5, 0.01 * n), "mass where p is ~0"
    stat = float(((counts[m] - e[m]) ** 2 / e[m]).sum())
    return stat, chi2_crit(max(int(m.sum()) - 1, 1))


def homogeneity(a, b):
    """Two-sample chi-square statistic over the categories seen, and its threshold."""
    cats = sorted(set(a) | set(b))
    ca = np.array([a.count(c) for c in cats], float)
    cb = np.array([b.count(c) for c in cats], float)
    tot = ca + cb
    keep = tot >= 10
    ca, cb, tot = ca[keep], cb[keep], tot[keep]
    na, nb = ca.sum(), cb.sum()
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = float(((ca - ea) ** 2 / ea + (cb - eb) ** 2 / eb).sum())
    return stat, chi2_crit(max(len(cats) - 1, 1))


# ------------------------------------------------------------------------------------------ unit
@pytest.mark.parametrize("top_k", [0, 4])
def test_rejection_sampling_emits_target_distribution(top_k):
    """k = 2 drafts from q, verified against p: token j of the output (when emitted) ~ p_j (after the
    same temperature / top-k transform), whatever q is; greedy rows take argmax p."""
    V, k, N = 7, 2, 40000
    rng = np.random.default_rng(0)
    p_logits = rng.normal(0, 1.5, (k + 1, V)).astype(np.float32)
    q_logits = rng.normal(0, 1.5, (k, V)).astype(np.float32)
    temp = 0.8
    # drafts drawn from the transformed q, as the engine draws them
    from lingjax.speculative import filtered_logits
    fq = filtered_logits(jnp.asarray(q_logits), jnp.full((k,), temp), jnp.full((k,), top_k), jnp.ones(k))
    fp = filtered_logits(jnp.asarray(p_logits), jnp.full((k + 1,), temp), jnp.full((k + 1,), top_k), jnp.ones(k + 1))
    P = np.asarray(jax.nn.softmax(fp, -1), np.float64)
    drafts = jax.random.categorical(jax.random.key(1), fq, shape=(N, k))
    R = jnp.full((N,), 1)
    toks, n_acc = jax.jit(accept)(
        jnp.broadcast_to(p_logits, (N, k + 1, V)), drafts.astype(jnp.int32), jnp.broadcast_to(q_logits, (N, k, V)),
        jnp.full((N,), k, jnp.int32), jnp.full((N,), temp, jnp.float32), R * top_k, jnp.ones(N, jnp.float32),
        jnp.arange(N, dtype=jnp.uint32), jnp.zeros(N, jnp.int32), jnp.zeros(N, jnp.int32))
    toks, n_acc = np.asarray(toks), np.asarray(n_acc)
    assert 0 < (n_acc == 0).sum() and 0 < (n_acc == k).sum()          # both paths taken
    for j in range(k + 1):
        emitted = n_acc >= j
        counts = np.bincount(toks[emitted, j], minlength=V).astype(float)
        stat, crit = gof(counts, P[j])
        assert stat < crit, (j, stat, crit, counts, P[j] * emitted.sum())
    # accepted drafts are the drafts themselves
    d = np.asarray(drafts)
    for j in range(k):
        m = n_acc > j
        assert (toks[m, j] == d[m, j]).all()
    # greedy: accept while draft == argmax p; then argmax p
    g_toks, g_acc = accept(jnp.asarray(p_logits)[None], jnp.asarray([[P[0].argmax(), (P[1].argmax() + 1) % V]]),
                           jnp.asarray(q_logits)[None], jnp.asarray([k]), jnp.zeros(1), jnp.zeros(1, jnp.int32),
                           jnp.ones(1), jnp.zeros(1, jnp.uint32), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    assert int(g_acc[0]) == 1 and list(np.asarray(g_toks[0, :2])) == [P[0].argmax(), P[1].argmax()]


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("spec"))
    write_tiny_checkpoint(d, tiny_config(num_hidden_layers=2), seed=0, dtype=np.float32, shards=1)   # linear, MLA
    return load_hf(d, dtype=jnp.float32, mtp=True)[1]


def engine(model, k, chunk=8, **kw):
    """max_tokens 2 (k + 1): the step's token budget is exactly two verifies, so each k compiles one step
    shape (prefill chunks then share steps with at most one verify, in chunks of at most k + 1)."""
    return Engine(model, max_batch=2, prefill_chunk=chunk, max_tokens=2 * (k + 1) if k else 8, max_len=96,
                  num_speculative_tokens=k, **kw)


@pytest.fixture(scope="module")
def prompts(model):
    rng = np.random.default_rng(4)
    return [rng.integers(3, model.cfg.vocab_size, n).tolist() for n in (1, 13, 5, 21, 2, 9)]


@pytest.fixture(scope="module")
def plain_greedy(model, prompts):
    sp = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (7, 12, 3, 9, 12, 1)]
    eng = engine(model, 0, overlap=False)
    return sp, eng.generate(prompts, sp), eng


def alone(eng, prompt, sp):
    """One request through add_request / step on an idle engine -> (its tokens, the linear-attention states
    its slot holds once it finished: the state after every token but the last, the one never fed)."""
    rid = eng.add_request(prompt, sp)
    toks, slot = [], None
    while True:
        outs = eng.step()
        slot = slot if slot is not None else next((r.slot for r in eng._running if r.id == rid), None)
        toks += [t for o in outs if o.request_id == rid for t in o.new_token_ids]
        if any(o.request_id == rid and o.finished for o in outs):
            return toks, [np.asarray(lin[slot]) for lin in eng.caches.linear]


@pytest.mark.parametrize("k,chunk", [(1, 3), (2, 8), (3, 5)])
def test_greedy_speculative_equals_plain_random_model(model, prompts, plain_greedy, k, chunk):
    """Random weights: the drafts are mostly rejected, so nearly every step rolls the linear state back. Then
    one request alone on each engine: the linear-attention state its slot ends with (verify rows through
    speculative.verify_linear, the accepted rows through the rollback's decode calls) is the plain engine's
    to float32 rounding (rel 1e-5: the k, v rows themselves come from matmuls over differently shaped
    batches, which XLA rounds differently by an ulp; the rollback's own arithmetic is checked bit for bit
    in test_rollback_is_the_decode_kernel_bit_for_bit)."""
    sp, ref, plain = plain_greedy
    eng = engine(model, k, chunk)
    assert eng.overlap is False
    out = eng.generate(prompts, sp)
    for o, r in zip(out, ref):
        assert o.token_ids == r.token_ids and o.finish_reason == r.finish_reason
    st = eng.stats()
    assert st["spec_drafts"] > 0 and 0 <= st["acceptance_rate"] <= 1 and 1 <= st["tokens_per_step"] <= k + 1
    one = SamplingParams(max_new_tokens=10, ignore_eos=True)
    want_toks, want = alone(plain, prompts[1], one)
    drafts = eng.stats()["spec_drafts"]
    got_toks, got = alone(eng, prompts[1], one)
    assert got_toks == want_toks and eng.stats()["spec_drafts"] > drafts
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_rollback_is_the_decode_kernel_bit_for_bit():
    """speculative.rollback_linear (after acceptance) leaves in each verify slot exactly the state that decoding
    its accepted rows 0..n_acc one by one with the decode kernel gives (bit for bit: it calls that kernel),
    leaves other slots alone; verify_linear's outputs are the decode kernel's outputs (float32, 1e-6)."""
    from lingjax.kernels.linear_attention import reference as ref
    from lingjax.speculative import rollback_linear, verify_linear
    rng = np.random.default_rng(0)
    R, n, H, D, scale = 3, 3, 4, 16, 0.25
    q, k, v = (jnp.asarray(rng.normal(0, 1, (R, n, H, D)), jnp.float32) for _ in range(3))
    g = jnp.asarray(-rng.uniform(0.01, 1, H), jnp.float32)
    pool = jnp.asarray(rng.normal(0, 1, (5, H, D, D)), jnp.float32)
    slots = jnp.asarray([3, 0, 4], jnp.int32)
    dec = jax.jit(lambda q, k, v, p: ref.decode(q, k, v, g, p, slots, jnp.zeros(R, bool), scale=scale))
    p, outs, states = pool, [], []
    for j in range(n):
        o, p = dec(q[:, j], k[:, j], v[:, j], p)
        outs.append(np.asarray(o))
        states.append(np.asarray(p))
    np.testing.assert_allclose(np.asarray(verify_linear(q, k, v, g, pool[slots], scale)), np.stack(outs, 1),
                               rtol=1e-6, atol=1e-6)
    n_acc = jnp.asarray([0, 2, 1], jnp.int32)
    verify = jnp.asarray([True, True, False])
    got = np.asarray(jax.jit(lambda p, n_acc, verify: rollback_linear(
        (p,), [(k, v, g, scale, "reference")], slots, n_acc, verify))(pool, n_acc, verify)[0])
    for r in range(R):
        want = states[int(n_acc[r])] if verify[r] else np.asarray(pool)
        np.testing.assert_array_equal(got[int(slots[r])], want[int(slots[r])])
    np.testing.assert_array_equal(got[[1, 2]], np.asarray(pool)[[1, 2]])


@pytest.fixture(scope="module")
def tiny():
    """The shipped tiny model (float32, with its trained MTP layer), its tokenizer and held-out examples."""
    from lingjax import evaluate as ev
    from lingjax.engine import load_model
    from tokenizers import Tokenizer
    _, m = load_model(TINY, jnp.float32, mtp=True)
    tok = Tokenizer.from_file(os.path.join(TINY, "tokenizer.json"))
    exs = [ex for t in ("add", "sort") for ex in ev.make_examples(t, 4)]
    return m, tok, exs


def test_greedy_speculative_tiny_model_answers(tiny):
    """The shipped tiny model's MTP layer is trained: most drafts are accepted (multi-token steps), and
    the answers are the model's greedy answers (held-out examples it answers correctly: README)."""
    m, tok, exs = tiny
    prompts = [tok.encode(p, add_special_tokens=False).ids for p, _ in exs]
    eng = Engine(m, max_batch=2, prefill_chunk=8, max_tokens=8, max_len=64, num_speculative_tokens=3)
    out = eng.generate(prompts, SamplingParams(max_new_tokens=12))
    assert [tok.decode(o.token_ids, skip_special_tokens=True) for o in out] == [a for _, a in exs]
    st = eng.stats()
    assert st["acceptance_rate"] > 0.5 and st["tokens_per_step"] > 1.5, st    # k = 3: drafts 2, 3 are weaker


def test_verify_paths_decode_kernels_same_tokens_and_states(tiny):
    """Engine(spec_verify=...) (speculative.VERIFY_PATHS) on the trained tiny model (drafts mostly accepted,
    so the rollback advances over accepted drafts): "mla_decode" (verify rows' MLA, main and MTP, through
    the paged decode kernel, a row per token) and "decode" (also the committed row's linear layers through
    the decode kernel, no prefill-kernel launch, the rollback over the drafts only) give the default path's
    answers, the same acceptance, and, "decode" against "mla_decode", the same linear states, MLA and MTP
    latents and drafts bit for bit (the CPU reference: verify_linear's arithmetic is the decode kernel's, and
    the rollback makes the same decode calls in the same order)."""
    m, tok, exs = tiny
    exs = exs[:2] + exs[4:6]
    prompts = [tok.encode(p, add_special_tokens=False).ids for p, _ in exs]
    got = {}
    for verify in ("mla_decode", "decode"):
        speculative.clear_compiled()        # other tests compiled these shapes ("decode" is the default): trace again
        eng = Engine(m, max_batch=2, prefill_chunk=8, max_tokens=8, max_len=64, num_speculative_tokens=3,
                     spec_verify=verify)
        out = eng.generate(prompts, SamplingParams(max_new_tokens=12))
        assert [tok.decode(o.token_ids, skip_special_tokens=True) for o in out] == [a for _, a in exs]
        assert any(s[0] == "spec+" + verify and s[2] for s in eng.compiled_shapes()), eng.compiled_shapes()
        got[verify] = eng.stats(), jax.tree.leaves((eng.caches, eng._spec.state))
    (sa, a), (sb, b) = got["mla_decode"], got["decode"]
    assert sa["acceptance_rate"] > 0.5 and (sa["spec_drafts"], sa["spec_accepted"]) == (sb["spec_drafts"],
                                                                                       sb["spec_accepted"])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_warm_up_compiles_every_speculative_step(model, prompts):
    """lingjax.server.warm_up on a speculative engine (k = 2, max_batch 3: a step budget of 9 tokens, not whole
    chunks of 8) whose decode-only steps take a verify path of their own (spec_verify="decode": executables
    apart from the prefill-shaped steps, per token bucket): afterwards greedy and drawn generation over a batch
    mix compiles nothing more. (Before session 7 the 9-token prefill-shaped steps and the decode-only steps
    carrying drafts compiled at first use.)"""
    from lingjax.server import compile_events, warm_up
    eng = Engine(model, max_batch=3, prefill_chunk=8, max_tokens=8, max_len=96, num_speculative_tokens=2,
                 spec_verify="decode")              # t_buckets 8 and 9
    warm_up(eng, threads=1)
    pre = compile_events()
    for temperature in (0.0, 1.0):
        eng.generate(prompts, SamplingParams(max_new_tokens=7, temperature=temperature, seed=1, ignore_eos=True))
    assert (compile_events() - pre)["compiles"] == 0
    assert any(s[0].startswith("spec+") and s[0].endswith("+decode") and s[2] for s in eng.compiled_shapes())


def test_sampling_distribution_matches_plain(model):
    """Joint distribution of the first two sampled tokens (temperature 1, top_k 3: at most 9 outcomes),
    700 seeds each, speculative (k = 2) vs plain: chi-square homogeneity."""
    prompt = [5, 17, 33]
    n = 700
    sp = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=3, seed=11, ignore_eos=True)
    plain = engine(model, 0, overlap=False).generate([prompt] * n, sp)
    spec = engine(model, 2).generate([prompt] * n, sp)
    a = [tuple(o.token_ids) for o in plain]
    b = [tuple(o.token_ids) for o in spec]
    assert len(set(a)) > 3
    stat, crit = homogeneity(a, b)
    assert stat < crit, (stat, crit)


def test_tensor_parallel_greedy_equals_plain(model, prompts, plain_greedy):
    """tp = 2 (simulated CPU devices): the whole speculative step in one shard_map; same tokens as the
    single-device plain engine (float32: the sharded sums differ from the unsharded ones by rounding
    only)."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py simulates 8 CPU devices)")
    sp, ref, _ = plain_greedy
    eng = engine(model, 3, 8, tp=2)
    assert eng.mesh is not None
    out = eng.generate(prompts, sp)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert eng.stats()["spec_drafts"] > 0


def test_rejected_drafts_leave_no_trace(model, prompts):
    """Logprobs the speculative engine computed for its own tokens (each from a verify step whose cache
    held rejected drafts before) == log_softmax of scoring the final sequence from scratch."""
    sp = SamplingParams(max_new_tokens=14, temperature=0.9, seed=3, ignore_eos=True, logprobs=0)
    eng = engine(model, 3, 5)
    outs = eng.generate(prompts[:4], sp)
    assert eng.stats()["spec_drafts"] > eng.stats()["spec_accepted"]          # some rejections happened
    seqs = [o.prompt_token_ids + o.token_ids for o in outs]
    scores = engine(model, 0, overlap=False).score(seqs)
    for o, s in zip(outs, scores):
        P = len(o.prompt_token_ids)
        ls = jax.nn.log_softmax(jnp.asarray(s), -1)
        want = [float(ls[P - 1 + i, t]) for i, t in enumerate(o.token_ids)]
        np.testing.assert_allclose(o.logprobs, want, atol=2e-4)


def test_bad_settings(model):
    with pytest.raises(EngineError, match="num_speculative_tokens"):
        Engine(model, num_speculative_tokens=-1)
    with pytest.raises(EngineError, match="spec_verify"):
        Engine(model, num_speculative_tokens=1, spec_verify="fast")
    _, no_mtp = load_hf(os.path.join(TINY), dtype=jnp.float32, mtp=False)
    with pytest.raises(EngineError, match="MTP layer"):
        Engine(no_mtp, num_speculative_tokens=1)


# ------------------------------------------------------------------------------------------ CLI, metrics
def test_cli_flags_and_score_mtp(tmp_path, capsys):
    """`--speculative-tokens` on generate and serve; `score --mtp` writes mtp_logits_i next to logits_i,
    equal to speculative.mtp_score (whose numerics tests/test_decoder.py checks against float64 numpy)."""
    import json
    from lingjax import cli
    from lingjax.engine import load_model
    from lingjax.speculative import mtp_score
    parser = cli.build_parser()
    assert parser.parse_args(["generate", "--prompt", "x", "--speculative-tokens", "3"]).speculative_tokens == 3
    assert parser.parse_args(["serve", "--speculative-tokens", "2"]).speculative_tokens == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--speculative-tokens", "-1"])
    from lingjax.speculative import VERIFY_PATHS
    for v in VERIFY_PATHS:                       # --spec-verify takes exactly Engine(spec_verify=)'s choices
        assert parser.parse_args(["serve", "--speculative-tokens", "1", "--spec-verify", v]).spec_verify == v
    assert parser.parse_args(["generate", "--prompt", "x"]).spec_verify == "decode"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--spec-verify", "fast"])
    seqs = [[5, 6, 7, 8, 9, 10], [20, 21]]
    (tmp_path / "t.json").write_text(json.dumps(seqs))
    out = tmp_path / "o.npz"
    assert cli.main(["score", "--model", TINY, "--tokens", str(tmp_path / "t.json"), "--out", str(out), "--mtp",
                     "--dtype", "float32", "--max-len", "64"]) == 0
    z = np.load(out)
    assert sorted(z) == ["logits_0", "logits_1", "mtp_logits_0", "mtp_logits_1"]
    _, m = load_model(TINY, jnp.float32, mtp=True)
    for i, want in enumerate(mtp_score(m, seqs)):
        assert z[f"mtp_logits_{i}"].dtype == np.float32 and z[f"mtp_logits_{i}"].shape == (len(seqs[i]), m.cfg.vocab_size)
        np.testing.assert_allclose(z[f"mtp_logits_{i}"], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_server_metrics_report_acceptance():
    from lingjax.server import Metrics

    class Loop:
        class engine:
            num_speculative_tokens, num_slots, num_pages = 2, 4, 16

        @staticmethod
        def stats():
            return dict(running=1, waiting=0, free_slots=3, free_pages=12, prefix_cache_hit_rate=0.0,
                        prefix_cache_hit_tokens=0, prefix_cache_query_tokens=0, prefix_cache_hits=0,
                        prefix_cache_pages=0, spec_drafts=10, spec_accepted=7, acceptance_rate=0.7,
                        tokens_per_step=2.4, steps=5, dispatches=5, host_seconds=0.01, wait_seconds=0.02,
                        compilations=3, compile_seconds=1.5)
    text = Metrics(Loop).render().decode()
    assert "lingjax_spec_acceptance_rate 0.7" in text and "lingjax_spec_tokens_per_step 2.4" in text
    assert "lingjax_spec_draft_tokens 10.0" in text and "lingjax_spec_accepted_tokens 7.0" in text


# ------------------------------------------------------------------------------------------ paged cache
def test_speculative_on_scattered_small_pages_and_prefix_cache():
    """The trained tiny model (drafts mostly accepted, so verify rows and drafts 2..k cross page
    boundaries): pages of 4 positions handed out in a shuffled order, with the prefix cache on and
    prompts sharing prefixes (second pass: hits). Greedy output equals plain greedy, and the drafts are
    the same as with one large page per request (same proposed / accepted counts): the MTP layer's paged
    latents are read back right across pages and from shared prefix pages."""
    from lingjax.engine import load_model
    _, m = load_model(TINY, jnp.float32, mtp=True)
    from lingjax import evaluate as ev
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(TINY, "tokenizer.json"))
    prompts = [tok.encode(p, add_special_tokens=False).ids for t in ("add", "sort") for p, _ in ev.make_examples(t, 2)]
    sp = SamplingParams(max_new_tokens=12)
    ref = Engine(m, max_batch=2, prefill_chunk=8, max_len=64, overlap=False).generate(prompts, sp)
    big = Engine(m, max_batch=2, prefill_chunk=8, max_tokens=8, max_len=64, num_speculative_tokens=3)
    want = big.generate(prompts, sp)
    small = Engine(m, max_batch=2, prefill_chunk=8, max_tokens=8, max_len=64, num_speculative_tokens=3,
                   page_size=4, page_shuffle_seed=3, prefix_cache=True, prefix_cache_states=8)
    for _ in range(2):
        small.reset_stats()
        got = small.generate(prompts, sp)
        assert [o.token_ids for o in got] == [o.token_ids for o in ref] == [o.token_ids for o in want]
        s, b = small.stats(), big.stats()
        assert (s["spec_drafts"], s["spec_accepted"]) == (b["spec_drafts"], b["spec_accepted"]), (s, b)
        assert b["acceptance_rate"] > 0.5, b
        # the last step's drafts and their MTP logits, by slot (the same slots in both engines)
        np.testing.assert_array_equal(np.asarray(small._spec.state.drafts), np.asarray(big._spec.state.drafts))
        np.testing.assert_allclose(np.asarray(small._spec.state.draft_logits),
                                   np.asarray(big._spec.state.draft_logits), rtol=1e-4, atol=1e-4)
    assert small.stats()["prefix_cache_hits"] > 0
    assert small.stats()["free_pages"] == small.num_pages - small.stats()["prefix_cache_pages"]


@pytest.mark.parametrize("verify", ["prefill", "decode"])
def test_engine_draft_is_the_mtp_head_at_the_last_row(model, plain_greedy, verify):
    """The draft a greedy step leaves for the next one (its MTP logits kept in SpecState) is the MTP head's
    output at the request's last committed row: speculative.mtp_score's row len - 2 of the final sequence
    (main-model hidden state there, embedding of the last token; tests/test_decoder.py checks mtp_score
    against float64 numpy). The step computes the MTP MoE at that row only (mtp_forward(rows=)), the MTP
    latents at every row: this checks both, through prefill chunks and verify steps. verify "decode"
    (speculative.VERIFY_PATHS): the verify steps are decode-only (MLA a row per token, the committed row's
    linear layers through the decode kernel), the last one's MTP attention ran at that row alone
    (mtp_forward(attend_rows=True)); random weights, so drafts are mostly rejected (the rollback), and the
    tokens are the plain engine's (also for one-token prompts)."""
    from lingjax.speculative import mtp_score
    prompt = np.random.default_rng(9).integers(3, model.cfg.vocab_size, 11).tolist()
    eng = engine(model, 1, 3, spec_verify=verify)
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    out = eng.generate([prompt], sp)[0]
    assert out.token_ids == plain_greedy[2].generate([prompt], sp)[0].token_ids
    assert eng.stats()["spec_drafts"] >= 4
    seq = prompt + out.token_ids
    want = mtp_score(model, [seq])[0][len(seq) - 2]
    got = np.asarray(eng._spec.state.draft_logits)[0, 0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert int(np.asarray(eng._spec.state.drafts)[0, 0]) == int(np.argmax(want))
    # one-token prompts: their first step is decode-only too, from fresh (zero) linear states
    two = [prompt[:1], prompt[5:6]]
    assert [o.token_ids for o in eng.generate(two, sp)] == [o.token_ids for o in plain_greedy[2].generate(two, sp)]


def test_mla_attention_at_rows_equals_the_whole_batch_at_those_rows(model):
    """MLA.step_paged(rows=) (the MTP layer's attention with speculative.VERIFY_PATHS other than "prefill"): in a
    mixed packed batch (a prefill chunk and two decoding requests), the latents written are the whole-batch
    step's, bit for bit, and the outputs at the chosen rows equal the whole batch's there (float32, 1e-5: the
    decode kernel against the prefill one)."""
    from lingjax.batch import StepBatch
    from lingjax.cache import contiguous_page_table
    att = next(l for l in model.layers if l.is_mla).attention
    rng = np.random.default_rng(3)
    lens, starts = [5, 1, 1], [0, 7, 12]                  # tokens this step, positions already cached
    T, R, ps, max_len = 8, 3, 4, 32
    pos = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)] + [np.zeros(T - sum(lens), int)])
    seq = np.concatenate([np.full(n, i) for i, n in enumerate(lens)] + [np.full(T - sum(lens), R)])
    batch = StepBatch(tokens=jnp.zeros(T, jnp.int32), positions=jnp.asarray(pos, jnp.int32),
                      token_seq=jnp.asarray(seq, jnp.int32), slots=jnp.arange(R, dtype=jnp.int32),
                      cu_seqlens=jnp.asarray(np.cumsum([0] + lens), jnp.int32), fresh=jnp.asarray([True, False, False]),
                      page_table=jnp.asarray(contiguous_page_table(R, max_len, ps)))
    pages = jnp.asarray(rng.normal(0, 1, (R * max_len // ps, ps, att.latent_dim)), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (T, model.cfg.hidden_size)), jnp.float32)
    rows = jnp.asarray([4, 5, 6], jnp.int32)               # each request's last row
    full, p_full = jax.jit(lambda x, p: att.step_paged(x, batch, p))(x, pages)
    some, p_some = jax.jit(lambda x, p: att.step_paged(x, batch, p, rows=rows))(x, pages)
    np.testing.assert_array_equal(np.asarray(p_some), np.asarray(p_full))
    np.testing.assert_allclose(np.asarray(some), np.asarray(full)[np.asarray(rows)], rtol=1e-5, atol=1e-5)


def test_server_warm_up_runs_greedy_and_drawing_steps(model):
    """A speculative step is compiled greedy-only or drawing (a static choice: no lax.cond on the device),
    so the server's warm_up runs every bucket's sampling step at temperature 0 and 1 (generate recorded,
    not run: this checks the shapes warm_up asks for, without compiling them)."""
    from lingjax.server import warm_up
    eng = Engine(model, max_batch=2, prefill_chunk=3, max_tokens=16, max_len=96, num_speculative_tokens=1)
    calls = []
    eng.generate = lambda prompts, sp: calls.append((tuple(map(len, prompts)), sp.temperature))
    warm_up(eng)
    assert len(eng.t_buckets) > 1
    drawn = {lens for lens, t in calls if t > 0}
    sampled_steps = {lens for lens, t in calls if t == 0 and all(n <= 3 for n in lens)}   # not prefill-only
    assert sampled_steps and sampled_steps <= drawn, (calls, eng.t_buckets)
