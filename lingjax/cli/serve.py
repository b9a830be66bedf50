"""`lingjax serve`: the OpenAI-compatible HTTP server (lingjax/server.py) from the command line.

    lingjax serve --model PATH [--tp N] [--host 127.0.0.1] [--port 8000] [--max-batch B] [--max-len N]

Imports only the standard library and lingjax.cli.common at the top (the server, the engine and JAX
load inside `run`), so that `lingjax --help` stays fast.
"""
from __future__ import annotations

import logging
import signal
import socket

from lingjax.cli.common import (CLIError, add_decode_steps, add_kernels, add_kv_cache, add_speculative, build_engine, default_model_dir, float_in, int_at_least,
                                max_len_for, read_config)

log = logging.getLogger(__name__)

HELP = "serve a model over an OpenAI-compatible HTTP API"
DESCRIPTION = (
    "Serve the model over HTTP: /v1/models, /v1/completions and /v1/chat/completions (OpenAI's API, streamed "
    "as server-sent events or not), /health and /metrics (Prometheus). Requests share the engine's continuous "
    "batching (--max-batch requests in flight, the rest queue). SIGTERM or Ctrl-C shut it down gracefully: "
    "requests in flight finish (up to --shutdown-timeout seconds, then they are aborted), exit status 0 on "
    "SIGTERM.")


def add_arguments(p):
    p.add_argument("--model", metavar="PATH",
                   help="checkpoint directory: an HF one (config.json, *.safetensors, tokenizer files) or a "
                        "`lingjax convert` output (with the tokenizer files); default: the model shipped in "
                        "checkpoints/")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; default %(default)s (this machine only; 0.0.0.0 for every "
                        "interface)")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="TCP port; 0 picks a free one; default %(default)s")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send (and /v1/models lists); default: the checkpoint directory's "
                        "name (the --model path is accepted too)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="parameter and activation dtype (logits are always float32); default %(default)s")
    p.add_argument("--max-batch", type=int_at_least(1), default=8, metavar="B",
                   help="requests in flight at once (each holds a cache slot); more queue; default %(default)s")
    p.add_argument("--max-len", type=int_at_least(2), default=None, metavar="N",
                   help="context length of each cache slot (prompt + generated tokens); a request whose prompt "
                        "+ max_tokens exceeds it gets a 400; default min(max_position_embeddings, 4096)")
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=256, metavar="N",
                   help="prompt tokens a request feeds per engine step (chunked prefill); default %(default)s")
    p.add_argument("--tp", type=int_at_least(1), default=1, metavar="N",
                   help="tensor-parallel degree (devices to shard heads and experts over); default 1")
    add_kernels(p)
    add_speculative(p)
    add_decode_steps(p)
    add_kv_cache(p)
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="turn the prefix cache off (on by default: requests whose prompts start with a prefix "
                        "served before reuse its MLA cache pages and saved linear-attention states and prefill "
                        "only the rest; results equal up to float rounding)")
    p.add_argument("--prefix-cache-states", type=int_at_least(0), default=None, metavar="N",
                   help="linear-attention states the prefix cache may keep (one per cached prefix end, each "
                        "linear layers x heads x head_dim^2 float32); default --max-batch")
    p.add_argument("--no-prefix-save-last", action="store_true",
                   help="save prefix-cache states only where prompts branch off the cached path, not also near "
                        "each prompt's end (the start of its last prefill chunk): fewer state rows used, but an "
                        "exact repeat of a prompt, or a chat turn extending it, resumes from the last branch "
                        "point instead of near its end; results are the same")
    p.add_argument("--shutdown-timeout", type=float_in(0.0, None, name="seconds"), default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C, how long requests in flight may run before they are aborted; "
                        "default %(default)s")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling every step shape before serving (the first requests then wait for "
                        "compilations)")
    p.add_argument("--compile-threads", type=int_at_least(1), default=None, metavar="K",
                   help="threads running XLA's compilations of the step shapes during the warm-up (tracing and "
                        "lowering stay on one thread); default: up to 8, one per CPU core. Compiling in parallel, "
                        "XLA's GPU autotuner times its candidates less accurately (it may warn \"Delay kernel timed "
                        "out\"); 1 for the most exact choice, at the cost of a longer start")
    p.add_argument("-v", "--verbose", action="store_true", help="log requests and engine progress")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


def _check_port_free(host: str, port: int) -> None:
    """Fail before the model loads if the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CLIError(f"--host {host}: {e.strerror or e}") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise CLIError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def _server_class():
    import sys
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:            # the real output: where to point a client (--port 0 picks the port)
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                print(f"lingjax serve: {self.config.app.state.server.model_name} on http://{host}:{port}/v1",
                      file=sys.stderr, flush=True)
    return Server


def run(args) -> int:
    from pathlib import Path
    from lingjax.tokenizer import Tokenizer, TokenizerError
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not model_dir.is_dir():
        raise CLIError(f"--model {model_dir}: no such directory")
    cfg = read_config(model_dir)
    max_len = max_len_for(args, cfg)
    try:
        tok = Tokenizer(model_dir)                  # fail before the weights load
    except TokenizerError as e:
        raise CLIError(str(e)) from None
    if args.port:
        _check_port_free(args.host, args.port)

    import uvicorn
    from lingjax.engine_loop import EngineLoop
    from lingjax.server import create_app, model_name_of, warm_up

    _, eng = build_engine(args, model_dir, max_len)
    if not args.no_warmup:
        import time
        t = time.perf_counter()
        n = warm_up(eng, threads=args.compile_threads)
        log.info("warm-up: %d compilations in %.1fs", n, time.perf_counter() - t)
    name = args.served_model_name or model_name_of(str(model_dir))
    app = create_app(EngineLoop(eng), tok, model_name=name, model_aliases=(str(args.model or model_dir),))
    level = "info" if args.verbose or args.debug else "warning"
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=level, access_log=args.verbose,
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="on")
    server = _server_class()(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; a SIGTERM handler of our own makes
    # that a no-op, so a graceful SIGTERM shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda *_: log.info("SIGTERM: shut down"))
    log.info("serving %s as %r on http://%s:%d (max_batch=%d, max_len=%d)", model_dir, name, args.host, args.port,
             eng.max_batch, eng.max_len)
    server.run()
    if not server.started:
        raise CLIError(f"the server did not start on {args.host}:{args.port}")
    return 0
