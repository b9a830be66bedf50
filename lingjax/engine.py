"""The serving engine: requests -> packed ragged batches -> one jitted, donated step (DESIGN.md "Data flow").

    engine = Engine(model, max_batch=8, prefill_chunk=256)
    logits = engine.score([[1, 2, 3], [4, 5]])                  # list of float32 [len_i, V]
    outs = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=32, temperature=0.7, seed=1))

    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=8))   # the incremental API
    while engine.has_unfinished():
        for out in engine.step():                               # RequestOutput: new tokens, finished?
            ...
    engine.abort(rid)                                           # frees its slot at once

`generate` and `score` are thin wrappers over add_request / step. `EngineLoop` (lingjax/engine_loop.py)
drives an engine from a background thread and takes requests from any thread (the server uses it).
The engine itself is not re-entrant and not thread-safe: a call made while another call runs (e.g.
`generate` from an `on_token` callback, or `step` from a second thread) raises EngineError.

Scheduling (continuous batching). Requests wait in a FIFO queue; up to `max_batch` run at once, each
holding one cache slot (`SlotAllocator`, lowest free slot first) for its linear-attention states and
pages of the paged MLA latent cache (`PageAllocator`, lingjax/paging.py; `page_size` positions each,
`num_pages` of them, set by `kv_cache_gb`; default: what num_slots x max_len needs). A request is
admitted only when the pages it can ever need (prompt + max_new_tokens, at most max_len; a score
request: its prompt) are free beyond those promised to the running requests: the pages are promised at
admission and taken as its pieces are dispatched, so a running request never lacks a page and nothing
is preempted; a request that does not fit waits (FIFO) until running ones end. The price of this choice
(against vLLM's preempt-and-recompute): pages promised to a request that stops early are not lent to
others meanwhile. A request needing more pages than the pool has is refused by add_request. Every step, each running request
advances by one piece: a decode (its one newest token) or a prefill chunk of up to `prefill_chunk`
prompt tokens that continues from the slot's state. Decodes are always scheduled; prefill chunks fill
the remaining per-step token budget `max_tokens` (default `max_batch * prefill_chunk`, so every
running request advances a full chunk). A request's first piece is marked `fresh`: its linear state
starts from zero whatever the slot held; MLA reads go through the request's own pages, up to positions
<= the token's own, which this request has already written, so stale latents are never read. A finished
(or aborted) request frees its slot and its pages at once and the next waiting request takes them in a
following step (the device runs steps in order, so the old user's last writes land first).

Prefix caching (`prefix_cache=True`; lingjax/prefix_cache.py holds the data structure and its rules). At
admission a generate request's prompt is looked up; on a hit it starts at the cached prefix's length:
the prefix's pages are shared (referenced in its page-table row), the saved linear states are copied
into its slot (a small jitted copy dispatched before its first step, so it is ordered after the slot's
previous user and before this request), and its first piece is not `fresh`. As its prompt is fed, its
whole blocks go into the cache, and a chunk ends where its state is to be saved (copied out of the slot
after that step).

Overlapped scheduling (`overlap=True`, the default). `step()` dispatches step n+1 before it waits
for step n's results, so the host packs the next step while the device runs the last one. The
sampled tokens stay on the device: a decode whose token is still in flight reads it from the
previous step's output (`take`: per packed token, the row of the previous step's sampled tokens it
is, or -1 for a token the host packed). A request is scheduled one step ahead as if it goes on; when
step n's tokens reach the host and show a stop token, its piece of step n+1 is discarded. Requests
that end by length are known on the host and never scheduled past their last token. The results
equal the non-overlapped engine's (`overlap=False`: each step's results are read before the next
is packed). `overlap_depth=D` (default 1) keeps D steps in flight: step n+D is dispatched before
step n is read, so a host that is late by less than D - 1 device steps (a slow callback, the Python
garbage collector, a dispatch that takes nearly as long as the device step) still finds the device
busy; a request that stops at step n then has up to D of its pieces discarded. The device-to-host
copies of a step's outputs start right after its dispatch, ahead of the next step's kernels. `stats()`
reports the host time per step (schedule, pack, dispatch) and the time the host waited for the device.

Multi-step decode (`decode_steps=N`, default 1 = off; vLLM's num_scheduler_steps). Each dispatch costs
the host a fixed time (the jitted call launches every kernel of the step: about 1.8 ms for the 8-layer
Ling-2.6-flash cut on an H200, nearly a batch-1 decode step on the device, 1.98 ms), which overlap cannot
hide where it is longer than the device step (a slower host, a smaller model). When every running request is decoding past its prompt and no
request waits, one dispatch (`_multi_step_fn`, a while loop over the same step) runs up to N decode
steps: each step's sampled tokens feed the next on the device, one position further, with the
sampling key's counter one higher, so the tokens equal those of N single steps for the same seed. A
request's steps in a window stop where it ends by length (its pages for those positions were promised
at admission and are taken before the dispatch; its row idles through the rest of the window); one
that hits a stop token mid-window ends when the host reads the window, and the window's tokens after
it are dropped (up to N - 1 steps of its row wasted). A window always runs N steps (a static trip
count: XLA:GPU then does not read the loop condition back each iteration), so it is dispatched only
when some request can use more than half of it; near the requests' ends, plain steps. The host then handles up to N tokens per request at once; with overlap, the next window is
dispatched before this one is read. Prefill chunks, score requests, waiting requests and speculative
decoding use single steps (decode_steps > 1 with speculative decoding is refused). The price: a
request that arrives during a window waits for it (up to N - 1 more steps before its prefill), tokens
stream N at a time, and each sampling kind compiles one more shape ("greedy*N", "sample*N", ...).
Hence the default 1: raise it (4 to 8) where the host's dispatch time exceeds a decode step, i.e.
small batches on a fast device and a slow host (scripts/bench_overlap.py --decode-steps measures it; on the
H200 at batch 1 overlap alone came within 2.3% of the device time and N = 8 gained nothing).

Packing. The pieces of one step are packed back to back into a `StepBatch`; one-token pieces
("decodes") go first (`decode_order="first"`, vLLM's order) or last (`"last"`, SGLang's legacy
order). A request's logits do not depend on this order, on the other requests in the step or on the
chunk size beyond float rounding: the tests check all three against the full forward pass (the
mixed-batch bug, SPEC §7.1).

Shapes and compilations. R (request rows) is always `max_batch`; padding rows have slot -1. A step
whose pieces are all one token is decode-only: T == R, tokens in row order, the decode kernels. Any
other step pads T up to the next of `t_buckets` (powers of two from 8, capped at `max_tokens`), its
padding tokens belonging to the dummy row R. Each kind of step ("score": float32 logits [T, V];
"sample": one sampled token per row; "+top": also the top-20 logprobs; a step holding score and
sample requests does both) compiles at most `len(t_buckets) + 1` times; `compile_count` counts the
traces this engine caused and `buckets()` lists every shape a run can hit. A decode-only step whose
sampled rows are all greedy (temperature 0) is the "greedy" twin of its kind ("greedy", "greedy+top",
...): the argmax alone, the same tokens without `sample`'s sort over the vocabulary, which costs most
where the model's share of the step is smallest. Only the decode-only shape has a twin, so each sampling
kind compiles at most one more shape (the server's warm-up compiles both). `precompile(shapes)` compiles
shapes ahead of use (lowered one by one, XLA compilations on a thread pool; lingjax.server.warm_up uses
it). The compiled steps live
in jit's cache of one module-level function whose static argument is the model's graph definition:
engines of structurally identical models (and the same mesh and kernels) share them.

Sampling runs on device inside the step: greedy (temperature 0), temperature, top-k, top-p. The key
of a request's n-th new token is fold_in(fold_in(key(seed), index), n), index being the prompt's
position in `generate` (`sample_index` of add_request, default 0): a run is reproducible for a seed
and a sample does not depend on batching. Logprobs (`SamplingParams.logprobs`) are those of the raw
float32 logits (log_softmax, before temperature or filters). Generation stops at a stop token (the
config's EOS ids unless `ignore_eos` or `stop_token_ids` says otherwise; the stop token is included
in `token_ids`), after `max_new_tokens`, or when prompt + new tokens fill the context (`max_len`
tokens; a prompt may therefore hold at most max_len - 1 tokens for `generate`, max_len for `score`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lingjax.batch import StepBatch
from lingjax.cache import SlotAllocator, page_bytes, pages_for
from lingjax.checkpoint import load_model  # noqa: F401  (re-exported: lingjax.engine.load_model)
from lingjax.kernels import fp8 as fp8_kernels
from lingjax.kernels.linear_attention import IMPLS as KERNELS   # the `kernels` choices
from lingjax.paging import PageAllocator
from lingjax.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 4096
DEFAULT_PAGE_SIZE = 64            # MLA latent positions per page (the GPU decode kernel needs a multiple of 16)
MIN_T_BUCKET = 8
MAX_LOGPROBS = 20                 # top logprobs a request may ask for (OpenAI's limit)


class EngineError(ValueError):
    """A request or an engine setting that cannot be served; the message is meant for the user."""


# --------------------------------------------------------------------------------------------- API types
def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """As in vLLM / HF: temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off.
    logprobs: None returns none; n >= 0 returns each new token's logprob and the n most likely
    tokens' (n <= 20), from the raw float32 logits."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None   # None: the model config's EOS ids
    ignore_eos: bool = False
    logprobs: int | None = None

    def validate(self) -> None:
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise EngineError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise EngineError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise EngineError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.seed):
            raise EngineError(f"seed must be an integer, got {self.seed!r}")
        if self.stop_token_ids is not None and (isinstance(self.stop_token_ids, (str, bytes)) or not all(
                _is_int(t) for t in self.stop_token_ids)):
            raise EngineError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise EngineError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


@dataclasses.dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]          # the new tokens, a final stop token included
    finish_reason: str            # "stop" (stop token), "length" (max_new_tokens or context full)
    logprobs: list[float] | None = None                        # with SamplingParams.logprobs
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass
class RequestOutput:
    """What one `step()` did for one request."""
    request_id: str
    new_token_ids: list[int]            # tokens produced by this step (0 or more; usually 1)
    new_logprobs: list[float] | None    # logprob (log_softmax of the raw float32 logits) of each new token
    new_top_logprobs: list[list[tuple[int, float]]] | None   # per new token, the top-n (id, logprob)
    finished: bool
    finish_reason: str | None           # "stop" | "length" | "abort"
    prompt_len: int
    num_generated: int                  # total so far
    logits: np.ndarray | None = None    # score requests: float32 [len, V] when finished


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    tokens: list[int]             # prompt, then generated tokens that reached the host
    prompt_len: int
    max_new: int                  # 0 = score request
    params: SamplingParams | None = None
    stop: frozenset = frozenset()
    index: int = 0                # sample_index: the key is fold_in(fold_in(key(seed), index), n)
    slot: int = -1
    fed: int = 0                  # tokens in dispatched pieces (in the cache once those steps ran)
    inflight: int = 0             # new tokens of dispatched steps that have not reached the host
    src_row: int = -1             # row of the in-flight token in the last dispatched step's output
    pages: list = dataclasses.field(default_factory=list)   # MLA page ids held, in position order
    promised: int = 0             # pages promised at admission and not taken yet
    chain: list = dataclasses.field(default_factory=list)   # prefix-cache nodes of its first blocks (pinned)
    cache_on: bool = False        # its prompt blocks still go into the prefix cache
    snaps: list = dataclasses.field(default_factory=list)   # positions where its linear states are saved
    logits: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    sampling: tuple = ()          # (temperature, top_k, top_p, seed) as the step's arrays take them

    @property
    def score(self) -> bool:
        return self.max_new == 0

    @property
    def total(self) -> int:
        """Tokens the request will hold once every dispatched step has come back."""
        return len(self.tokens) + self.inflight


def check_tokens(s, *, vocab_size: int, max_len: int, what: str = "sequence", room: int = 0) -> list[int]:
    """Validate one token-id list (non-empty, ids in [0, vocab_size), at most max_len - room tokens)
    -> a plain int list. Raises EngineError naming `what`."""
    if isinstance(s, np.ndarray):
        s = s.tolist()
    if isinstance(s, (str, bytes, dict)) or not isinstance(s, Sequence):
        raise EngineError(f"{what}: expected a list of token ids, got {type(s).__name__}")
    if len(s) == 0:
        raise EngineError(f"{what} is empty")
    if len(s) <= max_len - room and set(map(type, s)) == {int} and 0 <= min(s) and max(s) < vocab_size:
        return list(s)              # the common case, without the per-token checks below (~10x faster)
    for j, t in enumerate(s):
        if not _is_int(t):
            raise EngineError(f"{what}: token {j} is {t!r}, not an integer id")
        if not 0 <= t < vocab_size:
            raise EngineError(f"{what}: token id {t} at position {j} is outside the vocabulary [0, {vocab_size})")
    if len(s) > max_len - room:
        extra = " with room for one new token" if room else ""
        raise EngineError(f"{what} has {len(s)} tokens; the context (max_len={max_len}) holds "
                          f"{max_len - room}{extra}")
    return [int(t) for t in s]


def check_token_lists(seqs, *, vocab_size: int, max_len: int, what: str = "sequence", room: int = 0) -> list[list[int]]:
    """Validate a list of token-id lists (see check_tokens) -> plain int lists. Raises EngineError
    naming the first bad sequence ("sequence 3 is empty")."""
    if isinstance(seqs, (str, bytes, dict)) or not isinstance(seqs, (Sequence, np.ndarray)):
        raise EngineError(f"expected a list of token-id lists, got {type(seqs).__name__}")
    return [check_tokens(s, vocab_size=vocab_size, max_len=max_len, what=f"{what} {i}", room=room)
            for i, s in enumerate(seqs)]


# --------------------------------------------------------------------------------------------- sampling
def sample(logits, temperature, top_k, top_p, seeds, request_ids, counters):
    """logits [R, V] f32; per-row temperature/top_p f32, top_k/counters/request_ids int32, seeds uint32
    -> [R] int32. temperature <= 0 rows are greedy (argmax of the raw logits)."""
    R, V = logits.shape
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.where(temperature > 0, temperature, 1.0)
    x = logits / t[:, None]
    srt = -jnp.sort(-x, axis=-1)                                              # descending
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
    kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    srt = jnp.where(jnp.arange(V)[None, :] < k[:, None], srt, -jnp.inf)
    p = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p                                       # mass ranked above
    keep = (before < top_p[:, None]) | (jnp.arange(V)[None, :] == 0)
    thr = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1)
    x = jnp.where(x < thr[:, None], -jnp.inf, x)

    def row_key(s, i, c):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), c)

    keys = jax.vmap(row_key)(seeds, request_ids, counters)
    drawn = jax.vmap(jax.random.categorical)(keys, x)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


# --------------------------------------------------------------------------------------------- jitted step
def _kind(mode) -> str:
    """(logits, sample, top, greedy) -> "score", "sample", "sample+top", "score+sample", ...; "greedy" in
    place of "sample" in a decode-only step whose sampled rows are all greedy."""
    want_logits, want_sample, want_top, greedy = mode
    names = ("score", "greedy" if greedy else "sample", "top")
    return "+".join(n for n, on in zip(names, (want_logits, want_sample, want_top)) if on)


class _Graph:
    """The static argument of the jitted step: the model's graph definition, config and mesh. Equal
    (and equally hashed) for structurally identical models, so that engines of such models share
    the compiled steps in jit's cache; by identity when the graph definition is unhashable (e.g. a
    config holding a dict). `traces` is the calling engine's counter, outside equality: a trace
    counts against the engine whose call caused it."""

    def __init__(self, graphdef, treedef, cfg, mesh, traces: collections.Counter):
        self.graphdef, self.treedef, self.cfg, self.mesh, self.traces = graphdef, treedef, cfg, mesh, traces
        try:
            self._hash, self._by_value = hash((graphdef, treedef, mesh)), True
        except TypeError:
            self._hash, self._by_value = id(graphdef), False
        self._equal = []              # graphs found equal to this one (kept: jit compares keys every call)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        if self is other or any(g is other for g in self._equal):
            return True
        if not isinstance(other, _Graph) or self.mesh != other.mesh or not (self._by_value and other._by_value):
            return False
        if self.graphdef == other.graphdef and self.treedef == other.treedef:
            self._equal.append(other)
            return True
        return False


_STEP_JIT = dict(static_argnames=("graph", "mode"), donate_argnames=("caches",))
_WINDOW_JIT = dict(static_argnames=("graph", "mode", "num_steps"), donate_argnames=("caches",))


@functools.partial(jax.jit, **_STEP_JIT)
def _step_fn(params, caches, batch, take, prev, rows, temperature, top_k, top_p, seeds, request_ids, counters,
             *, graph: _Graph, mode: tuple[bool, bool, bool, bool]):
    """One engine step. params: the model state's leaves (a flat list: cheaper to pass every step
    than the nnx State, whose Variables flatten in Python). take [T]: for each packed token, the row
    of `prev` (the previous step's sampled tokens [R], still on the device) it is, or -1 to use
    batch.tokens. mode (static):
    (full logits [T, V] for score requests, sample one token per row, top-20 logprobs, every sampled row
    greedy: the argmax alone, without `sample`'s sort and filters, the same tokens; the engine sets it
    on decode-only steps only) ->
    (logits | None, tokens [R], logprobs [R] | None, top ids [R, 20] | None, top logprobs | None, caches)."""
    graph.traces[(_kind(mode), batch.tokens.shape[0], batch.decode_only)] += 1
    state = jax.tree.unflatten(graph.treedef, params)
    tokens = jnp.where(take >= 0, prev[jnp.maximum(take, 0)], batch.tokens)
    batch = dataclasses.replace(batch, tokens=tokens)
    return _step_body(state, caches, batch, rows, temperature, top_k, top_p, seeds, request_ids, counters,
                      graph=graph, mode=mode)


def _step_body(state, caches, batch, rows, temperature, top_k, top_p, seeds, request_ids, counters, *, graph, mode):
    """The traced body of one step (_step_fn; each step of _multi_step_fn): the model on `batch`, then
    sampling -> (logits | None, tokens, logprobs | None, top ids | None, top logprobs | None, caches)."""
    from lingjax import sharding
    want_logits, want_sample, want_top, greedy = mode
    model_step = sharding.shard_step(graph.graphdef, graph.cfg, graph.mesh)   # plain model.step without a mesh
    R = rows.shape[0]
    if want_logits:
        logits, caches = model_step(state, batch, caches)
        row_logits = logits[rows]
    else:
        logits = None
        row_logits, caches = model_step(state, batch, caches, rows)
    toks, lp, top_ids, top_lp = jnp.zeros(R, jnp.int32), None, None, None
    if want_sample:
        if greedy:           # what `sample` returns for temperature 0 rows (and padding rows)
            toks = jnp.argmax(row_logits, axis=-1).astype(jnp.int32)
        else:
            toks = sample(row_logits, temperature, top_k, top_p, seeds, request_ids, counters)
        lse = jax.nn.logsumexp(row_logits, axis=-1)          # log_softmax at the few entries needed
        lp = jnp.take_along_axis(row_logits, toks[:, None], axis=-1)[:, 0] - lse
        if want_top:
            top, top_ids = jax.lax.top_k(row_logits, MAX_LOGPROBS)
            top_lp = top - lse[:, None]
    out = (toks, lp, top_ids, top_lp)
    if graph.mesh is not None:     # every process reads the sampled tokens
        out = jax.lax.with_sharding_constraint(out, sharding.replicated(graph.mesh))
    return (logits,) + out + (caches,)


@functools.partial(jax.jit, **_WINDOW_JIT)
def _multi_step_fn(params, caches, batch, take, prev, steps, temperature, top_k, top_p, seeds, request_ids, counters,
                   *, graph: _Graph, mode: tuple[bool, bool, bool, bool], num_steps: int):
    """Up to `num_steps` decode steps in one call (multi-step decode, Engine(decode_steps=N)): `batch` is
    a decode-only step (one token per row; its first tokens from `prev` where take >= 0, as _step_fn);
    each later step feeds every row the token it sampled in the step before, one position further, with
    the sampling counter one higher. steps [R] int32: the steps row r takes (its tokens to produce, at
    most num_steps); past them a row is frozen (it feeds its last token at its last position again,
    which its own pages hold, and its outputs are dropped by the host), so it never writes past the
    pages the engine gave it. The loop always runs num_steps times: a static trip count, so that XLA
    runs it without reading a loop condition back from the device every iteration (with a dynamic one,
    XLA:GPU copies the predicate to the host and waits for it each time, which would serialize the host's
    kernel launches with the device's work). -> (tokens [N, R], logprobs [N, R] | None,
    top ids [N, R, 20] | None, top logprobs [N, R, 20] | None, last tokens [R] (each row's last own
    token: the next step's `prev`), caches)."""
    graph.traces[(_kind(mode) + f"*{num_steps}", batch.tokens.shape[0], True)] += 1
    state = jax.tree.unflatten(graph.treedef, params)
    R, N = steps.shape[0], num_steps
    tok0 = jnp.where(take >= 0, prev[jnp.maximum(take, 0)], batch.tokens)
    rows = jnp.arange(R, dtype=jnp.int32)
    _, want_sample, want_top, _ = mode
    bufs = (jnp.zeros((N, R), jnp.int32),
            jnp.zeros((N, R), jnp.float32) if want_sample else None,
            jnp.zeros((N, R, MAX_LOGPROBS), jnp.int32) if want_top else None,
            jnp.zeros((N, R, MAX_LOGPROBS), jnp.float32) if want_top else None)

    def body(i, carry):
        tok, caches, bufs = carry
        j = jnp.minimum(i, jnp.maximum(steps - 1, 0))          # the row's own step (frozen past its last)
        b = dataclasses.replace(batch, tokens=tok, positions=batch.positions + j, fresh=batch.fresh & (i == 0))
        _, toks, lp, top_ids, top_lp, caches = _step_body(
            state, caches, b, rows, temperature, top_k, top_p, seeds, request_ids, counters + j, graph=graph, mode=mode)
        bufs = tuple(None if buf is None else jax.lax.dynamic_update_index_in_dim(buf, x, i, 0)
                     for buf, x in zip(bufs, (toks, lp, top_ids, top_lp)))
        tok = jnp.where(i < steps, toks, tok)
        return tok, caches, bufs

    last, caches, bufs = jax.lax.fori_loop(0, N, body, (tok0, caches, bufs))
    return bufs + (last, caches)


@functools.partial(jax.jit, donate_argnames=("caches",))
def _copy_rows(caches, src, dst):
    """Every linear layer's state rows src [K] copied to rows dst [K] (out of range: skipped)."""
    return caches.replace(linear=tuple(p.at[dst].set(p[src], mode="drop") for p in caches.linear))


@functools.lru_cache(maxsize=None)
def _jitted_with(xla_options: tuple) -> tuple:
    """(step, window) jitted functions whose executables XLA compiles with the debug options
    `xla_options` ((name, value) pairs: jax.jit's compiler_options), for Engine(xla_options=...); one
    pair per option set, shared by the engines that use it. Without options the engine calls the module's
    _step_fn / _multi_step_fn themselves."""
    opts = dict(xla_options)
    return (jax.jit(_step_fn.__wrapped__, compiler_options=opts, **_STEP_JIT),
            jax.jit(_multi_step_fn.__wrapped__, compiler_options=opts, **_WINDOW_JIT))


def clear_compiled() -> None:
    """Forget every compiled step (the next step of each shape compiles again)."""
    _step_fn.clear_cache()
    _multi_step_fn.clear_cache()
    _jitted_with.cache_clear()


@dataclasses.dataclass
class _Flight:
    """A dispatched step whose results have not been read: its pieces and the device outputs."""
    pieces: list                  # [(request, n_tokens)] in packed order
    produces: list                # per piece: it yields a new token (sample requests) / ends the request (score)
    outputs: tuple                # (logits, tokens, logprobs, top ids, top logprobs) device arrays (or None)
    top_n: list                   # per piece: top logprobs the request wants
    steps: list | None = None     # a multi-step decode window: per piece, the tokens it produces (outputs [N, R])


class _Guard:
    """Refuses a second engine call while one runs (a callback calling back in, or another thread)."""

    def __init__(self):
        self._lock, self.holder = threading.Lock(), None

    def __call__(self, what: str):
        return _Held(self, what)


class _Held:
    def __init__(self, guard, what):
        self.guard, self.what = guard, what

    def __enter__(self):
        if not self.guard._lock.acquire(blocking=False):
            raise EngineError(f"Engine.{self.what}() called while Engine.{self.guard.holder}() is running: the engine "
                              f"is not re-entrant (do not call it from an on_token/on_output callback) and not "
                              f"thread-safe (use lingjax.engine_loop.EngineLoop to submit from other threads)")
        self.guard.holder = self.what

    def __exit__(self, *exc):
        self.guard.holder = None
        self.guard._lock.release()


# --------------------------------------------------------------------------------------------- engine
class Engine:
    """Continuous-batching engine over `num_slots` cache slots (default `max_batch`) of `max_len` tokens.

    max_batch      requests in flight at once (the R of every step)
    prefill_chunk  prompt tokens per request per step (1: every token goes through the decode path)
    max_tokens     token budget of one step (default max_batch * prefill_chunk)
    decode_order   "first" or "last": where one-token pieces sit in the packed batch
    state_dtype    linear-attention state dtype (float32 default); latent_dtype: MLA latent cache dtype
                   (default: the model's dtype)
    tp / mesh      tensor parallelism (lingjax.sharding): `tp=N` shards over the first N devices, or pass a
                   mesh from sharding.make_mesh; params and caches are placed on it, and each step runs
                   inside one shard_map. Default: one device, no collectives.
    kernels        linear-attention kernel backend, one of KERNELS; None keeps the model's choice (by
                   default: by jax.default_backend()). The engine runs a copy of the model's modules
                   with this setting (the parameters are shared, not copied). FP8 weights that run on
                   the GPU FP8 kernels are laid out K-major in the model, in place, once
                   (quant.to_kernel_layout: the same values, the layout those kernels read fastest).
    overlap        dispatch step n+1 before reading step n's results (module docstring); False reads
                   each step's results before packing the next (for debugging and to measure the gain)
    overlap_depth  with overlap: steps kept in flight (dispatched, not yet read); default 1 (module
                   docstring)
    xla_options    XLA debug options for the executables of the engine's steps and decode windows (jax.jit's
                   compiler_options: {name: value}, e.g. {"xla_gpu_enable_command_buffer": ""}: no CUDA
                   graphs), set per executable, not for the process; None: the model's defaults
                   (lingjax.kernels.fp8.step_xla_options: XLA's dot merger off on a GPU for compressed-tensors
                   FP8 weights; otherwise XLA's own settings); {}: XLA's own settings. Checked here (an
                   unknown name or value raises EngineError). Speculative steps keep XLA's own.
    decode_steps   N > 1: multi-step decode (module docstring): when every running request is decoding and
                   none waits, one dispatch runs up to N decode steps on the device, so the host's
                   per-dispatch cost is paid once per N tokens. Tokens equal those of N single steps.
                   Default 1 (off): see the module docstring for when to raise it.
    num_speculative_tokens  k > 0: speculative decoding with the model's MTP layer as the draft
                   (lingjax/speculative.py; the model must be loaded with its MTP layer). Steps are then
                   not overlapped, and max_tokens is raised to at least max_batch * (k + 1). 0: off.
    spec_verify    with speculative decoding: how a step of decoding requests only runs its verify rows, one
                   of lingjax.speculative.VERIFY_PATHS: "prefill" (the packed prefill kernels), "mla_decode" (MLA
                   through the paged decode kernel, a row per token), "decode" (default: that, and the linear
                   layers without a prefill-kernel launch; the fastest on H200, session 8: 1.26x a plain step
                   at B=1 k=1 against prefill's 1.41x, scripts/bench_notes_spec.md). Same greedy tokens; a
                   speed choice. Steps with a prefill chunk always verify through "prefill".
    page_size      MLA latent positions per page (default 64)
    kv_cache_gb    memory for the MLA latent pages in GiB (per device; the pool is replicated under tp);
                   num_pages = kv_cache_gb / ((MLA layers, + 1 for the MTP layer with speculative decoding)
                   x page_size x latent bytes). Default (None, and
                   num_pages None): num_slots x ceil(max_len / page_size) pages, what a per-slot max_len
                   cache needs (every admitted request always fits).
    num_pages      the pool size in pages directly (instead of kv_cache_gb)
    page_shuffle_seed  hand pages out in a seeded random order (tests: pages scattered and reused)
    prefix_cache   reuse cached prompt prefixes (lingjax/prefix_cache.py): MLA pages shared, linear states
                   copied; generate requests only (score requests bypass it). Off by default here, on in
                   `lingjax serve`. Results equal the cache-off engine's up to float rounding.
    prefix_cache_states  linear-state rows the prefix cache may fill (each cache.state_bytes(cfg)); default
                   num_slots. Its MLA pages come from the same pool as the running requests' (evicted
                   least recently used first when a request needs pages).
    prefix_cache_save_last  also save a state near each prompt's end (default True), so that a repeat of
                   the prompt, or a later turn that extends it, resumes there: at the start of the prompt's
                   last prefill chunk (a chunk ends there anyway: no extra step; a repeat then prefills at
                   most one chunk). When prefill_chunk is not a multiple of page_size, at the prompt's last
                   whole block instead, which ends a chunk there: one more step (one more read of every
                   weight). False saves only where prompts branch off the cached path (fewer state rows
                   used). Results are the same either way.
    """

    def __init__(self, model, *, max_batch: int = 8, prefill_chunk: int = 256, max_len: int | None = None,
                 num_slots: int | None = None, max_tokens: int | None = None, decode_order: str = "first",
                 state_dtype=jnp.float32, latent_dtype=None, tp: int | None = None, mesh=None,
                 kernels: str | None = None, overlap: bool = True, overlap_depth: int = 1,
                 page_size: int = DEFAULT_PAGE_SIZE,
                 kv_cache_gb: float | None = None, num_pages: int | None = None,
                 page_shuffle_seed: int | None = None, prefix_cache: bool = False,
                 prefix_cache_states: int | None = None, prefix_cache_save_last: bool = True,
                 num_speculative_tokens: int = 0, spec_verify: str = "decode", decode_steps: int = 1,
                 xla_options: dict | None = None):
        cfg = model.cfg
        self.cfg = cfg
        if max_len is None:
            max_len = min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
        num_slots = max_batch if num_slots is None else num_slots
        for name, v in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk), ("max_len", max_len),
                        ("num_slots", num_slots), ("page_size", page_size)):
            if not (_is_int(v) and v >= 1):
                raise EngineError(f"{name} must be an integer >= 1, got {v!r}")
        if max_len > cfg.max_position_embeddings:
            raise EngineError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings}")
        if num_slots < max_batch:
            raise EngineError(f"num_slots={num_slots} < max_batch={max_batch}: every running request needs a slot")
        max_tokens = max_batch * prefill_chunk if max_tokens is None else max_tokens
        if not (_is_int(max_tokens) and max_tokens >= max_batch):
            raise EngineError(f"max_tokens must be an integer >= max_batch={max_batch}, got {max_tokens!r}")
        k_spec = num_speculative_tokens
        if not (_is_int(k_spec) and k_spec >= 0):
            raise EngineError(f"num_speculative_tokens must be an integer >= 0, got {k_spec!r}")
        from lingjax.speculative import VERIFY_PATHS
        if spec_verify not in VERIFY_PATHS:
            raise EngineError(f"spec_verify must be one of {VERIFY_PATHS}, got {spec_verify!r}")
        if not (_is_int(decode_steps) and decode_steps >= 1):
            raise EngineError(f"decode_steps must be an integer >= 1, got {decode_steps!r}")
        if decode_steps > 1 and k_spec:
            raise EngineError("decode_steps > 1 (multi-step decode) cannot be combined with speculative decoding "
                              "(num_speculative_tokens > 0): use one or the other")
        if k_spec:
            if not len(getattr(model, "mtp", ())):
                raise EngineError("num_speculative_tokens > 0 needs the model's MTP layer: load it with "
                                  "load_model(..., mtp=True) (the checkpoint must have num_nextn_predict_layers >= 1)")
            if jax.process_count() > 1:
                raise EngineError("speculative decoding does not support multi-host runs yet")
            if overlap:
                log.debug("speculative decoding: steps are not overlapped (overlap=True ignored)")
            overlap = False
            max_tokens = max(max_tokens, max_batch * (k_spec + 1))
        self.num_speculative_tokens = k_spec
        self.spec_verify = spec_verify
        self.decode_steps = int(decode_steps)
        if xla_options is None:             # the model's defaults (an FP8 scheme's: fp8_kernels.step_xla_options)
            xla_options = fp8_kernels.step_xla_options(model) or None
        self.xla_options = _check_xla_options(xla_options)
        if decode_order not in ("first", "last"):
            raise EngineError(f"decode_order must be 'first' or 'last', got {decode_order!r}")
        if kernels is not None and kernels not in KERNELS:
            raise EngineError(f"kernels must be None or one of {', '.join(KERNELS)}; got {kernels!r}")
        self.max_batch, self.prefill_chunk, self.max_len = max_batch, prefill_chunk, max_len
        self.num_slots, self.max_tokens, self.decode_order = num_slots, max_tokens, decode_order
        self.overlap = bool(overlap)
        if not (_is_int(overlap_depth) and overlap_depth >= 1):
            raise EngineError(f"overlap_depth must be an integer >= 1, got {overlap_depth!r}")
        self.overlap_depth = int(overlap_depth) if self.overlap else 0
        b, self.t_buckets = MIN_T_BUCKET, []
        while b < max_tokens:
            self.t_buckets.append(b)
            b *= 2
        self.t_buckets.append(max_tokens)
        if k_spec and max_batch * (k_spec + 1) not in self.t_buckets:    # a step of verifies only: no padding
            self.t_buckets = sorted(self.t_buckets + [max_batch * (k_spec + 1)])

        from lingjax import sharding
        if mesh is None and tp is not None and tp > 1:
            mesh = _engine_error(sharding.make_mesh, tp)
        if mesh is not None and sharding.tp_of(mesh) == 1 and jax.process_count() == 1:
            mesh = None
        self.mesh = mesh
        if _fp8_on_gpu_kernels(model, kernels):
            from lingjax import quant
            n = quant.to_kernel_layout(model)           # in place: the same weights, K-major
            if n:
                log.info("laid %d FP8 weights out K-major for the GPU FP8 kernels", n)
        if kernels is not None:
            model = _with_kernels(model, kernels)
        self.model = model
        self.kernels = kernels
        self.graphdef, self.state = nnx.split(model)
        if mesh is not None:
            self.state = _engine_error(sharding.shard_state, self.state, cfg, mesh)
        self._traces = collections.Counter()         # (kind, T, decode_only) -> traces this engine caused
        self._params, treedef = jax.tree.flatten(self.state)
        self._graph = _Graph(self.graphdef, treedef, cfg, mesh, self._traces)
        self._cache_dtypes = dict(state_dtype=state_dtype, latent_dtype=latent_dtype or model.dtype)
        self.page_size, self.max_pages = page_size, pages_for(max_len, page_size)
        self.num_pages = self._pool_pages(num_pages, kv_cache_gb)
        self._page_shuffle_seed = page_shuffle_seed
        if prefix_cache_states is not None and not (_is_int(prefix_cache_states) and prefix_cache_states >= 0):
            raise EngineError(f"prefix_cache_states must be an integer >= 0, got {prefix_cache_states!r}")
        self.prefix_cache = bool(prefix_cache)
        if not isinstance(prefix_cache_save_last, (bool, np.bool_)):
            raise EngineError(f"prefix_cache_save_last must be True or False, got {prefix_cache_save_last!r}")
        self.prefix_cache_save_last = bool(prefix_cache_save_last)
        self.state_rows = (num_slots if prefix_cache_states is None else prefix_cache_states) if prefix_cache else 0
        self._new_pages()
        self.caches = self._new_caches()
        self._prev = self._zero_tokens()                  # "the previous step's sampled tokens" of the first step
        self.slots = SlotAllocator(num_slots)
        self.steps = 0
        self._guard = _Guard()
        self._ids = itertools.count()
        self._requests: dict[str, _Request] = {}      # unfinished requests by id
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._flights: collections.deque[_Flight] = collections.deque()
        self._aborted: list[_Request] = []            # aborted since the last step: reported by the next
        self._counts = collections.Counter()          # stats: prompt/generated tokens, host and wait seconds
        self._spec = None
        if k_spec:
            from lingjax.speculative import SpecDriver
            self._spec = SpecDriver(self, k_spec, RequestOutput, spec_verify)     # draft state, verify packing (lingjax/speculative.py)

    # ----------------------------------------------------------------------------- introspection
    def buckets(self, kind: str | None = None) -> list[tuple[str, int, bool]]:
        """Every (kind, T, decode_only) step shape this engine can compile (kind default: "score" and
        "sample"; the others are "sample+top", "score+sample", "score+sample+top"), with the "greedy" twin
        of a sampling kind's decode-only shape."""
        kinds = (kind,) if kind else ("score", "sample")
        R = self.max_batch
        windows = [] if self.decode_steps == 1 else [
            (f"{k.replace('sample', g)}*{self.decode_steps}", R, True)
            for k in kinds if "sample" in k and "score" not in k for g in ("sample", "greedy")]
        return ([(k, R, True) for k in kinds] + [(k.replace("sample", "greedy"), R, True) for k in kinds if "sample" in k]
                + [(k, t, False) for k in kinds for t in self.t_buckets] + windows)

    def compiled_shapes(self) -> dict[tuple[str, int, bool], int]:
        return dict(self._traces)

    @property
    def compile_count(self) -> int:
        """Compilations (traces) of the step this engine caused. Engines of structurally identical
        models share compiled steps, so a later engine may cause fewer."""
        return sum(list(self._traces.values()))     # (a list first: stats() may run on another thread)

    def precompile(self, shapes: Sequence[tuple[str, int, bool]], *, threads: int = 1) -> int:
        """Compile step shapes ahead of their first use: each (kind, T, decode_only) of `buckets()` (a
        "...*N" window kind with this engine's decode_steps) is traced and lowered here, one after the
        other (Python), and its XLA compilation runs on a pool of `threads` threads (the compiler
        releases the GIL, so compilations overlap each other and the next lowering). Nothing runs on the
        device and the caches are not touched: the arguments are the engine's own params, caches and
        previous tokens and host arrays of the shape's sizes, so the compiled steps land in the jit cache
        that later steps look up. Shapes already traced by this engine are skipped. Not with speculative
        decoding or several processes (-> 0; their steps compile at first use). -> the shapes compiled."""
        from concurrent.futures import ThreadPoolExecutor
        if not (_is_int(threads) and threads >= 1):
            raise EngineError(f"threads must be an integer >= 1, got {threads!r}")
        if self._spec is not None or jax.process_count() > 1:
            return 0
        todo = []
        for shape in shapes:
            if shape in self._traces or shape in todo:
                continue
            kind, T, decode_only = shape
            base, _, n = kind.partition("*")
            if (n and (int(n) != self.decode_steps or not decode_only or "score" in base)) or \
                    (decode_only and T != self.max_batch) or not (decode_only or T in self.t_buckets):
                raise EngineError(f"precompile: {shape} is not a step shape of this engine (see Engine.buckets())")
            todo.append(shape)
        if not todo:
            return 0
        with ThreadPoolExecutor(min(threads, len(todo)), thread_name_prefix="lingjax-compile") as pool:
            futures = [pool.submit(self._lower(*shape).compile) for shape in todo]
            for f in futures:
                f.result()
        return len(todo)

    def _lower(self, kind: str, T: int, decode_only: bool):
        """jit's Lowered step of one shape, for arguments like those _dispatch / _dispatch_window pass."""
        R = self.max_batch
        base, _, n = kind.partition("*")
        mode = ("score" in base, "sample" in base or "greedy" in base, "top" in base, "greedy" in base)
        i32 = lambda m: np.zeros(m, np.int32)                                     # noqa: E731
        batch = StepBatch(tokens=i32(T), positions=i32(T), token_seq=np.full(T, R, np.int32), slots=np.full(R, -1, np.int32),
                          cu_seqlens=i32(R + 1), fresh=np.zeros(R, bool),
                          page_table=np.zeros((R, self.max_pages), np.int32), decode_only=bool(decode_only))
        host = (np.full(T, -1, np.int32), i32(R), np.zeros(R, np.float32), i32(R), np.ones(R, np.float32),
                np.zeros(R, np.uint32), i32(R), i32(R))        # take, rows | steps, temperature, top_k, top_p, ...
        step_fn, window_fn = self._fns()
        if n:
            return window_fn.lower(self._params, self.caches, batch, host[0], self._prev, *host[1:],
                                   graph=self._graph, mode=mode, num_steps=int(n))
        return step_fn.lower(self._params, self.caches, batch, host[0], self._prev, *host[1:],
                             graph=self._graph, mode=mode)

    def _fns(self) -> tuple:
        """The jitted (step, decode window) functions this engine calls: the module's own, or their twins
        compiled with the engine's xla_options."""
        return _jitted_with(self.xla_options) if self.xla_options else (_step_fn, _multi_step_fn)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        """Whether a request is waiting or running, or an abort is still to be reported by step()."""
        return bool(self._requests or self._aborted)

    def stats(self) -> dict:
        """Counters (a snapshot; safe to read from any thread): requests running (holding a slot) /
        waiting, free slots, pages (total, free), the prefix cache's requests looked up, hits, prompt
        tokens looked up and served from the cache (hit_rate = their ratio), pages and state rows it
        holds, pages evicted; steps, prompt tokens fed, tokens generated, and the host's time:
        `host_seconds` scheduling, packing and dispatching steps (steps that compiled are counted in
        `compile_seconds` instead), `wait_seconds` blocked on the device for results; the per-step
        means over the steps that did not compile."""
        c, n = self._counts, max(self._counts["timed_steps"], 1)
        pc = self.prefix
        out = dict(running=len(self._running), waiting=len(self._waiting), free_slots=self.slots.num_free,
                   num_pages=self.num_pages, free_pages=self.pages.num_free, page_size=self.page_size,
                   prefix_cache=pc is not None, prefix_cache_queries=c["prefix_queries"],
                   prefix_cache_hits=c["prefix_hits"], prefix_cache_query_tokens=c["prefix_query_tokens"],
                   prefix_cache_hit_tokens=c["prefix_hit_tokens"],
                   prefix_cache_hit_rate=c["prefix_hit_tokens"] / max(c["prefix_query_tokens"], 1),
                   prefix_cache_pages=pc.num_nodes if pc else 0, prefix_cache_states=pc.rows_used if pc else 0,
                   prefix_cache_evicted_pages=pc.evicted if pc else 0,
                   steps=self.steps, prompt_tokens=c["prompt_tokens"], generated_tokens=c["generated_tokens"],
                   host_seconds=c["host_seconds"], wait_seconds=c["wait_seconds"],
                   host_ms_per_step=1e3 * c["host_seconds"] / n, wait_ms_per_step=1e3 * c["wait_seconds"] / n,
                   compilations=self.compile_count, compile_seconds=c["compile_seconds"], overlap=self.overlap,
                   decode_steps=self.decode_steps, dispatches=c["dispatches"], windows=c["windows"],
                   window_steps=c["window_steps"])
        if self._spec is not None:    # speculative decoding: drafts proposed/accepted, tokens per decode step
            out.update(self._spec.stats())
        return out

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (an idle engine only; a no-op without the prefix cache)."""
        with self._guard("clear_prefix_cache"):
            self._check_idle("clear_prefix_cache")
            if self.prefix is not None:
                self.prefix.clear()

    def reset_stats(self) -> None:
        """Zero the token and time counters of stats() (e.g. after a warm-up)."""
        self._counts.clear()
        if self._spec is not None:
            self._spec.counts = dict.fromkeys(self._spec.counts, 0)

    # ----------------------------------------------------------------------------- incremental API
    def check_request(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
                      score: bool = False) -> list[int]:
        """Validate a request without adding it (any thread) -> the prompt as a plain int list.
        Raises EngineError with a one-line message."""
        if not score:
            if params is None:
                params = SamplingParams()
            if not isinstance(params, SamplingParams):
                raise EngineError(f"expected SamplingParams, got {type(params).__name__}")
            params.validate()
        return check_tokens(prompt, vocab_size=self.cfg.vocab_size, max_len=self.max_len, what="prompt",
                            room=0 if score else 1)

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, score: bool = False, sample_index: int = 0) -> str:
        """Queue a request -> its id (request_id, or a new one). score=True: a teacher-forced scoring
        request (params ignored; its finishing RequestOutput carries the float32 [len, V] logits).
        sample_index: the `index` of the sampling key (module docstring); requests with the same seed
        and index draw the same random numbers. Raises EngineError on bad input."""
        with self._guard("add_request"):
            return self._add(prompt, params, request_id=request_id, score=score, index=sample_index)

    def abort(self, request_id: str) -> bool:
        """Drop a request: its slot is free at once (or it leaves the queue). The next step() reports it
        finished with finish_reason "abort". False if no such unfinished request."""
        with self._guard("abort"):
            return self._abort(request_id)

    def step(self) -> list[RequestOutput]:
        """Run one engine step -> the outputs of the requests that got tokens or finished (with
        overlap, the step whose results are read is the previous one; the new one is dispatched
        first)."""
        with self._guard("step"):
            return self._step()

    # ----------------------------------------------------------------------------- batch API
    def score(self, sequences: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
              ) -> list[np.ndarray]:
        """Teacher-forced next-token logits: one float32 [len_i, vocab] array per sequence."""
        with self._guard("score"):
            seqs = self._check(sequences, "sequence", 0)
            self._check_idle("score")
            ids = [self._add(s, None, score=True, checked=True) for s in seqs]
            done = self._run(ids, progress)
            return [done[i].logits for i in ids]

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_token: Callable[[int, int], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[GenerationOutput]:
        """Sample a continuation of each prompt, with one SamplingParams for all or one per prompt.
        on_token(i, token) is called as request i gets a token; progress(n) as n more requests finish.
        The callbacks must not call the engine (EngineError)."""
        with self._guard("generate"):
            prompts = self._check(prompts, "prompt", 1)
            params = params or SamplingParams()
            per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
            if len(per) != len(prompts):
                raise EngineError(f"{len(per)} SamplingParams for {len(prompts)} prompts")
            for i, sp in enumerate(per):
                if not isinstance(sp, SamplingParams):
                    raise EngineError(f"prompt {i}: expected SamplingParams, got {type(sp).__name__}")
                sp.validate()
            self._check_idle("generate")
            ids = [self._add(p, sp, index=i, checked=True) for i, (p, sp) in enumerate(zip(prompts, per))]
            index = {rid: i for i, rid in enumerate(ids)}
            results = {rid: ([], [], []) for rid in ids}

            def on_output(o):
                toks, lps, tops = results[o.request_id]
                toks += o.new_token_ids
                if o.new_logprobs is not None:
                    lps += o.new_logprobs
                    tops += o.new_top_logprobs
                if on_token is not None:
                    for t in o.new_token_ids:
                        on_token(index[o.request_id], t)

            done = self._run(ids, progress, on_output)
            outs = []
            for rid, p, sp in zip(ids, prompts, per):
                toks, lps, tops = results[rid]
                lp = (lps, tops) if sp.logprobs is not None else (None, None)
                outs.append(GenerationOutput(p, toks, done[rid].finish_reason, *lp))
            return outs

    # ----------------------------------------------------------------------------- internals
    def _check(self, seqs, what, room):
        return check_token_lists(seqs, vocab_size=self.cfg.vocab_size, max_len=self.max_len, what=what, room=room)

    def _check_idle(self, what):
        if self._requests or self._aborted:
            raise EngineError(f"Engine.{what}() needs an idle engine: {len(self._requests)} requests added with "
                              f"add_request are unfinished (step() them to the end or abort() them)")

    def _pool_pages(self, num_pages, kv_cache_gb) -> int:
        if num_pages is not None and kv_cache_gb is not None:
            raise EngineError("give kv_cache_gb or num_pages, not both")
        if kv_cache_gb is not None:
            if not (_is_number(kv_cache_gb) and math.isfinite(kv_cache_gb) and kv_cache_gb > 0):
                raise EngineError(f"kv_cache_gb must be a number > 0, got {kv_cache_gb!r}")
            per = page_bytes(self.cfg, self.page_size, self._cache_dtypes["latent_dtype"])
            if self.num_speculative_tokens and self.cfg.mla_layers:     # + the MTP layer's pool (speculative.py)
                per += per // len(self.cfg.mla_layers)
            num_pages = int(kv_cache_gb * 2 ** 30 // per) if per else 1
            if num_pages < 1:
                raise EngineError(f"kv_cache_gb={kv_cache_gb} holds no page of {per} bytes")
        elif num_pages is None:
            num_pages = self.num_slots * self.max_pages
        if not (_is_int(num_pages) and num_pages >= 1):
            raise EngineError(f"num_pages must be an integer >= 1, got {num_pages!r}")
        return int(num_pages)

    def _new_pages(self):
        """A fresh page allocator and host page table (nothing held, nothing promised)."""
        self.pages = PageAllocator(self.num_pages, shuffle_seed=self._page_shuffle_seed)
        self.page_table = np.zeros((self.num_slots, self.max_pages), np.int32)
        self._promised = 0
        self.prefix = (PrefixCache(self.page_size, self.pages, list(range(self.num_slots, self.num_slots + self.state_rows)))
                       if self.prefix_cache else None)

    def _pages_needed(self, r: _Request) -> int:
        """Pages r can ever write: its prompt for a score request; else every position but the last
        token's (that token is never fed), prompt + max_new_tokens at most max_len."""
        if r.score:
            return pages_for(r.prompt_len, self.page_size)
        return pages_for(min(r.prompt_len + r.max_new, self.max_len) - 1, self.page_size)

    def _new_caches(self):
        from lingjax import sharding
        caches = sharding.init_caches(self.cfg, self.mesh, self.num_slots + self.state_rows, self.num_pages,
                                      self.page_size, **self._cache_dtypes)
        return caches if self.mesh is not None else jax.device_put(caches, self._placement())

    def _zero_tokens(self):
        """[R] int32 zeros placed as a step's sampled tokens are (committed to the device, or
        replicated over the mesh), so that the first step and the later ones share one compilation."""
        from lingjax import sharding
        zeros = np.zeros(self.max_batch, np.int32)
        if self.mesh is not None:
            return sharding.host_to_global(zeros, self.mesh)
        return jax.device_put(zeros, self._placement())

    def _placement(self):
        """Without a mesh: where the step's outputs land, i.e. as the params are placed (a one-device
        mesh or a device). Inputs of the first step placed so match the later steps' inputs (the
        previous step's outputs) and share their compilation."""
        from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
        s = getattr(jax.tree.leaves(self.state)[0], "sharding", None)
        if isinstance(s, NamedSharding):
            return NamedSharding(s.mesh, PartitionSpec())
        return SingleDeviceSharding(min(s.device_set, key=lambda d: d.id) if s is not None else jax.devices()[0])

    def _add(self, prompt, params, *, request_id=None, score=False, index=0, checked=False) -> str:
        """Queue one request; checked: prompt (a plain int list) and params were validated by the caller
        (generate / score validate them all before adding any: the prompt's tokens are not checked twice)."""
        # the request's own token list (it grows as tokens are generated; the caller's list stays the prompt)
        prompt = list(prompt) if checked else self.check_request(prompt, params, score=score)
        if not _is_int(index):
            raise EngineError(f"sample_index must be an integer, got {index!r}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self._requests:
                request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise EngineError(f"request_id must be a non-empty string, got {request_id!r}")
        elif request_id in self._requests:
            raise EngineError(f"request_id {request_id!r} is already in use by an unfinished request")
        if score:
            r = _Request(request_id, prompt, len(prompt), 0)
        else:
            sp = params or SamplingParams()
            stop = () if sp.ignore_eos else self.cfg.eos_ids if sp.stop_token_ids is None else sp.stop_token_ids
            r = _Request(request_id, prompt, len(prompt), sp.max_new_tokens, params=sp,
                         stop=frozenset(int(t) for t in stop), index=int(index),
                         sampling=(sp.temperature, min(sp.top_k, self.cfg.vocab_size), sp.top_p, sp.seed % 2 ** 32))
        need = self._pages_needed(r)
        if need > self.num_pages:
            raise EngineError(f"the request needs {need} cache pages of {self.page_size} positions (prompt + "
                              f"max_new_tokens) but the pool has {self.num_pages}; raise kv_cache_gb or shorten it")
        self._requests[request_id] = r
        self._waiting.append(r)
        return request_id

    def _abort(self, request_id) -> bool:
        r = self._requests.get(request_id)
        if r is None:
            return False
        self._finish(r, "abort")
        self._aborted.append(r)
        return True

    def _finish(self, r: _Request, reason: str) -> None:
        """Mark r finished and give its slot back (a later in-flight piece of r is then discarded).
        A slot is given back as soon as no more pieces of its request will be dispatched, even with
        the request's last step still in flight: the device runs steps in order, so those cache
        writes land before the slot's next user's first (fresh) step."""
        r.finish_reason = reason
        del self._requests[r.id]
        if r.slot >= 0:
            self._release(r)
        elif r.fed == 0:
            self._waiting.remove(r)

    def _release(self, r: _Request) -> None:
        self._running.remove(r)
        self.slots.free(r.slot)
        r.slot = -1
        for p in r.pages:
            self.pages.unref(p)
        r.pages = []
        self._promised -= r.promised
        r.promised = 0
        for node in r.chain:
            self.prefix.unpin(node)
        r.chain, r.snaps, r.cache_on = [], [], False

    def _admit(self, r: _Request, restores: list) -> bool:
        """Give r a slot and promise it the pages it can need, if they are free beyond earlier promises
        (pages the prefix cache can evict count as free). With the prefix cache: look r's prompt up, share
        the pages of the cached prefix, and queue the copy of its saved state into r's slot (`restores`)."""
        need = self._pages_needed(r)
        pc = self.prefix if not r.score else None
        path, hit = pc.lookup(r.tokens) if pc is not None else ([], 0)
        free = self.pages.num_free - self._promised + (self.prefix.evictable if self.prefix is not None else 0)
        # r pins the cached path it walked (pinned nodes are not evictable, so they no longer count as free):
        # all of it, so that it can save its state where it leaves the path; if that does not fit, only the
        # nodes whose pages it shares (then it saves nothing past them).
        walk = path
        if free - sum(nd.users == 0 for nd in walk) < need - hit:
            walk = path[:hit]
            if free - sum(nd.users == 0 for nd in walk) < need - hit:
                return False
        r.slot = self.slots.alloc()
        r.promised = need - hit
        self._promised += need - hit
        if pc is None:
            return True
        ps = self.page_size
        for nd in walk:
            pc.pin(nd)
        r.chain, r.cache_on = list(walk), True
        if hit:
            r.pages = [nd.page for nd in path[:hit]]
            for p in r.pages:
                self.pages.ref(p)
            self.page_table[r.slot, :hit] = r.pages
            r.fed = hit * ps
            restores.append((path[hit - 1].state_row, r.slot))
        # Save states where a later request can resume: where r leaves the cached path (a node without a
        # state), and (prefix_cache_save_last) near r's end, where a chunk ends anyway: at the start of r's
        # last prefill chunk when its chunks run whole from where it starts (or from where it leaves the
        # path, which ends a chunk); at r's last whole block when chunks are not whole blocks (one step more).
        start, branch = hit * ps, len(walk) * ps
        last = 0
        if self.prefix_cache_save_last:
            base = max(start, branch)
            last = base + (r.prompt_len - 1 - base) // self.prefill_chunk * self.prefill_chunk
            if last % ps:
                last = (r.prompt_len - 1) // ps * ps
        r.snaps = sorted({b for b in (branch, last) if b > start})
        self._counts["prefix_queries"] += 1
        self._counts["prefix_hits"] += hit > 0
        self._counts["prefix_query_tokens"] += r.prompt_len
        self._counts["prefix_hit_tokens"] += hit * ps
        return True

    def _cache_progress(self, r: _Request, saves: list) -> None:
        """After r's piece is dispatched: its whole prompt blocks fed so far go into the prefix cache (a
        block already cached there is not replaced: r keeps its own page private), and a boundary where
        r's state is to be saved queues the copy of r's slot into a state row (`saves`)."""
        pc, ps = self.prefix, self.page_size
        # With speculative decoding a page also holds the MTP layer's latents, and the one at position
        # prompt_len - 1 depends on the token r generated there: blocks stop before it, so that a cached
        # page's contents depend on the prompt tokens alone.
        full = min(r.fed, r.prompt_len - (1 if self.num_speculative_tokens else 0)) // ps
        while r.cache_on and len(r.chain) < full:
            j = len(r.chain)
            parent = r.chain[-1] if r.chain else pc.root
            block = pc.block(r.tokens, j)
            node = pc.child(parent, block)
            if node is None:
                node = pc.insert(parent, block, r.pages[j])
            elif node.users > 0:
                pc.pin(node)
            else:               # cached meanwhile by a request that has ended: pinning it would break the
                r.cache_on = False      # page promises (it counts as evictable), so r stops inserting here
                break
            r.chain.append(node)
        while r.snaps and r.snaps[0] <= r.fed:
            b = r.snaps.pop(0)
            if b == r.fed and len(r.chain) >= b // ps:
                row = pc.take_row(r.chain[b // ps - 1])
                if row is not None:
                    saves.append((r.slot, row))

    def _copy_states(self, pairs) -> None:
        """Copy linear-state rows src -> dst of every linear layer (one small jitted call, ordered on the
        device between the steps dispatched before and after it)."""
        if not pairs:
            return
        k = 1 << (len(pairs) - 1).bit_length()             # a power-of-two bucket: few compilations
        src = np.zeros(k, np.int32)
        dst = np.full(k, self.num_slots + self.state_rows, np.int32)          # out of range: dropped
        src[:len(pairs)], dst[:len(pairs)] = zip(*pairs)
        if self.mesh is not None and jax.process_count() > 1:
            src, dst = _global((src, dst), self.mesh)
        self.caches = _copy_rows(self.caches, src, dst)

    def _grow(self, r: _Request, upto: int) -> None:
        """Take pages (promised at admission) so that r holds positions [0, upto)."""
        want = pages_for(upto, self.page_size) - len(r.pages)
        if want > self.pages.num_free and self.prefix is not None:
            self.prefix.evict(want - self.pages.num_free)
        while len(r.pages) < pages_for(upto, self.page_size):
            p = self.pages.alloc()
            if p is None or r.promised < 1:       # the admission rule makes this unreachable
                raise RuntimeError(f"request {r.id} outgrew its promised pages ({len(r.pages)} held)")
            self.page_table[r.slot, len(r.pages)] = p
            r.pages.append(p)
            r.promised -= 1
            self._promised -= 1

    def _run(self, ids, progress, on_output=None) -> dict:
        """Step until the requests `ids` (all the engine's) finish -> id -> their _Request."""
        reqs = {i: self._requests[i] for i in ids}
        try:
            while self._requests:
                outs = self._step()
                n_done = 0
                for o in outs:
                    if o.logits is not None:
                        reqs[o.request_id].logits = o.logits
                    if on_output is not None:
                        on_output(o)
                    n_done += o.finished
                if n_done and progress is not None:
                    progress(n_done)
            self._drain()
        except BaseException:
            self._reset()
            raise
        return reqs

    def _reset(self) -> None:
        """After a failed or interrupted step: every request aborted, the slots free, nothing in flight,
        so that the engine stays usable."""
        self._flights.clear()
        for r in list(self._requests.values()):
            self._finish(r, "abort")
        self._aborted.clear()
        self._prev = self._zero_tokens()
        self._new_pages()
        if any(a.is_deleted() for a in jax.tree.leaves(self.caches)):   # donated to a step that failed
            self.caches = self._new_caches()
        if self._spec is not None:
            self._spec.reset(self)

    def _drain(self) -> list[RequestOutput]:
        outs = []
        while self._flights:
            outs += self._collect(self._flights.popleft())
        return outs

    def _pending(self, r: _Request) -> int:
        """Tokens of r still to feed: 0 when its last token is in flight or known and it ends there."""
        total = r.total
        if not r.score and (total - r.prompt_len >= r.max_new or total >= self.max_len):
            return 0
        return total - r.fed

    def _admit_waiting(self) -> None:
        """Admit waiting requests in order while a slot and their pages are free; prefix-cache hits get
        their saved states copied into their slots at once."""
        restores = []
        while self._waiting and len(self._running) < self.max_batch and self.slots.num_free:
            if not self._admit(self._waiting[0], restores):
                break
            self._running.append(self._waiting.popleft())
        self._copy_states(restores)

    def _schedule(self) -> list[tuple[_Request, int]]:
        self._admit_waiting()
        budget = self.max_tokens
        pending = [(r, self._pending(r)) for r in self._running]
        decodes = [(r, 1) for r, p in pending if p == 1]
        budget -= len(decodes) * (1 + self.num_speculative_tokens)     # a decode verifies up to k drafts
        prefills = []
        for r, p in pending:
            if p > 1 and budget > 0:
                n = min(self.prefill_chunk, p, budget)
                if r.snaps:                       # end the chunk where r's state is to be saved
                    n = min(n, r.snaps[0] - r.fed)
                prefills.append((r, n))
                budget -= n
        return decodes + prefills if self.decode_order == "first" else prefills + decodes

    def _pack(self, pieces):
        """Pieces [(request, n_tokens)] -> host arrays of a StepBatch (+ decode_only) and `take` [T]
        (the previous step's output row of a token still on the device, else -1). Plain Python lists,
        one numpy conversion per array: this runs on the host every step."""
        R, k = self.max_batch, len(pieces)
        decode_only = all(n == 1 for _, n in pieces)
        slots = np.full(R, -1, np.int32)
        fresh = np.zeros(R, bool)
        slots[:k] = [r.slot for r, _ in pieces]
        fresh[:k] = [r.fed == 0 for r, _ in pieces]
        page_table = np.zeros((R, self.max_pages), np.int32)
        page_table[:k] = self.page_table[slots[:k]]
        if decode_only:                                # T == R, one token per row
            tok, pos, take = [0] * R, [0] * R, [-1] * R
            for i, (r, _) in enumerate(pieces):
                f = pos[i] = r.fed
                if f < len(r.tokens):
                    tok[i] = r.tokens[f]
                else:                                  # the token is still on the device
                    take[i] = r.src_row
            token_seq = list(range(k)) + [R] * (R - k)
            cu = np.minimum(np.arange(R + 1, dtype=np.int32), k)
        else:
            n_tok = sum(n for _, n in pieces)
            T = next(t for t in self.t_buckets if t >= n_tok)
            tok, pos, take, token_seq, cu = [], [], [], [], [0]
            for i, (r, n) in enumerate(pieces):
                f = r.fed
                known = min(n, len(r.tokens) - f)      # n - known == 1: the token in flight
                tok += r.tokens[f:f + known]
                take += [-1] * known
                if known < n:
                    tok.append(0)
                    take.append(r.src_row)
                pos += range(f, f + n)
                token_seq += [i] * n
                cu.append(cu[-1] + n)
            pad = T - n_tok
            tok, pos, take, token_seq = tok + [0] * pad, pos + [0] * pad, take + [-1] * pad, token_seq + [R] * pad
            cu = np.asarray(cu + [n_tok] * (R - k), np.int32)
        return dict(tokens=np.asarray(tok, np.int32), positions=np.asarray(pos, np.int32),
                    token_seq=np.asarray(token_seq, np.int32), slots=slots, cu_seqlens=cu, fresh=fresh,
                    page_table=page_table, decode_only=decode_only, take=np.asarray(take, np.int32))

    def _dispatch(self, pieces) -> _Flight:
        """Pack and launch one step (asynchronously); update the requests' bookkeeping."""
        if self._spec is not None:
            return self._spec.dispatch(self, pieces)
        R = self.max_batch
        for r, n in pieces:
            self._grow(r, r.fed + n)
        b = self._pack(pieces)
        take = b.pop("take")
        rows = np.maximum(b["cu_seqlens"][1:] - 1, 0).astype(np.int32)
        produces = [r.fed + n == r.total for r, n in pieces]
        sampled = [i for i, (r, _) in enumerate(pieces) if produces[i] and not r.score]
        ids, counters, top_k = (np.zeros(R, np.int32) for _ in range(3))
        temp, top_p, seeds = np.zeros(R, np.float32), np.ones(R, np.float32), np.zeros(R, np.uint32)
        top_n = [0] * len(pieces)
        if sampled:
            rs = [pieces[i][0] for i in sampled]
            ids[sampled] = [r.index % 2 ** 31 for r in rs]
            counters[sampled] = [r.total - r.prompt_len for r in rs]
            temp[sampled], top_k[sampled], top_p[sampled], seeds[sampled] = zip(*(r.sampling for r in rs))
            for i, r in zip(sampled, rs):
                top_n[i] = r.params.logprobs or 0
        # a decode-only step in which no row draws skips the sampler's sort (module docstring)
        greedy = b["decode_only"] and bool(sampled) and not (temp[sampled] > 0).any()
        mode = (any(r.score for r, _ in pieces), bool(sampled), any(top_n), greedy)
        batch = StepBatch(**b)
        host = (take, rows, temp, top_k, top_p, seeds, ids, counters)
        if self.mesh is not None and jax.process_count() > 1:
            batch, host = _global(batch, self.mesh), _global(host, self.mesh)
        logits, toks, lp, top_ids, top_lp, self.caches = self._fns()[0](
            self._params, self.caches, batch, host[0], self._prev, *host[1:], graph=self._graph, mode=mode)
        self._prev = toks
        self.steps += 1
        self._advance(pieces, [p and not r.score for p, (r, _) in zip(produces, pieces)], src_rows=True)
        if not any(pieces[i][0].params.logprobs is not None for i in sampled):
            lp = None                                   # nobody reads it: one device-to-host copy fewer
        return _Flight(pieces, produces, _to_host_async((logits, toks, lp, top_ids, top_lp)), top_n)

    def _advance(self, pieces, in_flight, *, src_rows: bool) -> None:
        """Bookkeeping after a step is dispatched (plain and speculative): the pieces' tokens count as fed
        (prompt tokens counted), prefix-cache progress and its state saves, one more token in flight where
        in_flight[i] (its output row kept as src_row if src_rows), and the slot of a request with nothing
        left to dispatch freed for the next step."""
        prompt_tokens, saves = 0, []
        for i, (r, n) in enumerate(pieces):
            if r.fed < r.prompt_len:
                prompt_tokens += min(r.fed + n, r.prompt_len) - r.fed
            r.fed += n
            if r.chain or r.cache_on:
                self._cache_progress(r, saves)
            if in_flight[i]:
                r.inflight += 1
                if src_rows:
                    r.src_row = i
            if self._pending(r) == 0:     # all of r is dispatched: its slot is free for the next step
                self._release(r)
        self._counts["prompt_tokens"] += prompt_tokens
        self._copy_states(saves)

    def _score_rows(self, r, rows, last: bool) -> list[RequestOutput]:
        """A score request's logits rows from one step; its finished output when that step was its last
        (nothing for a request stopped or aborted since)."""
        if r.finish_reason is not None:
            return []
        r.logits.append(rows)
        if not last:
            return []
        full = np.concatenate(r.logits, axis=0)
        r.logits = []
        self._finish(r, "length")
        return [RequestOutput(r.id, [], None, None, True, "length", r.prompt_len, 0, logits=full)]

    def _collect(self, f: _Flight) -> list[RequestOutput]:
        """Read one dispatched step's results (blocks until the device has them) -> outputs."""
        if self._spec is not None:
            return self._spec.collect(self, f)
        if f.steps is not None:
            return self._collect_window(f)
        t0 = time.perf_counter()
        # one device_get (the copies were started at dispatch; _dispatch left out the logprobs when no
        # request of the step reads them)
        logits, toks, lp, top_ids, top_lp = jax.device_get(f.outputs)
        self._counts["wait_seconds"] += time.perf_counter() - t0
        outs, off = [], 0
        for i, (r, n) in enumerate(f.pieces):
            live = r.finish_reason is None                 # else stopped or aborted since: discard
            if r.score:
                outs += self._score_rows(r, logits[off:off + n], f.produces[i])
            elif f.produces[i]:
                r.inflight -= 1
                if live:
                    outs.append(self._new_token(r, i, toks, lp, top_ids, top_lp, f.top_n[i]))
            off += n
        return outs

    def _window(self, pieces) -> list[int] | None:
        """Multi-step decode: the tokens each piece produces in one window of up to decode_steps steps, or
        None for a plain step. A window runs only when every running request is decoding past its prompt
        (no prefill chunk, no score request, no prefix-cache state to save) and no request waits (it would
        wait for the whole window). A request's count stops where it ends by length (max_new_tokens or
        max_len), so that it writes no position past its promised pages; a stop token that comes
        mid-window ends it when the host reads the window (the tokens after it are dropped). A window
        always runs decode_steps steps on the device (rows past their count idle along), so it is used
        only when some request can take more than half of them; else a plain step."""
        N = self.decode_steps
        if N == 1 or self._spec is not None or self._waiting or len(pieces) != len(self._running):
            return None
        steps = []
        for r, n in pieces:
            if n != 1 or r.score or r.fed < r.prompt_len or r.snaps:
                return None
            steps.append(min(N, r.max_new - (r.total - r.prompt_len), self.max_len - r.total))
        return steps if max(steps) > max(N // 2, 1) else None

    def _dispatch_window(self, pieces, steps) -> _Flight:
        """Pack and launch one multi-step decode window (_multi_step_fn); the requests' bookkeeping."""
        R, k = self.max_batch, len(pieces)
        for (r, _), m in zip(pieces, steps):
            self._grow(r, r.fed + m)
        b = self._pack(pieces)
        take = b.pop("take")
        rs = [r for r, _ in pieces]
        st, ids, counters, top_k = (np.zeros(R, np.int32) for _ in range(4))
        temp, top_p, seeds = np.zeros(R, np.float32), np.ones(R, np.float32), np.zeros(R, np.uint32)
        st[:k] = steps
        ids[:k] = [r.index % 2 ** 31 for r in rs]
        counters[:k] = [r.total - r.prompt_len for r in rs]
        temp[:k], top_k[:k], top_p[:k], seeds[:k] = zip(*(r.sampling for r in rs))
        top_n = [r.params.logprobs or 0 for r in rs]
        mode = (False, True, any(top_n), not (temp[:k] > 0).any())
        batch = StepBatch(**b)
        host = (take, st, temp, top_k, top_p, seeds, ids, counters)
        if self.mesh is not None and jax.process_count() > 1:
            batch, host = _global(batch, self.mesh), _global(host, self.mesh)
        *outs, self._prev, self.caches = self._fns()[1](
            self._params, self.caches, batch, host[0], self._prev, *host[1:], graph=self._graph, mode=mode,
            num_steps=self.decode_steps)
        self.steps += max(steps)
        self._counts["windows"] += 1
        self._counts["window_steps"] += max(steps)
        for i, (r, m) in enumerate(zip(rs, steps)):
            r.fed += m
            r.inflight += m
            r.src_row = i
            if self._pending(r) == 0:     # ends by length in this window: its slot is free for the next step
                self._release(r)
        if not any(r.params.logprobs is not None for r in rs):
            outs[1] = None                              # logprobs: nobody reads them
        return _Flight(pieces, [True] * k, _to_host_async((None, *outs)), top_n, steps=list(steps))

    def _collect_window(self, f: _Flight) -> list[RequestOutput]:
        """Read a multi-step window's results -> one output per live request with its new tokens (up to
        and including a stop token; the window's tokens past a request's end are dropped)."""
        t0 = time.perf_counter()
        _, toks, lp, top_ids, top_lp = (None if a is None else np.asarray(a) for a in f.outputs)
        self._counts["wait_seconds"] += time.perf_counter() - t0
        outs = []
        for i, (r, _) in enumerate(f.pieces):
            m = f.steps[i]
            r.inflight -= m
            got = []
            for j in range(m):
                if r.finish_reason is not None:           # stopped or aborted (before or within the window)
                    break
                got.append(self._new_token(r, i, toks[j], None if lp is None else lp[j],
                                           None if top_ids is None else top_ids[j],
                                           None if top_lp is None else top_lp[j], f.top_n[i]))
            if got:
                o = got[-1]
                o.new_token_ids = [t for g in got for t in g.new_token_ids]
                if o.new_logprobs is not None:
                    o.new_logprobs = [x for g in got for x in g.new_logprobs]
                    o.new_top_logprobs = [x for g in got for x in g.new_top_logprobs]
                outs.append(o)
        return outs

    def _new_token(self, r, i, toks, lp, top_ids, top_lp, top_n) -> RequestOutput:
        t = int(toks[i])
        r.tokens.append(t)
        self._counts["generated_tokens"] += 1
        n_new = len(r.tokens) - r.prompt_len
        reason = ("stop" if t in r.stop else
                  "length" if n_new >= r.max_new or len(r.tokens) >= self.max_len else None)
        if reason:
            self._finish(r, reason)
        want = r.params.logprobs is not None
        lps = [float(lp[i])] if want else None
        tops = [[(int(a), float(b)) for a, b in zip(top_ids[i, :top_n], top_lp[i, :top_n])]
                if top_n else []] if want else None
        return RequestOutput(r.id, [t], lps, tops, reason is not None, reason, r.prompt_len, n_new)

    def _step(self) -> list[RequestOutput]:
        t0, compiles = time.perf_counter(), self.compile_count
        outs = [RequestOutput(r.id, [], None, None, True, "abort", r.prompt_len, len(r.tokens) - r.prompt_len)
                for r in self._aborted]
        self._aborted.clear()
        pieces = self._schedule()
        if pieces:
            steps = self._window(pieces)
            self._flights.append(self._dispatch(pieces) if steps is None else self._dispatch_window(pieces, steps))
            self._counts["dispatches"] += 1
        dt = time.perf_counter() - t0           # a step that compiled counts as compile time, not host time
        self._counts["compile_seconds" if self.compile_count > compiles else "host_seconds"] += dt
        self._counts["compile_steps" if self.compile_count > compiles else "timed_steps"] += 1
        keep = self.overlap_depth if pieces else 0          # with overlap, the last steps launched stay in flight
        while len(self._flights) > keep:
            outs += self._collect(self._flights.popleft())
        if not pieces and not self._flights and self._requests and not outs:
            raise RuntimeError(f"engine stalled: {len(self._requests)} unfinished requests and nothing to run")
        return outs


def _to_host_async(outputs: tuple) -> tuple:
    """Start the device-to-host copies of a dispatched step's outputs now, right behind the step, so
    that they are not queued behind the next step (which the overlapped engine dispatches before it
    reads these): the host then waits for this step only. -> outputs (None entries kept)."""
    for a in outputs:
        if a is not None:
            a.copy_to_host_async()
    return outputs


def _fp8_on_gpu_kernels(model, kernels) -> bool:
    """Whether the model holds FP8 projections that run on the GPU FP8 kernels (with the engine's
    `kernels`, or the layers' own choice when None): then the engine lays its FP8 weights out K-major
    (quant.to_kernel_layout), the layout those kernels stream fastest."""
    from lingjax import quant
    from lingjax.kernels import fp8 as fp8_kernels
    from lingjax.model.common import Dense
    for _, m in nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules():
        if isinstance(m, Dense) and quant.is_fp8(m.kernel.get_value()):
            return fp8_kernels.resolve(kernels if kernels is not None else m.kernels) == "gpu"
    return False


def _with_kernels(model, kernels: str):
    """A copy of the model's modules (sharing its parameter arrays) whose kernel-calling layers use
    `kernels`."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, state)
    for _, m in nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules():
        if hasattr(m, "kernels"):
            m.kernels = kernels
    return model


def _engine_error(fn, *args):
    from lingjax.sharding import ShardingError
    try:
        return fn(*args)
    except ShardingError as e:
        raise EngineError(str(e)) from None


def _check_xla_options(options) -> tuple:
    """Engine(xla_options=...) -> sorted (name, value) pairs (() for None / {}); each name and value is
    checked by compiling a trivial function with them (EngineError naming the problem)."""
    if not options:
        return ()
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise EngineError(f"xla_options must be a dict of XLA debug option names to values, got {options!r}")
    for k, v in options.items():
        if not isinstance(v, (str, bool, int, float)):
            raise EngineError(f"xla_options[{k!r}] must be a string, bool, int or float, got {v!r}")
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.int32(0)).compile()
    except Exception as e:                  # noqa: BLE001  (XLA's message names the option)
        raise EngineError(f"xla_options {options!r}: {str(e).splitlines()[0][:300]}") from None
    return tuple(sorted(options.items()))


def _global(tree, mesh):
    """Host arrays (identical on every process) -> global arrays replicated over the mesh."""
    from lingjax import sharding
    return jax.tree.map(lambda a: sharding.host_to_global(np.asarray(a), mesh), tree)
