"""What the subcommands of lingjax.cli share: the one-line error type, flag types, the common
model/engine flags, the steps from flags to a loaded engine, and atomic output files. Every module of
lingjax/cli/ imports it; it imports no other module of lingjax.cli. Runtime modules (model, kernels,
engine, server) import none of lingjax.cli.

Imports only the standard library at the top, so that `lingjax --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("lingjax")

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"
DEFAULT_CHECKPOINT = "ling-tiny"   # name under checkpoints/ to prefer when several are shipped


class CLIError(Exception):
    """A failure to report as one line and exit status 1."""



# ------------------------------------------------------------------------------------------ flag types
def int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}")
        return v
    parse.__name__ = f"int>={lo}"
    return parse


def float_in(lo, hi, lo_open=False, name="value"):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
            raise argparse.ArgumentTypeError(f"expected a number in {rng}, got {s!r}")
        return v
    parse.__name__ = name
    return parse


def add_common(p: argparse.ArgumentParser, *, model_required: bool) -> None:
    if model_required:
        p.add_argument("--model", required=True, metavar="PATH",
                       help="checkpoint directory: an HF one (config.json, *.safetensors, tokenizer files) or "
                            "a `lingjax convert` output")
    else:
        p.add_argument("--model", metavar="PATH",
                       help="checkpoint directory: an HF one (config.json, *.safetensors, tokenizer files) or "
                            "a `lingjax convert` output; default: the model shipped in checkpoints/")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="parameter and activation dtype. bfloat16: bf16 weights and activations, matmuls with "
                        "bf16 products and float32 accumulation (the backend's default); float32: every matmul in "
                        "full float32 on every backend (precision 'highest': no TF32 on GPUs; the linear-attention "
                        "GPU kernels use 3xTF32, float32-accurate). Either way logits, router, softmax and the "
                        "linear-attention states are float32; default %(default)s")
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=256, metavar="N",
                   help="prompt tokens a request feeds per engine step (chunked prefill); 1 sends every token "
                        "through the decode path; default %(default)s")
    p.add_argument("--max-batch", type=int_at_least(1), default=8, metavar="B",
                   help="requests in flight at once (each holds a cache slot); more requests queue and start as "
                        "slots free, so prefill chunks and decodes of different requests share steps; "
                        "default %(default)s")
    p.add_argument("--max-len", type=int_at_least(1), default=None, metavar="N",
                   help="context length of each cache slot, in tokens (prompt + generated); default "
                        "min(max_position_embeddings, 4096)")
    p.add_argument("--tp", type=int_at_least(1), default=1, metavar="N",
                   help="tensor-parallel degree (devices to shard heads and experts over); default 1")
    add_kernels(p)
    p.add_argument("--xla-option", dest="xla_options", action="append", type=xla_option, default=None,
                   metavar="NAME=VALUE",
                   help="an XLA debug option for the engine's step executables (repeatable; set per executable, "
                        "not for the process), e.g. xla_gpu_enable_command_buffer= (no CUDA graphs); VALUE "
                        "true/false/an integer/text; default: XLA's own settings")
    add_kv_cache(p)
    g = p.add_argument_group("multi-host (one process per host, JAX's distributed runtime; default: the "
                             "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID environment variables)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    g.add_argument("--num-processes", type=int_at_least(1), metavar="N", help="number of processes (hosts)")
    g.add_argument("--process-id", type=int_at_least(0), metavar="I", help="this process's index in [0, N)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (compilations, steps)")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


def xla_option(s: str):
    """NAME=VALUE -> (name, value): true/false -> bool, an integer -> int, else the text (may be empty)."""
    name, eq, value = s.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {s!r}")
    if value.lower() in ("true", "false"):
        return name.strip(), value.lower() == "true"
    try:
        return name.strip(), int(value)
    except ValueError:
        return name.strip(), value


def add_kernels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", default=os.environ.get("LINGJAX_KERNELS") or None, metavar="IMPL",
                   help="linear-attention kernels: reference, gpu, tpu, mosaic_gpu (or gpu_interpret, "
                        "tpu_interpret, mosaic_gpu_interpret: Pallas interpret mode, for tests); default: "
                        "$LINGJAX_KERNELS if set, else by platform (gpu, tpu, else reference)")


def add_speculative(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative-tokens", type=int_at_least(0), default=0, metavar="K",
                   help="speculative decoding: the checkpoint's MTP layer drafts K tokens per step and the "
                        "main model verifies them in the same step (exact: greedy output is unchanged, "
                        "sampling keeps its distribution); steps are then not overlapped. Needs the MTP "
                        "weights (num_nextn_predict_layers >= 1); default 0 (off)")
    # lingjax.speculative.VERIFY_PATHS, spelled out: importing the runtime here would make --help take ~1.3 s
    p.add_argument("--spec-verify", choices=("prefill", "mla_decode", "decode"), default="decode",
                   help="with --speculative-tokens: how a step of decoding requests only runs its verify rows: "
                        "prefill (the packed prefill kernels), mla_decode (MLA through the paged decode kernel, a "
                        "row per token), decode (that, and the linear layers without a prefill-kernel launch: the "
                        "fastest on an H200). The same greedy tokens; a speed choice. Default %(default)s")


def add_decode_steps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode-steps", type=int_at_least(1), default=1, metavar="N",
                   help="multi-step decode: when every running request is decoding and none waits, one dispatch "
                        "runs up to N decode steps on the device (the same tokens as N single steps), so the "
                        "host's fixed cost per dispatch is paid once per N tokens. Helps small batches on a fast "
                        "device; a request arriving meanwhile waits for the window, tokens stream N at a time. "
                        "Not with --speculative-tokens. Default %(default)s (off)")


def add_kv_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-gb", type=float_in(0.0, None, lo_open=True, name="GiB"), default=None, metavar="GB",
                   help="memory for the paged MLA latent cache, in GiB per device: requests take pages as they "
                        "grow and wait in the queue when the pages they may need are not free; default: what "
                        "--max-batch x --max-len needs")
    p.add_argument("--page-size", type=int_at_least(1), default=64, metavar="N",
                   help="token positions per MLA cache page; default %(default)s")


def default_model_dir() -> Path:
    """The checkpoint shipped in checkpoints/ (the only one there, or DEFAULT_CHECKPOINT)."""
    found = sorted(d for d in CHECKPOINTS_DIR.glob("*") if (d / "config.json").is_file()) \
        if CHECKPOINTS_DIR.is_dir() else []
    if not found:
        raise CLIError(f"no --model given and no checkpoint is shipped in {CHECKPOINTS_DIR}; "
                       f"pass --model PATH (an HF checkpoint directory)")
    if len(found) == 1:
        return found[0]
    if DEFAULT_CHECKPOINT and (CHECKPOINTS_DIR / DEFAULT_CHECKPOINT / "config.json").is_file():
        return CHECKPOINTS_DIR / DEFAULT_CHECKPOINT
    raise CLIError(f"no --model given and {CHECKPOINTS_DIR} holds several checkpoints "
                   f"({', '.join(d.name for d in found)}); pass --model PATH")


def read_config(path):
    from lingjax.config import BailingConfig, ConfigError
    path = os.path.join(path, "config.json") if os.path.isdir(path) else str(path)
    try:
        return BailingConfig.from_json(path)
    except ConfigError as e:
        msg = str(e)
        raise CLIError(msg if msg.startswith(path) else f"{path}: {msg}") from None


def max_len_for(args, cfg) -> int:
    from lingjax.engine import DEFAULT_MAX_LEN
    if args.max_len is None:
        return min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
    if args.max_len > cfg.max_position_embeddings:
        raise CLIError(f"--max-len {args.max_len} exceeds the model's max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    return args.max_len


def make_mesh(args):
    """Start the distributed runtime if asked, then the tp mesh (None: one device, no sharding)."""
    import jax
    from lingjax import sharding
    try:
        multi = sharding.initialize_distributed(getattr(args, "coordinator", None),
                                                getattr(args, "num_processes", None), getattr(args, "process_id", None))
    except (sharding.ShardingError, RuntimeError, ValueError) as e:
        raise CLIError(f"distributed runtime: {first_line(e)}") from None
    if multi and jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")          # process 0 prints the results
    n = jax.device_count()
    if args.tp > n:
        raise CLIError(f"--tp {args.tp} needs {args.tp} devices; found {n}")
    if args.tp == 1 and not multi:
        return None
    try:
        return sharding.make_mesh(args.tp)
    except sharding.ShardingError as e:
        raise CLIError(str(e)) from None


def build_engine(args, model_dir, max_len):
    """Load the model at model_dir and build the engine the flags describe."""
    k_spec = getattr(args, "speculative_tokens", 0) or 0
    decode_steps = getattr(args, "decode_steps", 1) or 1
    if decode_steps > 1 and k_spec:
        raise CLIError("--decode-steps > 1 cannot be combined with --speculative-tokens: use one or the other")
    import jax.numpy as jnp
    from lingjax.engine import Engine, load_model
    mesh = make_mesh(args)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    log.info("loading %s (%s, tp=%d)", model_dir, args.dtype, args.tp)
    mtp = bool(k_spec) or bool(getattr(args, "mtp", False))       # the MTP layer: drafts, or score --mtp
    if mtp and read_config(model_dir).num_nextn_predict_layers < 1:
        raise CLIError(f"{model_dir}: the checkpoint has no MTP layer (num_nextn_predict_layers is 0); "
                       f"{'--speculative-tokens' if k_spec else '--mtp'} needs it")
    cfg, model = load_model(str(model_dir), dtype, mesh=mesh, mtp=mtp)
    eng = Engine(model, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, max_len=max_len, mesh=mesh,
                 kernels=getattr(args, "kernels", None), num_speculative_tokens=k_spec,
                 spec_verify=getattr(args, "spec_verify", "decode"), decode_steps=decode_steps,
                 kv_cache_gb=getattr(args, "kv_cache_gb", None),
                 page_size=getattr(args, "page_size", 64),
                 prefix_cache=hasattr(args, "no_prefix_cache") and not args.no_prefix_cache,
                 prefix_cache_states=getattr(args, "prefix_cache_states", None),
                 prefix_cache_save_last=not getattr(args, "no_prefix_save_last", False),
                 xla_options=dict(getattr(args, "xla_options", None) or ()) or None)
    log.info("engine: max_batch=%d prefill_chunk=%d max_len=%d, step buckets T=%s", eng.max_batch,
             eng.prefill_chunk, eng.max_len, eng.t_buckets)
    return cfg, eng


def progress_bar(total, desc, enabled=True):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, file=sys.stderr, leave=False)


def first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ------------------------------------------------------------------------------------------ output files
def check_output_path(out, flag="--out") -> str:
    """The file an output path names, once it is safe to write there: a new path or a regular file
    (a symlink is followed to its target); a directory, FIFO, device or socket is refused, and so is a
    missing or unwritable directory. Call it before the long work, so a bad path fails at once."""
    target = os.path.realpath(out)
    if os.path.isdir(target):
        raise CLIError(f"{flag} {out}: is a directory")
    if os.path.exists(target) and not os.path.isfile(target):
        raise CLIError(f"{flag} {out}: not a regular file (a FIFO, device or socket); refusing to replace it")
    d = os.path.dirname(target)
    if not os.path.isdir(d):
        raise CLIError(f"{flag} {out}: directory {os.path.dirname(os.path.abspath(out))} does not exist")
    if not os.access(d, os.W_OK):
        raise CLIError(f"{flag} {out}: directory {d} is not writable")
    return target


def write_output_atomic(out, write, flag="--out") -> None:
    """Write an output file atomically: write(f) fills a temporary file in the target's directory,
    which then replaces the target (a symlink's target, never the link). A new file gets the usual
    permissions (0666 less the umask), a replaced one keeps its own."""
    target = check_output_path(out, flag)
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=".lingjax-", suffix=".tmp", dir=os.path.dirname(target))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, mode)
        check_output_path(out, flag)           # still a regular file or absent: not swapped meanwhile
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
