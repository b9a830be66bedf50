"""Load generator for `lingjax serve`: throughput, time to first token and inter-token latency.

    # CPU, the shipped tiny model (starts `lingjax serve` itself, on 127.0.0.1):
    python scripts/bench_serve.py --model checkpoints/ling-tiny --concurrency 16 --num-requests 128
    # GPU, random weights at Ling-2.6-flash shapes cut to 8 layers, built on the device:
    python scripts/bench_serve.py --random-shapes flash8 --max-batch 64 --concurrency 64 --num-requests 512
    # an already running server:
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --request-rate 20 --num-requests 200

Requests are streamed completions (`/v1/completions`, `stream: true`) of random token-id prompts
(--prompt-len MIN MAX) with random output lengths (--output-len MIN MAX; `ignore_eos`, so each
request generates exactly that many tokens), sent either by --concurrency C closed-loop clients or
at --request-rate R requests/s (Poisson arrivals). --warmup requests run first, unmeasured (the server
compiles its step shapes at start-up, `lingjax.server.warm_up`; these settle the rest). The run is bounded by --num-requests and --max-seconds.

Measured per request: TTFT (send -> first token), TPOT ((last - first token) / (tokens - 1)), ITL (gap
between consecutive token events; a server-sent event usually holds one token), end-to-end latency.
Printed: request and token throughput and the percentiles; written as JSON to --out (default
$OUT/bench_serve.json when $OUT is set, else scripts/results/bench_serve_<what>.json).

The server runs in a child process (never this one: the load generator would steal its host time):
`python -m lingjax.cli serve` for --model, or this script's own --_child server for --random-shapes (a
random model built on the device, with a synthetic tokenizer of one word per token id).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- random model (child)
def random_config(shapes: str):
    """The model of scripts/tp_bench.py and scripts/bench_overlap.py: flash8 = Ling-2.6-flash layer shapes
    (d=4096, 32 heads, MLA, 256 experts top-8), 8 layers (layer_group_size 4: 6 linear + 2 MLA), the full
    vocabulary; tiny = its --shrink shapes (for a CPU smoke test)."""
    import types
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tp_bench import build_config
    return build_config(types.SimpleNamespace(shrink=shapes == "tiny", vocab=157184, layers=8, layer_group_size=4))


def random_model(cfg, dtype, tp):
    """Random params generated on the device(s), each directly in its shards: shapes.random_model's hash fill
    (seconds at flash8; the model's own threefry init took 66 s on an H200)."""
    from lingjax.sharding import make_mesh
    from shapes import random_model as hash_model
    return hash_model(cfg, make_mesh(tp) if tp > 1 else None, dtype)


def word_tokenizer_dir(cfg, path):
    """tokenizer.json with one word per id ("t123"), config.json: enough for lingjax.tokenizer.Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(tok.to_str())
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t1"}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": cfg.vocab_size, "eos_token_id": cfg.eos_token_id}, f)


def child(args) -> int:
    """Serve a random model on 127.0.0.1 (prints the URL line `lingjax serve` prints)."""
    import jax
    import jax.numpy as jnp
    import uvicorn
    from lingjax.engine import Engine
    from lingjax.engine_loop import EngineLoop
    from lingjax.server import create_app, warm_up
    from lingjax.tokenizer import Tokenizer

    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="bench_serve child: %(message)s")
    logging.getLogger("lingjax.server").setLevel(logging.INFO)        # the warm-up's account of its time
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    cfg = random_config(args.random_shapes)
    t = time.perf_counter()
    model = random_model(cfg, dtype, args.tp)
    jax.block_until_ready(jax.tree.leaves(model))
    print(f"bench_serve child: random {args.random_shapes} model ({cfg.num_hidden_layers} layers, vocab "
          f"{cfg.vocab_size}) built in {time.perf_counter() - t:.1f}s on {jax.devices()[0].platform}", file=sys.stderr)
    kw = {} if args.kernels is None else dict(kernels=args.kernels)
    eng = Engine(model, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, max_len=args.max_len,
                 max_tokens=args.max_step_tokens, tp=args.tp, decode_steps=args.decode_steps, **kw)
    t = time.perf_counter()
    n = warm_up(eng, threads=args.compile_threads)
    print(f"bench_serve child: warm-up {n} compilations in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="bench-serve-tok-")
    word_tokenizer_dir(cfg, tmp)
    app = create_app(EngineLoop(eng), Tokenizer(tmp), model_name=f"random-{args.random_shapes}")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           timeout_graceful_shutdown=5))
    signal.signal(signal.SIGTERM, lambda *_: None)      # graceful, exit 0 (see lingjax/cli/serve.py)

    async def serve():
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"lingjax serve: random-{args.random_shapes} on http://127.0.0.1:{port}/v1", file=sys.stderr,
                  flush=True)
        await task
    asyncio.run(serve())
    return 0


# --------------------------------------------------------------------------------------------- load generator
def percentiles(xs, ps=(50, 90, 99)):
    if not xs:
        return {}
    s = sorted(xs)
    out = {f"p{p}": s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] for p in ps}
    out["mean"] = statistics.fmean(s)
    return out


async def one_request(client, url, model, prompt, max_tokens):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    events, tokens = [], None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0].get("text"):
                events.append(time.perf_counter())
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
    t1 = time.perf_counter()
    if not events:
        raise RuntimeError("no token came back")
    n = tokens or len(events)
    return dict(prompt_len=len(prompt), output_tokens=n, ttft=events[0] - t0, e2e=t1 - t0,
                tpot=(events[-1] - events[0]) / (n - 1) if n > 1 else None,
                itl=[b - a for a, b in zip(events, events[1:])])


async def run_load(args, url, model, vocab, n_requests, seed, record=True):
    import httpx
    rng = random.Random(seed)
    work = [([rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_len))], rng.randint(*args.output_len))
            for _ in range(n_requests)]
    results, errors = [], []
    deadline = time.perf_counter() + args.max_seconds
    limits = httpx.Limits(max_connections=max(args.concurrency or 0, 256))
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        async def do(item):
            if time.perf_counter() > deadline:
                return
            try:
                results.append(await one_request(client, url, model, *item))
            except Exception as e:          # a failed request is counted, the run goes on
                errors.append(f"{type(e).__name__}: {e}")

        t0 = time.perf_counter()
        if args.request_rate:
            tasks = []
            for item in work:
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.ensure_future(do(item)))
                await asyncio.sleep(rng.expovariate(args.request_rate))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(work))

            async def worker():
                while queue and time.perf_counter() <= deadline:
                    await do(queue.pop())
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    return results, errors, wall


def summarize(results, errors, wall):
    out_tokens = sum(r["output_tokens"] for r in results)
    in_tokens = sum(r["prompt_len"] for r in results)
    ms = lambda d: {k: round(1e3 * v, 3) for k, v in d.items()}   # noqa: E731
    return dict(
        completed=len(results), failed=len(errors), errors=errors[:5], wall_seconds=round(wall, 3),
        requests_per_s=len(results) / wall, output_tokens=out_tokens, prompt_tokens=in_tokens,
        output_tokens_per_s=out_tokens / wall, total_tokens_per_s=(out_tokens + in_tokens) / wall,
        ttft_ms=ms(percentiles([r["ttft"] for r in results])),
        tpot_ms=ms(percentiles([r["tpot"] for r in results if r["tpot"] is not None])),
        itl_ms=ms(percentiles([x for r in results for x in r["itl"]])),
        e2e_ms=ms(percentiles([r["e2e"] for r in results])))


def engine_counters(url) -> dict:
    """The server's lingjax_engine_* totals from /metrics (steps, dispatches, host / wait / compile seconds,
    compilations); {} when the server has none (another server)."""
    import httpx
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("lingjax_engine_"):
            name, value = line.split()
            out[name.removeprefix("lingjax_engine_")] = float(value)
    return out


def engine_delta(before, after) -> dict:
    """What the engine did during the measured run: steps, dispatches, compilations (a compile in the
    window stalls every request in flight: it is reported, never hidden), host and wait ms per dispatch."""
    if not before or not after:
        return {}
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    n = max(d.get("dispatches", 0.0), 1.0)
    return dict(steps=int(d.get("steps", 0)), dispatches=int(d.get("dispatches", 0)),
                compilations=int(d.get("compilations", 0)), compile_seconds=round(d.get("compile_seconds", 0.0), 3),
                host_ms_per_dispatch=round(1e3 * d.get("host_seconds", 0.0) / n, 3),
                wait_ms_per_dispatch=round(1e3 * d.get("wait_seconds", 0.0) / n, 3))


def print_summary(s, what):
    print(f"bench_serve: {what}")
    print(f"  requests      {s['completed']} completed, {s['failed']} failed in {s['wall_seconds']:.1f} s "
          f"({s['requests_per_s']:.2f} req/s)")
    print(f"  throughput    {s['output_tokens_per_s']:.1f} output tok/s, {s['total_tokens_per_s']:.1f} total tok/s")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = s[name]
        if d:
            print(f"  {name[:-3]:<13} p50 {d['p50']:9.2f} ms   p90 {d['p90']:9.2f} ms   p99 {d['p99']:9.2f} ms   "
                  f"mean {d['mean']:9.2f} ms")
    e = s.get("engine")
    if e:
        print(f"  engine        {e['steps']} steps in {e['dispatches']} dispatches; host {e['host_ms_per_dispatch']:.2f} "
              f"ms and wait {e['wait_ms_per_dispatch']:.2f} ms per dispatch; {e['compilations']} compilations "
              f"({e['compile_seconds']:.1f} s) during the run")
    for err in s["errors"]:
        print(f"  error         {err}")


# --------------------------------------------------------------------------------------------- main
def start_server(args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]))
    common = ["--max-batch", str(args.max_batch), "--max-len", str(args.max_len), "--prefill-chunk",
              str(args.prefill_chunk), "--dtype", args.dtype, "--tp", str(args.tp)]
    if args.kernels:
        common += ["--kernels", args.kernels]
    if args.decode_steps != 1:
        common += ["--decode-steps", str(args.decode_steps)]
    if args.compile_threads and not args.model:
        common += ["--compile-threads", str(args.compile_threads)]
    if args.max_step_tokens and not args.model:     # (`lingjax serve` has no such option: its default budget)
        common += ["--max-step-tokens", str(args.max_step_tokens)]
    if args.model:
        cmd = [sys.executable, "-m", "lingjax.cli", "serve", "--model", args.model, "--port", "0"] + common
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--random-shapes", args.random_shapes] + common
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    # The server is ready when it prints its URL (after loading and warming up: no fixed clock, the
    # warm-up takes what its compilations take). Its stderr is read on a thread, so that --start-timeout
    # (if given) is kept even while the child prints nothing.
    found = queue.Queue()

    def read():
        for line in proc.stderr:
            sys.stderr.write(line)
            m = re.search(r"lingjax serve: (\S+) on (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                found.put((m.group(2), m.group(1)))
        found.put(None)                           # the child closed its stderr (it exited)
    threading.Thread(target=read, daemon=True).start()
    while True:
        try:
            got = found.get(timeout=1.0)
        except queue.Empty:
            got = False
        except BaseException:                     # SIGTERM / Ctrl-C while it starts: do not leave it running
            proc.kill()
            raise
        if got:
            print(f"bench_serve: server ready after {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
            return proc, got[0], got[1]
        timed_out = args.start_timeout is not None and time.monotonic() - t0 > args.start_timeout
        if got is None or timed_out or (got is False and proc.poll() is not None):
            proc.kill()
            why = f"not ready after --start-timeout {args.start_timeout:g}s" if timed_out else \
                f"it exited with status {proc.wait()} before it was ready"
            raise SystemExit(f"bench_serve: the server did not start ({why}): {' '.join(cmd)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server (127.0.0.1 or localhost only)")
    src.add_argument("--model", help="checkpoint directory: start `lingjax serve --model PATH` for the run")
    src.add_argument("--random-shapes", choices=("flash8", "tiny"),
                     help="start a server on a random model: flash8 = Ling-2.6-flash shapes, 8 layers (GPU); "
                          "tiny = lingjax.testing.tiny_config")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: C clients (default 16)")
    load.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson arrivals, requests/s")
    p.add_argument("--num-requests", type=int, default=128, help="measured requests (default %(default)s)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured requests first (default: 2 x concurrency, "
                                                            "or 16)")
    p.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long (default %(default)s)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"),
                   help="prompt lengths in tokens, uniform in [MIN, MAX] (default %(default)s)")
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"),
                   help="tokens each request generates (ignore_eos), uniform in [MIN, MAX] (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=98, help="with --url: prompt token ids are drawn from [3, V) "
                                                             "(default %(default)s, the tiny model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and lengths (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600,
                   help="seconds a request may take before it counts as failed (default %(default)s)")
    p.add_argument("--start-timeout", type=float, default=None,
                   help="give up if the started server is not ready (listening, after its warm-up) after this many "
                        "seconds; default: wait as long as it runs")
    g = p.add_argument_group("the server this script starts")
    g.add_argument("--max-batch", type=int, default=16, help="requests in flight at once (default %(default)s)")
    g.add_argument("--max-len", type=int, default=512, help="context length per request (default %(default)s)")
    g.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens per request per step (default %(default)s)")
    g.add_argument("--max-step-tokens", type=int, default=None,
                   help="--random-shapes: the engine's token budget per step (default max-batch x prefill-chunk); "
                        "fewer step buckets to compile at start-up")
    g.add_argument("--decode-steps", type=int, default=1, metavar="N",
                   help="multi-step decode: up to N decode steps per dispatch (Engine(decode_steps=N), "
                        "`lingjax serve --decode-steps`); default %(default)s")
    g.add_argument("--compile-threads", type=int, default=None, metavar="K",
                   help="--random-shapes: threads compiling the step shapes at start-up (lingjax.server.warm_up; "
                        "default: up to 8, one per CPU core)")
    g.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="parameter dtype (default %(default)s)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default %(default)s)")
    g.add_argument("--kernels", default=None, help="the engine's kernel backend (default: by platform)")
    p.add_argument("--out", help="JSON path (default $OUT/bench_serve.json, else scripts/results/bench_serve_<what>.json)")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 16
    if args.warmup is None:
        args.warmup = 2 * args.concurrency if args.concurrency else 16
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        p.error("--url: only a server on 127.0.0.1 / localhost")
    if args.prompt_len[0] < 1 or args.output_len[0] < 1 or args.prompt_len[0] > args.prompt_len[1] \
            or args.output_len[0] > args.output_len[1]:
        p.error("--prompt-len / --output-len: 1 <= MIN <= MAX")
    if args.model and (args.max_step_tokens or args.compile_threads):
        p.error("--max-step-tokens and --compile-threads apply to --random-shapes only (`lingjax serve` has "
                "neither option)")
    if args.decode_steps < 1:
        p.error("--decode-steps: N >= 1")
    if args.prompt_len[1] + args.output_len[1] > args.max_len and not (args.url or args._child):
        p.error(f"--prompt-len MAX + --output-len MAX must fit --max-len {args.max_len}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        return child(args)
    proc = None
    # a SIGTERM (e.g. from `timeout`) ends this process through the `finally` below, which stops the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.url:
            url = args.url.rstrip("/").removesuffix("/v1")
            import httpx
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        else:
            proc, url, model = start_server(args)
        import httpx
        info = httpx.get(url + "/v1/models").json()["data"][0]
        vocab = _vocab(args, info)
        if args.warmup:
            res, err, wall = asyncio.run(run_load(args, url, model, vocab, args.warmup, args.seed + 1))
            print(f"bench_serve: warm-up {len(res)} requests in {wall:.1f}s ({len(err)} failed)", file=sys.stderr)
        before = engine_counters(url)
        results, errors, wall = asyncio.run(run_load(args, url, model, vocab, args.num_requests, args.seed))
        after = engine_counters(url)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)       # graceful: requests in flight finish (up to 5 s)
            try:
                rc = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            print(f"bench_serve: server exited with status {rc}", file=sys.stderr)
    s = summarize(results, errors, wall)
    s["engine"] = engine_delta(before, after)
    load = f"concurrency {args.concurrency}" if args.concurrency else f"rate {args.request_rate}/s"
    what = (f"{model}, {load}, prompts {args.prompt_len[0]}-{args.prompt_len[1]}, outputs "
            f"{args.output_len[0]}-{args.output_len[1]} tokens")
    if not args.url:
        what += f", max_batch {args.max_batch}, max_len {args.max_len}, {args.dtype}, tp {args.tp}"
    print_summary(s, what)
    report = dict(what=what, args={k: v for k, v in vars(args).items() if not k.startswith("_")}, platform=_platform(),
                  **s)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_serve.json") if os.environ.get("OUT") else
                       os.path.join(REPO, "scripts", "results", f"bench_serve_{re.sub(r'[^A-Za-z0-9._-]', '_', model)}.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"bench_serve: wrote {out}")
    return 0 if results else 1


def _vocab(args, info) -> int:
    if args.random_shapes:
        return random_config(args.random_shapes).vocab_size
    if args.model:
        with open(os.path.join(args.model, "config.json")) as f:
            return json.load(f)["vocab_size"]
    return args.vocab_size


def _platform() -> str:
    import platform
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus"


if __name__ == "__main__":
    sys.exit(main())
