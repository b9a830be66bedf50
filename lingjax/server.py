"""An OpenAI-compatible HTTP server over the engine (`lingjax serve`).

    app = create_app(EngineLoop(engine), tokenizer, model_name="ling-tiny")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streamed as server-sent
events with `"stream": true`, or answered whole), GET /health, GET /metrics (Prometheus text format).

This module is the HTTP layer only: it turns a request into token ids (lingjax.tokenizer: chat template,
encoding), submits one engine request per choice to the `EngineLoop` (the engine's thread-safe driver, whose
background thread steps the engine), and turns the tokens that come back into text (incremental
detokenization, stop strings) and JSON. Scheduling, batching, sampling and logprobs are the engine's.

Choices made where the OpenAI API leaves room (as vLLM does unless noted):
- Sampling parameters: temperature (default 1.0), top_p, top_k (an extension; 0 or -1 = off), seed, n,
  max_tokens (completions: default 16; chat: `max_completion_tokens` or `max_tokens`, default until the
  context is full), stop (strings; the text ends before the first one and the reply is cut there),
  `ignore_eos` (extension). Without a seed, a request draws a random one. Choice i samples with the
  engine's key (seed, sample_index=i): a request with a seed is reproducible whatever else the server
  runs, and its first choice equals the offline `Engine.generate` of the same prompt and seed.
- Context: the prompt plus max_tokens must fit the context (max_len), else 400 (code
  "context_length_exceeded").
- Unsupported parameters that change the output (penalties, logit_bias, echo, suffix, best_of > n,
  response_format other than text, forced tool calls) get a 400 naming them instead of being ignored.
  Tools are passed to the chat template; tool calls in the reply are not parsed (the reply is text).
- Logprobs: completions `logprobs: k` (0..20) gives the sampled token's logprob and the top k; chat
  `logprobs: true` with `top_logprobs: k`. Values are the engine's log_softmax of the raw logits (before
  temperature / top-k / top-p). A stop token (EOS) counts in `usage.completion_tokens` but adds no text
  and no logprob entry.
- Errors: OpenAI's body {"error": {"message", "type", "param", "code"}}; 400 for bad parameters, 404 for an
  unknown model, 503 while shutting down.
- A client that disconnects (streaming or not) has its engine requests aborted at once, freeing their slots.
- Shutdown (SIGTERM, through uvicorn): no new connections; requests in flight finish (up to the server's
  graceful-shutdown timeout, then they are aborted), then the engine loop stops.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from lingjax.engine import EngineError, SamplingParams
from lingjax.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20
MAX_N = 64
MAX_STOP = 16


# --------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An OpenAI-style error answer: status, message, type, param, code."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


# --------------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")     # unknown fields are ignored, like OpenAI's `user`

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------- metrics
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    """Prometheus metrics of one server (its own registry: several apps in one process do not mix)."""

    def __init__(self, loop):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        Gauge("lingjax_num_requests_running", "Engine requests holding a cache slot", registry=r) \
            .set_function(lambda: loop.stats()["running"])
        Gauge("lingjax_num_requests_waiting", "Engine requests queued for a slot", registry=r) \
            .set_function(lambda: loop.stats()["waiting"])
        Gauge("lingjax_cache_usage_ratio", "Cache slots in use / total slots", registry=r) \
            .set_function(lambda: 1.0 - loop.stats()["free_slots"] / loop.engine.num_slots)
        if getattr(loop.engine, "num_speculative_tokens", 0):        # speculative decoding (--speculative-tokens)
            Gauge("lingjax_spec_draft_tokens", "MTP draft tokens proposed to the main model", registry=r) \
                .set_function(lambda: loop.stats()["spec_drafts"])
            Gauge("lingjax_spec_accepted_tokens", "MTP draft tokens the main model accepted", registry=r) \
                .set_function(lambda: loop.stats()["spec_accepted"])
            Gauge("lingjax_spec_acceptance_rate", "Accepted / proposed draft tokens", registry=r) \
                .set_function(lambda: loop.stats()["acceptance_rate"])
            Gauge("lingjax_spec_tokens_per_step", "Tokens emitted per verify step of one request (1 .. k+1)",
                  registry=r).set_function(lambda: loop.stats()["tokens_per_step"])
        Gauge("lingjax_kv_cache_pages_usage_ratio", "MLA cache pages held (by requests or the prefix cache) / total",
              registry=r).set_function(lambda: 1.0 - loop.stats()["free_pages"] / loop.engine.num_pages)
        Gauge("lingjax_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up",
              registry=r).set_function(lambda: loop.stats()["prefix_cache_hit_rate"])
        Gauge("lingjax_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache (total)",
              registry=r).set_function(lambda: loop.stats()["prefix_cache_hit_tokens"])
        Gauge("lingjax_prefix_cache_query_tokens", "Prompt tokens of the requests looked up in the prefix cache (total)",
              registry=r).set_function(lambda: loop.stats()["prefix_cache_query_tokens"])
        Gauge("lingjax_prefix_cache_hits", "Requests that resumed from the prefix cache (total)",
              registry=r).set_function(lambda: loop.stats()["prefix_cache_hits"])
        Gauge("lingjax_prefix_cache_pages", "MLA cache pages the prefix cache holds", registry=r) \
            .set_function(lambda: loop.stats()["prefix_cache_pages"])
        for key, name, doc in (     # the engine's step counters (totals; a load generator takes differences)
                ("steps", "lingjax_engine_steps", "Engine steps run (a multi-step decode window counts its steps)"),
                ("dispatches", "lingjax_engine_dispatches", "Jitted step calls (one per step or window)"),
                ("host_seconds", "lingjax_engine_host_seconds", "Host time scheduling, packing and dispatching "
                                                                 "steps (steps that compiled excluded)"),
                ("wait_seconds", "lingjax_engine_wait_seconds", "Host time blocked on the device for step results"),
                ("compilations", "lingjax_engine_compilations", "Step shapes compiled (warm-up included)"),
                ("compile_seconds", "lingjax_engine_compile_seconds", "Host time of the steps that compiled "
                                                                       "(after the warm-up: a stall of serving)")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: loop.stats()[key])
        self.prompt_tokens = Counter("lingjax_prompt_tokens", "Prompt tokens submitted to the engine", registry=r)
        self.generation_tokens = Counter("lingjax_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("lingjax_requests_finished", "Choices finished, by finish reason (stop, length, abort)",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("lingjax_time_to_first_token_seconds", "Time from arrival to a choice's first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lingjax_inter_token_latency_seconds", "Time between two tokens of a choice",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lingjax_e2e_request_latency_seconds", "Time from arrival to a choice's last token",
                             buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------- one choice
@dataclass
class _Choice:
    """One engine request and the text made of its tokens."""
    index: int
    sample_index: int                             # the engine's sampling-key index: choice i of a request
    prompt_ids: list[int]
    params: SamplingParams
    stream: Any                                   # tokenizer.TextStream
    stop_ids: frozenset
    request_id: str | None = None
    tokens: int = 0                               # generated tokens (usage), stop token included
    finish_reason: str | None = None
    first: float | None = None
    last: float | None = None
    logprobs: list = field(default_factory=list)  # (token text, logprob, [(text, logprob)], text offset)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class _Generation:
    """The engine requests of one HTTP request: submits them, turns their outputs into text deltas."""

    def __init__(self, server: "_Server", choices: list[_Choice], n: int, want_logprobs: bool):
        self.server, self.choices, self.n, self.want_logprobs = server, choices, n, want_logprobs
        self.arrival = time.perf_counter()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def submit(self) -> None:
        s = self.server
        try:
            for c in self.choices:
                def on_output(out, c=c):          # called on the engine loop's thread
                    try:
                        self.loop.call_soon_threadsafe(self.queue.put_nowait, (c, out))
                    except RuntimeError:          # the event loop is closed: nobody is listening
                        pass
                c.request_id = s.loop.submit(c.prompt_ids, c.params, on_output, sample_index=c.sample_index)
                s.metrics.prompt_tokens.inc(len(c.prompt_ids))
        except EngineError as e:
            self.abort()
            raise APIError(str(e)) from None

    def abort(self) -> None:
        """Abort every unfinished choice (the client is gone): their slots free at once."""
        for c in self.choices:
            if c.request_id is not None and not c.done:
                self.server.loop.abort(c.request_id)
                c.finish_reason = "abort"
                self.server.metrics.finished.labels("abort").inc()

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)

    async def next(self) -> tuple[_Choice, str, list]:
        """Wait for the next engine output -> (choice, new text, new logprob entries)."""
        c, out = await self.queue.get()
        return (c,) + self._apply(c, out)

    def _apply(self, c: _Choice, out) -> tuple[str, list]:
        if c.done:                                   # outputs after a stop string cut the choice
            return "", []
        m, now = self.server.metrics, time.perf_counter()
        ids = list(out.new_token_ids)
        if ids:
            if c.first is None:
                c.first = now
                m.ttft.observe(now - self.arrival)
            else:
                gap = (now - c.last) / len(ids)
                for _ in ids:
                    m.itl.observe(gap)
            c.last = now
        text, entries = "", []
        for j, t in enumerate(ids):
            c.tokens += 1
            m.generation_tokens.inc()
            if out.finished and out.finish_reason == "stop" and j == len(ids) - 1 and t in c.stop_ids:
                break                                # the EOS: counted, no text
            offset = len(c.stream.text) + len(c.stream.pending)
            piece, stopped = c.stream.add([t])
            text += piece
            if self.want_logprobs and out.new_logprobs is not None:
                tops = out.new_top_logprobs[j] if out.new_top_logprobs is not None else []
                tok = self.server.tokenizer.token_text
                entries.append((tok(t), float(out.new_logprobs[j]), [(tok(i), float(lp)) for i, lp in tops], offset))
            if stopped:
                c.finish_reason = "stop"
                self.server.loop.abort(c.request_id)
                break
        if not c.done and out.finished:
            text += c.stream.finish()
            c.finish_reason = out.finish_reason
        if c.done:
            m.finished.labels(c.finish_reason).inc()
            m.e2e.observe(now - self.arrival)
        c.logprobs += entries
        return text, entries


# --------------------------------------------------------------------------------------------- the app
class _Server:
    def __init__(self, loop, tokenizer: Tokenizer, model_name: str, max_len: int, vocab_size: int, metrics: Metrics):
        self.loop, self.tokenizer, self.model_name = loop, tokenizer, model_name
        self.max_len, self.vocab_size, self.metrics = max_len, vocab_size, metrics
        self.created = int(time.time())
        self.shutting_down = False


def create_app(loop, tokenizer: Tokenizer, *, model_name: str, model_aliases: tuple[str, ...] = (),
               start_loop: bool = True) -> FastAPI:
    """The FastAPI app serving `loop` (an EngineLoop; its engine gives max_len and the stats). The app
    starts the loop's thread on startup (unless start_loop=False) and stops it on shutdown."""
    engine = loop.engine
    server = _Server(loop, tokenizer, model_name, engine.max_len, engine.cfg.vocab_size, Metrics(loop))
    names = {model_name, *model_aliases}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start_loop:
            loop.start()
        try:
            yield
        finally:
            server.shutting_down = True
            loop.stop()
            log.info("engine loop stopped")

    app = FastAPI(title="lingjax", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
        msg = f"{where}: {err.get('msg', 'invalid request')}" if where else err.get("msg", "invalid request body")
        return APIError(msg, param=where).response()

    @app.get("/health")
    async def health():
        if server.shutting_down or not loop.running:
            return JSONResponse(status_code=503, content={"status": "unavailable"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "lingjax", "max_model_len": server.max_len}]}

    def check_model(name):
        if name not in names:
            raise APIError(f"The model `{name}` does not exist (this server serves `{model_name}`)", 404,
                           param="model", code="model_not_found")
        if server.shutting_down:
            raise APIError("the server is shutting down", 503, type="service_unavailable")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        _unsupported(body, echo=body.echo, suffix=body.suffix, best_of=body.best_of not in (None, body.n))
        _check_range("logprobs", body.logprobs, 0, MAX_LOGPROBS)
        prompts = _completion_prompts(body.prompt, tokenizer, server.vocab_size)
        choices = []
        for p, ids in enumerate(prompts):
            choices += _choices(server, body, ids, body.max_tokens, body.logprobs, first_index=p * body.n,
                                param="prompt")
        gen = _Generation(server, choices, body.n, want_logprobs=body.logprobs is not None)
        return await _respond(request, gen, body, _completion_format(server, body))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        check_model(body.model)
        fmt = (body.response_format or {}).get("type", "text")
        _unsupported(body, response_format=fmt != "text",
                     tool_choice=body.tool_choice not in (None, "auto", "none"))
        _check_range("top_logprobs", body.top_logprobs, 0, MAX_LOGPROBS)
        if body.top_logprobs and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        if not body.messages:
            raise APIError("messages must hold at least one message", param="messages")
        messages = [_message(m, i) for i, m in enumerate(body.messages)]
        extra = body.chat_template_kwargs or {}
        reserved = sorted(set(extra) & {"messages", "conversation", "tools", "add_generation_prompt", "tokenize",
                                        "return_dict", "continue_final_message", "chat_template"})
        if reserved:
            raise APIError(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        try:
            ids = tokenizer.encode_chat(messages, tools=body.tools, add_generation_prompt=body.add_generation_prompt,
                                        **extra)
        except TokenizerError as e:
            raise APIError(str(e), param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        choices = _choices(server, body, ids, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                           param="messages")
        gen = _Generation(server, choices, body.n, want_logprobs=body.logprobs)
        return await _respond(request, gen, body, _chat_format(server, body))

    return app


# --------------------------------------------------------------------------------------------- request checks
def _unsupported(body, **flags):
    for name, bad in flags.items():
        if bad:
            raise APIError(f"{name} is not supported by this server", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(f"{name} is not supported by this server (only 0)", param=name)
    if body.repetition_penalty not in (None, 1, 1.0):
        raise APIError("repetition_penalty is not supported by this server (only 1)", param="repetition_penalty")
    if body.logit_bias:
        raise APIError("logit_bias is not supported by this server", param="logit_bias")


def _check_range(name, v, lo, hi):
    if v is not None and not lo <= v <= hi:
        raise APIError(f"{name} must be in [{lo}, {hi}], got {v}", param=name)


def _message(m: dict, i: int) -> dict:
    """An OpenAI message -> the dict the chat template sees (content parts joined into one string)."""
    if not isinstance(m.get("role"), str):
        raise APIError(f"messages[{i}] has no role", param=f"messages.{i}.role")
    m = dict(m)
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(f"messages[{i}]: only text content parts are supported", param=f"messages.{i}.content")
            parts.append(part["text"])
        m["content"] = "".join(parts)
    elif content is None:
        m["content"] = ""
    elif not isinstance(content, str):
        raise APIError(f"messages[{i}].content must be a string or a list of text parts", param=f"messages.{i}.content")
    return m


def _completion_prompts(prompt, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif prompt and all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise APIError("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids (non-empty)", param="prompt")
    for i, ids in enumerate(prompts):
        if not ids:
            raise APIError(f"prompt {i} is empty", param="prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab_size})", param="prompt")
    return prompts


def _choices(server: _Server, body, ids: list[int], max_tokens, logprobs, *, first_index=0, param) -> list[_Choice]:
    """Validated SamplingParams -> one _Choice per `n`."""
    if not 1 <= body.n <= MAX_N:
        raise APIError(f"n must be in [1, {MAX_N}], got {body.n}", param="n")
    room = server.max_len - len(ids)
    if room < 1:
        raise APIError(f"This model's maximum context length is {server.max_len} tokens; the prompt has {len(ids)} "
                       f"tokens (no room for one new token)", param=param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 1:
        raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if max_tokens > room:
        raise APIError(f"This model's maximum context length is {server.max_len} tokens; the prompt has {len(ids)} "
                       f"tokens and max_tokens asks for {max_tokens} more", param="max_tokens",
                       code="context_length_exceeded")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise APIError(f"stop must be at most {MAX_STOP} non-empty strings", param="stop")
    top_k = body.top_k if body.top_k is not None else 0
    if top_k == -1:
        top_k = 0
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    eos = server.tokenizer.eos_token_ids
    out = []
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    for i in range(body.n):
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop_token_ids=eos, ignore_eos=body.ignore_eos, logprobs=logprobs)
        try:
            params.validate()
            check = getattr(server.loop.engine, "check_request", None)
            if check is not None:          # the engine's own checks, before anything is submitted
                check(ids, params)
        except EngineError as e:
            raise APIError(str(e), param=str(e).split(" ")[0]) from None
        out.append(_Choice(first_index + i, i, ids, params, server.tokenizer.text_stream(ids, stop),
                           frozenset() if body.ignore_eos else frozenset(eos)))
    return out


# --------------------------------------------------------------------------------------------- answers
async def _respond(request: Request, gen: _Generation, body, fmt):
    if body.stream:               # submitted by the stream itself: a stream that never starts holds no slot
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(gen, fmt, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    gen.submit()
    collect = asyncio.ensure_future(_collect(gen))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():          # the client left (or the server is cancelling): free the slots
            collect.cancel()
            gen.abort()
            log.info("client disconnected; aborted %d engine request(s)", len(gen.choices))
    texts = collect.result()
    return fmt.whole(gen, texts)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(gen: _Generation) -> dict[int, str]:
    texts = {c.index: "" for c in gen.choices}
    while not gen.finished:
        c, text, _ = await gen.next()
        texts[c.index] += text
    return texts


async def _sse(gen: _Generation, fmt, include_usage: bool):
    try:
        try:
            gen.submit()
        except APIError as e:      # e.g. the server began shutting down after the request was checked
            yield _event({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            return
        for chunk in fmt.stream_start(gen):
            yield _event(chunk)
        while not gen.finished:
            c, text, entries = await gen.next()
            for chunk in fmt.stream_delta(gen, c, text, entries, include_usage):
                yield _event(chunk)
        if include_usage:
            yield _event(fmt.usage_chunk(gen))
        yield "data: [DONE]\n\n"
    finally:
        if not gen.finished:            # the client disconnected, or the server cancelled the stream
            gen.abort()
            log.info("stream closed early; aborted its engine request(s)")


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(gen: _Generation) -> dict:
    prompt = sum(len(c.prompt_ids) for c in gen.choices if c.index % gen.n == 0)     # each prompt once
    completion = sum(c.tokens for c in gen.choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _completion_format:
    def __init__(self, server, body):
        self.server, self.body = server, body
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _logprobs(self, entries):
        if self.body.logprobs is None:
            return None
        return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
                "top_logprobs": [dict(e[2]) for e in entries], "text_offset": [e[3] for e in entries]}

    def _chunk(self, choices, usage=None, with_usage=False):
        d = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.server.model_name,
             "choices": choices}
        if with_usage:
            d["usage"] = usage
        return d

    def whole(self, gen, texts):
        choices = [{"index": c.index, "text": texts[c.index], "logprobs": self._logprobs(c.logprobs),
                    "finish_reason": _reason(c)} for c in sorted(gen.choices, key=lambda c: c.index)]
        return self._chunk(choices, _usage(gen), True)

    def stream_start(self, gen):
        return []

    def stream_delta(self, gen, c, text, entries, include_usage):
        if not (text or entries or c.done):
            return []
        return [self._chunk([{"index": c.index, "text": text, "logprobs": self._logprobs(entries),
                              "finish_reason": _reason(c) if c.done else None}], None, include_usage)]

    def usage_chunk(self, gen):
        return self._chunk([], _usage(gen), True)


class _chat_format:
    def __init__(self, server, body):
        self.server, self.body = server, body
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _logprobs(self, entries):
        if not self.body.logprobs:
            return None

        def one(text, lp):
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [dict(one(e[0], e[1]), top_logprobs=[one(t, lp) for t, lp in e[2]]) for e in entries],
                "refusal": None}

    def _chunk(self, choices, usage=None, with_usage=False):
        d = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
             "model": self.server.model_name, "system_fingerprint": None, "choices": choices}
        if with_usage:
            d["usage"] = usage
        return d

    def whole(self, gen, texts):
        choices = [{"index": c.index, "message": {"role": "assistant", "content": texts[c.index], "refusal": None,
                                                  "tool_calls": []},
                    "logprobs": self._logprobs(c.logprobs), "finish_reason": _reason(c)}
                   for c in sorted(gen.choices, key=lambda c: c.index)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.server.model_name,
                "system_fingerprint": None, "choices": choices, "usage": _usage(gen)}

    def stream_start(self, gen):
        include_usage = bool((self.body.stream_options or {}).get("include_usage"))
        return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}], None, include_usage) for c in gen.choices]

    def stream_delta(self, gen, c, text, entries, include_usage):
        out = []
        if text or entries:
            out.append(self._chunk([{"index": c.index, "delta": {"content": text}, "logprobs": self._logprobs(entries),
                                     "finish_reason": None}], None, include_usage))
        if c.done:
            out.append(self._chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": _reason(c)}],
                                   None, include_usage))
        return out

    def usage_chunk(self, gen):
        return self._chunk([], _usage(gen), True)


def _reason(c: _Choice) -> str | None:
    return c.finish_reason


def serving_shapes(engine, *, logprobs: bool = False) -> list[tuple[str, int, bool]]:
    """The step shapes (Engine.buckets() format) that serving generate requests can hit: for every token
    bucket T a step that samples; a prefill-only step (nothing samples) for each bucket k full chunks fill
    (k = 1 .. steps of whole chunks); the decode-only step, greedy and drawing; with engine.decode_steps =
    N > 1 the N-step windows, greedy and drawing. logprobs=True adds the sampling kinds' "+top" twins.
    (Score steps, and the prefill-only steps of other sizes that a prefix-cache chunk boundary can make,
    compile at first use.)"""
    R, c, N = engine.max_batch, engine.prefill_chunk, getattr(engine, "decode_steps", 1)
    tops = ("", "+top") if logprobs else ("",)
    bucket = lambda n: next(t for t in engine.t_buckets if t >= n)          # noqa: E731
    shapes = [("sample" + top, T, False) for T in engine.t_buckets for top in tops]
    if c + 1 <= engine.max_len - 1:          # a prompt longer than one chunk fits
        full = {bucket(k * c) for k in range(1, min(R, engine.max_tokens // c) + 1)}
        shapes += [("", T, False) for T in sorted(full)]
    shapes += [(g + top, R, True) for g in ("greedy", "sample") for top in tops]
    if N > 1:
        shapes += [(f"{g}{top}*{N}", R, True) for g in ("greedy", "sample") for top in tops]
    return shapes


def warm_up(engine, *, logprobs: bool = False, threads: int | None = None) -> int:
    """Compile the step shapes serving can hit before serving (else the first requests that hit a new
    shape wait for its compilation, seconds on a GPU). First `engine.precompile(serving_shapes(...))`:
    the shapes lowered one by one, their XLA compilations on `threads` threads (default: up to 8, one
    per CPU core). Then a few short generate runs over the same shapes, which run each kind of step
    once on the device and compile (at first use, as before) anything the list missed: for every token
    bucket T a step that samples (prompts of at most prefill_chunk tokens, T in all, then a decode
    step) and, when T >= prefill_chunk, a prefill-only step (prompts one token longer than their first
    chunk: nothing samples); then a decode step at temperature 1 (the greedy runs compiled the "greedy"
    twin of the decode step, see engine.py); with engine.decode_steps > 1, the multi-step decode windows
    (greedy and drawing). With speculative decoding also a prefill-only step of the whole step budget when
    that is not whole chunks, and on a decode-only verify path (Engine(spec_verify=) not "prefill") a decode
    step carrying drafts for every token bucket such steps can fill (greedy and drawing). With logprobs=True
    also the sampling steps that return top logprobs. Call it before the EngineLoop starts. Logs the time
    taken and where it went. -> the compilations this caused.
    (Compiling in parallel, XLA's GPU autotuner times its candidates with other compilations running, less
    accurately: it may warn "Delay kernel timed out"; threads=1 for the most exact choice.)"""
    before = engine.compile_count
    vocab, c, cap = engine.cfg.vocab_size, engine.prefill_chunk, engine.max_len - 1
    threads = threads or max(1, min(8, os.cpu_count() or 1))
    events = compile_events()
    t0 = time.perf_counter()
    n_pre = engine.precompile(serving_shapes(engine, logprobs=logprobs), threads=threads)
    t1 = time.perf_counter()
    pre = compile_events() - events

    def run(lens, temperature=0.0, max_new=2):
        prompts = [[3 + (i + j) % max(vocab - 3, 1) for j in range(n)] for i, n in enumerate(lens)]
        for top in ([None, MAX_LOGPROBS] if logprobs else [None]):
            engine.clear_prefix_cache()             # a hit would skip the shape meant to compile
            engine.generate(prompts, SamplingParams(max_new_tokens=max_new, ignore_eos=True, logprobs=top,
                                                    temperature=temperature))

    # a speculative engine compiles each step shape twice, greedy and drawing (the choice is static:
    # lingjax.speculative._spec_step_fn), so every bucket runs at both temperatures there
    k_spec = getattr(engine, "num_speculative_tokens", 0)
    temps = (0.0, 1.0) if k_spec else (0.0,)
    bucket = lambda n: next(t for t in engine.t_buckets if t >= n)              # noqa: E731
    for T in engine.t_buckets:
        lens, left = [], T                          # sampling step of T tokens
        while left > 0 and len(lens) < engine.max_batch:
            lens.append(min(left, c, cap))
            left -= lens[-1]
        # no one-token prompt beside others: the scheduler takes it as a decode, which with speculative
        # decoding reserves k + 1 tokens of the step's budget (the step would not hold T tokens)
        if len(lens) > 1 and lens[-1] == 1 and lens[-2] > 2:
            lens[-2:] = [lens[-2] - 1, 2]
        for temp in temps:
            run(lens, temp)
        k = min(T // c, engine.max_batch)           # prefill-only step: k full chunks, none ends its prompt
        if k and c + 1 <= cap:
            run([c + 1] * k)
        # with speculative decoding the step budget (at least max_batch (k + 1)) need not be whole chunks: a
        # prefill-only step of the whole budget, k full chunks and a partial one
        r = T - k * c
        if k_spec and r > 0 and T == bucket(engine.max_tokens) and k + 1 <= engine.max_batch and max(c, r) < cap:
            run([c + 1] * k + [r + 1])
    run([1], temperature=1.0)                       # one-token prompt: decode-only steps that draw
    if k_spec and getattr(engine, "spec_verify", "decode") != "prefill":
        # the decode-only verify steps (lingjax.speculative.VERIFY_PATHS) are executables of their own per token
        # bucket: n decoding requests with d drafts each pack n (1 + d) tokens. One (n, d) per bucket, run as n
        # one-token prompts with max_new_tokens d + 2 (their first decode step carries d drafts), greedy and drawing
        runs = {}
        for n in range(1, engine.max_batch + 1):
            for d in range(min(k_spec, cap - 2) + 1):
                runs.setdefault(bucket(n * (1 + d)), (n, d))
        for n, d in runs.values():
            for temp in temps:
                run([1] * n, temp, max_new=d + 2)
    warm_up_windows(engine, [None, MAX_LOGPROBS] if logprobs else [None])
    engine.clear_prefix_cache()
    late = compile_events() - events - pre
    log.info("warm-up: %d step shapes precompiled in %.1fs on %d threads (trace %.1fs, lower %.1fs, XLA compile "
             "%.1fs summed over threads); the warm-up requests then ran in %.1fs and compiled %d more (%.1fs)",
             n_pre, t1 - t0, threads, pre["trace_s"], pre["lower_s"], pre["compile_s"], time.perf_counter() - t1,
             late["compiles"], late["compile_s"])
    return engine.compile_count - before


class _CompileEvents(dict):
    def __sub__(self, other):
        return _CompileEvents({k: v - other.get(k, 0) for k, v in self.items()})


_COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                   "/jax/core/compile/backend_compile_duration": "compile_s"}
_compile_totals = {"trace_s": 0.0, "lower_s": 0.0, "compile_s": 0.0, "compiles": 0}   # this process's, for logs
_compile_lock = None


def compile_events() -> _CompileEvents:
    """This process's JAX compilation counters so far (jax.monitoring events; the listener is registered
    at the first call): seconds tracing, lowering to MLIR and in the XLA compiler, and XLA compilations
    (each jitted program, every jit in the process). For logs and tests: take a snapshot and subtract."""
    global _compile_lock
    if _compile_lock is None:
        import threading
        import jax
        _compile_lock = threading.Lock()

        def listen(name, secs, **_):
            key = _COMPILE_EVENTS.get(name)
            if key:
                with _compile_lock:
                    _compile_totals[key] += secs
                    _compile_totals["compiles"] += key == "compile_s"
        jax.monitoring.register_event_duration_secs_listener(listen)
    with _compile_lock:
        return _CompileEvents(_compile_totals)


def warm_up_windows(engine, tops=(None,)) -> None:
    """With engine.decode_steps = N > 1: run one greedy and one drawing request per logprobs setting in
    `tops` long enough that a whole multi-step decode window runs (its first token, then N in one
    window), so that the window shapes compile before serving. A no-op for N = 1."""
    N = getattr(engine, "decode_steps", 1)
    if N == 1:
        return
    for temperature in (0.0, 1.0):
        for top in tops:
            engine.clear_prefix_cache()
            engine.generate([[3]], SamplingParams(max_new_tokens=min(N + 1, engine.max_len - 1), ignore_eos=True,
                                                  logprobs=top, temperature=temperature))


def model_name_of(path: str) -> str:
    return os.path.basename(os.path.normpath(path))
