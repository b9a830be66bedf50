"""Tensor-parallel benchmark at Ling-2.6-flash layer shapes: tp = 1, 2, 4 (as many as devices allow).

The model has Ling-2.6-flash's layer shapes -- d=4096, 32 heads of 128, GroupRMSNorm with 4 groups,
MLA with q_lora 1536 / kv_lora 512 / nope 128 / rope 64 / v 128, 256 experts of width 1024 (top-8,
8 groups, keep 4) plus one shared expert, a dense first layer of width 9216 -- with random weights and
fewer layers: by default 8 (layer_group_size 4: 6 linear-attention + 2 MLA layers; 1 dense + 7 MoE).
The vocabulary is cut to 32768 (flash: 157184) so that the embedding/lm_head stay small; say so
when quoting the numbers.

For each tp the weights are generated on device directly in their shards (same seed, so the same
values at every tp: JAX's partitionable threefry), on a mesh of the first tp devices:
  1. check: the sharded full forward of `--check-batch` prompts in float32 with full-precision
     matmuls (no TF32), on the first `--check-layers` layers at the same shapes (float32 params of all
     8 layers would not fit one GPU), compared with tp = 1: max |diff| / max |logit| <= --tol (1e-4).
     bfloat16 is not used for this check: its rounding differs with the reduction order and flips
     near-tied expert choices, so bf16 logits of different tp differ by far more than the TP math does;
  2. bench (--dtype, default bfloat16, all layers): an Engine on the mesh generates `--decode-steps`
     greedy tokens for `--batch` prompts of `--prompt-len` tokens; every decode-only engine step is
     timed (median, ms: wall time of the jitted step, host sync included); greedy tokens are
     compared with tp = 1 for information;
  3. memory: per-device bytes in use with params + caches resident, and the param bytes per device.
Prints a table and writes JSON to $OUT/tp_bench.json (or --out). Partial results are written after
each tp, so a timeout still leaves the finished rows.

    PYTHONPATH=. python3 scripts/tp_bench.py                     # GPU machine, all visible GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        PYTHONPATH=. python3 scripts/tp_bench.py --shrink        # CPU smoke test, tiny shapes

Multi-host: the same command on every host with --coordinator HOST:PORT --num-processes N
--process-id I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); process 0 prints.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time


def build_config(args):
    from lingjax.config import BailingConfig
    if args.shrink:
        shapes = dict(hidden_size=64, num_attention_heads=8, head_dim=16, intermediate_size=96, num_experts=16,
                      moe_intermediate_size=32, n_group=4, topk_group=2, num_experts_per_tok=4, q_lora_rank=24,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, vocab_size=256)
    else:       # Ling-2.6-flash (SPEC §1.2, §1.4)
        shapes = dict(hidden_size=4096, num_attention_heads=32, head_dim=128, intermediate_size=9216,
                      num_experts=256, moe_intermediate_size=1024, n_group=8, topk_group=4, num_experts_per_tok=8,
                      q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      vocab_size=args.vocab)
    cfg = BailingConfig(num_hidden_layers=args.layers, layer_group_size=args.layer_group_size, group_norm_size=4,
                        num_key_value_heads=shapes["num_attention_heads"], num_shared_experts=1,
                        first_k_dense_replace=1, routed_scaling_factor=2.5, rope_theta=6e6,
                        max_position_embeddings=131072, num_nextn_predict_layers=0, pad_token_id=0, eos_token_id=1,
                        **shapes)
    cfg.validate()
    return cfg


def init_state(cfg, mesh, dtype):
    """Random params generated on device, each directly in its shards."""
    import jax
    from flax import nnx
    from lingjax import sharding
    from lingjax.model import BailingModel

    def make():
        return BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=False)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, cfg, mesh)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def device_memory(devices):
    out = []
    for d in devices:
        try:
            s = d.memory_stats() or {}
        except Exception:       # CPU backends may not report
            s = {}
        out.append(dict(device=str(d), bytes_in_use=s.get("bytes_in_use"), peak_bytes_in_use=s.get("peak_bytes_in_use"),
                        bytes_limit=s.get("bytes_limit")))
    return out


def param_bytes_per_device(model):
    import jax
    from flax import nnx
    per = {}
    for x in jax.tree.leaves(nnx.split(model)[1]):
        for s in x.addressable_shards:
            per[str(s.device)] = per.get(str(s.device), 0) + s.data.nbytes
    return per


def check_tp(tp, args, cfg, prompts, log):
    """float32, full-precision matmuls: the sharded full forward's logits (host numpy)."""
    import dataclasses
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from lingjax import sharding

    ccfg = dataclasses.replace(cfg, num_hidden_layers=min(args.check_layers, cfg.num_hidden_layers))
    mesh = sharding.make_mesh(tp)
    t0 = time.perf_counter()
    model = init_state(ccfg, mesh, jnp.float32)
    graphdef, state = nnx.split(model)
    with jax.default_matmul_precision("highest"):
        fwd = jax.jit(sharding.shard_forward(graphdef, ccfg, mesh))
        logits = np.asarray(fwd(state, jnp.asarray(prompts[: args.check_batch])))
    log(f"tp={tp}: float32 check forward ({ccfg.num_hidden_layers} layers, init + compile + run) "
        f"{time.perf_counter() - t0:.1f}s")
    del model, state, fwd
    gc.collect()
    return logits


def bench_tp(tp, args, cfg, dtype, prompts, log):
    import jax
    from lingjax import sharding
    from lingjax.engine import Engine, SamplingParams

    mesh = sharding.make_mesh(tp)
    t0 = time.perf_counter()
    model = init_state(cfg, mesh, dtype)
    jax.block_until_ready(nnx_state(model))
    t_init = time.perf_counter() - t0
    B = len(prompts)
    eng = Engine(model, mesh=mesh if tp > 1 else None, max_batch=B, prefill_chunk=args.prompt_len,
                 max_len=args.prompt_len + args.decode_steps + 8, kernels=args.kernels)
    devices = list(mesh.devices.flat)
    mem_loaded = device_memory(devices)
    pbytes = param_bytes_per_device(model)

    times, orig = [], eng._sample_step

    def timed(state, caches, batch, *rest):
        t = time.perf_counter()
        out = orig(state, caches, batch, *rest)
        jax.block_until_ready(out)
        if batch.decode_only:
            times.append(time.perf_counter() - t)
        return out
    eng._sample_step = timed
    t0 = time.perf_counter()
    eng.generate(prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))           # compile
    t_warm = time.perf_counter() - t0
    times.clear()
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=args.decode_steps, ignore_eos=True))
    steady = times[2:] if len(times) > 4 else times
    log(f"tp={tp}: init {t_init:.1f}s, compile {t_warm:.1f}s, {len(steady)} decode steps timed")
    row = dict(tp=tp, init_s=round(t_init, 2), compile_s=round(t_warm, 2),
               decode_steps_timed=len(steady), decode_step_ms=1e3 * statistics.median(steady),
               decode_step_ms_min=1e3 * min(steady), tokens_per_s=B / statistics.median(steady),
               param_bytes_per_device=max(pbytes.values()), memory=mem_loaded,
               memory_after=device_memory(devices), kernels=args.kernels or "auto")
    tokens = [o.token_ids for o in outs]
    del eng, model
    gc.collect()
    return row, tokens


def nnx_state(model):
    from flax import nnx
    return nnx.split(model)[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", default=None, help="comma-separated tp values (default: 1,2,4,8 up to the device count)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--layer-group-size", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=16, help="requests decoded together (engine max_batch)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--check-layers", type=int, default=4, help="layers of the float32 logits check")
    p.add_argument("--check-batch", type=int, default=4, help="prompts of the float32 logits check")
    p.add_argument("--tol", type=float, default=1e-4, help="max relative float32 logits error vs tp=1")
    p.add_argument("--kernels", default=None, help="linear-attention kernels, the engine's kernels= (default: $LINGJAX_KERNELS, else by platform)")
    p.add_argument("--shrink", action="store_true", help="tiny shapes, for a CPU smoke test")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/tp_bench.json, else ./tp_bench.json)")
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    args = p.parse_args(argv)
    args.kernels = args.kernels or os.environ.get("LINGJAX_KERNELS") or None

    import jax
    from lingjax import sharding
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax.numpy as jnp
    import numpy as np

    main_proc = jax.process_index() == 0

    def log(msg):
        if main_proc:
            print(msg, file=sys.stderr, flush=True)

    n = jax.device_count()
    tps = [int(t) for t in args.tp.split(",")] if args.tp else [t for t in (1, 2, 4, 8) if t <= n]
    cfg = build_config(args)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    tol = args.tol
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "tp_bench.json")
    report = dict(device=str(jax.devices()[0].device_kind), platform=jax.default_backend(), devices=n,
                  processes=jax.process_count(), jax=jax.__version__, dtype=args.dtype,
                  config=dict(layers=cfg.num_hidden_layers, kinds=list(cfg.layer_kinds), d=cfg.hidden_size,
                              heads=cfg.num_attention_heads, head_dim=cfg.head_dim, experts=cfg.num_experts,
                              expert_width=cfg.moe_intermediate_size, q_lora=cfg.q_lora_rank,
                              kv_lora=cfg.kv_lora_rank, vocab=cfg.vocab_size, group_norm_size=cfg.group_norm_size),
                  batch=args.batch, prompt_len=args.prompt_len, decode_steps=args.decode_steps, tol=tol,
                  check=dict(dtype="float32", matmul_precision="highest", layers=min(args.check_layers, args.layers),
                             batch=args.check_batch), rows=[])
    log(f"{report['device']} x{n} ({report['processes']} process(es)); tp {tps}; {cfg.num_hidden_layers} layers "
        f"{''.join('L' if k == 'linear' else 'M' for k in cfg.layer_kinds)}, vocab {cfg.vocab_size}, {args.dtype}")

    base = None
    for tp in tps:
        logits = check_tp(tp, args, cfg, prompts, log)
        try:
            row, tokens = bench_tp(tp, args, cfg, dtype, prompts, log)
        except Exception as e:          # keep the rows done so far; a kernel failure falls back once
            if args.kernels != "reference" and jax.default_backend() == "gpu":
                log(f"tp={tp}: {type(e).__name__}: {str(e).splitlines()[0][:300]} -- retrying with reference kernels")
                args.kernels = "reference"
                gc.collect()
                row, tokens = bench_tp(tp, args, cfg, dtype, prompts, log)
            else:
                raise
        if base is None:
            base = (logits, tokens)
        err = float(np.abs(logits - base[0]).max() / np.abs(base[0]).max())
        top1 = float(np.mean(logits.argmax(-1) == base[0].argmax(-1)))
        same_tokens = float(np.mean([x == y for x, y in zip(tokens, base[1])]))
        row.update(max_rel_err_vs_tp1=err, top1_agree_vs_tp1=top1, greedy_same_vs_tp1=same_tokens, ok=err <= tol)
        report["rows"].append(row)
        if main_proc:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            with open(out_path, "w") as f:
                json.dump(report, f, indent=2)
        log(f"tp={tp}: decode step {row['decode_step_ms']:.2f} ms, f32 max rel err vs tp=1 {err:.2e}, "
            f"top-1 agree {top1:.3f}")

    if main_proc:
        gib = 2 ** 30
        print(f"\n{report['device']} x{n}, {args.dtype}, batch {args.batch}, prompt {args.prompt_len}, "
              f"{cfg.num_hidden_layers} layers at Ling-2.6-flash shapes (vocab {cfg.vocab_size})")
        print(f"| tp | decode step ms (median, {args.dtype}) | tok/s | params GiB/device | in use GiB/device (max) | "
              "f32 logits max rel err vs tp=1 | f32 top-1 agree | greedy tokens same |")
        print("|---|---|---|---|---|---|---|---|")
        for r in report["rows"]:
            used = [m["bytes_in_use"] for m in r["memory"] if m["bytes_in_use"] is not None]
            print(f"| {r['tp']} | {r['decode_step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                  f"{r['param_bytes_per_device'] / gib:.2f} | {max(used) / gib if used else float('nan'):.2f} | "
                  f"{r['max_rel_err_vs_tp1']:.2e} | {r['top1_agree_vs_tp1']:.3f} | {r['greedy_same_vs_tp1']:.2f} |")
        print(f"\nwrote {out_path}")
    bad = [r["tp"] for r in report["rows"] if not r["ok"]]
    if bad:
        log(f"logits disagree with tp=1 beyond tol {tol} at tp {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
