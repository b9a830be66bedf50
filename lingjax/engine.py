"""The serving engine: requests -> packed ragged batches -> one jitted, donated step (DESIGN.md "Data flow").

    engine = Engine(model, max_batch=8, prefill_chunk=256)
    logits = engine.score([[1, 2, 3], [4, 5]])                  # list of float32 [len_i, V]
    outs = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=32, temperature=0.7, seed=1))

Scheduling (continuous batching). Requests wait in a FIFO queue; up to `max_batch` run at once, each
holding one cache slot (`SlotAllocator`, lowest free slot first). Every step, each running request
advances by one piece: a decode (its one newest token) or a prefill chunk of up to `prefill_chunk`
prompt tokens that continues from the slot's state. Decodes are always scheduled; prefill chunks fill
the remaining per-step token budget `max_tokens` (default `max_batch * prefill_chunk`, so every
running request advances a full chunk). A request's first piece is marked `fresh`: its linear state
starts from zero whatever the slot held; MLA reads are masked to positions <= the token's own, which
this request has already written, so stale latents are never read. A finished request frees its
slot at once and the next waiting request takes it in the following step.

Packing. The pieces of one step are packed back to back into a `StepBatch`; one-token pieces
("decodes") go first (`decode_order="first"`, vLLM's order) or last (`"last"`, SGLang's legacy
order). A request's logits do not depend on this order, on the other requests in the step or on the
chunk size: the tests check all three against the full forward pass (the mixed-batch bug, SPEC §7.1).

Shapes and compilations. R (request rows) is always `max_batch`; padding rows have slot -1. A step
whose pieces are all one token is decode-only: T == R, tokens in row order, the decode kernels. Any
other step pads T up to the next of `t_buckets` (powers of two from 8, capped at `max_tokens`), its
padding tokens belonging to the dummy row R. So each kind of step ("score": float32 logits [T, V];
"sample": one sampled token per row) compiles at most `len(t_buckets) + 1` times; `compile_count`
counts the traces and `buckets()` lists every shape a run can hit.

Sampling runs on device inside the step: greedy (temperature 0), temperature, top-k, top-p. The key
of request i's n-th new token is fold_in(fold_in(key(seed), i), n): a run is reproducible for a
seed and a sample does not depend on batching. Generation stops at a stop token (the config's EOS
ids unless `ignore_eos` or `stop_token_ids` says otherwise; the stop token is included in
`token_ids`), after `max_new_tokens`, or when prompt + new tokens fill the context (`max_len` tokens; a prompt
may therefore hold at most max_len - 1 tokens for `generate`, max_len for `score`).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lingjax.batch import StepBatch
from lingjax.cache import SlotAllocator

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 4096
MIN_T_BUCKET = 8


class EngineError(ValueError):
    """A request or an engine setting that cannot be served; the message is meant for the user."""


# --------------------------------------------------------------------------------------------- API types
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """As in vLLM / HF: temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None   # None: the model config's EOS ids
    ignore_eos: bool = False

    def validate(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise EngineError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EngineError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise EngineError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int):
            raise EngineError(f"seed must be an integer, got {self.seed!r}")


@dataclasses.dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]          # the new tokens, a final stop token included
    finish_reason: str            # "stop" (stop token), "length" (max_new_tokens or context full)


@dataclasses.dataclass
class _Request:
    index: int
    tokens: list[int]             # prompt, then generated tokens
    prompt_len: int
    max_new: int                  # 0 = score request
    slot: int = -1
    fed: int = 0                  # tokens already in the slot's cache
    logits: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    params: SamplingParams | None = None
    stop: frozenset = frozenset()

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.fed


def check_token_lists(seqs, *, vocab_size: int, max_len: int, what: str = "sequence", room: int = 0) -> list[list[int]]:
    """Validate a list of token-id lists (non-empty, ids in [0, vocab_size), at most max_len - room
    tokens) -> plain int lists. Raises EngineError naming the first bad sequence."""
    if isinstance(seqs, (str, bytes, dict)) or not isinstance(seqs, (Sequence, np.ndarray)):
        raise EngineError(f"expected a list of token-id lists, got {type(seqs).__name__}")
    out = []
    for i, s in enumerate(seqs):
        if isinstance(s, np.ndarray):
            s = s.tolist()
        if isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise EngineError(f"{what} {i}: expected a list of token ids, got {type(s).__name__}")
        if len(s) == 0:
            raise EngineError(f"{what} {i} is empty")
        for j, t in enumerate(s):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise EngineError(f"{what} {i}: token {j} is {t!r}, not an integer id")
            if not 0 <= t < vocab_size:
                raise EngineError(f"{what} {i}: token id {t} at position {j} is outside the vocabulary "
                                  f"[0, {vocab_size})")
        if len(s) > max_len - room:
            extra = " with room for one new token" if room else ""
            raise EngineError(f"{what} {i} has {len(s)} tokens; the context (max_len={max_len}) holds "
                              f"{max_len - room}{extra}")
        out.append([int(t) for t in s])
    return out


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


# --------------------------------------------------------------------------------------------- jitted steps
_TRACES = collections.Counter()          # (engine id, kind, T, decode_only) -> traces; see Engine.compile_count
_active_engine: list = [None]
# Compiled steps, shared by every engine whose model has the same graph definition (a structurally
# identical model: same config, dtype and modules) and mesh; by model object when the graphdef is
# unhashable (e.g. a config holding a dict).
_JIT: dict = {}
_JIT_BY_MODEL = weakref.WeakKeyDictionary()


def clear_compiled() -> None:
    """Forget every compiled step (the next step of each shape compiles again)."""
    _JIT.clear()
    _JIT_BY_MODEL.clear()


def _jitted_steps(model, graphdef, mesh=None):
    try:
        hash(graphdef)
        cache, key = _JIT, (graphdef, mesh)
    except TypeError:
        cache, key = _JIT_BY_MODEL.setdefault(model, {}), mesh
    if key in cache:
        return cache[key]
    from lingjax import sharding
    model_step = sharding.shard_step(graphdef, model.cfg, mesh)    # plain model.step when mesh is None

    def note(kind, batch):
        _TRACES[(_active_engine[0], kind, batch.tokens.shape[0], batch.decode_only)] += 1

    def score_step(state, caches, batch):
        note("score", batch)
        return model_step(state, batch, caches)

    def sample_step(state, caches, batch, rows, temperature, top_k, top_p, seeds, request_ids, counters):
        note("sample", batch)
        logits, caches = model_step(state, batch, caches, rows)
        toks = sample(logits, temperature, top_k, top_p, seeds, request_ids, counters)
        if mesh is not None:     # every process reads the sampled tokens
            toks = jax.lax.with_sharding_constraint(toks, sharding.replicated(mesh))
        return toks, caches

    fns = (jax.jit(score_step, donate_argnums=1), jax.jit(sample_step, donate_argnums=1))
    cache[key] = fns
    return fns


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
    """

    def __init__(self, model, *, max_batch: int = 8, prefill_chunk: int = 256, max_len: int | None = None,
                 num_slots: int | None = None, max_tokens: int | None = None, decode_order: str = "first",
                 state_dtype=jnp.float32, latent_dtype=None, tp: int | None = None, mesh=None):
        cfg = model.cfg
        self.model, self.cfg = model, cfg
        if max_len is None:
            max_len = min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
        num_slots = max_batch if num_slots is None else num_slots
        for name, v in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk), ("max_len", max_len),
                        ("num_slots", num_slots)):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise EngineError(f"{name} must be an integer >= 1, got {v!r}")
        if max_len > cfg.max_position_embeddings:
            raise EngineError(f"max_len={max_len} exceeds the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings}")
        if num_slots < max_batch:
            raise EngineError(f"num_slots={num_slots} < max_batch={max_batch}: every running request needs a slot")
        max_tokens = max_batch * prefill_chunk if max_tokens is None else max_tokens
        if not (isinstance(max_tokens, int) and max_tokens >= max_batch):
            raise EngineError(f"max_tokens must be an integer >= max_batch={max_batch}, got {max_tokens!r}")
        if decode_order not in ("first", "last"):
            raise EngineError(f"decode_order must be 'first' or 'last', got {decode_order!r}")
        self.max_batch, self.prefill_chunk, self.max_len = max_batch, prefill_chunk, max_len
        self.num_slots, self.max_tokens, self.decode_order = num_slots, max_tokens, decode_order
        b, self.t_buckets = MIN_T_BUCKET, []
        while b < max_tokens:
            self.t_buckets.append(b)
            b *= 2
        self.t_buckets.append(max_tokens)

        from lingjax import sharding
        if mesh is None and tp is not None and tp > 1:
            mesh = _engine_error(sharding.make_mesh, tp)
        if mesh is not None and sharding.tp_of(mesh) == 1 and jax.process_count() == 1:
            mesh = None
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        if mesh is not None:
            self.state = _engine_error(sharding.shard_state, self.state, cfg, mesh)
        self._score_step, self._sample_step = _jitted_steps(model, self.graphdef, mesh)
        self.caches = sharding.init_caches(cfg, mesh, num_slots, max_len, state_dtype=state_dtype,
                                           latent_dtype=latent_dtype or model.dtype)
        self.slots = SlotAllocator(num_slots)
        self.steps = 0

    # ----------------------------------------------------------------------------- introspection
    def buckets(self, kind: str | None = None) -> list[tuple[str, int, bool]]:
        """Every (kind, T, decode_only) step shape this engine can compile."""
        kinds = (kind,) if kind else ("score", "sample")
        return [(k, self.max_batch, True) for k in kinds] + [(k, t, False) for k in kinds for t in self.t_buckets]

    def compiled_shapes(self) -> dict[tuple[str, int, bool], int]:
        return {k[1:]: n for k, n in _TRACES.items() if k[0] == id(self)}

    @property
    def compile_count(self) -> int:
        """Compilations (traces) of the step this engine caused. Engines of structurally identical
        models share compiled steps, so a later engine may cause fewer."""
        return sum(self.compiled_shapes().values())

    # ----------------------------------------------------------------------------- public API
    def score(self, sequences: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
              ) -> list[np.ndarray]:
        """Teacher-forced next-token logits: one float32 [len_i, vocab] array per sequence."""
        reqs = [_Request(i, toks, len(toks), 0) for i, toks in enumerate(self._check(sequences, "sequence", 0))]
        self._run(reqs, "score", progress)
        return [np.concatenate(r.logits, axis=0) for r in reqs]

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_token: Callable[[int, int], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[GenerationOutput]:
        """Sample a continuation of each prompt, with one SamplingParams for all or one per prompt.
        on_token(i, token) is called as request i gets a token; progress(n) as n more requests finish."""
        prompts = self._check(prompts, "prompt", 1)
        params = params or SamplingParams()
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per) != len(prompts):
            raise EngineError(f"{len(per)} SamplingParams for {len(prompts)} prompts")
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, per)):
            if not isinstance(sp, SamplingParams):
                raise EngineError(f"prompt {i}: expected SamplingParams, got {type(sp).__name__}")
            sp.validate()
            stop = () if sp.ignore_eos else self.cfg.eos_ids if sp.stop_token_ids is None else sp.stop_token_ids
            reqs.append(_Request(i, list(p), len(p), sp.max_new_tokens, params=sp, stop=frozenset(stop)))
        self._run(reqs, "sample", progress, on_token)
        return [GenerationOutput(r.tokens[:r.prompt_len], r.tokens[r.prompt_len:], r.finish_reason) for r in reqs]

    # ----------------------------------------------------------------------------- internals
    def _check(self, seqs, what, room):
        return check_token_lists(seqs, vocab_size=self.cfg.vocab_size, max_len=self.max_len, what=what, room=room)

    def _schedule(self, waiting: collections.deque, running: list) -> list[tuple[_Request, int]]:
        while waiting and len(running) < self.max_batch and self.slots.num_free:
            r = waiting.popleft()
            r.slot = self.slots.alloc()
            running.append(r)
        budget = self.max_tokens
        decodes = [(r, 1) for r in running if r.pending == 1]
        budget -= len(decodes)
        prefills = []
        for r in running:
            if r.pending > 1 and budget > 0:
                n = min(self.prefill_chunk, r.pending, budget)
                prefills.append((r, n))
                budget -= n
        return decodes + prefills if self.decode_order == "first" else prefills + decodes

    def _pack(self, pieces):
        """Pieces [(request, n_tokens)] -> host arrays of a StepBatch (+ decode_only)."""
        R = self.max_batch
        decode_only = all(n == 1 for _, n in pieces)
        n_tok = sum(n for _, n in pieces)
        T = R if decode_only else next(t for t in self.t_buckets if t >= n_tok)
        tokens = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        token_seq = np.full(T, R, np.int32)
        slots = np.full(R, -1, np.int32)
        fresh = np.zeros(R, bool)
        cu = np.zeros(R + 1, np.int32)
        off = 0
        for i, (r, n) in enumerate(pieces):
            tokens[off:off + n] = r.tokens[r.fed:r.fed + n]
            positions[off:off + n] = np.arange(r.fed, r.fed + n)
            token_seq[off:off + n] = i
            slots[i], fresh[i] = r.slot, r.fed == 0
            off += n
            cu[i + 1] = off
        cu[len(pieces) + 1:] = off
        return dict(tokens=tokens, positions=positions, token_seq=token_seq, slots=slots, cu_seqlens=cu,
                    fresh=fresh, decode_only=decode_only)

    def _run(self, reqs, kind, progress, on_token=None):
        waiting, running = collections.deque(reqs), []
        R = self.max_batch
        _active_engine[0] = id(self)
        try:
            while waiting or running:
                pieces = self._schedule(waiting, running)
                b = self._pack(pieces)
                batch = StepBatch(**b)
                if self.mesh is not None and jax.process_count() > 1:
                    batch = _global(batch, self.mesh)
                if kind == "score":
                    logits, self.caches = self._score_step(self.state, self.caches, batch)
                    logits = np.asarray(logits)
                    off = 0
                    for r, n in pieces:
                        r.logits.append(logits[off:off + n])
                        off += n
                else:
                    rows = np.maximum(b["cu_seqlens"][1:] - 1, 0).astype(np.int32)
                    ids, counters, top_k = (np.zeros(R, np.int32) for _ in range(3))
                    temp, top_p, seeds = np.zeros(R, np.float32), np.ones(R, np.float32), np.zeros(R, np.uint32)
                    for i, (r, _) in enumerate(pieces):
                        ids[i], counters[i] = r.index, len(r.tokens) - r.prompt_len
                        sp = r.params
                        temp[i], top_k[i], top_p[i], seeds[i] = sp.temperature, sp.top_k, sp.top_p, sp.seed % 2 ** 32
                    host = (rows, temp, top_k, top_p, seeds, ids, counters)
                    if self.mesh is not None and jax.process_count() > 1:
                        host = _global(host, self.mesh)
                    toks, self.caches = self._sample_step(self.state, self.caches, batch, *host)
                    toks = np.asarray(toks)
                self.steps += 1
                finished = []
                for i, (r, n) in enumerate(pieces):
                    r.fed += n
                    if kind == "score":
                        if r.pending == 0:
                            r.finish_reason = "length"
                            finished.append(r)
                    elif r.pending == 0:                       # the piece reached the end: a new token
                        t = int(toks[i])
                        r.tokens.append(t)
                        if on_token is not None:
                            on_token(r.index, t)
                        if t in r.stop:
                            r.finish_reason = "stop"
                        elif len(r.tokens) - r.prompt_len >= r.max_new or len(r.tokens) >= self.max_len:
                            r.finish_reason = "length"
                        if r.finish_reason:
                            finished.append(r)
                for r in finished:
                    running.remove(r)
                    self.slots.free(r.slot)
                    r.slot = -1
                if finished and progress is not None:
                    progress(len(finished))
        except BaseException:
            # A failed or interrupted run: release the slots so the engine stays usable.
            for r in running:
                self.slots.free(r.slot)
            raise
        finally:
            _active_engine[0] = None
        log.debug("engine: %d steps so far, %d compilations", self.steps, self.compile_count)


def _engine_error(fn, *args):
    from lingjax.sharding import ShardingError
    try:
        return fn(*args)
    except ShardingError as e:
        raise EngineError(str(e)) from None


def _global(tree, mesh):
    """Host arrays (identical on every process) -> global arrays replicated over the mesh."""
    from lingjax import sharding
    return jax.tree.map(lambda a: sharding.host_to_global(np.asarray(a), mesh), tree)


def load_model(path, dtype=jnp.bfloat16, mesh=None):
    """(config, model) from a checkpoint directory. Today: an HF directory (config.json + *.safetensors);
    the converted (Orbax) layout is recognised here too once the converter lands (issue 4).
    Raises EngineError with a one-line message naming the problem."""
    import os
    from lingjax.config import ConfigError
    if not os.path.isdir(path):
        raise EngineError(f"model directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EngineError(f"{path} has no config.json: not a checkpoint directory")
    from lingjax.weights import WeightError, load_hf
    from lingjax.sharding import ShardingError, place_fn
    from lingjax.convert import is_converted, load_converted
    try:
        place = None
        if mesh is not None:        # each param goes straight to its shards, one tensor at a time
            from lingjax.config import BailingConfig
            place = place_fn(BailingConfig.from_json(path), mesh)
        if is_converted(path):      # `lingjax convert` output: with a mesh, each device reads its own shard
            sharding = None
            if mesh is not None:
                from jax.sharding import NamedSharding
                from lingjax.config import BailingConfig
                from lingjax.sharding import param_spec, tp_of
                cfg = BailingConfig.from_json(path)
                sharding = lambda p, shape, dt: NamedSharding(mesh, param_spec(p, cfg, tp_of(mesh)))  # noqa: E731
            return load_converted(path, dtype, mtp=False, place=place, sharding=sharding)
        return load_hf(path, dtype=dtype, mtp=False, place=place)      # the engine does not run the MTP layer
    except (ConfigError, WeightError, ShardingError) as e:
        raise EngineError(f"{path}: {e}") from None
