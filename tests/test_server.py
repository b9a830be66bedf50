"""`lingjax serve` (lingjax/server.py) against a live server on checkpoints/ling-tiny, through the official
`openai` client: completions and chat, streamed and not, stop strings, seeds, logprobs, 64 concurrent
clients each answered as the offline `Engine.generate` answers, a disconnecting client freeing its slot,
bad requests answered 4xx while the server keeps serving, and SIGTERM shutting a real `lingjax serve`
process down gracefully (exit 0).

The in-process server runs uvicorn on a thread (127.0.0.1, a free port); the offline reference engine has
the same shapes, so it reuses the server engine's compiled steps. float32 weights: greedy answers of the
server and of the offline engine are compared exactly."""
import asyncio
import json
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

from lingjax.engine import Engine, EngineError, SamplingParams, load_model
from lingjax.engine_loop import EngineLoop
from lingjax.server import compile_events, create_app, serving_shapes, warm_up
from lingjax.tokenizer import Tokenizer

CKPT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "checkpoints", "ling-tiny"))
NAME = "ling-tiny"
ENGINE = dict(max_batch=8, prefill_chunk=16, max_len=256, max_tokens=64)   # step buckets T = 8, 16, 32, 64
TIMEOUT = 60


@pytest.fixture(scope="module")
def model():
    return load_model(CKPT, jnp.float32)[1]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(CKPT)


@pytest.fixture(scope="module")
def served(model, tok):
    """(base_url, engine loop) of a live server; always shut down."""
    engine = Engine(model, **ENGINE)
    shapes = serving_shapes(engine)
    assert engine.precompile(shapes, threads=2) == len(shapes) == 4 + 3 + 2   # T buckets; "" at 16/32/64; decode
    pre = compile_events()
    warm_up(engine)                                               # every step shape serving can hit
    # the warm-up's requests ran every kind of step on the precompiled steps: not one XLA compilation
    # (precompile filled the jit cache that the steps look up; a mismatched argument would recompile)
    assert (compile_events() - pre)["compiles"] == 0
    engine.warm_shapes = dict(engine.compiled_shapes())
    loop = EngineLoop(engine)
    app = create_app(loop, tok, model_name=NAME)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", loop
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive()
        assert not loop.running                      # the app's shutdown stopped the engine loop


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def offline(model):
    return Engine(model, **ENGINE)


def greedy(offline, tok, prompts, max_tokens):
    outs = offline.generate([tok.encode(p) for p in prompts],
                            [SamplingParams(max_new_tokens=m, stop_token_ids=tok.eos_token_ids) for m in max_tokens])
    return [(tok.decode(o.token_ids), o.finish_reason, len(o.token_ids)) for o in outs]


def metric(base, name):
    text = httpx.get(base + "/metrics", timeout=TIMEOUT).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_idle(loop, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = loop.stats()
        if s["running"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.01)
    raise AssertionError(f"requests still in flight: {loop.stats()}")


# --------------------------------------------------------------------------------------------- basics
def test_models_health_metrics(served, client):
    base, _ = served
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    assert httpx.get(base + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    text = httpx.get(base + "/metrics", timeout=TIMEOUT).text
    for name in ("lingjax_num_requests_running", "lingjax_num_requests_waiting", "lingjax_cache_usage_ratio",
                 "lingjax_prompt_tokens_total", "lingjax_generation_tokens_total",
                 "lingjax_time_to_first_token_seconds_bucket", "lingjax_inter_token_latency_seconds_bucket"):
        assert name in text
    engine = served[1].engine
    assert f"lingjax_engine_compilations {float(engine.compile_count)}" in text
    assert "lingjax_engine_steps" in text and "lingjax_engine_wait_seconds" in text
    assert engine.precompile(serving_shapes(engine)) == 0                     # all traced already
    with pytest.raises(EngineError, match="not a step shape"):
        engine.precompile([("sample", 12, False)])


def test_completion_and_chat_greedy(client, offline, tok):
    (want, reason, n), = greedy(offline, tok, ["123+45="], [8])
    assert want == "168" and reason == "stop"                    # the tiny model's answer, then <eos>
    r = client.completions.create(model=NAME, prompt="123+45=", max_tokens=8, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, n)

    # streamed: the same text, piece by piece; the last chunk carries the finish reason, then usage
    chunks = list(client.completions.create(model=NAME, prompt="123+45=", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == n

    # chat: the checkpoint's template (the messages' contents, concatenated)
    (want, _, n), = greedy(offline, tok, ["sort:hello="], [12])
    msgs = [{"role": "user", "content": "sort:hello="}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want == "ehllo" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == n
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings(client):
    r = client.completions.create(model=NAME, prompt="sort:hello=", max_tokens=12, temperature=0, stop=["ll", "q"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("eh", "stop")
    chunks = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "sort:hello="}],
                                                 max_tokens=12, temperature=0, stop="lo", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "ehl"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # max_tokens reached before the stop string: "length"
    r = client.completions.create(model=NAME, prompt="sort:hello=", max_tokens=2, temperature=0, stop=["o"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("eh", "length")


def test_seed_reproducible_and_equal_to_offline(client, offline, tok):
    kw = dict(model=NAME, prompt="ab:", max_tokens=24, temperature=1.3, top_p=0.95, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, n=2, **kw)
    b = client.completions.create(seed=7, n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text                # choices of one request differ
    others = {client.completions.create(seed=s, **kw).choices[0].text for s in (8, 9)}
    assert others != {a.choices[0].text}
    ref = offline.generate([tok.encode("ab:")], SamplingParams(max_new_tokens=24, temperature=1.3, top_p=0.95,
                                                               seed=7, ignore_eos=True))[0]
    assert a.choices[0].text == tok.decode(ref.token_ids)         # choice 0 = the offline run, same seed


def test_logprobs(client, offline, tok):
    r = client.completions.create(model=NAME, prompt="12+34=", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert "".join(lp.tokens) == text and lp.text_offset == list(range(len(text)))
    # the engine's logprobs (tests/test_engine.py checks them against log_softmax of score()'s logits)
    ref = offline.generate([tok.encode("12+34=")], SamplingParams(max_new_tokens=6, logprobs=3,
                                                                   stop_token_ids=tok.eos_token_ids))[0]
    n = len(text)
    assert lp.token_logprobs == pytest.approx(ref.logprobs[:n], abs=1e-6)
    for j in range(n):
        top = lp.top_logprobs[j]
        assert list(top.items()) == [(tok.token_text(t), pytest.approx(v, abs=1e-6)) for t, v in ref.top_logprobs[j]]
        assert lp.tokens[j] == next(iter(top)) and lp.token_logprobs[j] == top[lp.tokens[j]]   # greedy: the top one

    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "12+34="}], max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               and e.logprob == e.top_logprobs[0].logprob and e.bytes == list(e.token.encode()) for e in content)


def test_64_concurrent_clients_equal_offline(served, offline, tok):
    rng = random.Random(0)
    prompts = ["".join(rng.choice(string.ascii_lowercase + string.digits + "+=:;") for _ in range(rng.randint(1, 120)))
               for _ in range(64)]
    max_tokens = [rng.randint(1, 24) for _ in prompts]
    want = greedy(offline, tok, prompts, max_tokens)

    async def run():
        c = openai.AsyncOpenAI(base_url=served[0] + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)

        async def one(p, m, stream):
            if not stream:
                r = await c.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0)
                return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
            text, reason, usage = "", None, None
            async for ch in await c.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0, stream=True,
                                                       stream_options={"include_usage": True}):
                if ch.choices:
                    text += ch.choices[0].text
                    reason = ch.choices[0].finish_reason or reason
                usage = ch.usage or usage
            return text, reason, usage.completion_tokens
        try:
            return await asyncio.gather(*(one(p, m, i % 2) for i, (p, m) in enumerate(zip(prompts, max_tokens))))
        finally:
            await c.close()

    got = asyncio.run(run())
    assert got == want
    wait_idle(served[1])
    engine = served[1].engine              # serving (prompts longer than a chunk, mixed steps) compiled nothing
    assert {k: v for k, v in engine.compiled_shapes().items() if "top" not in k[0]} == engine.warm_shapes
    assert ("sample", 64, False) in engine.warm_shapes and ("", 64, False) in engine.warm_shapes
    R = engine.max_batch
    assert ("greedy", R, True) in engine.warm_shapes and ("sample", R, True) in engine.warm_shapes


# --------------------------------------------------------------------------------------------- disconnects
ABORTS = 'lingjax_requests_finished_total{finish_reason="abort"}'


def test_disconnect_frees_the_slot(served):
    base, loop = served
    text = httpx.get(base + "/metrics", timeout=TIMEOUT).text
    aborts = metric(base, ABORTS) if ABORTS in text else 0
    body = {"model": NAME, "prompt": "ab", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    # On a loaded 2-core machine the engine thread can emit all 200 tokens before this thread reads the third
    # event (seen once in CI): then the request ended normally, nothing was aborted, and the drop is tried again.
    for _ in range(5):
        with httpx.Client(timeout=TIMEOUT) as h:
            with h.stream("POST", base + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                events = 0
                for line in r.iter_lines():
                    events += line.startswith("data: ")
                    if events == 3:
                        break
                live = loop.stats()["running"] == 1
            # the response is closed: the connection drops mid-stream
        wait_idle(loop, 2.0)
        if live:
            break
    assert live
    assert metric(base, ABORTS) == aborts + 1
    assert metric(base, "lingjax_num_requests_running") == 0 and metric(base, "lingjax_cache_usage_ratio") == 0

    # a non-streaming request whose client goes away: raw socket, close before the answer
    port = int(base.rsplit(":", 1)[1])
    payload = json.dumps(dict(body, stream=False)).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        deadline = time.monotonic() + TIMEOUT
        while loop.stats()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_idle(loop, 2.0)
    assert metric(base, ABORTS) == aborts + 2


# --------------------------------------------------------------------------------------------- bad requests
BAD = [
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found"),
    ("/v1/completions", {"model": NAME, "prompt": "x" * 300}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 255}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 0}, 400, "n must be"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 9999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt 0 is empty"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "stop": ["a"] * 17}, 400, "stop"),
]


@pytest.mark.parametrize("path,body,status,match", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_request_then_served(served, client, path, body, status, match):
    r = httpx.post(served[0] + path, json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and match in json.dumps(err), err
    assert client.completions.create(model=NAME, prompt="1+1=", max_tokens=4, temperature=0).choices[0].text == "2"


def test_bad_json_and_openai_client_errors(served, client):
    r = httpx.post(served[0] + "/v1/completions", content=b"{not json", timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|maximum context length"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "y" * 400}])


# --------------------------------------------------------------------------------------------- the CLI
def test_serve_cli_sigterm_finishes_in_flight_then_exits_0(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                                      + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.Popen([sys.executable, "-m", "lingjax.cli", "serve", "--model", CKPT, "--port", "0",
                             "--dtype", "float32", "--max-batch", "1", "--max-len", "128", "--prefill-chunk", "8", "--no-warmup"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "lingjax serve did not start"
            line = proc.stderr.readline()
            m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line)
            url = m and m.group(1)
        c = openai.OpenAI(base_url=url, api_key="none", timeout=TIMEOUT, max_retries=0)
        stream = iter(c.completions.create(model=CKPT, prompt="ab", max_tokens=100, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        next(stream)                                              # in flight
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-2].choices[0].finish_reason == "length"      # finished, not cut
        assert rest[-1].usage.completion_tokens == 100
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_cli_bad_setup_is_one_line(capsys):
    from lingjax import cli
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cases = [(["--model", CKPT, "--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                 (["--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
                 (["--model", os.path.dirname(CKPT)], "config.json")]
        for argv, want in cases:
            assert cli.main(["serve"] + argv) == 1                # before any weights load
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("lingjax: error: ") and want in err[0], err
