"""Speculative decoding with the checkpoint's MTP (NextN) layer as the draft (issue 16).

    engine = Engine(model, num_speculative_tokens=2)        # model loaded with mtp=True

What one speculative step does, all in one jitted function (`_spec_step_fn`):

1. Verify. A decoding request whose last committed token is x (at position n-1, not yet in the cache)
   and that holds k_r drafts d_1..d_k_r (made by the previous step, kept on the device by slot)
   contributes k_r + 1 rows [x, d_1, .., d_k_r] at positions n-1 .. n-1+k_r to the same packed,
   mixed batch as the other requests' prefill chunks. The main model runs once over the batch.
2. Accept. Row j's logits give p_j, the target distribution of the token at position n+j. Greedy
   requests accept the longest prefix of drafts equal to argmax p_j and add argmax p_a; sampling
   requests run standard speculative rejection sampling (draft d_j accepted with probability
   min(1, p_j(d_j) / q_j(d_j)); at the first rejection a token from norm(max(p_a - q_a, 0)); if all
   are accepted a bonus token from p_{k_r}). p and q are the same temperature / top-k / top-p
   transforms as the plain engine's sampling (`filtered_logits`), so the output distribution equals
   non-speculative sampling. Every step emits 1 .. k_r + 1 tokens per decoding request.
3. Roll back. MLA latents written past the accepted position are simply overwritten later (reads are
   masked to positions <= the reading token's own, and a request's next rows start right after its
   accepted ones). The linear-attention state must be exact: verify requests skip the prefill kernel
   (their slot is passed as -1, so the pool keeps the state from before the step, S_0), their rows'
   outputs come from the decode recurrence S <- exp(g) S + k^T v, o = scale q S from S_0 in float32
   (`verify_linear`), and after acceptance the accepted rows 0..n_acc go through the plain engine's decode
   kernel one position at a time (rows past a request's n_acc as padding), which writes the state: what
   decoding those rows one by one gives, bit for bit.
4. Draft. The MTP layer runs over every packed row (its own paged MLA latent pool: page id p of a
   request's page-table row is page p of the main MLA pools and of the MTP pool) on the main model's final-norm hidden state at t and the embedding of token t+1: for the
   rows of accepted tokens that is the emitted token, for prompt rows the next prompt token, for a
   request's last row the token this step emitted. Every row writes its MTP latent (the attention
   part), but the rest of the block (its MoE) and the final norm run only at each request's last
   committed row, whose output gives draft 1 (`mtp_forward(rows=)`); drafts 2..k re-apply the same
   layer (one row per request) on its own final-norm output and its previous draft, as vLLM and SGLang
   do. Drafts (tokens and their raw float32 logits, needed for q) stay on the device in `SpecState`,
   indexed by slot.

The engine side (`SpecDriver`): steps are not overlapped (the host must know how many tokens each
request accepted before packing the next step; `Engine(overlap=True)` is turned off with a log line),
every step is packed as a prefill-shaped batch (verify rows use the prefill kernels; with
Engine(spec_verify="mla_decode" | "decode") a step of decoding requests only takes the decode kernels instead,
`VERIFY_PATHS`), and a request
gets k_r = min(k, tokens it may still emit - 1) drafts, so nothing is computed past max_new_tokens or
the context. Whether a step has sampling requests is decided on the host and compiled in (each step
shape has a greedy and a drawing twin): a greedy step runs the argmax acceptance and drafts alone, with
no lax.cond, which on the GPU would copy its predicate to the host and hold the host's kernel launches
until the device caught up. Random keys: the plain engine's key of a request's n-th new token,
fold_in(fold_in(key(seed), index), n), drives the bonus/plain sample (so a step without drafts samples exactly as the
plain engine); fold_in(that key, TAG) with TAG_DRAFT, TAG_ACCEPT, TAG_RESIDUAL the draft, the
acceptance test and the residual sample of that position. Stats: drafts proposed / accepted,
acceptance rate and tokens per decoding step (Engine.stats()).

Pages (lingjax/paging.py): a step takes the pages its rows write as Engine._dispatch does, plus those of
the MTP latents drafts 2..k write (up to k - 1 positions past the verify rows) as far as the request's
page promise goes; MTP writes past the pages held are dropped (the drafts that would read them are never
verified: a request gets at most its remaining room - 1 drafts). With the prefix cache (Engine(prefix_cache=
True), `lingjax serve`'s default) the two work together: prefix pages are shared with their MTP latents,
saved linear states are copied between steps as in the plain engine, and prompt blocks are cached only
up to position prompt_len - 2 (the MTP latent at prompt_len - 1 depends on the generated token), so a
cached page depends on the prompt alone. Greedy output stays token for token the plain engine's.

Tensor parallelism: the whole step runs in one shard_map (sharding.py's specs; the MTP latent cache,
drafts and draft logits are replicated like the MLA cache), logits all-gathered over the vocabulary.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lingjax.batch import StepBatch
from lingjax.kernels import linear_attention as la

F32 = jnp.float32
# How a step whose requests are all decoding (one committed row each, plus its drafts) runs its verify rows
# (Engine(spec_verify=...)); steps with a prefill chunk or a score request always take "prefill" (they share its
# compiled steps).
#   prefill     every row in the packed prefill-shaped step: MLA through the paged prefill kernel, the linear
#               layers' prefill kernel launched with the verify slots skipped
#   mla_decode  the main MLA layers through the paged decode kernel, one row per token with its own length
#               (StepBatch.decode_only), and the MTP layer's attention only at the one row per request whose
#               output is used (mtp_forward(attend_rows=True): the decode kernel); the linear layers as "prefill"
#   decode      "mla_decode", and no linear prefill-kernel launch: the committed row through the decode kernel,
#               the drafts from the state after it (main_hidden(first_decode=True)); k rollback calls, not k + 1
#               (the default: the fastest on H200, session 8, scripts/bench_notes_spec.md)
VERIFY_PATHS = ("prefill", "mla_decode", "decode")
TAG_DRAFT, TAG_ACCEPT, TAG_RESIDUAL = 1, 2, 3
MAX_LOGPROBS = 20


# ------------------------------------------------------------------------------------------ state
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    """Draft state: the MTP layer's paged MLA latent cache [num_pages, page_size, r + rope] (page id p is
    page p of the main model's MLA pools too: a request's page-table row indexes both), the k drafts
    [num_slots, k] int32 and their raw float32 MTP logits [num_slots, k, V], by slot."""
    mtp: jax.Array
    drafts: jax.Array
    draft_logits: jax.Array


def init_spec_state(cfg, num_slots: int, num_pages: int, page_size: int, k: int, latent_dtype) -> SpecState:
    return SpecState(mtp=jnp.zeros((num_pages, page_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim), latent_dtype),
                     drafts=jnp.zeros((num_slots, k), jnp.int32),
                     draft_logits=jnp.zeros((num_slots, k, cfg.vocab_size), F32))


# ------------------------------------------------------------------------------------------ sampling
def filtered_logits(logits, temperature, top_k, top_p):
    """logits [..., V] f32; temperature / top_k / top_p broadcast over the leading dims -> logits / t
    with tokens outside top-k and outside the top-p nucleus set to -inf: the distribution the plain
    engine samples from (lingjax.engine.sample; same tie handling). temperature <= 0 is treated as 1
    (greedy rows do not use it)."""
    V = logits.shape[-1]
    t = jnp.where(temperature > 0, temperature, 1.0)[..., None]
    x = logits / t
    srt = -jnp.sort(-x, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)[..., None]
    kth = jnp.take_along_axis(srt, k - 1, axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    srt = jnp.where(jnp.arange(V) < k, srt, -jnp.inf)
    p = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p
    keep = (before < top_p[..., None]) | (jnp.arange(V) == 0)
    thr = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x < thr, -jnp.inf, x)


def _key(seed, index, counter):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), counter)


def draw(logits, temperature, top_k, top_p, seeds, ids, counters, tag, sampling=None):
    """One draft per row [R] from raw logits [R, V] (greedy rows: argmax), key of (seed, index,
    counter, tag). sampling (static): False: every row is greedy (the argmax alone); True: the sampling
    path (greedy rows in it still take the argmax); None: chosen on the device (lax.cond on any
    temperature > 0). The engine passes it from the host: on the GPU a lax.cond copies its predicate
    to the host and waits for it, which stalls the host's kernel launches until the device has run
    everything before it."""
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)

    def sampled():
        keys = jax.vmap(lambda s, i, c: jax.random.fold_in(_key(s, i, c), tag))(seeds, ids, counters)
        x = filtered_logits(logits, temperature, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, x)
        return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
    if sampling is None:
        return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
    return sampled() if sampling else greedy


def accept(target_logits, drafts, draft_logits, num_drafts, temperature, top_k, top_p, seeds, ids, counters,
           sampling=None):
    """Verify drafts against the main model.

    target_logits [R, k+1, V] raw f32 (row j: the token after draft j, i.e. new-token index
    counters + j); drafts [R, k]; draft_logits [R, k, V] raw MTP logits; num_drafts [R] (drafts
    beyond it are ignored). -> (tokens [R, k+1]: accepted drafts then one more token, zeros after;
    num_accepted [R] in 0..num_drafts; the emitted count is num_accepted + 1). Greedy rows
    (temperature 0) accept drafts equal to the argmax; a batch without sampling rows takes only
    that path, without the sorts of the top-k / top-p filters. sampling (static) as in `draw`: False
    the greedy path, True the sampling path (same result for greedy rows), None a lax.cond."""
    R, K1, V = target_logits.shape
    k = K1 - 1
    best = jnp.argmax(target_logits, -1).astype(jnp.int32)                    # [R, k+1]
    if k:
        ok = (best[:, :k] == drafts) & (jnp.arange(k)[None, :] < num_drafts[:, None])
        n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    else:
        n_acc = jnp.zeros(R, jnp.int32)
    toks = jnp.where(jnp.arange(K1)[None, :] <= n_acc[:, None], best, 0).astype(jnp.int32)
    sample = functools.partial(_accept_sampling, target_logits, drafts, draft_logits, num_drafts, temperature,
                               top_k, top_p, seeds, ids, counters)
    if sampling is None:
        return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: (toks, n_acc.astype(jnp.int32)))
    return sample() if sampling else (toks, n_acc.astype(jnp.int32))


def _accept_sampling(target_logits, drafts, draft_logits, num_drafts, temperature, top_k, top_p, seeds, ids,
                     counters):
    """`accept` for a batch with sampling rows (greedy rows in it still take the argmax path)."""
    R, K1, V = target_logits.shape
    k = K1 - 1
    greedy = temperature <= 0
    j = jnp.arange(k)
    bc = lambda a: jnp.broadcast_to(a[:, None], (R, K1))                         # noqa: E731
    xp = filtered_logits(target_logits, bc(temperature), bc(top_k), bc(top_p))   # [R, k+1, V]
    logp = jax.nn.log_softmax(xp, axis=-1)
    if k:
        bk = lambda a: jnp.broadcast_to(a[:, None], (R, k))                      # noqa: E731
        logq = jax.nn.log_softmax(filtered_logits(draft_logits, bk(temperature), bk(top_k), bk(top_p)), axis=-1)
        pd = jnp.take_along_axis(logp[:, :k], drafts[..., None], -1)[..., 0]
        qd = jnp.take_along_axis(logq, drafts[..., None], -1)[..., 0]
        ukeys = jax.vmap(lambda s, i, c: jax.vmap(
            lambda jj: jax.random.fold_in(_key(s, i, c + jj), TAG_ACCEPT))(j))(seeds, ids, counters)
        u = jax.vmap(jax.vmap(lambda kk: jax.random.uniform(kk, (), F32)))(ukeys)
        ok_sample = jnp.log(u) < pd - qd              # u < p(d) / q(d)
        ok_greedy = jnp.argmax(target_logits[:, :k], -1) == drafts
        ok = jnp.where(greedy[:, None], ok_greedy, ok_sample) & (j[None, :] < num_drafts[:, None])
        n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    else:
        n_acc = jnp.zeros(R, jnp.int32)
    rows = jnp.arange(R)
    xa, la_ = xp[rows, n_acc], target_logits[rows, n_acc]                       # [R, V]
    c_a = counters + n_acc
    plain = jax.vmap(jax.random.categorical)(jax.vmap(_key)(seeds, ids, c_a), xa)
    last = jnp.where(greedy, jnp.argmax(la_, -1), plain)
    if k:
        rejected = n_acc < num_drafts
        qa = jnp.exp(logq[rows, jnp.minimum(n_acc, k - 1)])
        resid = jnp.maximum(jnp.exp(logp[rows, n_acc]) - qa, 0.0)
        has = jnp.sum(resid, -1) > 0
        rkeys = jax.vmap(lambda s, i, c: jax.random.fold_in(_key(s, i, c), TAG_RESIDUAL))(seeds, ids, c_a)
        res = jax.vmap(jax.random.categorical)(rkeys, jnp.where(resid > 0, jnp.log(resid), -jnp.inf))
        res = jnp.where(has, res, plain)
        last = jnp.where(greedy | ~rejected, last, res)
        toks = jnp.where(jnp.arange(K1)[None, :] < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), 0)
    else:
        toks = jnp.zeros((R, 1), jnp.int32)
    toks = jnp.where(jnp.arange(K1)[None, :] == n_acc[:, None], last[:, None], toks)
    return toks.astype(jnp.int32), n_acc.astype(jnp.int32)


# ------------------------------------------------------------------------------------------ model side
def main_hidden(model, batch, caches, vrows, vslots, is_verify, n_drafts, first_decode=False):
    """The main model over a packed batch (as BailingModel.step, linear layers through the prefill
    kernels) -> (final-norm hidden [T, d], caches, saved) where saved holds, per linear layer, what
    the rollback needs: (k and v at the verify rows [R, k+1, H, D], log decay [H], scale, kernels).

    Verify sequences (is_verify [R]: a decoding request's rows [x, d_1..d_n], n = n_drafts > 0, at
    vrows[r, :n+1]) skip the prefill kernel (their slot passed as -1: the kernel leaves the slot
    untouched, so the pool still holds S_0 after it): their linear-attention outputs come from the decode
    recurrence from S_0 in float32 (`verify_linear`), and only the rollback writes their state. Per verify
    request and linear layer: S_0 read for the outputs, then read and the state written once per accepted
    row by the rollback's decode calls (a rejected first draft: 3 state transfers, where the prefill kernel
    and a rollback from a copy of S_0 took 6).

    first_decode (static; only for a batch.decode_only step, every request one committed row at vrows[r, 0]
    plus its drafts: `VERIFY_PATHS` "decode"): no prefill-kernel launch at all. Each request's committed row
    goes through the plain engine's decode kernel (it is always accepted: the kernel writes S_1 and gives
    that row's output, the plain engine's arithmetic), the draft rows' outputs come from verify_linear from
    S_1, and `saved` holds the draft rows only (the rollback then advances over drafts 1..n_acc: k decode
    calls per layer, not k + 1). The state is the same decode calls in the same order as the default path's:
    bit for bit the same."""
    x = model.embed(batch.tokens)
    lin, mla = list(caches.linear), list(caches.mla)
    saved = []
    i_lin = i_mla = 0
    T = batch.tokens.shape[0]
    kslots = jnp.where(is_verify, -1, batch.slots)                   # verify sequences: not the kernel's
    j1 = jnp.arange(vrows.shape[1])
    wrows = jnp.where(is_verify[:, None] & (j1[None, :] <= n_drafts[:, None]), vrows, T)     # T: dropped
    for layer in model.layers:
        if layer.is_mla:
            x, mla[i_mla] = layer.step(x, batch, mla[i_mla])
            i_mla += 1
            continue
        att = layer.attention
        h = layer.input_layernorm(x)
        q, k, v = att.qkv(h, batch.positions)
        g = att.decay(q.shape[-2])
        if first_decode:
            r0 = vrows[:, 0]                         # each request's committed row
            o0, pool = la.decode(q[r0], k[r0], v[r0], g, lin[i_lin], batch.slots, batch.fresh, scale=att.scale,
                                 impl=att.kernels)
            o = jnp.zeros((T,) + o0.shape[1:], o0.dtype).at[jnp.where(batch.slots >= 0, r0, T)].set(o0, mode='drop')
            if vrows.shape[1] > 1:                   # the drafts' rows, from S_1
                dr = vrows[:, 1:]
                kv, vv = k[dr], v[dr]
                o = o.at[wrows[:, 1:]].set(verify_linear(q[dr], kv, vv, g, pool[vslots], att.scale).astype(o.dtype),
                                           mode='drop')
                saved.append((kv, vv, g, att.scale, att.kernels))
            else:
                saved.append(None)
        else:
            o, pool = la.prefill(q, k, v, g, lin[i_lin], kslots, batch.cu_seqlens, batch.fresh, scale=att.scale,
                                 impl=att.kernels)
            s0 = pool[vslots]                            # S_0: the kernel skipped the verify slots
            kv, vv = k[vrows], v[vrows]
            o = o.at[wrows].set(verify_linear(q[vrows], kv, vv, g, s0, att.scale).astype(o.dtype), mode='drop')
            saved.append((kv, vv, g, att.scale, att.kernels))
        x = x + att.output(o, h)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        lin[i_lin] = pool
        i_lin += 1
    return model.norm(x), caches.replace(linear=tuple(lin), mla=tuple(mla)), saved


def verify_linear(q, k, v, log_decay, s0, scale):
    """Linear-attention outputs of verify rows q, k, v [R, n, H, D] from the states S_0 [R, H, D, D] with the
    decode recurrence (lingjax.kernels.linear_attention.reference.decode's float32 arithmetic, token by token:
    S <- exp(g) S + k^T v, o = scale q S) -> float32 [R, n, H, D]."""
    S = s0.astype(F32)
    decay = jnp.exp(log_decay.astype(F32))[None, :, None, None]
    out = []
    for j in range(q.shape[1]):
        S = decay * S + k[:, j].astype(F32)[..., :, None] * v[:, j].astype(F32)[..., None, :]
        out.append(scale * jnp.einsum('rhk,rhkv->rhv', q[:, j].astype(F32), S, precision='highest'))
    return jnp.stack(out, 1)


def rollback_linear(lin, saved, slots, n_acc, is_verify, first=0):
    """Advance the verify requests' linear states, still S_0 in the pool (the prefill kernel skipped their
    slots), over their accepted rows 0..n_acc with the decode kernel the plain engine runs (la.decode, one
    call per row position, rows past a request's n_acc passed as padding): the plain engine's decode
    arithmetic, so the state is what decoding those rows one by one gives, bit for bit, in every kernel
    implementation. lin: per linear layer [rows, H, D, D] -> the same, updated. first: the row saved[.][0][:, 0]
    is (1: the committed row already went through the decode kernel, main_hidden(first_decode=True), and
    saved holds rows 1..k; a layer's entry None: nothing to advance)."""
    lin = list(lin)
    fresh = jnp.zeros(slots.shape, bool)
    for i, entry in enumerate(saved):
        if entry is None:
            continue
        k, v, g, scale, impl = entry
        pool = lin[i]
        for j in range(k.shape[1]):
            rows = jnp.where(is_verify & (j + first <= n_acc), slots, -1)
            _, pool = la.decode(k[:, j], k[:, j], v[:, j], g, pool, rows, fresh, scale=scale, impl=impl)  # (q: unused)
        lin[i] = pool
    return tuple(lin)


def mtp_forward(model, batch, cache, hidden, next_tokens, rows=None, attend_rows=False):
    """The MTP layer over a packed batch with its own paged latent cache (batch.page_table) -> (final-norm
    output [T, d], cache). rows [N] (optional): the output only at these rows -> [N, d]. The latents of
    every row are written (later drafts attend to them), but the MoE, the rest of the block after the
    attention, runs only on the rows whose output is used: a verify step needs one row per request, and
    with random routing each extra row through the MoE reads about num_experts_per_tok more experts.
    attend_rows (with rows): the attention too runs only at these rows (DecoderLayer.step(attend_rows=True): the
    paged decode kernel at one row per request instead of the whole batch's attention); the latents of every
    row are still written."""
    m = model.mtp[0]
    z = m.eh_proj(jnp.concatenate([m.enorm(model.embed(next_tokens)), m.hnorm(hidden.astype(model.dtype))], -1))
    z, cache = m.block.step(z, batch, cache, rows=rows, attend_rows=attend_rows)
    return m.final_layernorm(z), cache


# ------------------------------------------------------------------------------------------ jitted step
@functools.partial(jax.jit, static_argnames=("graph", "mode", "k", "verify"), donate_argnames=("caches", "spec"))
def _spec_step_fn(params, caches, spec, batch, draft_take, next_tok, next_take, start, num_drafts, produce, held,
                  temperature, top_k, top_p, seeds, request_ids, counters, *, graph, mode, k, verify="prefill"):
    """One speculative engine step (module docstring). Host arrays: draft_take [T] (index into the
    flattened [num_slots, k] drafts of a packed token that is a draft, else -1); next_tok / next_take
    [T]: the MTP input token of each row (a known token, or the index into the flattened [R, k+1]
    emitted tokens); start [R]: first verify row (a prefill's last row); num_drafts [R]; produce [R]
    (the request emits tokens this step); held [R]: positions the request row's pages cover (drafts 2..k
    write the MTP latents of later positions; past `held` those writes are dropped, and the drafts they
    would feed are never verified: lingjax.speculative.SpecDriver.dispatch). mode (static): (full logits for score requests, want
    top logprobs, any emitting request samples: False runs the greedy acceptance and drafts alone, with no
    lax.cond: on the GPU each one waits for its predicate on the host, `draw`) -> (logits | None, tokens
    [R, k+1], n_emit [R], logprobs [R, k+1], top ids, top logprobs | None, caches, spec). Under tensor
    parallelism the whole step runs inside one shard_map (sharding.py's specs); logits are all-gathered
    over the vocabulary inside it, so acceptance and drafting run identically on every device.
    verify (static, `VERIFY_PATHS`): "decode" with a batch.decode_only batch (every request one committed row
    plus its drafts) runs main_hidden(first_decode=True); otherwise the linear layers take today's path. The
    main MLA layers follow batch.decode_only (StepBatch: the decode kernel, one row per token); the MTP layer's
    attention runs at its output rows only unless verify is "prefill" (SpecDriver passes "prefill" for every
    step that is not decode-only)."""
    from lingjax import sharding
    want_logits, want_top, sampling = mode
    graph.traces[("spec" + ("+score" if want_logits else "") + ("+top" if want_top else "")
                  + ("+sample" if sampling else "") + ("" if verify == "prefill" else "+" + verify),
                  batch.tokens.shape[0], batch.decode_only)] += 1
    state = jax.tree.unflatten(graph.treedef, params)
    host = (draft_take, next_tok, next_take, start, num_drafts, produce, held, temperature, top_k, top_p, seeds,
            request_ids, counters)
    tp = sharding.tp_of(graph.mesh)
    if tp == 1:
        return _spec_body(graph.graphdef, False, want_logits, want_top, sampling, k, verify, state, caches, spec, batch,
                          host)
    from jax.sharding import PartitionSpec as P
    gather = sharding.logits_spec(graph.cfg, tp) != sharding.REPLICATED
    body = functools.partial(_spec_body, graph.graphdef, gather, want_logits, want_top, sampling, k, verify)
    rep = sharding.REPLICATED
    out_specs = (rep if want_logits else None, rep, rep, rep, rep if want_top else None, rep if want_top else None,
                 sharding.cache_specs(), rep)
    f = jax.shard_map(body, mesh=graph.mesh, in_specs=(sharding.state_specs(state, graph.cfg, tp), sharding.cache_specs(),
                                                      rep, rep, rep), out_specs=out_specs, check_vma=False)
    del P
    return f(state, caches, spec, batch, host)


def _spec_body(graphdef, gather, want_logits, want_top, sampling, k, verify, state, caches, spec, batch, host):
    (draft_take, next_tok, next_take, start, num_drafts, produce, held, temperature, top_k, top_p, seeds, request_ids,
     counters) = host
    model = nnx.merge(graphdef, state)

    def logits_of(y):          # full-vocabulary logits (all-gathered under tensor parallelism)
        lg = model.logits(y)
        return jax.lax.all_gather(lg, "tp", axis=lg.ndim - 1, tiled=True) if gather else lg

    with model.precision():
        R, T = start.shape[0], batch.tokens.shape[0]
        num_slots = spec.drafts.shape[0]
        flat = spec.drafts.reshape(-1)
        tokens = jnp.where(draft_take >= 0, flat[jnp.maximum(draft_take, 0)], batch.tokens)
        batch = dataclasses.replace(batch, tokens=tokens)
        vslots = jnp.clip(batch.slots, 0, num_slots - 1)
        j1 = jnp.arange(k + 1)
        vrows = jnp.clip(start[:, None] + j1[None, :], 0, T - 1)
        is_verify = produce & (num_drafts > 0) & (batch.slots >= 0)
        first_decode = verify == "decode" and batch.decode_only
        y, caches, saved = main_hidden(model, batch, caches, vrows, vslots, is_verify, num_drafts, first_decode)
        lrows = jnp.clip(start[:, None] + jnp.minimum(j1[None, :], num_drafts[:, None]), 0, T - 1)   # [R, k+1]
        if want_logits:
            logits = logits_of(y)
            target = logits[lrows]
        else:
            logits = None
            target = logits_of(y[lrows])
        drafts = spec.drafts[vslots]
        dlog = spec.draft_logits[vslots]
        toks, n_acc = accept(target, drafts, dlog, num_drafts, temperature, top_k, top_p, seeds, request_ids,
                             counters, sampling)
        caches = caches.replace(linear=rollback_linear(caches.linear, saved, batch.slots, n_acc, is_verify,
                                                       first=int(first_decode)))

        # Drafts for the next step: MTP latents of every row, its output at one row per request, then k - 1
        # more single-row passes.
        nxt = jnp.where(next_take >= 0, toks.reshape(-1)[jnp.maximum(next_take, 0)], next_tok)
        base = jnp.clip(start + n_acc, 0, T - 1)
        h, mtp_cache = mtp_forward(model, batch, spec.mtp, y, nxt, rows=base, attend_rows=verify != "prefill")
        pos = batch.positions[base]
        new_counters = counters + n_acc + 1
        d_slots = jnp.where(produce, batch.slots, -1)
        lg = logits_of(h)
        d = draw(lg, temperature, top_k, top_p, seeds, request_ids, new_counters, TAG_DRAFT, sampling)
        new_d, new_l = d[:, None], lg[:, None]
        if k > 1:                     # drafts 2..k: one row per request, in a scan (traced once, not k - 1 times)
            def again(carry, j):
                h, prev, cache = carry
                b1 = StepBatch(tokens=prev, positions=pos + j, token_seq=jnp.arange(R, dtype=jnp.int32),
                               slots=jnp.where(pos + j < held, d_slots, -1),
                               cu_seqlens=jnp.arange(R + 1, dtype=jnp.int32), fresh=jnp.zeros(R, bool),
                               page_table=batch.page_table, decode_only=True)
                h, cache = mtp_forward(model, b1, cache, h, prev)
                lg = logits_of(h)
                d = draw(lg, temperature, top_k, top_p, seeds, request_ids, new_counters + j, TAG_DRAFT, sampling)
                return (h, d, cache), (d, lg)
            (_, _, mtp_cache), (ds, lgs) = jax.lax.scan(again, (h, d, mtp_cache), jnp.arange(1, k))
            new_d = jnp.concatenate([new_d, ds.T], 1)
            new_l = jnp.concatenate([new_l, jnp.moveaxis(lgs, 0, 1)], 1)
        dst = jnp.where(produce & (batch.slots >= 0), batch.slots, num_slots)
        spec = SpecState(mtp=mtp_cache,
                         drafts=spec.drafts.at[dst].set(new_d, mode='drop'),
                         draft_logits=spec.draft_logits.at[dst].set(new_l, mode='drop'))

        lse = jax.nn.logsumexp(target, axis=-1)
        lp = jnp.take_along_axis(target, toks[..., None], -1)[..., 0] - lse
        top_ids = top_lp = None
        if want_top:
            top, top_ids = jax.lax.top_k(target, MAX_LOGPROBS)
            top_lp = top - lse[..., None]
        n_emit = jnp.where(produce, n_acc + 1, 0)
    return logits, toks, n_emit, lp, top_ids, top_lp, caches, spec


def clear_compiled() -> None:
    _spec_step_fn.clear_cache()


# ------------------------------------------------------------------------------------------ engine side
@dataclasses.dataclass
class SpecFlight:
    pieces: list                  # [(request, rows)] in packed order (rows: verify rows or chunk tokens)
    produces: list
    outputs: tuple                # (logits, tokens, n_emit, logprobs, top ids, top logprobs)
    top_n: list
    num_drafts: list


class SpecDriver:
    """Host side of speculative decoding for one Engine: packs verify rows, runs `_spec_step_fn`,
    reads back the emitted tokens (Engine._dispatch / _collect hand over to it)."""

    def __init__(self, engine, k: int, output_type, verify: str = "prefill"):
        self.k = k
        self.verify = verify               # VERIFY_PATHS
        self.output_type = output_type     # lingjax.engine.RequestOutput (passed in: no import cycle)
        self.state = self._new_state(engine)
        self.counts = dict(drafts=0, accepted=0, verify_pieces=0, verify_tokens=0)

    def _new_state(self, e):
        st = init_spec_state(e.cfg, e.num_slots, e.num_pages, e.page_size, self.k, e._cache_dtypes["latent_dtype"])
        if e.mesh is not None:                       # replicated over the mesh, like the MLA cache
            from lingjax import sharding
            return jax.device_put(st, sharding.replicated(e.mesh))
        return jax.device_put(st, e._placement())

    def reset(self, e):
        if any(a.is_deleted() for a in jax.tree.leaves(self.state)):
            self.state = self._new_state(e)

    def stats(self) -> dict:
        c = self.counts
        return dict(speculative_tokens=self.k, spec_drafts=c["drafts"], spec_accepted=c["accepted"],
                    spec_verify_steps=c["verify_pieces"],
                    acceptance_rate=c["accepted"] / c["drafts"] if c["drafts"] else 0.0,
                    tokens_per_step=c["verify_tokens"] / c["verify_pieces"] if c["verify_pieces"] else 0.0)

    def num_drafts(self, e, r) -> int:
        """Drafts to verify for a decoding request: k, fewer near max_new_tokens or the context end."""
        n = len(r.tokens)
        if r.score or n == r.prompt_len or r.fed != n - 1:
            return 0
        room = min(r.max_new - (n - r.prompt_len), e.max_len - n)
        return max(0, min(self.k, room - 1))

    def dispatch(self, e, pieces) -> SpecFlight:
        R, k = e.max_batch, self.k
        nd = [self.num_drafts(e, r) if n == 1 else 0 for r, n in pieces]
        rows = [n + d for (r, n), d in zip(pieces, nd)]
        held = np.zeros(R, np.int32)
        for i, ((r, n), d) in enumerate(zip(pieces, nd)):
            # pages for the rows written (verify rows included), and for the MTP latents of drafts 2..k
            # (positions up to fed + n + d + k - 2) as far as r's promise goes: past it no draft is verified
            e._grow(r, r.fed + n + d)
            e._grow(r, max(r.fed + n + d, min(r.fed + n + d + k - 1, e._pages_needed(r) * e.page_size)))
            held[i] = len(r.pages) * e.page_size
        n_tok = sum(rows)
        T = next(t for t in e.t_buckets if t >= n_tok)
        tok, pos, token_seq, draft_take, next_tok, next_take, cu = [], [], [], [], [], [], [0]
        start = np.zeros(R, np.int32)
        num_drafts = np.zeros(R, np.int32)
        produce = np.zeros(R, bool)
        produces = []
        for i, ((r, n), d) in enumerate(zip(pieces, nd)):
            f = r.fed
            prod = f + n == len(r.tokens)
            produces.append(prod)
            produce[i] = prod and not r.score
            tok += r.tokens[f:f + n] + [0] * d
            draft_take += [-1] * n + [r.slot * k + j for j in range(d)]
            pos += range(f, f + n + d)
            token_seq += [i] * (n + d)
            # MTP input of each row: the token after it (known, or emitted by this step).
            for t in range(f, f + n):
                if t + 1 < len(r.tokens):
                    next_tok.append(r.tokens[t + 1])
                    next_take.append(-1)
                else:
                    next_tok.append(0)
                    next_take.append(i * (k + 1) if not r.score else -1)
            next_tok += [0] * d
            next_take += [i * (k + 1) + j for j in range(1, d + 1)]
            start[i] = cu[-1] + (n - 1)
            num_drafts[i] = d
            cu.append(cu[-1] + n + d)
        pad = T - n_tok
        pad_i = lambda a, v: np.asarray(a + [v] * pad, np.int32)      # noqa: E731
        slots = np.full(R, -1, np.int32)
        fresh = np.zeros(R, bool)
        slots[:len(pieces)] = [r.slot for r, _ in pieces]
        fresh[:len(pieces)] = [r.fed == 0 for r, _ in pieces]
        page_table = np.zeros((R, e.max_pages), np.int32)
        page_table[:len(pieces)] = e.page_table[slots[:len(pieces)]]
        # a step of decoding requests only (one committed row each) may take the decode kernels (VERIFY_PATHS)
        decode_only = self.verify != "prefill" and all(n == 1 and not r.score for r, n in pieces)
        batch = StepBatch(tokens=pad_i(tok, 0), positions=pad_i(pos, 0), token_seq=pad_i(token_seq, R), slots=slots,
                          cu_seqlens=np.asarray(cu + [n_tok] * (R - len(pieces)), np.int32), fresh=fresh,
                          page_table=page_table, decode_only=decode_only)
        ids, counters, top_k = (np.zeros(R, np.int32) for _ in range(3))
        temp, top_p, seeds = np.zeros(R, np.float32), np.ones(R, np.float32), np.zeros(R, np.uint32)
        top_n = [0] * len(pieces)
        for i, (r, _) in enumerate(pieces):
            if not r.score:
                ids[i] = r.index % 2 ** 31
                counters[i] = len(r.tokens) - r.prompt_len
                temp[i], top_k[i], top_p[i], seeds[i] = r.sampling
                top_n[i] = r.params.logprobs or 0
        # drawing twin only when a request that emits tokens this step samples (other rows' acceptance
        # and drafts are discarded): prefill-only steps are always greedy-only
        mode = (any(r.score for r, _ in pieces), any(top_n), bool(((temp > 0) & produce).any()))
        out = _spec_step_fn(e._params, e.caches, self.state, batch, pad_i(draft_take, -1), pad_i(next_tok, 0),
                            pad_i(next_take, -1), start, num_drafts, produce, held, temp, top_k, top_p, seeds, ids,
                            counters, graph=e._graph, mode=mode, k=k, verify=self.verify if decode_only else "prefill")
        logits, toks, n_emit, lp, top_ids, top_lp, e.caches, self.state = out
        e.steps += 1
        e._advance(pieces, [bool(produce[i]) for i in range(len(pieces))], src_rows=False)
        return SpecFlight(list(pieces), produces, (logits, toks, n_emit, lp, top_ids, top_lp), top_n, nd)

    def collect(self, e, f: SpecFlight):
        import time
        RequestOutput = self.output_type
        t0 = time.perf_counter()
        logits, toks, n_emit, lp, top_ids, top_lp = (None if a is None else np.asarray(a) for a in f.outputs)
        e._counts["wait_seconds"] += time.perf_counter() - t0
        outs, off = [], 0
        for i, (r, n) in enumerate(f.pieces):
            live = r.finish_reason is None
            d = f.num_drafts[i]
            if r.score:
                outs += e._score_rows(r, logits[off:off + n], f.produces[i])
            elif f.produces[i]:
                r.inflight -= 1
                m = int(n_emit[i])
                if d:
                    self.counts["drafts"] += d
                    self.counts["accepted"] += m - 1
                    self.counts["verify_pieces"] += 1
                if live:
                    new, lps, tops, reason = [], [], [], None
                    for j in range(m):
                        t = int(toks[i, j])
                        r.tokens.append(t)
                        new.append(t)
                        lps.append(float(lp[i, j]))
                        tn = f.top_n[i]
                        tops.append([(int(a), float(b)) for a, b in zip(top_ids[i, j, :tn], top_lp[i, j, :tn])]
                                    if tn else [])
                        n_new = len(r.tokens) - r.prompt_len
                        reason = ("stop" if t in r.stop else
                                  "length" if n_new >= r.max_new or len(r.tokens) >= e.max_len else None)
                        if reason:
                            break
                    if d:
                        self.counts["verify_tokens"] += len(new)
                    r.fed = len(r.tokens) - 1
                    e._counts["generated_tokens"] += len(new)
                    if reason:
                        e._finish(r, reason)
                    want = r.params.logprobs is not None
                    outs.append(RequestOutput(r.id, new, lps if want else None, tops if want else None,
                                              reason is not None, reason, r.prompt_len, len(r.tokens) - r.prompt_len))
            off += n + d
        return outs


# ------------------------------------------------------------------------------------------ scoring
@functools.partial(jax.jit, static_argnames=("graphdef",))
def _mtp_score_fn(state, tokens, *, graphdef):
    model = nnx.merge(graphdef, state)
    with model.precision():
        return model.mtp_logits(tokens, model.hidden(tokens))


def mtp_score(model, sequences, *, bucket: int = 64) -> list[np.ndarray]:
    """The MTP layer's logits for each token sequence: float32 [len_i, V], row t computed from the main
    model's final-norm hidden state at t and the embedding of token t+1, causal over positions 0..t; the
    last row uses token id 0 (SPEC §5.2, App. B; `lingjax score --mtp`). A full forward without a cache,
    one sequence at a time, right-padded with id 0 to a multiple of `bucket` (causal: padding changes no
    earlier row, and row len-1 sees id 0 as its next token, as defined)."""
    if not len(getattr(model, "mtp", ())):
        raise ValueError("the model has no MTP layer (load it with mtp=True)")
    graphdef, state = nnx.split(model)
    out = []
    for s in sequences:
        n = len(s)
        T = -(-n // bucket) * bucket
        tok = np.zeros((1, T), np.int32)
        tok[0, :n] = s
        out.append(np.asarray(_mtp_score_fn(state, jnp.asarray(tok), graphdef=graphdef))[0, :n])
    return out
