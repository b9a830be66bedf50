"""A thread-safe driver of an Engine: a background thread steps it while work exists, and requests
come from any thread (the HTTP server's handlers).

    loop = EngineLoop(engine)
    loop.start()
    rid = loop.submit(prompt_ids, SamplingParams(max_new_tokens=64), on_output)   # any thread
    loop.abort(rid)                                                              # any thread
    loop.stop()

`on_output(RequestOutput)` is called from the loop thread for every output of its request, the last
one with `finished=True` (finish_reason "stop", "length" or "abort"; also "abort" when the loop stops
or a step fails). It must return quickly and must not call the engine (EngineError); it may call
`submit` / `abort` of the loop. An exception it raises is logged and aborts its request.

Only the loop thread touches the engine: submits and aborts wait in a queue until the loop takes
them, between two steps. A bad request is refused in `submit` itself (EngineError, in the caller's
thread), so a server can answer it with a 4xx.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Callable, Sequence

from lingjax.engine import Engine, EngineError, RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cv = threading.Condition()
        self._submits: list[tuple] = []          # (request_id, prompt, params, kwargs)
        self._aborts: list[str] = []
        self._callbacks: dict[str, Callable[[RequestOutput], None]] = {}    # submitted, unfinished
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None  # the exception of the last failed step, if any

    # ----------------------------------------------------------------------------- any thread
    def start(self) -> "EngineLoop":
        with self._cv:
            if self._thread is not None:
                raise RuntimeError("EngineLoop already started")
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="lingjax-engine-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop thread after its current step; unfinished requests end with "abort"."""
        with self._cv:
            if self._thread is None:
                return
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        thread.join(timeout)
        with self._cv:
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: Sequence[int], params: SamplingParams | None,
               on_output: Callable[[RequestOutput], None], request_id: str | None = None, *,
               score: bool = False, sample_index: int = 0) -> str:
        """Queue a request -> its id. Raises EngineError (bad prompt or params, id in use) at once."""
        prompt = self.engine.check_request(prompt, params, score=score)
        with self._cv:
            if self._stopping or self._thread is None:
                raise EngineError("the engine loop is not running")
            if request_id is None:
                request_id = f"loop-{next(self._ids)}"
                while request_id in self._callbacks:
                    request_id = f"loop-{next(self._ids)}"
            elif request_id in self._callbacks:
                raise EngineError(f"request_id {request_id!r} is already in use by an unfinished request")
            self._callbacks[request_id] = on_output
            self._submits.append((request_id, prompt, params, dict(score=score, sample_index=sample_index)))
            self._cv.notify_all()
        return request_id

    def abort(self, request_id: str) -> None:
        """Abort a request (its on_output then gets a finished "abort" output, unless it had already
        finished). Unknown ids are ignored."""
        with self._cv:
            if request_id in self._callbacks:
                self._aborts.append(request_id)
                self._cv.notify_all()

    def stats(self) -> dict:
        """The engine's stats() plus requests queued in the loop but not yet in the engine."""
        with self._cv:
            queued = len(self._submits)
        s = self.engine.stats()
        s["waiting"] += queued
        return s

    # ----------------------------------------------------------------------------- loop thread
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                while not (self._submits or self._aborts or self._stopping or eng.has_unfinished()):
                    self._cv.wait()
                submits, self._submits = self._submits, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for rid, prompt, params, kw in submits:
                try:
                    eng.add_request(prompt, params, request_id=rid, **kw)
                except EngineError as e:            # checked in submit; only an id clash can get here
                    log.warning("request %s refused: %s", rid, e)
                    self._emit(RequestOutput(rid, [], None, None, True, "abort", len(prompt), 0))
            for rid in aborts:
                eng.abort(rid)
            if stopping:
                for rid in list(self._callbacks):
                    eng.abort(rid)
            try:
                outs = eng.step() if eng.has_unfinished() else []
            except Exception as e:                  # a failed step: end every request, keep serving
                log.exception("engine step failed; aborting %d requests", len(self._callbacks))
                self.error = e
                eng._reset()
                outs = [RequestOutput(rid, [], None, None, True, "abort", 0, 0) for rid in list(self._callbacks)]
            for o in outs:
                self._emit(o)
            if stopping and not eng.has_unfinished():
                with self._cv:
                    leftover = list(self._callbacks)
                for rid in leftover:                # submitted after the stop was asked
                    self._emit(RequestOutput(rid, [], None, None, True, "abort", 0, 0))
                return

    def _emit(self, o: RequestOutput) -> None:
        with self._cv:
            cb = self._callbacks.pop(o.request_id, None) if o.finished else self._callbacks.get(o.request_id)
        if cb is None:
            return
        try:
            cb(o)
        except Exception:
            log.exception("on_output of request %s failed; aborting it", o.request_id)
            if not o.finished:
                self.abort(o.request_id)
