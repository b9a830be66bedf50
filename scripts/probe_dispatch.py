"""Where the host's time per decode step goes (issue 15): host and device time of one jitted engine
step under several XLA / kernel configurations, with the step's thunk counts from its optimized HLO.

Model: Ling-2.6-flash layer shapes with random weights (scripts/shapes.py's hash fill), 8 layers (the
config builder of scripts/tp_bench.py, as scripts/bench_overlap.py), full vocabulary, bf16, one device, an Engine(max_batch=--batch). Each
configuration runs in its own process (XLA reads XLA_FLAGS once per process). In it: the engine
generates from one-token prompts, which compiles only the decode-only step ("greedy", T = batch)
and, with --decode-steps N > 1, the N-step window (Engine(decode_steps=N)); the last call of each is
recorded and replayed on the engine's caches:

  host ms     time for the jitted call to return, the device idle before it (the median of --calls
              calls, each followed by block_until_ready): Python + argument handling + enqueueing every
              kernel / thunk of the step
  pipe ms     --calls calls back to back, then one block: max(host, device) per call
  win ms      (N > 1) the N-step window called back to back, per step: the device's time per step
              (the host's launch cost is paid once per N steps), and its host ms per call (win host)
              (if the runtime launched the kernels on a thread of its own, host ms would be small and the
              launch cost would show as pipe ms above win ms instead: read the two together)
  noop ms     host ms of a jitted function taking the same arguments and returning one of them
              untouched (argument handling and dispatch without the model's kernels)
  fus / cc / while / cb   in the optimized HLO of the step (XLA's dump, not a second compilation):
              fusions, custom calls (kernels of jax-triton: triton_kernel_call; XLA's own Triton:
              __gpu$xla.gpu.triton; cuBLAS ...), while loops, command buffers (XLA's `command_buffer`
              computations: kernels launched as one CUDA graph) and the thunks outside them
  launches    top-level thunks the host launches per call (thunks outside command buffers + one per
              command buffer); us/launch = (host ms - noop ms) / launches

Configurations (--configs): default (XLA's own defaults, the engine's kernels), cb_off
(--xla_gpu_enable_command_buffer= : no CUDA graphs), cb_all (every command type, incl. custom calls,
while and conditional, and --xla_gpu_graph_min_graph_size=1); pallas_triton (Engine(kernels=
"pallas_triton"): the linear-attention kernels as XLA's own Triton custom call; MLA and MoE keep
jax-triton) and reference (no custom kernels at all, pure XLA), each also with +cb_off / +cb_all.
Default: default cb_off cb_all; the window (--decode-steps) is measured in the --window-configs
(default: default cb_all). Counted: while bodies once (not per trip). --budget (default 85 s) bounds
the whole run: configurations it leaves out are listed as not run.

    . scripts/gpu_env.sh; python3 scripts/probe_dispatch.py --out $OUT                  # nvidia-h200
    . scripts/gpu_env.sh; python3 scripts/probe_dispatch.py --configs pallas_triton reference \
        pallas_triton+cb_all reference+cb_all --window-configs --name probe_dispatch_kernels --out $OUT
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 scripts/probe_dispatch.py --shrink --configs default cb_off  # smoke

Writes --out/--name.json (default scripts/results/probe_dispatch.json) and prints the table. A configuration
whose process fails (an unknown flag, a compile error) is reported as failed with its last error
line; the others still run. Correctness: every configuration's greedy tokens are compared with the
first configuration's (the same random model and prompts; 'same' column; kernels may differ in
rounding, so a differing token under --kernels reference is not by itself a bug).
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CB_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
FLAGS = {
    "default": "",
    "cb_off": "--xla_gpu_enable_command_buffer=",
    "cb_all": f"--xla_gpu_enable_command_buffer={CB_ALL} --xla_gpu_graph_min_graph_size=1",
}
CONFIGS = {("+".join(x for x in (kernels, name) if x and x != "default") or "default"): (flags, kernels)
           for kernels in (None, "pallas_triton", "reference") for name, flags in FLAGS.items()}
DEFAULT_CONFIGS = ["default", "cb_off", "cb_all"]
MARK = "PROBE_RESULT "
NO_THUNK = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
            "partition-id", "replica-id"}


# ------------------------------------------------------------------------------------------ HLO text
def hlo_stats(text: str) -> dict:
    """Counts in an optimized HLO module's text: thunk-making instructions of the entry computation and
    of the while / conditional / command-buffer computations it calls (fused computations excluded)."""
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-$]+)\s*\(.*\{\s*$", line)    # a computation's header (column 0)
        if m:
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
            continue
        if cur is not None and line.strip() == "}":
            cur = None
            continue
        if cur is not None:
            line = re.sub(r"/\*.*?\*/", "", line)                  # /*index=5*/ comments in tuple types
            im = re.match(r"^\s*(ROOT\s+)?%?[\w.\-$]+\s*=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(", line)
            if im:
                comps[cur].append((im.group(2), line))
    out = collections.Counter()
    targets = collections.Counter()

    def walk(name, inside_cb, depth=0):
        for op, line in comps.get(name, []):
            if op in NO_THUNK:
                continue
            callee = re.findall(r"(?:to_apply|body|condition|calls|branch_computations=\{|true_computation|"
                                r"false_computation)=?%?([\w.\-$]+)", line)
            if op == "call" and callee and "command_buffer" in callee[0]:
                out["command_buffers"] += 1
                out["launches"] += not inside_cb
                n0 = out["thunks_in_command_buffers"]
                walk(callee[0], True, depth + 1)
                out["largest_command_buffer"] = max(out["largest_command_buffer"], out["thunks_in_command_buffers"] - n0)
                continue
            if op == "fusion":
                out["fusions"] += 1
            elif op == "custom-call":
                out["custom_calls"] += 1
                t = re.search(r'custom_call_target="([^"]+)"', line)
                targets[t.group(1) if t else "?"] += 1
            elif op in ("while", "conditional"):
                out[op + "s"] += 1
                for c in re.findall(r"(?:body|condition|true_computation|false_computation)=%?([\w.\-$]+)", line) + \
                        re.findall(r"branch_computations=\{([^}]*)\}", line):
                    for cc in c.split(","):
                        walk(cc.strip().lstrip("%"), inside_cb, depth + 1)
            else:
                out["other_" + op] += 1
            if inside_cb:
                out["thunks_in_command_buffers"] += 1
            else:
                out["launches"] += 1

    if entry:
        walk(entry, False)
    d = {k: out[k] for k in ("launches", "fusions", "custom_calls", "whiles", "conditionals", "command_buffers",
                             "thunks_in_command_buffers", "largest_command_buffer")}
    d["custom_call_targets"] = dict(targets)
    d["other_ops"] = {k[6:]: v for k, v in out.items() if k.startswith("other_")}
    return d


def dumped_hlo(dump_dir: str, name: str) -> str | None:
    files = sorted(glob.glob(os.path.join(dump_dir, f"*.jit_{name}.*after_optimizations.txt")), key=os.path.getmtime)
    if not files:
        return None
    with open(files[-1]) as f:
        return f.read()


# ------------------------------------------------------------------------------------------ one config
def child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from lingjax import engine as engine_lib
    from lingjax.engine import Engine, SamplingParams
    from lingjax.sharding import make_mesh
    from shapes import random_model
    from tp_bench import build_config

    t_start = time.perf_counter()
    cfg = build_config(types.SimpleNamespace(shrink=args.shrink, vocab=args.vocab, layers=args.layers,
                                             layer_group_size=4))
    model = random_model(cfg, make_mesh(1), jnp.bfloat16)      # hash fill: seconds, not the init's minute
    calls = {}
    origs = {"step": engine_lib._step_fn, "window": engine_lib._multi_step_fn}

    def recorder(name):
        def rec(*a, **kw):
            if a[2].decode_only:
                calls[name] = (a, kw)
            return origs[name](*a, **kw)
        return rec

    B, N = args.batch, args.decode_steps
    rng = np.random.default_rng(0)
    prompts = [[int(t)] for t in rng.integers(2, cfg.vocab_size, B)]
    eng = Engine(model, max_batch=B, prefill_chunk=1, max_len=64, kernels=args.kernels, decode_steps=N)
    engine_lib._step_fn, engine_lib._multi_step_fn = recorder("step"), recorder("window")
    try:
        t0 = time.perf_counter()
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
        compile_s = time.perf_counter() - t0
    finally:
        engine_lib._step_fn, engine_lib._multi_step_fn = origs["step"], origs["window"]
    res = dict(tokens=[o.token_ids for o in outs], compile_and_first_run_s=compile_s,
               platform=jax.default_backend(), device=str(jax.devices()[0].device_kind))

    def timings(name, n):
        fn, (a, kw) = origs[name], calls[name]
        caches = eng.caches
        host = []
        for i in range(n + 3):                       # device idle before each call
            t = time.perf_counter()
            out = fn(a[0], caches, *a[2:], **kw)
            dt = time.perf_counter() - t
            caches = out[-1]
            jax.block_until_ready(out)
            if i >= 3:
                host.append(dt)
        t = time.perf_counter()
        for _ in range(n):                           # back to back
            out = fn(a[0], caches, *a[2:], **kw)
            caches = out[-1]
        jax.block_until_ready(out)
        pipe = (time.perf_counter() - t) / n
        eng.caches = caches
        return 1e3 * statistics.median(host), 1e3 * pipe

    res["host_ms"], res["pipe_ms"] = timings("step", args.calls)
    if "window" in calls:
        steps = calls["window"][1]["num_steps"]          # a window always runs N steps
        res["window_steps"] = steps
        host, pipe = timings("window", max(args.calls // steps, 3))
        res["window_host_ms"], res["window_ms_per_step"] = host, pipe / steps

    # argument handling alone: the same arguments, no kernels (returns the caches untouched)
    (a, kw) = calls["step"]
    noop = jax.jit(lambda params, caches, *rest: caches, donate_argnums=(1,))
    caches = noop(a[0], eng.caches, *a[2:12])
    jax.block_until_ready(caches)
    host = []
    for _ in range(args.calls):
        t = time.perf_counter()
        caches = noop(a[0], caches, *a[2:12])
        host.append(time.perf_counter() - t)
        jax.block_until_ready(caches)
    res["noop_ms"] = 1e3 * statistics.median(host)
    res["num_args"] = len(jax.tree.leaves((a[0], caches, a[2:12])))
    for name, fn_name in (("step", "_step_fn"), ("window", "_multi_step_fn")):
        text = dumped_hlo(args.dump_dir, fn_name) if args.dump_dir else None
        if text is None and name in calls:           # no dump (or a backend without one): compile the text
            a, kw = calls[name]
            text = origs[name].lower(a[0], eng.caches, *a[2:], **kw).compile().as_text()
        if text is not None:
            res[name + "_hlo"] = hlo_stats(text)
    res["child_seconds"] = time.perf_counter() - t_start
    return res


# ------------------------------------------------------------------------------------------ parent
def run_config(name, args, timeout) -> dict:
    flags, kernels = CONFIGS[name]
    dump = tempfile.mkdtemp(prefix="probe_dump_")
    env = dict(os.environ)
    xla = " ".join(x for x in (env.get("XLA_FLAGS", ""), flags,
                                f"--xla_dump_to={dump} --xla_dump_hlo_as_text "
                                f"--xla_dump_hlo_module_re=.*step_fn.*") if x)
    env["XLA_FLAGS"] = xla
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch), "--layers", str(args.layers),
           "--vocab", str(args.vocab), "--calls", str(args.calls),
           "--decode-steps", str(args.decode_steps if name in args.window_configs else 1),
           "--new-tokens", str(2 * args.decode_steps + 2),
           "--dump-dir", dump] + (["--kernels", kernels] if kernels else []) + (["--shrink"] if args.shrink else [])
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(config=name, ok=False, error=f"timed out after {timeout:.0f} s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode != 0 or not lines:
        err = [ln for ln in (p.stderr or "").splitlines() if ln.strip()]
        return dict(config=name, ok=False, error=(err[-1] if err else f"exit status {p.returncode}")[:300],
                    seconds=time.perf_counter() - t)
    res = json.loads(lines[-1][len(MARK):])
    res.update(config=name, ok=True, xla_flags=flags, kernels=kernels, seconds=time.perf_counter() - t)
    return res


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS), metavar="NAME",
                   help=f"configurations to run, of: {', '.join(CONFIGS)}; default {' '.join(DEFAULT_CONFIGS)}")
    p.add_argument("--window-configs", nargs="*", default=["default", "cb_all"], metavar="NAME",
                   help="configurations in which the --decode-steps window is measured too; default default cb_all")
    p.add_argument("--batch", type=int, default=1, help="requests per decode step (max_batch); default 1")
    p.add_argument("--layers", type=int, default=8, help="decoder layers; default 8")
    p.add_argument("--vocab", type=int, default=157184, help="vocabulary size; default 157184")
    p.add_argument("--calls", type=int, default=30, help="timed calls per measurement; default 30")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="also measure the multi-step window of this many decode steps (1: none); default 8")
    p.add_argument("--timeout", type=float, default=120, help="seconds one configuration's process may take")
    p.add_argument("--budget", type=float, default=85,
                   help="seconds for the whole run: no configuration starts after it, and one running is "
                        "stopped at it (reported as timed out); default %(default)s")
    p.add_argument("--shrink", action="store_true", help="tiny shapes, for a CPU smoke test")
    p.add_argument("--out", default="scripts/results", help="directory for the JSON; default %(default)s")
    p.add_argument("--name", default="probe_dispatch", help="the JSON's file name, without .json; default %(default)s")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernels", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--new-tokens", type=int, default=18, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(MARK + json.dumps(child(args)), flush=True)
        return
    rows, ref = [], None
    print(f"probe_dispatch: batch {args.batch}, {args.layers} layers, vocab {'(shrink)' if args.shrink else args.vocab}, {args.calls} calls, "
          f"window {args.decode_steps} steps", flush=True)
    head = (f"{'config':<24} {'host':>6} {'pipe':>6} {'noop':>5} {'win/st':>6} {'winhost':>7} {'launch':>6} "
            f"{'us/l':>5} {'fus':>4} {'cc':>4} {'while':>5} {'cb':>3} {'in cb':>5} {'same':>4} {'s':>4}")
    print(head, flush=True)
    t_start = time.perf_counter()
    for name in args.configs:
        left = args.budget - (time.perf_counter() - t_start)
        if left < 5:
            rows.append(dict(config=name, ok=False, error="not run: --budget spent"))
            print(f"{name:<24} not run: --budget {args.budget:.0f} s spent", flush=True)
            continue
        r = run_config(name, args, min(args.timeout, left))
        rows.append(r)
        if not r["ok"]:
            print(f"{name:<24} FAILED: {r['error']}", flush=True)
            continue
        h = r.get("step_hlo", {})
        same = ref is None or r["tokens"] == ref
        ref = ref if ref is not None else r["tokens"]
        r["tokens_equal_first_config"] = same
        launches = h.get("launches") or None
        r["us_per_launch"] = None if not launches else 1e3 * (r["host_ms"] - r["noop_ms"]) / launches
        print(f"{name:<24} {r['host_ms']:>6.2f} {r['pipe_ms']:>6.2f} {r['noop_ms']:>5.2f} "
              f"{fmt(r.get('window_ms_per_step')):>6} {fmt(r.get('window_host_ms')):>7} {fmt(launches, 'd'):>6} "
              f"{fmt(r['us_per_launch'], '.1f'):>5} {h.get('fusions', 0):>4} {h.get('custom_calls', 0):>4} "
              f"{h.get('whiles', 0):>5} {h.get('command_buffers', 0):>3} {h.get('thunks_in_command_buffers', 0):>5} "
              f"{'yes' if same else 'NO':>4} {r['seconds']:>4.0f}", flush=True)
    for r in rows:
        if r["ok"] and r.get("step_hlo"):
            print(f"  {r['config']}: custom calls {r['step_hlo']['custom_call_targets']}; other thunks "
                  f"{r['step_hlo']['other_ops']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    out = os.path.join(args.out, args.name + ".json")
    with open(out, "w") as f:
        json.dump(dict(batch=args.batch, layers=args.layers, vocab=args.vocab, calls=args.calls,
                       decode_steps=args.decode_steps, rows=rows), f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
