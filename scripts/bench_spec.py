#!/usr/bin/env python
"""Cost of a speculative verify step (k = 1, 2, 3 MTP drafts) against a plain decode step (issue 16).

    PYTHONPATH=.:scripts python3 scripts/bench_spec.py --profile --out $OUT/bench_spec.json         # one H200
    PYTHONPATH=.:scripts python3 scripts/bench_spec.py --floor-only                                 # no device
    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 scripts/bench_spec.py --preset tiny --smoke      # CPU check

Model: a preset of scripts/shapes.py (default flash8: Ling-2.6-flash layer shapes, 8 layers, vocab cut
to 32768) plus one MTP layer (MLA + MoE, as the checkpoint's), random bf16 weights made on device.
Random weights accept (almost) no drafts, so acceptance cannot be measured here; the step costs are what
matter and do not depend on it.

For each batch B (requests, each at context --context): the device time of
  plain   one engine decode step (lingjax.engine._step_fn: B tokens through the main model, sampling),
  verify  one speculative step (lingjax.speculative._spec_step_fn) with k drafts per request: B (k + 1)
          tokens through the main model, acceptance, linear-state rollback, the MTP layer's latents over
          the B (k + 1) rows and its MoE at one row per request, and k - 1 more single-row MTP passes
          (the next step's drafts),
each the median over --reps runs of --steps steps dispatched back to back (caches donated). Reported:
cost ratio verify / plain and the speedup implied at acceptance a in --accept: expected tokens per step
(1 - a^(k+1)) / (1 - a) over the cost ratio (independent per-draft acceptance a). Target: at B = 1,
k = 1 the ratio is <= 1.15. JSON to --out after every measurement (a run cut short keeps its rows).

Correctness, on the device before timing: the first (warm-up) call of the plain step and of each verify
step start from the same zeroed caches with the same first token per request, so the verify step's
first emitted token (the argmax of its row 0) must be the plain step's greedy token and its logprob the
plain one; the agreement (share of requests, max |logprob difference|) is printed and kept in the JSON
(bf16 decode and prefill kernels round differently: a near-tie may flip; below 75% agreement or a
difference above 0.1 the run stops).

The floor (`step_bytes`): the bytes a step must read or write, over the copy bandwidth measured at the
start (bench_moe.copy_bandwidth: the larger of JAX's and PyTorch's copy, 4.28 TB/s on the H200; session 5's
calls B and C used a jitted bf16 y = 2x alone, which measured 2.66, 2.14 and 1.74 TB/s in three runs, so their
floor ms columns are 1.6-2.5x high, each by its own run's figure; the floor ratios do not depend on it),
in the columns "floor ms":
  weights     every main-model parameter but the routed experts, the embedding and the lm_head, once;
  experts     per MoE layer, the distinct experts the step's tokens route to, times one expert's bytes:
              with independent uniform routing E[distinct] = E (1 - (1 - top_k / E)^n) for n tokens
              (exact for independent tokens, by symmetry); that the random model routes its tokens so is
              an assumption, measured by --routing-stats (below); one token always touches exactly top_k;
  lm_head     read once by the plain step; by the verify step once for its B (k + 1) target rows and
              once per MTP draft pass (k; each depends on the last);
  mtp         the MTP layer's non-expert weights per pass (k passes) and its experts: each pass routes
              B rows (the first pass's MoE runs at one row per request);
  states      linear states read and written once per linear layer and request (float32 [H, D, D]; the
              rollback's minimum: read S_0, write the accepted state);
  caches      MLA latents read (context) and written (the new rows) per MLA layer and request in the
              model's dtype (the engine's default latent dtype), the MTP latents per pass; embedding rows;
              the draft logits read and written (float32 [B, k, V]).
A step measured below its floor means the count or the bandwidth is wrong (the run says so). The floor
ratio is what the cost ratio tends to as both steps approach their floors (B = 64: the plain step is at
about 1.07x its floor); at B = 1 both steps are far above theirs (host launches, small kernels), so the
floor ratio alone cannot say whether the B = 1 target is reachable: the table's conclusion compares the
verify step's floor with 1.15x the measured plain step, and the plain step's time plus the verify step's
extra bytes at copy bandwidth (the cost if every extra byte streamed at full bandwidth and nothing else
were added) with it.
--moe-decode-max-tokens N1,N2: sets lingjax.kernels.moe.gpu.DECODE_MAX_TOKENS = N before the steps are traced
(the MoE layer runs its decode path, not the grouped matmul, at T <= N tokens; at B = 1 the verify step
with k drafts has T = k + 1); with several values every measurement is repeated per value (the compiled
steps cleared in between: the constant is read at trace time, it is no jit cache key), the rows labelled
"MoE decode T<=N"; recorded in the JSON and the table title.
--routing-stats: no timing; the first call of each plain and verify step is traced with a recorder on
every MoE layer's router (a host callback, so these compiled steps are not the timed ones) and the run
prints, per step, the distinct experts the main model's MoE layers touched (mean over layers and steps
of --steps calls) beside the uniform formula the floor uses.
--routing hotM (synthetic, NOT a checkpoint's routing): every MoE layer's expert_bias is raised by 2 on
M experts (M / 4 in each of 4 groups; sigmoid scores are < 1, so those groups and experts always win),
so every token picks its top_k among the same M experts: M = top_k (hot8) makes every token of the
batch use the same experts (the MoE bytes of a verify step equal a plain step's: the ratio then shows
what else the verify step costs); larger M lets consecutive tokens share most experts. It applies
across the whole batch (requests share experts too), so the B > 1 plain steps get cheaper as well.
Floor: M (1 - (1 - top_k / M)^n) experts. `--routing hot8,uniform --hot-batches 1` runs B = 1 with
hot8 first (its compiled steps are then reused by the uniform pass: the same shapes), then every B.
--verify-paths prefill,mla_decode,decode: each verify measurement once per verify path (lingjax.speculative.
VERIFY_PATHS, Engine(spec_verify=...)): the default packs the verify rows as a prefill-shaped step (MLA
through the paged prefill kernel); mla_decode runs the main MLA layers through the paged decode kernel, a
row per token, and the MTP layer's attention at its one output row per request; decode also drops the
linear layers' prefill-kernel launch (the committed row through the decode kernel, the rollback over the
drafts only). Each path's first token is checked against the plain step's as above.
--profile: each measurement is also run under the XLA profiler; per step: device busy time, the gaps
between kernels, kernel launches, and device time by kernel category (the verify step's excess over
the plain step, by category, is printed at the end).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time

import numpy as np

log = logging.getLogger("bench_spec")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ floor
def param_bytes(model):
    """Bytes of the model's parameters by role (works on an abstract model: nnx.eval_shape):
    dense (main model, not experts / embedding / lm_head), expert (one routed expert's three matrices),
    lm_head, embed_row (one embedding row), mtp_dense, mtp_expert."""
    import jax
    from flax import nnx
    E = model.cfg.num_experts
    out = dict(dense=0, expert=0, lm_head=0, embed_row=0, mtp_dense=0, mtp_expert=0)
    for path, x in nnx.to_flat_state(nnx.state(model)):
        names = [str(q) for q in path]
        v = x.get_value() if hasattr(x, "get_value") else x.value
        n = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(v))
        mtp = names[0] == "mtp"
        if names[-1] in ("w_gate", "w_up", "w_down"):
            out["mtp_expert" if mtp else "expert"] += n / E
        elif names[0] == "word_embeddings":
            out["embed_row"] = n / model.cfg.vocab_size
        elif names[0] == "lm_head":
            out["lm_head"] = n
        else:
            out["mtp_dense" if mtp else "dense"] += n
    n_moe = sum(model.cfg.is_moe(l) for l in range(model.cfg.num_hidden_layers))
    out["expert"] /= n_moe              # summed over the MoE layers above: one layer's expert
    return out


def distinct_experts(n, E, top_k, hot=0):
    """Expected distinct experts that n tokens with independent uniform routing touch in one layer
    (hot: every token picks top_k of the same `hot` experts)."""
    if n <= 0:
        return 0.0
    pool = hot or E
    return pool * (1 - (1 - top_k / pool) ** n)


def step_bytes(cfg, pb, B, C, k, hot=0, latent_itemsize=2, state_itemsize=4):
    """Bytes a plain step (k = 0) or a verify step with k drafts per request must touch: {part: bytes}
    (module docstring). Parts: weights, experts, lm_head, mtp (k > 0), states (the linear-attention states,
    read and written once), caches (MLA and MTP latents, embedding rows, draft logits). latent_itemsize: the
    MLA latent cache's (the engine's default is the model dtype's). bench_e2e.step_bytes (MBU) is this at k = 0."""
    E, top = cfg.num_experts, cfg.num_experts_per_tok
    n_moe = sum(cfg.is_moe(l) for l in range(cfg.num_hidden_layers))
    H, D = cfg.num_attention_heads, cfg.head_dim
    lat = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * latent_itemsize
    T = B * (k + 1)
    parts = dict(weights=pb["dense"], experts=n_moe * distinct_experts(T, E, top, hot) * pb["expert"],
                 lm_head=(1 + k) * pb["lm_head"])
    caches = len(cfg.mla_layers) * (B * (C + k) + T) * lat + T * pb["embed_row"]
    if k:
        parts["mtp"] = k * pb["mtp_dense"] + k * distinct_experts(B, E, top, hot) * pb["mtp_expert"]
        caches += k * (B * (C + k) + T) * lat + (T + (k - 1) * B) * pb["embed_row"] + 2 * B * k * cfg.vocab_size * 4
    parts["states"] = len(cfg.linear_layers) * B * H * D * D * state_itemsize * 2
    parts["caches"] = caches
    return parts


def set_hot_experts(model, m, base, seed=0):
    """--routing hotM: every MoE layer's expert_bias = its base value (`base`, in layer order) + 2 on m
    experts, m / topk_group in each of topk_group groups (a different random choice per layer), so that
    every token picks its top_k among them; m = 0: the base values."""
    import jax.numpy as jnp
    cfg = model.cfg
    E, G, top = cfg.num_experts, cfg.n_group, cfg.num_experts_per_tok
    per = E // G
    if m and (m % cfg.topk_group or not (top <= m <= cfg.topk_group * per)):
        raise SystemExit(f"--routing hot{m}: must be a multiple of topk_group={cfg.topk_group} between "
                         f"top_k={top} and {cfg.topk_group * per}")
    rng = np.random.default_rng(seed)
    layers = moe_layers(model)
    for moe, b0 in zip(layers, base):
        bias = np.zeros(E, np.float32)
        if m:
            for g in rng.choice(G, cfg.topk_group, replace=False):
                bias[g * per + rng.choice(per, m // cfg.topk_group, replace=False)] = 2.0
        moe.expert_bias.set_value(b0 + jnp.asarray(bias))


def moe_layers(model):
    return [l.mlp for l in model.layers if l.is_moe] + [m_.block.mlp for m_ in model.mtp if m_.block.is_moe]


# ------------------------------------------------------------------------------------------ timing
def timed(fn, carry, steps, reps):
    """fn(carry) -> (out, carry) -> (median ms per call over reps runs of `steps` calls, the first
    call's out (the compile and warm-up call, from the initial carry), carry)."""
    import jax
    first, carry = fn(carry)
    jax.block_until_ready(first)
    first = jax.device_get(first)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            out, carry = fn(carry)
        jax.block_until_ready((out, carry))
        ts.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(ts), first, carry


def traced(fn, carry, steps):
    """Device profile of `steps` calls of fn: per-step busy / gap us, launches, us by kernel category and
    the top kernels (bench_linear_attention.device_trace; categories of profile_fp8)."""
    import jax
    try:
        from bench_linear_attention import device_trace
        from profile_fp8 import per_step_kernels
    except Exception as err:         # a profiler failure costs the profile, not the measurement
        log.warning("profile unavailable: %s: %s", type(err).__name__, err)
        return None, carry
    box = {}

    def run():
        c = carry
        for _ in range(steps):
            out, c = fn(c)
        jax.block_until_ready((out, c))
        box["carry"] = c
    try:
        tr = device_trace(run, steps)
    except Exception as err:         # a profiler failure costs the profile, not the measurement
        log.warning("profile failed: %s: %s", type(err).__name__, err)
        return None, box.get("carry", carry)
    k = per_step_kernels(tr, steps, top=1000)           # every kernel (the per-kernel verify - plain table)
    prof = dict(busy_us=k["busy_us"], gap_us=k["gap_us"], launches=k["kernels_per_step"], categories=k["categories"],
                top=k["top"])
    return prof, box["carry"]


def first_tokens(model, B):
    """The first token of each request (the same in the plain and the verify steps of a batch size)."""
    return np.random.default_rng(B).integers(2, model.cfg.vocab_size, B)


def plain_ms(model, B, C, steps, reps, profile=False):
    """-> (ms, {"tokens", "logprobs"} of the first call, profile or None)."""
    import jax.numpy as jnp
    from lingjax.batch import StepBatch
    from lingjax.cache import contiguous_page_table
    from lingjax.engine import Engine, _step_fn
    e = Engine(model, max_batch=B, prefill_chunk=8, max_len=C + 16, overlap=False)
    batch = StepBatch(tokens=jnp.asarray(first_tokens(model, B), jnp.int32),
                      positions=jnp.full((B,), C, jnp.int32), token_seq=jnp.arange(B, dtype=jnp.int32),
                      slots=jnp.arange(B, dtype=jnp.int32), cu_seqlens=jnp.arange(B + 1, dtype=jnp.int32),
                      fresh=jnp.zeros((B,), bool), decode_only=True,
                      page_table=jnp.asarray(contiguous_page_table(B, e.max_len, e.page_size)))
    z = jnp.zeros(B, jnp.int32)
    host = (jnp.full(B, -1, jnp.int32), jnp.arange(B, dtype=jnp.int32), jnp.zeros(B, jnp.float32), z,
            jnp.ones(B, jnp.float32), jnp.zeros(B, jnp.uint32), z, z)

    def one(caches):
        take, rows, *rest = host
        out = _step_fn(e._params, caches, batch, take, e._prev, rows, *rest, graph=e._graph, mode=(False, True, False, True))
        return (out[1], out[2]), out[-1]
    ms, first, caches = timed(one, e.caches, steps, reps)
    prof = None
    if profile:
        prof, caches = traced(one, caches, steps)
    del caches, e
    return ms, dict(tokens=np.asarray(first[0]), logprobs=np.asarray(first[1])), prof


def verify_ms(model, B, C, k, steps, reps, profile=False, sampling=False, path="prefill"):
    """-> (ms, {"tokens" (first emitted token per request), "logprobs"} of the first call, profile or None).
    sampling: the step's static sampling flag (False: greedy code only, as the engine runs an all-greedy
    step; None: the acceptance and drafts choose greedy or sampling on the device, by lax.cond). path: the
    verify path (lingjax.speculative.VERIFY_PATHS; every request here decodes, so the engine with
    spec_verify=path runs this step shape)."""
    import jax.numpy as jnp
    from lingjax.batch import StepBatch
    from lingjax.cache import contiguous_page_table
    from lingjax.engine import Engine
    from lingjax.speculative import _spec_step_fn
    e = Engine(model, max_batch=B, prefill_chunk=8, max_len=C + 16, num_speculative_tokens=k)
    T = B * (k + 1)
    r = np.repeat(np.arange(B), k + 1)
    j = np.tile(np.arange(k + 1), B)
    tokens = np.zeros(T, np.int64)
    tokens[j == 0] = first_tokens(model, B)        # draft rows: the drafts held on the device (zeros at first)
    batch = StepBatch(tokens=jnp.asarray(tokens, jnp.int32),
                      positions=jnp.asarray(C + j, jnp.int32), token_seq=jnp.asarray(r, jnp.int32),
                      slots=jnp.arange(B, dtype=jnp.int32),
                      cu_seqlens=jnp.asarray(np.arange(B + 1) * (k + 1), jnp.int32),
                      fresh=jnp.zeros((B,), bool), decode_only=path != "prefill",
                      page_table=jnp.asarray(contiguous_page_table(B, e.max_len, e.page_size)))
    draft_take = jnp.asarray(np.where(j > 0, r * k + j - 1, -1), jnp.int32)
    next_take = jnp.asarray(r * (k + 1) + j, jnp.int32)
    z = jnp.zeros(B, jnp.int32)
    args = (draft_take, jnp.zeros(T, jnp.int32), next_take, jnp.asarray(np.arange(B) * (k + 1), jnp.int32),
            jnp.full(B, k, jnp.int32), jnp.ones(B, bool), jnp.full(B, e.max_len, jnp.int32), jnp.zeros(B, jnp.float32), z, jnp.ones(B, jnp.float32),
            jnp.zeros(B, jnp.uint32), z, z)

    def one(carry):
        caches, spec = carry
        out = _spec_step_fn(e._params, caches, spec, batch, *args, graph=e._graph, mode=(False, False, sampling), k=k,
                            verify=path)
        return (out[1], out[3]), (out[-2], out[-1])        # (no slicing here: an op outside the step)
    ms, first, carry = timed(one, (e.caches, e._spec.state), steps, reps)
    prof = None
    if profile:
        prof, carry = traced(one, carry, steps)
    del carry, e
    return ms, dict(tokens=np.asarray(first[0])[:, 0], logprobs=np.asarray(first[1])[:, 0]), prof


def agreement(plain, verify):
    """(share of requests whose first verify token is the plain step's greedy token, max |logprob
    difference| over those)."""
    same = plain["tokens"] == verify["tokens"]
    d = np.abs(plain["logprobs"] - verify["logprobs"])[same]
    return float(same.mean()), float(d.max()) if d.size else float("nan")


# ------------------------------------------------------------------------------------------ main
def floor_rows(cfg, pb, batches, ks, C, hot, bw, lat_b):
    rows = []
    for B in batches:
        base = sum(step_bytes(cfg, pb, B, C, 0, hot, lat_b).values())
        for k in ks:
            parts = step_bytes(cfg, pb, B, C, k, hot, lat_b)
            v = sum(parts.values())
            rows.append(dict(batch=B, k=k, plain_bytes=base, verify_bytes=v, verify_parts=parts,
                             plain_parts=step_bytes(cfg, pb, B, C, 0, hot, lat_b),
                             plain_floor_ms=base / bw * 1e3, verify_floor_ms=v / bw * 1e3, floor_ratio=v / base))
    return rows


def print_floor(rows):
    print("\nfloor: bytes a step must touch / copy bandwidth (module docstring)")
    print("| B | k | plain GB | verify GB | plain floor ms | verify floor ms | floor ratio | verify GB: weights / experts / "
          "lm_head / mtp / states / caches |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["verify_parts"]
        print(f"| {r['batch']} | {r['k']} | {r['plain_bytes'] / 1e9:.3f} | {r['verify_bytes'] / 1e9:.3f} | "
              f"{r['plain_floor_ms']:.3f} | {r['verify_floor_ms']:.3f} | {r['floor_ratio']:.3f} | "
              + " / ".join(f"{p[q] / 1e9:.3f}" for q in ("weights", "experts", "lm_head", "mtp", "states", "caches")) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flash8", help="model shapes (scripts/shapes.py): flash8, flash, 1t, tiny")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--batches", default="1,16,64", help="batch sizes B (comma list)")
    p.add_argument("--ks", default="1,2,3", help="draft counts k (comma list)")
    p.add_argument("--large-ks", default="", help="draft counts k for the batches after the first (default: --ks)")
    p.add_argument("--context", type=int, default=1024, help="tokens already in each request's cache")
    p.add_argument("--accept", default="0.6,0.8,0.9", help="acceptance rates for the implied speedup")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--reps", type=int, default=3, help="timed runs; the median is reported")
    p.add_argument("--time-budget", type=float, default=215.0,
                   help="seconds after which no new measurement starts (rows are written as they finish; B=1 "
                        "first); default %(default)s, so the run fits 4 minutes with the last compile")
    p.add_argument("--routing", default="uniform",
                   help="comma list of routing passes, for each B in this order (B = 1 first): 'uniform' (the random "
                        "model's own, independent "
                        "routing) or 'hotM' (SYNTHETIC correlated routing: every token picks its experts among the "
                        "same M per layer, module docstring); default %(default)s")
    p.add_argument("--hot-batches", default="1", help="batch sizes of the hotM passes (comma list; default 1)")
    p.add_argument("--cond-ks", default="",
                   help="comma list of k: at the first B of the uniform pass also time the verify step with the "
                        "greedy/sampling choice made on the device by lax.cond (as before session 5), for comparison")
    p.add_argument("--profile", action="store_true",
                   help="also trace each measurement under the XLA profiler (device busy time, gaps, categories)")
    p.add_argument("--bandwidth", type=float, default=0.0,
                   help="copy bandwidth for the floor in bytes/s; 0 (default): measured at the start (--floor-only: "
                        "4.3e12, the H200's measured)")
    p.add_argument("--floor-only", action="store_true",
                   help="print the floor table only (abstract model: no weights, no device time)")
    p.add_argument("--moe-decode-max-tokens", default="",
                   help="comma list N1,N2,..: lingjax.kernels.moe.gpu.DECODE_MAX_TOKENS set to each before the steps "
                        "are traced (the MoE layer takes its decode path at T <= N tokens; the B = 1 verify step with "
                        "k drafts has T = k + 1), every plain and verify measurement repeated per value (compiled steps "
                        "cleared between values); default: the module's own value")
    p.add_argument("--routing-stats", action="store_true",
                   help="no timing: count the distinct experts each step's tokens touch per MoE layer (a recorder on "
                        "the router, traced fresh) against the floor's uniform formula (module docstring)")
    p.add_argument("--verify-paths", default="decode",
                   help="comma list of verify paths (lingjax.speculative.VERIFY_PATHS: prefill, mla_decode, decode; "
                        "Engine(spec_verify=...)): every verify measurement is repeated per path, the rows labelled "
                        "'verify=<path>' when not the default alone; default %(default)s")
    p.add_argument("--smoke", action="store_true", help="CPU check: 1 step, 1 rep, context 16")
    p.add_argument("--out", help="JSON output (default $OUT/bench_spec.json when $OUT is set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from shapes import preset, random_model
    from lingjax.kernels.moe import gpu as moe_gpu
    if args.smoke:
        args.steps, args.reps, args.context = 1, 1, 16
    try:
        dmts = [int(x) for x in args.moe_decode_max_tokens.split(",")] if args.moe_decode_max_tokens else []
    except ValueError:
        p.error(f"--moe-decode-max-tokens: expected a comma list of integers >= 0, got {args.moe_decode_max_tokens!r}")
    from lingjax.speculative import VERIFY_PATHS
    vpaths = args.verify_paths.split(",")
    if not vpaths or any(v not in VERIFY_PATHS for v in vpaths):
        p.error(f"--verify-paths: expected a comma list of {', '.join(VERIFY_PATHS)}, got {args.verify_paths!r}")
    if any(n < 0 for n in dmts):
        p.error(f"--moe-decode-max-tokens: expected integers >= 0, got {args.moe_decode_max_tokens!r}")
    if dmts:
        moe_gpu.DECODE_MAX_TOKENS = dmts[0]         # before any trace (read at trace time, not a jit cache key)
    cfg = dataclasses.replace(preset(args.preset, args.layers, args.vocab), num_nextn_predict_layers=1)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    lat_b = jnp.dtype(dtype).itemsize         # the engine's MLA latents are in the model's dtype by default
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    large_ks = [int(x) for x in args.large_ks.split(",")] if args.large_ks else ks
    passes = []
    for name in args.routing.split(","):
        if name == "uniform":
            passes.append((0, batches))
        elif name.startswith("hot") and name[3:].isdigit():
            passes.append((int(name[3:]), [int(x) for x in args.hot_batches.split(",")]))
        else:
            p.error(f"--routing: unknown pass {name!r} (uniform or hotM, e.g. hot8)")
    if args.floor_only:
        from lingjax.model import BailingModel
        abstract = nnx.eval_shape(lambda: BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=True))
        pb = param_bytes(abstract)
        bw = args.bandwidth or 4.3e12
        print(f"{args.preset} ({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}), context {args.context}, "
              f"bandwidth {bw / 1e12:.2f} TB/s; " + ", ".join(f"{q} {v / 1e6:.1f} MB" for q, v in pb.items()))
        for hot, bs in passes:
            print(f"\nrouting: {routing_name(hot)}")
            print_floor(floor_rows(cfg, pb, bs, ks, args.context, hot, bw, lat_b))
        return 0
    t0 = time.perf_counter()
    recorded = record_routing() if args.routing_stats else None      # before anything is traced
    from bench_moe import copy_bandwidth
    bw = args.bandwidth or (4.3e12 if args.routing_stats else copy_bandwidth(args.smoke))
    log.info("copy bandwidth %.3f TB/s", bw / 1e12)
    model = random_model(cfg, None, dtype, mtp=True)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    base_bias = [moe.expert_bias.get_value() for moe in moe_layers(model)]
    pb = param_bytes(model)
    kinds = "".join("L" if kd == "linear" else "M" for kd in cfg.layer_kinds)
    report = dict(device=jax.devices()[0].device_kind, preset=args.preset, layers=cfg.num_hidden_layers, kinds=kinds,
                  vocab=cfg.vocab_size, dtype=args.dtype, context=args.context, init_s=time.perf_counter() - t0,
                  copy_bandwidth=bw, param_bytes=pb, moe_decode_max_tokens=dmts or [moe_gpu.DECODE_MAX_TOKENS],
                  note="random weights: drafts are (almost) never accepted; costs only, speedups implied",
                  plain=[], rows=[])
    out = args.out or (os.path.join(os.environ["OUT"], "bench_spec.json") if os.environ.get("OUT") else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def save():
        if out:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)
    if recorded is not None:
        report["routing_stats"] = run_routing_stats(model, cfg, pb, passes, ks, large_ks, args, base_bias, recorded,
                                                     lat_b, bw, save)
        save()
        print_routing_stats(report)
        return 0
    accs = [float(a) for a in args.accept.split(",")]
    skipped, failed = [], []
    profile = args.profile          # (on the CPU the trace has no device kernels: empty categories)
    order = [(B, hot, dmt) for B in dict.fromkeys(b for _, bs in passes for b in bs)   # B outer, passes inner:
             for hot, bs in passes if B in bs for dmt in dmts or [None]]               # B = 1 first, every pass
    from lingjax import engine as engine_mod
    from lingjax import speculative
    for B, hot, dmt in order:
        set_hot_experts(model, hot, base_bias)
        routing = routing_name(hot)
        if dmt is not None and len(dmts) > 1:
            routing += f", MoE decode T<={dmt}"
            if moe_gpu.DECODE_MAX_TOKENS != dmt:           # the constant is read at trace time: retrace
                moe_gpu.DECODE_MAX_TOKENS = dmt
                engine_mod.clear_compiled()
                speculative.clear_compiled()
        bs = [b for h, bb in passes if h == hot for b in bb]
        if time.perf_counter() - t0 > args.time_budget:
            skipped.append(f"{routing} B={B}")
            continue
        base, pfirst, pprof = plain_ms(model, B, args.context, args.steps, args.reps, profile)
        pfloor = sum(step_bytes(cfg, pb, B, args.context, 0, hot, lat_b).values()) / bw * 1e3
        report["plain"].append(dict(routing=routing, batch=B, ms=base, floor_ms=pfloor, profile=pprof))
        if base < pfloor:
            log.warning("[%s] B=%d: the plain step measured BELOW its floor (%.3f < %.3f ms): the byte count or the "
                        "bandwidth is wrong", routing, B, base, pfloor)
        log.info("[%s] B=%d plain decode step %.3f ms (floor %.3f ms%s)", routing, B, base, pfloor,
                 f"; device busy {pprof['busy_us'] / 1e3:.3f} ms, gaps {pprof['gap_us'] / 1e3:.3f} ms, "
                 f"{pprof['launches']:.0f} launches" if pprof else "")
        for k in [int(x) for x in args.cond_ks.split(",") if x] if (hot == 0 and B == bs[0]) else []:
            if time.perf_counter() - t0 > args.time_budget:
                skipped.append(f"{routing} B={B} k={k} lax.cond")
                continue
            v, vfirst, vprof = verify_ms(model, B, args.context, k, args.steps, args.reps, profile, sampling=None)
            report.setdefault("cond_rows", []).append(dict(routing=routing, batch=B, k=k, verify_ms=v, plain_ms=base,
                                                           cost_ratio=v / base, profile=vprof))
            log.info("[%s] B=%d k=%d verify with the greedy/sampling choice by lax.cond on the device: %.3f ms = "
                     "%.3fx plain%s", routing, B, k, v, v / base, f"; device busy {vprof['busy_us'] / 1e3:.3f} ms, "
                     f"gaps {vprof['gap_us'] / 1e3:.3f} ms, {vprof['launches']:.0f} launches" if vprof else "")
            save()
        for k, path in [(k, v) for k in (ks if B == order[0][0] else large_ks) for v in vpaths]:
            label = routing if vpaths == ["decode"] else f"{routing}, verify={path}"
            if time.perf_counter() - t0 > args.time_budget:
                skipped.append(f"{label} B={B} k={k}")
                continue
            v, vfirst, vprof = verify_ms(model, B, args.context, k, args.steps, args.reps, profile, path=path)
            agree, dlp = agreement(pfirst, vfirst)
            parts = step_bytes(cfg, pb, B, args.context, k, hot, lat_b)
            vfloor = sum(parts.values()) / bw * 1e3
            ratio = v / base
            speed = {str(a): ((1 - a ** (k + 1)) / (1 - a)) / ratio for a in accs}
            ok = agree >= 0.75 and dlp < 0.1
            row = dict(routing=label, plain_routing=routing, verify_path=path, batch=B, k=k, plain_ms=base,
                       verify_ms=v, cost_ratio=ratio,
                       speedup_at_acceptance=speed, plain_floor_ms=pfloor, verify_floor_ms=vfloor,
                       floor_ratio=vfloor / pfloor, verify_bytes=parts, check_first_token_agreement=agree,
                       check_max_logprob_diff=dlp, check_ok=ok, profile=vprof)
            report["rows"].append(row)
            log.info("[%s] B=%d k=%d verify %.3f ms = %.3fx plain (floor %.3f ms, floor ratio %.3fx)%s; check: "
                     "first token agrees for %.0f%% of requests, max |dlogprob| %.2g%s; implied speedup %s",
                     label, B, k, v, ratio, vfloor, vfloor / pfloor,
                     f"; device busy {vprof['busy_us'] / 1e3:.3f} ms, gaps {vprof['gap_us'] / 1e3:.3f} ms, "
                     f"{vprof['launches']:.0f} launches" if vprof else "", 100 * agree, dlp, "" if ok else " CHECK FAILED",
                     "  ".join(f"a={a}: {s:.2f}x" for a, s in speed.items()))
            if v < vfloor:
                log.warning("[%s] B=%d k=%d: the verify step measured BELOW its floor (%.3f < %.3f ms): the byte "
                            "count or the bandwidth is wrong", label, B, k, v, vfloor)
            if not ok:
                failed.append(f"{label} B={B} k={k}")
            save()
    if skipped:
        report["skipped_for_time"] = skipped
        log.info("time budget %.0f s: skipped %s", args.time_budget, ", ".join(skipped))
    save()
    print_table(report)
    if failed:
        print(f"CHECK FAILED (verify's first token or its logprob differs from the plain step's: agreement < 75% or "
              f"|dlogprob| >= 0.1) at {', '.join(failed)}")
        return 1
    return 0


def routing_name(hot):
    return f"SYNTHETIC hot{hot}" if hot else "uniform"


def target_verdict(r, target=1.15):
    """The B = 1 k = 1 conclusion, in words, from a row: the measured ratio against the target, and what the
    bytes say about it (module docstring: the floor ratio alone decides nothing while the steps are far
    above their floors)."""
    bound = target * r["plain_ms"]
    extra_ms = r["verify_floor_ms"] - r["plain_floor_ms"]              # the verify step's extra bytes at copy bw
    additive = (r["plain_ms"] + extra_ms) / r["plain_ms"]
    if r["verify_floor_ms"] > bound:
        bytes_say = (f"the verify step's floor ({r['verify_floor_ms']:.3f} ms) is above {target}x the measured plain "
                     f"step ({bound:.3f} ms): out of reach whatever the overheads")
    else:
        bytes_say = (f"the verify step's floor ({r['verify_floor_ms']:.3f} ms) is below {target}x the measured plain "
                     f"step ({bound:.3f} ms), so the bytes alone do not rule the target out; the plain step plus "
                     f"the verify step's extra bytes at copy bandwidth (+{extra_ms:.3f} ms) gives {additive:.3f}x "
                     f"(the ratio if the verify step added nothing but its extra bytes, streamed at full bandwidth)")
    return (f"[{r['routing']}] target B=1 k=1 verify <= {target}x plain: {r['cost_ratio']:.3f}x "
            f"({'met' if r['cost_ratio'] <= target else 'NOT met'}); floor ratio {r['floor_ratio']:.3f} (both steps at "
            f"their floors; plain at {r['plain_ms'] / r['plain_floor_ms']:.2f}x its floor here); {bytes_say}")


def record_routing():
    """--routing-stats: wrap lingjax.model.moe.MoE.route so that every traced call sends its expert ids [T, top_k]
    to the host (jax.debug.callback); -> the list they are appended to. Must run before anything is traced."""
    import jax
    from lingjax.model import moe as moe_mod
    got = []
    plain_route = moe_mod.MoE.route

    def route(self, x2):
        idx, w = plain_route(self, x2)
        jax.debug.callback(lambda i: got.append(np.asarray(i)), idx)
        return idx, w
    moe_mod.MoE.route = route
    return got


def run_routing_stats(model, cfg, pb, passes, ks, large_ks, args, base_bias, recorded, lat_b, bw, save):
    """--routing-stats: per (routing, B, k) (k = 0: the plain step) the distinct experts per main-model MoE layer
    over --steps calls (the first from zeroed caches, then each on the last one's caches and drafts: the timed
    calls' inputs), beside the uniform formula, and the floor ratio with the measured counts."""
    import jax
    E, top = cfg.num_experts, cfg.num_experts_per_tok
    n_moe = sum(cfg.is_moe(l) for l in range(cfg.num_hidden_layers))
    C = args.context
    out = []
    order = [(B, hot) for B in dict.fromkeys(b for _, bs in passes for b in bs) for hot, bs in passes if B in bs]
    for B, hot in order:
        set_hot_experts(model, hot, base_bias)
        plain_distinct = None
        for k in [0] + (ks if B == order[0][0] else large_ks):
            recorded.clear()
            if k == 0:
                plain_ms(model, B, C, args.steps, 1)
            else:
                verify_ms(model, B, C, k, args.steps, 1)
            jax.effects_barrier()
            T = B * (k + 1)
            # the main model's MoE layers route all T rows; the MTP layer's MoE routes one row per request
            main = [a for a in recorded if a.shape[0] == T]
            d = np.array([len(np.unique(a)) for a in main], float)
            if not d.size or len(main) % n_moe:
                raise SystemExit(f"--routing-stats: B={B} k={k}: {len(main)} router calls with {T} rows, expected a "
                                 f"multiple of {n_moe} (the MoE layers)")
            formula = distinct_experts(T, E, top, hot)
            row = dict(routing=routing_name(hot), batch=B, k=k, tokens=T, calls=len(main) // n_moe,
                       distinct_mean=float(d.mean()), distinct_min=float(d.min()), distinct_max=float(d.max()),
                       formula=formula)
            if k == 0:
                plain_distinct = row["distinct_mean"]
            else:                       # the floor ratio with the measured counts (main model and plain step)
                def measured(kk, dist):
                    parts = step_bytes(cfg, pb, B, C, kk, hot, lat_b)
                    parts["experts"] = n_moe * dist * pb["expert"]
                    return sum(parts.values())
                row["floor_ratio_formula"] = (sum(step_bytes(cfg, pb, B, C, k, hot, lat_b).values())
                                              / sum(step_bytes(cfg, pb, B, C, 0, hot, lat_b).values()))
                row["floor_ratio_measured"] = measured(k, row["distinct_mean"]) / measured(0, plain_distinct)
            out.append(row)
            log.info("[%s] B=%d k=%d: %d tokens touch %.2f distinct experts per MoE layer (min %d, max %d over %d "
                     "layers x %d calls); uniform formula %.2f", row["routing"], B, k, T, row["distinct_mean"],
                     row["distinct_min"], row["distinct_max"], n_moe, row["calls"], formula)
    return out


def print_routing_stats(report):
    print(f"\n{report['device']}, {report['preset']} ({report['layers']} layers, vocab {report['vocab']}), {report['dtype']}: "
          "distinct experts per main-model MoE layer a step's tokens touch (k = 0: the plain step), mean over layers "
          "and calls, against the floor's uniform formula E (1 - (1 - top_k / E)^T)")
    print("| routing | B | k | tokens | measured (min-max) | formula | floor ratio (formula) | floor ratio (measured) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in report["routing_stats"]:
        fr = (f"{r['floor_ratio_formula']:.3f} | {r['floor_ratio_measured']:.3f}" if r["k"] else " | ")
        print(f"| {r['routing']} | {r['batch']} | {r['k']} | {r['tokens']} | {r['distinct_mean']:.2f} "
              f"({r['distinct_min']:.0f}-{r['distinct_max']:.0f}) | {r['formula']:.2f} | {fr} |")


def print_table(report):
    rows = report["rows"]
    if not rows:
        return
    print(f"\n{report['device']}, {report['preset']} ({report['layers']} layers {report['kinds']} + MTP, vocab "
          f"{report['vocab']}), {report['dtype']}, context {report['context']}, MoE decode path at T <= "
          f"{', '.join(map(str, report.get('moe_decode_max_tokens', [])))}; copy bandwidth {report['copy_bandwidth'] / 1e12:.2f} TB/s; "
          f"{report['note']}. Routing 'SYNTHETIC hotM': every token's experts among the same M per layer (not a "
          f"checkpoint's routing)")
    print("| routing | B | k | plain ms | verify ms | ratio | plain floor ms | verify floor ms | floor ratio | "
          "verify / its floor | plain / its floor | check (agree, max dlogprob) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['routing']} | {r['batch']} | {r['k']} | {r['plain_ms']:.3f} | {r['verify_ms']:.3f} | "
              f"{r['cost_ratio']:.3f} | {r['plain_floor_ms']:.3f} | {r['verify_floor_ms']:.3f} | {r['floor_ratio']:.3f} | "
              f"{r['verify_ms'] / r['verify_floor_ms']:.2f} | {r['plain_ms'] / r['plain_floor_ms']:.2f} | "
              f"{100 * r['check_first_token_agreement']:.0f}%, {r['check_max_logprob_diff']:.2g}"
              f"{'' if r['check_ok'] else ' FAILED'} |")
    for r in rows:
        if r["batch"] == 1 and r["k"] == 1:
            print(target_verdict(r))
    for r in report.get("cond_rows", []):
        print(f"[{r['routing']}] B={r['batch']} k={r['k']} with the greedy/sampling choice by lax.cond on the device "
              f"(as before session 5): verify {r['verify_ms']:.3f} ms = {r['cost_ratio']:.3f}x plain"
              + (f" (device busy {r['profile']['busy_us'] / 1e3:.3f} ms, gaps {r['profile']['gap_us'] / 1e3:.3f} ms)"
                 if r.get("profile") else ""))
    accs = list(rows[0]["speedup_at_acceptance"])
    print("\nimplied speedup (tokens per step / cost ratio) at acceptance " + ", ".join(accs))
    print("| routing | B | k | " + " | ".join(f"a={a}" for a in accs) + " |\n|---|---|---|" + "---|" * len(accs))
    for r in rows:
        print(f"| {r['routing']} | {r['batch']} | {r['k']} | "
              + " | ".join(f"{r['speedup_at_acceptance'][a]:.2f}x" for a in accs) + " |")
    profs = [(r, r["profile"]) for r in rows if r.get("profile")]
    plains = {(p["routing"], p["batch"]): p for p in report.get("plain", [])}
    if profs:
        print("\ndevice profile per step: busy us (launches), gaps us; verify minus plain by kernel category: us (launches)")
        cats = sorted({c for _, pr in profs for c in pr["categories"]}
                      | {c for p in plains.values() if p.get("profile") for c in p["profile"]["categories"]})
        print("| routing | B | k | plain busy | verify busy | plain gaps | verify gaps | " + " | ".join(cats)
              + " |\n|---|---|---|---|---|---|---|" + "---|" * len(cats))
        for r, pr in profs:
            pp = (plains.get((r.get("plain_routing", r["routing"]), r["batch"]), {}).get("profile")
                  or dict(busy_us=0, gap_us=0, launches=0, categories={}))
            cells = []
            for c in cats:
                a = pr["categories"].get(c, dict(us=0.0, n=0.0))
                b = pp["categories"].get(c, dict(us=0.0, n=0.0))
                cells.append(f"{a['us'] - b['us']:+.0f} ({a['n'] - b['n']:+.0f})")
            print(f"| {r['routing']} | {r['batch']} | {r['k']} | {pp['busy_us']:.0f} ({pp['launches']:.0f}) | "
                  f"{pr['busy_us']:.0f} ({pr['launches']:.0f}) | {pp['gap_us']:.0f} | {pr['gap_us']:.0f} | "
                  + " | ".join(cells) + " |")
        for r, pr in profs:
            if r["k"] != 1 or r["batch"] not in (1, 64):
                continue
            print(f"\ntop kernels of the [{r['routing']}] verify step B={r['batch']} k={r['k']} (us per step, launches):")
            for kk in pr["top"][:12]:
                print(f"  {kk['us']:8.1f} ({kk['n']:.0f})  {kk['name']}")
            pp = plains.get((r.get("plain_routing", r["routing"]), r["batch"]), {}).get("profile")
            if pp:
                print(f"top kernels of the [{r['routing']}] plain step B={r['batch']}:")
                for kk in pp["top"][:8]:
                    print(f"  {kk['us']:8.1f} ({kk['n']:.0f})  {kk['name']}")
                print_kernel_diff(r, pr, pp)


def print_kernel_diff(r, pr, pp, n=16):
    """Verify minus plain per kernel name (every kernel of both profiles; XLA numbers its fusions per program, so
    a fusion may appear under different names in the two steps): the n largest differences."""
    a = {t["name"]: t for t in pr["top"]}
    b = {t["name"]: t for t in pp["top"]}
    diff = sorted(((a.get(nm, {}).get("us", 0.0) - b.get(nm, {}).get("us", 0.0), nm) for nm in set(a) | set(b)),
                  key=lambda x: -abs(x[0]))
    print(f"verify minus plain by kernel [{r['routing']}] B={r['batch']} k={r['k']}: us (verify launches / plain "
          f"launches); the {n} largest of {len(diff)}")
    for d, nm in diff[:n]:
        print(f"  {d:+8.1f} ({a.get(nm, {}).get('n', 0):.0f} / {b.get(nm, {}).get('n', 0):.0f})  {nm}")


if __name__ == "__main__":
    sys.exit(main())
