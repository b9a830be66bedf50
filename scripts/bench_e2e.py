"""The engine end to end at real shapes, as a user runs it: decode and prefill, one table.

Model: a preset of scripts/shapes.py (default flash8: Ling-2.6-flash layer shapes, 8 layers, vocab cut to
32768) with random weights generated on device in their shards (--fill), on a mesh of --tp devices.

Decode rows (batch B at context C): every request holds C tokens and decodes one more.
  step ms     device time of one decode step: the engine's step (model step + greedy sampling),
              B requests at position C, run --steps times back to back (caches donated, nothing read
              back between steps); median over --reps
  e2e ms      wall time per decode step of Engine.generate (the whole engine: scheduling, packing,
              sampling, reading tokens back): median time between consecutive tokens of one request
              (on_token), after a warm-up run; only where the prefill of B x C tokens takes reasonable
              time (--e2e-max-tokens)
  host gap    e2e ms - step ms (host time the device waits for)
  tok/s       B / e2e (or B / step where no e2e was run)
  bytes       what a step must touch: non-expert weights (embedding rows aside) + each touched expert once
              (expected unique experts per MoE layer under uniform routing: E (1 - (1 - k/E)^B)) +
              linear-attention states read and written (float32) + MLA latents read (bf16, C per request)
  MBU         bytes / step ms over the copy bandwidth measured in the same run
Prefill rows (N requests x L tokens, each one engine step of N x L tokens, sampling one token):
  ms, tok/s, MFU = (2 x active params x tokens + attention flops) / time over the dense bf16 matmul rate
  measured in the same run (attention: linear attention 4 H D (D + 64) per token; MLA causal scores
  and values H (2 (r + rope) + 2 r) per token pair).

Capacity rows (--capacity GB, comma list): how many requests of mixed lengths (total tokens uniform in
--capacity-lengths, default 1k-128k, seeded) fit an MLA latent budget of GB GiB. before: the per-slot cache,
each slot reserving --capacity-max-len positions (budget / (max_len x latent bytes per position)); after:
the paged engine's own admission (Engine(kv_cache_gb=GB), requests added in order, one schedule() call,
no step run), each request holding ceil(length / page_size) pages. The linear-attention states (the same
per request either way) are reported beside it, outside the budget.

--moe old swaps in the routed-expert forms the engine used before the grouped matmul (for a before/after
table in one run; scripts/bench_moe.py old_forms). Writes JSON to --out (default $OUT/bench_e2e.json).

    PYTHONPATH=.:scripts python3 scripts/bench_e2e.py                       # nvidia-h200, flash8
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.:scripts python3 scripts/bench_e2e.py --preset flash --tp 2 \
        --decode 1x1024,16x1024,64x1024 --prefill 1x4096 --steps 10 --e2e-max-tokens 0
        # nvidia-h200-x2, full depth: 97 GiB of bf16 weights per GPU (JAX's default 75% cap would leave ~7 GiB)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 \
        scripts/bench_e2e.py --preset flash --tp 2 --layers 8 --vocab 2048 --experts 16 --decode 1x64,4x64 \
        --prefill 1x64 --steps 2 --reps 1 --e2e-max-tokens 0 --smoke     # the same path on the CPU, reduced
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=.:scripts python3 scripts/bench_e2e.py --preset flash \
        --quantize fp8-block      # nvidia-h200: full depth in FP8 (98.3 GiB of weights: JAX's default 75% cap
                                  # of the 140 GiB would leave 6.6 GiB for caches)
FP8 (--quantize): MFU is still over the bf16 matmul rate (the FP8 tensor-core peak is twice that).
    JAX_PLATFORMS=cpu PYTHONPATH=.:scripts python3 scripts/bench_e2e.py --smoke [--quantize fp8-block]
    # issue 14 targets (nvidia-h200, < 4 min): batch 256 at a 131k cache, and the capacity at 40 GiB
    PYTHONPATH=.:scripts python3 scripts/bench_e2e.py --decode 256x131072,64x8192 --prefill 1x4096 \
        --e2e-max-tokens 0 --steps 10 --capacity 40
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
log = logging.getLogger("bench_e2e")


def parse_pairs(s):
    return [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p]


def fp8_moe_options(decode_max_tokens, quant_h, prefill_w16=False):
    """The FP8 MoE switches for this run (before any step is traced): the decode path up to decode_max_tokens
    tokens (None: the library's default), down quantizing h itself, w16 at prefill sizes."""
    from lingjax.kernels.moe import gpu_fp8
    if decode_max_tokens is not None:
        gpu_fp8.DECODE_MAX_TOKENS = decode_max_tokens
    gpu_fp8.DECODE_QUANT_H = bool(quant_h)
    gpu_fp8.PREFILL_W16 = bool(prefill_w16)
    log.info("FP8 MoE decode path up to %d tokens%s%s", gpu_fp8.DECODE_MAX_TOKENS,
             ", h quantized in down" if quant_h else "", ", w16 at prefill sizes" if prefill_w16 else "")


def use_old_moe():
    """Route MoE layers through the pre-grouped-matmul forms (gather / sorted / dense by pick_form)."""
    import jax.numpy as jnp
    import lingjax.model.moe as moe_mod
    from bench_moe import old_forms
    forms = old_forms()

    def pick(T, k, n, d, I):
        if T * k < n:
            return "gather"
        bm = 64
        while bm > 8 and T * k < 2 * bm * n:
            bm //= 2
        nb = -(-(T * k + n * (bm - 1)) // bm)
        return "sorted" if nb * 3 * d * I * 4 <= (64 << 20) else "dense"

    class Old:
        @staticmethod
        def experts(x, idx, w, wg, wu, wd, impl=None):
            n, d, I = wg.shape
            mine = (idx >= 0) & (idx < n)
            idx, w = jnp.clip(idx, 0, n - 1), jnp.where(mine, w, 0.0)
            return forms[pick(x.shape[0], idx.shape[1], n, d, I)](x, idx, w, wg, wu, wd)
    moe_mod.moe_kernels = Old


def step_bytes(cfg, model, B, C, tp):
    """Bytes one decode step of B requests at context C must touch (per device under tp) -> (bytes, expected
    distinct experts per MoE layer): bench_spec.step_bytes at k = 0 (one count for both benches: the non-expert
    weights with the lm_head, the touched experts, the linear states read and written, the MLA latents read
    and the new ones written in the model's dtype, the embedding rows). Under tp the weights, the experts
    and the linear states are split over the devices; the latents and the embedding rows are replicated.
    FP8 weights count their values and scales."""
    import jax.numpy as jnp
    from bench_spec import distinct_experts, param_bytes
    from bench_spec import step_bytes as spec_step_bytes
    parts = spec_step_bytes(cfg, param_bytes(model), B, C, 0, latent_itemsize=jnp.dtype(model.dtype).itemsize)
    split = parts["weights"] + parts["experts"] + parts["lm_head"] + parts["states"]
    return split / tp + parts["caches"], distinct_experts(B, cfg.num_experts, cfg.num_experts_per_tok)


def cache_bytes(cfg, latent_dtype):
    """Cache bytes of one request: linear-attention states (float32 [H, D, D] per linear layer) and MLA
    latents per token (kv_lora_rank + rope per MLA layer, in the latent dtype)."""
    import jax.numpy as jnp
    H, D = cfg.num_attention_heads, cfg.head_dim
    return dict(linear_state_per_request=len(cfg.linear_layers) * H * D * D * 4,
                mla_latent_per_token=len(cfg.mla_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                * jnp.dtype(latent_dtype).itemsize)


def attention_flops(cfg, lengths):
    H, D = cfg.num_attention_heads, cfg.head_dim
    lin = len(cfg.linear_layers) * 4 * H * D * (D + 64) * sum(lengths)
    mla = len(cfg.mla_layers) * H * (2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * cfg.kv_lora_rank) \
        * sum(L * (L + 1) / 2 for L in lengths)
    return lin + mla


def decode_setup(model, cfg, mesh, B, C, page_size):
    """(f, state, caches, batch) of one decode step of B requests at context C: f(state, caches, batch)
    -> (greedy tokens, caches) jitted with the caches donated, over the paged MLA cache with each
    request's pages scattered over the pool."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from lingjax import sharding
    from lingjax.batch import StepBatch
    from lingjax.cache import pages_for
    from lingjax.kernels import fp8 as fp8_kernels
    graphdef, state = nnx.split(model)
    step = sharding.shard_step(graphdef, cfg, mesh)

    def one(state, caches, batch):
        logits, caches = step(state, batch, caches, jnp.arange(B, dtype=jnp.int32))
        return jnp.argmax(logits, -1).astype(jnp.int32), caches
    f = jax.jit(one, donate_argnums=1, compiler_options=fp8_kernels.step_xla_options(model) or None)  # the engine's
    max_pages = pages_for(C + 8, page_size)
    caches = sharding.init_caches(cfg, mesh, B, B * max_pages, page_size, latent_dtype=model.dtype)
    rng = np.random.default_rng(B)
    table = rng.permutation(B * max_pages).astype(np.int32).reshape(B, max_pages)   # scattered pages
    batch = StepBatch(tokens=jnp.asarray(rng.integers(2, cfg.vocab_size, B), jnp.int32),
                      positions=jnp.full((B,), C, jnp.int32), token_seq=jnp.arange(B, dtype=jnp.int32),
                      slots=jnp.arange(B, dtype=jnp.int32), cu_seqlens=jnp.arange(B + 1, dtype=jnp.int32),
                      fresh=jnp.zeros((B,), bool), page_table=jnp.asarray(table), decode_only=True)
    return f, state, caches, batch


def device_decode_ms(model, cfg, mesh, B, C, steps, reps, page_size, setup=None):
    """Median device time of one decode step (engine step + greedy), steps dispatched back to back, over
    the paged MLA cache with each request's pages scattered over the pool (decode_setup; `setup`: one
    made and compiled before, precompile)."""
    f, state, caches, batch = setup or decode_setup(model, cfg, mesh, B, C, page_size)
    ms, first_s, caches = time_steps(f, state, caches, batch, steps, reps)
    log.info("decode B=%d C=%d: first step (compile unless precompiled) %.1f s", B, C, first_s)
    del caches
    return ms


def time_steps(f, state, caches, batch, steps, reps):
    """One step of decode_setup's f (compiles unless compiled before), then `reps` runs of `steps` steps
    dispatched back to back with one sync each -> (median ms per step, the first step's seconds, caches)."""
    import jax
    t = time.perf_counter()
    toks, caches = f(state, caches, batch)
    jax.block_until_ready(toks)
    first_s = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            toks, caches = f(state, caches, batch)
        jax.block_until_ready((toks, caches))
        ts.append((time.perf_counter() - t) / steps * 1e3)
    return statistics.median(ts), first_s, caches


def engine(model, mesh, **kw):
    from lingjax.engine import Engine
    return Engine(model, mesh=mesh, **kw)


def e2e_decode_ms(model, mesh, cfg, B, C, steps):
    """Median wall time between consecutive decode steps of Engine.generate (request 0's token arrival
    times through on_token), and the time to the first token (prefill)."""
    from lingjax.engine import SamplingParams
    rng = np.random.default_rng(C + B)
    prompts = [rng.integers(2, cfg.vocab_size, C).tolist() for _ in range(B)]
    chunk = min(C, max(256, 16384 // B))
    eng = engine(model, mesh, max_batch=B, prefill_chunk=chunk, max_len=C + steps + 8)
    sp = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    eng.generate(prompts, sp)                                         # compile every shape
    times = []
    t0 = time.perf_counter()
    eng.generate(prompts, sp, on_token=lambda i, tok: times.append(time.perf_counter()) if i == 0 else None)
    del eng
    gaps = np.diff(times)
    return float(np.median(gaps[1:] if len(gaps) > 2 else gaps)) * 1e3, times[0] - t0


def prefill_engine(model, mesh, N, L):
    return engine(model, mesh, max_batch=N, prefill_chunk=L, max_len=L + 8)


def prefill_ms(model, mesh, cfg, N, L, reps, eng=None):
    """Median wall time of Engine.generate of N prompts of L tokens, one token each (one prefill step),
    after a warm-up call (eng: an engine made by prefill_engine, maybe precompiled)."""
    from lingjax.engine import SamplingParams
    rng = np.random.default_rng(N * L)
    prompts = [rng.integers(2, cfg.vocab_size, L).tolist() for _ in range(N)]
    eng = eng or prefill_engine(model, mesh, N, L)
    sp = SamplingParams(max_new_tokens=1, ignore_eos=True)
    t = time.perf_counter()
    eng.generate(prompts, sp)
    log.info("prefill %dx%d: warm-up generate (compile unless precompiled) %.1f s", N, L, time.perf_counter() - t)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        eng.generate(prompts, sp)
        ts.append((time.perf_counter() - t) * 1e3)
    del eng
    return statistics.median(ts)


def precompile(model, cfg, mesh, decode_rows, prefill_rows, page_size, threads):
    """Compile every row's step before any is timed, `threads` XLA compilations at a time (the compiler
    releases the GIL; a 32-layer step takes tens of seconds to compile, one after the other they did
    not fit a device call): decode rows traced and lowered here (decode_setup, Python, one after the
    other), their compilations on a pool; meanwhile each prefill row's engine lowers and compiles its
    prefill step (Engine.precompile). -> ({(B, C): setup}, {(N, L): engine})."""
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.perf_counter()
    setups, engines, futs = {}, {}, []
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-compile") as pool:
        for B, C in decode_rows:
            try:
                s = decode_setup(model, cfg, mesh, B, C, page_size)
                f, state, caches, batch = s
                futs.append(pool.submit(f.lower(state, caches, batch).compile))
                setups[(B, C)] = s
            except Exception as e:                      # noqa: BLE001 (OOM etc.: the row runs and records it)
                log.info("precompile decode B=%d C=%d: %s", B, C, str(e).splitlines()[0][:200] if str(e) else e)
        log.info("precompile: %d decode steps lowered in %.1f s", len(decode_rows), time.perf_counter() - t0)
        for N, L in prefill_rows:
            eng = engines[(N, L)] = prefill_engine(model, mesh, N, L)
            shapes = [sh for sh in eng.buckets("sample") if not sh[2] and sh[1] >= N * L][:1]
            try:
                eng.precompile(shapes, threads=1)
            except Exception as e:                      # noqa: BLE001 (the warm-up generate compiles it then)
                log.info("precompile prefill %dx%d %s: %s", N, L, shapes, e)
        for fu in futs:
            fu.result()
    log.info("precompile: %d decode + %d prefill steps compiled in %.1f s (%d threads)", len(decode_rows),
             len(prefill_rows), time.perf_counter() - t0, threads)
    return setups, engines


def capacity(model, mesh, cfg, gb, page_size, max_len, lo, hi, seed=0):
    """Requests of total length uniform in [lo, hi] that fit `gb` GiB of MLA latents: per-slot cache vs the
    paged engine's admission (see the module docstring)."""
    import jax.numpy as jnp
    from lingjax.cache import page_bytes, state_bytes
    from lingjax.engine import Engine, SamplingParams
    per_pos = page_bytes(cfg, 1, model.dtype)
    before = int(gb * 2 ** 30 // (max_len * per_pos))
    pages = int(gb * 2 ** 30 // page_bytes(cfg, page_size, model.dtype))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, 4 * max(before, 1) + 64).tolist()
    n = 0                                                 # upper bound on what can fit: size max_batch by it
    budget = pages
    for L in lengths:
        budget -= -(-L // page_size)
        if budget < 0:
            break
        n += 1
    eng = Engine(model, mesh=mesh, max_batch=max(n, 1) + 1, max_len=max_len, page_size=page_size, kv_cache_gb=gb,
                 prefill_chunk=1, max_tokens=max(n, 1) + 1, state_dtype=jnp.float32)
    for L in lengths[: n + 1]:        # one prompt token + L - 1 new ones: a request of L tokens in all (cheap to
        eng.add_request([2], SamplingParams(max_new_tokens=max(L - 1, 1), ignore_eos=True))   # validate)
    eng._admit_waiting()
    after = eng.num_running
    for rid in list(eng._requests):
        eng.abort(rid)
    del eng
    return dict(gb=gb, lengths=[lo, hi], page_size=page_size, max_len=max_len, before=before, after=after,
                ratio=after / max(before, 1), mean_length=float(np.mean(lengths[:after])) if after else 0.0,
                linear_state_gib_per_request=state_bytes(cfg) / 2 ** 30)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None,
                   help="model shapes (scripts/shapes.py): flash8 (default), flash, 1t, tiny (default under --smoke)")
    p.add_argument("--layers", type=int, help="override the preset's depth")
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary")
    p.add_argument("--experts", type=int, help="override the preset's number of routed experts (CPU checks of a "
                   "full-width command; the table header gives the number)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (devices)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--decode", default=None,
                   help="decode rows BxC (batch x context), comma list (default 1x1024,16x1024,64x1024,256x1024; "
                        "under --smoke 2x16)")
    p.add_argument("--prefill", default=None,
                   help="prefill rows NxL (requests x tokens), comma list (default 1x4096,8x2048; under --smoke 1x32)")
    p.add_argument("--steps", type=int, default=20, help="decode steps per timed run (default 20)")
    p.add_argument("--reps", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--e2e-max-tokens", type=int, default=300_000,
                   help="run the end-to-end generate() timing only where B x C is at most this (its prefill)")
    p.add_argument("--moe", choices=("grouped", "old"), default="grouped",
                   help="grouped: the MoE layer as it is; old: the forms it replaced (before/after)")
    p.add_argument("--matmul-precision", default=None,
                   help="comma list of the model's matmul precisions to run in turn on the same weights "
                        "(default, high, highest; e.g. 'default,highest' for issue 21's float32 before/after); "
                        "default: the model's own (highest for float32, default for bfloat16)")
    p.add_argument("--fp8-dense-decode", choices=("xla", "triton"), default=None,
                   help="FP8 dense projections of <= 64 rows: XLA's FP8 dot or the Triton kernel with "
                        "fp8.gpu.decode_config (sets lingjax.kernels.fp8.DENSE_DECODE; default: the library's)")
    p.add_argument("--fp8-moe-decode", type=int, default=None, metavar="N",
                   help="FP8 MoE: run the decode path (no layout; gpu_fp8.experts_decode) up to N tokens per step "
                        "(sets gpu_fp8.DECODE_MAX_TOKENS; default: the library's, 0 = the grouped path always)")
    p.add_argument("--fp8-moe-quant-h", action="store_true",
                   help="FP8 MoE decode path: down quantizes h itself (sets gpu_fp8.DECODE_QUANT_H)")
    p.add_argument("--fp8-moe-prefill-w16", action="store_true",
                   help="FP8 MoE at prefill sizes (128-row blocks): the reference math on the bf16 tensor cores, the "
                        "weight tiles dequantized in the kernel (sets gpu_fp8.PREFILL_W16)")
    p.add_argument("--quantize", choices=("none", "fp8-block", "fp8-channel"), default="none",
                   help="FP8 weights: the projections and experts made on device and quantized one parameter "
                        "at a time (shapes.random_fp8_model; 128x128 blocks with per-token-group activations, or "
                        "per-channel with per-token activations); the model's kernels run them (GPU: the FP8 "
                        "Triton kernels); under --tp each made directly in its shards")
    p.add_argument("--fill", choices=("hash", "init"), default="hash",
                   help="random weights: hash (a cheap pseudo-random fill of every matrix, ~N(0, 0.02); "
                        "default) or init (the model's own threefry initialisation: slow at real scale)")
    p.add_argument("--page-size", type=int, default=64, help="MLA latent positions per page (default 64)")
    p.add_argument("--capacity", default="", help="MLA latent budgets in GiB (comma list) for the capacity rows")
    p.add_argument("--capacity-lengths", default="1024,131072",
                   help="capacity rows: request lengths uniform in LO,HI (default 1024,131072)")
    p.add_argument("--capacity-max-len", type=int, default=131072,
                   help="capacity rows: the context a per-slot cache reserves per request (default 131072)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test: the tiny preset and small rows unless given, 2 steps, 1 rep")
    p.add_argument("--compile-threads", type=int, default=1,
                   help="compile every decode and prefill row's step before timing any, this many XLA compilations "
                        "at a time (default 1: each row compiles when it runs; full depth: 32 unrolled layers take "
                        "tens of seconds per step shape)")
    p.add_argument("--out", help="JSON output (default $OUT/bench_e2e.json when $OUT is set)")
    args = p.parse_args(argv)
    for name, full, smoke in (("preset", "flash8", "tiny"), ("decode", "1x1024,16x1024,64x1024,256x1024", "2x16"),
                              ("prefill", "1x4096,8x2048", "1x32")):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import jax
    import jax.numpy as jnp
    from lingjax import sharding
    from bench_moe import ceilings, torch_ceilings
    from shapes import param_counts, preset, random_fp8_model, random_model, weight_bytes
    if args.moe == "old":
        use_old_moe()
    fp8_moe_options(args.fp8_moe_decode, args.fp8_moe_quant_h, args.fp8_moe_prefill_w16)
    if args.fp8_dense_decode:
        from lingjax.kernels import fp8 as fp8_kernels
        fp8_kernels.DENSE_DECODE = args.fp8_dense_decode
        log.info("FP8 dense projections of <= %d rows: %s", fp8_kernels.XLA_DOT_MAX_ROWS, args.fp8_dense_decode)
    cfg = preset(args.preset, args.layers, args.vocab, args.experts)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    mesh = sharding.make_mesh(args.tp) if args.tp > 1 else None
    copy_bw, mm_rate = ceilings(args.smoke)
    if jax.default_backend() == "gpu":
        try:
            t_copy, t_rate = torch_ceilings()
            copy_bw, mm_rate = max(copy_bw, t_copy), max(mm_rate, t_rate)
            import torch
            torch.cuda.empty_cache()              # give PyTorch's cached blocks (8 GiB) back for the model
        except Exception as e:                          # noqa: BLE001
            log.info("PyTorch ceilings not measured: %s", e)
    if args.quantize != "none" and args.moe == "old":
        p.error("--quantize runs with the grouped MoE only")
    t0 = time.perf_counter()
    model = (random_model(cfg, mesh, dtype, fill=args.fill) if args.quantize == "none"
             else random_fp8_model(cfg, dtype, args.quantize, mesh=mesh))
    jax.block_until_ready(jax.tree.leaves(model))
    t_init = time.perf_counter() - t0
    total, active, head = param_counts(cfg)
    devs = jax.devices()[: args.tp]
    mem = [d.memory_stats() or {} for d in devs] if jax.default_backend() != "cpu" else [{}]
    kinds = "".join("L" if k == "linear" else "M" for k in cfg.layer_kinds)
    report = dict(device=devs[0].device_kind, tp=args.tp, preset=args.preset, layers=cfg.num_hidden_layers, kinds=kinds,
                  experts=cfg.num_experts,
                  vocab=cfg.vocab_size, dtype=args.dtype, moe=args.moe, quantize=args.quantize,
                  fp8_moe_decode=args.fp8_moe_decode, fp8_moe_quant_h=args.fp8_moe_quant_h,
                  fp8_moe_prefill_w16=args.fp8_moe_prefill_w16, fp8_dense_decode=args.fp8_dense_decode,
                  weight_bytes=weight_bytes(model) / args.tp, cache_bytes=cache_bytes(cfg, model.dtype), matmul_precisions=args.matmul_precision or model.matmul_precision,
                  copy_bw=copy_bw, matmul_rate=mm_rate, params=total, init_s=t_init, fill=args.fill,
                  bytes_in_use=[m.get("bytes_in_use") for m in mem], bytes_limit=[m.get("bytes_limit") for m in mem],
                  decode=[], prefill=[])
    log.info("%s x%d: %s %d layers %s vocab %d %s, moe=%s, quantize=%s, %.1fB params (%.1f GiB), init %.0f s; "
             "copy %.2f TB/s, matmul %.0f TFLOP/s", report["device"], args.tp, args.preset, cfg.num_hidden_layers, kinds,
             cfg.vocab_size, args.dtype, args.moe, args.quantize, total / 1e9, report["weight_bytes"] / 2**30, t_init,
             copy_bw / 1e12, mm_rate / 1e12)
    if mem[0].get("bytes_limit"):
        free = mem[0]["bytes_limit"] - mem[0]["bytes_in_use"]
        cb = report["cache_bytes"]
        log.info("memory after the weights: %.1f GiB in use of %.1f GiB; %.1f GiB left for caches and activations "
                 "(a request's linear-attention states %.1f MiB + MLA latents %.1f KiB per token)",
                 mem[0]["bytes_in_use"] / 2**30, mem[0]["bytes_limit"] / 2**30, free / 2**30,
                 cb["linear_state_per_request"] / 2**20, cb["mla_latent_per_token"] / 2**10)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_e2e.json") if os.environ.get("OUT") else None)

    def save():
        if out:
            with open(out, "w") as f:
                json.dump(report, f, indent=1)

    steps, reps = (2, 1) if args.smoke else (args.steps, args.reps)
    for prec in (args.matmul_precision.split(",") if args.matmul_precision else [model.matmul_precision]):
        model.matmul_precision = prec          # a static attribute: the steps compile anew
        setups, engines = {}, {}
        if args.compile_threads > 1:
            setups, engines = precompile(model, cfg, mesh, parse_pairs(args.decode), parse_pairs(args.prefill),
                                         args.page_size, args.compile_threads)
        for B, C in parse_pairs(args.decode):
            row = dict(batch=B, context=C, matmul_precision=prec)
            try:
                row["step_ms"] = device_decode_ms(model, cfg, mesh, B, C, steps, reps, args.page_size,
                                                  setups.pop((B, C), None))
                if B * C <= args.e2e_max_tokens:
                    row["e2e_ms"], row["prefill_s"] = e2e_decode_ms(model, mesh, cfg, B, C, steps)
                    row["host_gap_ms"] = row["e2e_ms"] - row["step_ms"]
            except Exception as e:                      # noqa: BLE001 (OOM etc.: recorded, the run goes on)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log.info("decode B=%d C=%d: %s", B, C, row["error"])
                report["decode"].append(row)
                save()
                continue
            nbytes, touched = step_bytes(cfg, model, B, C, args.tp)
            ms = row.get("e2e_ms", row["step_ms"])
            row.update(tok_s=B / ms * 1e3, bytes=nbytes, touched_experts=touched,
                       mbu=nbytes / (row["step_ms"] * 1e-3) / copy_bw)
            report["decode"].append(row)
            save()
            log.info("decode B=%-4d C=%-6d step %.2f ms  e2e %s  MBU %.0f%%", B, C, row["step_ms"],
                     f"{row['e2e_ms']:.2f} ms" if "e2e_ms" in row else "-", 100 * row["mbu"])
        for N, L in parse_pairs(args.prefill):
            row = dict(requests=N, length=L, matmul_precision=prec)
            try:
                row["ms"] = prefill_ms(model, mesh, cfg, N, L, reps, engines.pop((N, L), None))
            except Exception as e:                      # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                log.info("prefill %dx%d: %s", N, L, row["error"])
                report["prefill"].append(row)
                save()
                continue
            flops = 2 * active * N * L + 2 * head * N + attention_flops(cfg, [L] * N)
            row.update(tok_s=N * L / row["ms"] * 1e3, flops=flops, mfu=flops / (row["ms"] * 1e-3) / (mm_rate * args.tp))
            report["prefill"].append(row)
            save()
            log.info("prefill %dx%d: %.1f ms, %.0f tok/s, MFU %.1f%%", N, L, row["ms"], row["tok_s"], 100 * row["mfu"])
    report["capacity"] = []
    lo, hi = (int(v) for v in args.capacity_lengths.split(","))
    for gb in [float(v) for v in args.capacity.split(",") if v]:
        row = capacity(model, mesh, cfg, gb, args.page_size, args.capacity_max_len, lo, hi)
        report["capacity"].append(row)
        save()
        log.info("capacity %.3g GiB: %d requests per-slot, %d paged (%.2fx)", gb, row["before"], row["after"],
                 row["ratio"])
    if jax.default_backend() != "cpu":
        report["peak_bytes_in_use"] = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devs]
    save()
    print(f"\n{report['device']} x{args.tp}, {args.preset} ({cfg.num_hidden_layers} layers {kinds}, vocab "
          f"{cfg.vocab_size}, {cfg.num_experts} experts), {args.dtype}, moe={args.moe}, quantize={args.quantize}, weights "
          f"{report['weight_bytes'] / 2**30:.1f} GiB; copy {copy_bw / 1e12:.2f} TB/s, "
          f"matmul {mm_rate / 1e12:.0f} TFLOP/s")
    print(f"| batch | context | precision | step ms | e2e ms | host gap ms | tok/s | GB/step | MBU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["decode"]:
        if "error" in r:
            print(f"| {r['batch']} | {r['context']} | {r['error'][:80]} |")
            continue
        e2e = f"{r['e2e_ms']:.2f}" if "e2e_ms" in r else "-"
        gap = f"{r['host_gap_ms']:.2f}" if "host_gap_ms" in r else "-"
        print(f"| {r['batch']} | {r['context']} | {r['matmul_precision']} | {r['step_ms']:.2f} | {e2e} | {gap} | {r['tok_s']:.0f} | "
              f"{r['bytes'] / 1e9:.2f} | {100 * r['mbu']:.0f}% |")
    print(f"| prefill | precision | ms | tok/s | MFU |\n|---|---|---|---|---|")
    for r in report["prefill"]:
        if "error" in r:
            print(f"| {r['requests']}x{r['length']} | {r['error'][:80]} |")
        else:
            print(f"| {r['requests']}x{r['length']} | {r['matmul_precision']} | {r['ms']:.1f} | {r['tok_s']:.0f} | {100 * r['mfu']:.1f}% |")
    if report["capacity"]:
        print("| MLA budget GiB | lengths | per-slot (max_len) | paged | ratio | linear state GiB / request |\n"
              "|---|---|---|---|---|---|")
        for r in report["capacity"]:
            print(f"| {r['gb']:g} | {r['lengths'][0]}-{r['lengths'][1]} | {r['before']} ({r['max_len']}) | "
                  f"{r['after']} | {r['ratio']:.2f}x | {r['linear_state_gib_per_request']:.4f} |")
    if report.get("peak_bytes_in_use"):
        print("peak GiB per device: " + ", ".join(f"{b / 2**30:.1f}" for b in report["peak_bytes_in_use"] if b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
