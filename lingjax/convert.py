"""`lingjax convert` / `lingjax export`: HF checkpoint directory <-> lingjax checkpoint directory.

A lingjax checkpoint directory:

    DST/
      lingjax_checkpoint.json    the marker, written last: format, dtype, mtp, and the param items
      config.json                copied verbatim from the source (+ tokenizer.json,
      tokenizer*.json, ...       tokenizer_config.json, generation_config.json when present)
      params/0000/ ...           Orbax PyTree checkpoints ("items"), each a nested dict of params
                                 in the model's own layout (Flax kernels [in, out], experts stacked
                                 [E, in, out], fused QKV split), e.g. {"layers": {"3": {"mlp": {"w_up": ...}}}}

Why many Orbax items and not one: Orbax saves a pytree whose leaves are all in memory at once (and
copies each leaf once more while writing), so one whole-model save needs twice the model in host
RAM. Here the rules of weights.py (one HF tensor group -> one or a few params) are packed, in
checkpoint order, into items of at most ITEM_BYTES that never straddle two layers; a rule larger than
that (an expert stack: 2.1 GB for Ling-2.6-flash, the embedding) is an item by itself. One thread
reads and transforms the next item while the main thread saves the previous one, so at most two
items (plus Orbax's copy of one) are alive: the peak is ~3x the largest single param, about the
size of one MoE layer (3 expert stacks), whatever the model's size.

Every tensor name, shape and dtype is checked against config.json before anything is written. The
output goes to a temporary directory beside DST that is renamed to DST at the end; a failed or
interrupted run leaves DST absent, or as it was.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time

log = logging.getLogger(__name__)

MARKER = "lingjax_checkpoint.json"
FORMAT, VERSION = "lingjax-orbax", 1
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
               "special_tokens_map.json")
ITEM_BYTES = 256 << 20
DTYPES = ("bfloat16", "float32")


class ConvertError(Exception):
    """A conversion that cannot go ahead: one line naming the file, tensor or flag."""


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _key(path) -> str:
    return ".".join(map(str, path))


def _unkey(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in s.split("."))


# ------------------------------------------------------------------------------------------ planning
def _layer_of(path) -> tuple:
    return tuple(path[:2]) if path[0] in ("layers", "mtp") else (path[0] in ("norm", "lm_head"),)


def plan_items(rules, param_bytes, item_bytes: int = ITEM_BYTES) -> list[list]:
    """Pack rules, in order, into items of <= item_bytes that stay within one layer."""
    items, cur, cur_bytes, cur_layer = [], [], 0, None
    for rule in rules:
        nb, layer = param_bytes(rule), _layer_of(rule.params[0])
        if cur and (layer != cur_layer or cur_bytes + nb > item_bytes):
            items.append(cur)
            cur, cur_bytes = [], 0
        cur.append(rule)
        cur_bytes += nb
        cur_layer = layer
    if cur:
        items.append(cur)
    return items


def _nested(flat: dict) -> dict:
    tree = {}
    for path, v in flat.items():
        d = tree
        for k in path[:-1]:
            d = d.setdefault(str(k), {})
        d[str(path[-1])] = v
    return tree


def _leaf(tree: dict, path):
    for k in path:
        tree = tree[str(k)]
    return tree


# ------------------------------------------------------------------------------------------ output dir
def _check_dst(dst: str, overwrite: bool, looks_ok) -> str:
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    if os.path.lexists(dst):
        if not overwrite:
            raise ConvertError(f"{dst} already exists; pass --overwrite to replace it")
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise ConvertError(f"{dst} exists and is not a directory; refusing to replace it")
        if os.listdir(dst) and not looks_ok(dst):
            raise ConvertError(f"{dst} exists and is not a checkpoint directory; refusing to replace it")
    if not os.path.isdir(parent):
        raise ConvertError(f"{dst}: parent directory {parent} does not exist")
    return dst


@contextlib.contextmanager
def atomic_dir(dst: str):
    """Yields a fresh temporary directory beside dst; on success it replaces dst (an existing dst is
    moved aside first and deleted only after the rename); on any failure it is deleted."""
    parent, base = os.path.split(dst)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{base}.lingjax-tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as e:
        raise ConvertError(f"{dst}: cannot create a directory in {parent} ({e.strerror or e})") from None
    try:
        yield tmp
        if os.path.lexists(dst):
            old = tempfile.mkdtemp(prefix=f".{base}.lingjax-old-", dir=parent)
            os.rename(dst, os.path.join(old, "x"))
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(os.path.join(old, "x"), dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_space(parent: str, need: int) -> None:
    free = shutil.disk_usage(parent).free
    if need > free:
        raise ConvertError(f"not enough space in {parent}: the output needs {need / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB free")


def _copy_extra(src: str, tmp: str) -> list[str]:
    copied = []
    for name in ("config.json",) + EXTRA_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(tmp, name))
            copied.append(name)
    return copied


def _progress(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
                disable=None if enabled else True, smoothing=0.1)


def _orbax(saving: bool = False):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    kw = {}
    if saving:
        # Orbax deep-copies every host array before writing it (a guard for async saves); our saves are
        # synchronous and the arrays ours, so skip it: it would double the peak and add a memcpy.
        kw["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()))
    # No zstd: bf16 weights compress by ~10% and zstd would be the bottleneck by far.
    return ocp, ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True,
                                                             use_compression=False, **kw))


def _same_dir(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or b.startswith(a + os.sep)


# ------------------------------------------------------------------------------------------ convert
class _Counting:
    """A CheckpointReader that reports each tensor it reads (for the progress bar)."""

    def __init__(self, reader, on_read):
        self.reader, self.on_read, self.canonical = reader, on_read, reader.canonical

    def get(self, name):
        t = self.reader.get(name)
        self.on_read(t.nbytes)
        return t


def convert(src: str, dst: str, *, dtype: str = "bfloat16", mtp: bool = True, overwrite: bool = False,
            progress: bool = False, item_bytes: int = ITEM_BYTES) -> dict:
    """HF checkpoint directory src -> lingjax checkpoint directory dst. Returns the summary dict.
    Raises ConvertError / WeightError / ConfigError (one line naming the problem) before writing
    anything when the source or dst is unusable."""
    import numpy as np

    from lingjax.config import BailingConfig, ConfigError
    from lingjax.weights import CheckpointReader, WeightError, is_mtp_name, validate

    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: no such directory")
    if is_converted(src):
        raise ConvertError(f"{src} is already a lingjax checkpoint (it has {MARKER}); "
                           f"`lingjax export` turns it back into an HF one")
    if _same_dir(src, dst) or _same_dir(dst, src):
        raise ConvertError(f"{dst}: the output must not be the source directory or inside it")
    cfg_path = os.path.join(src, "config.json")
    try:
        cfg = BailingConfig.from_json(cfg_path)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(cfg_path) else f"{cfg_path}: {msg}") from None
    reader = CheckpointReader(src)
    try:
        rules = validate(cfg, reader, mtp=mtp)
    except WeightError as e:
        hint = ""
        missing = str(e).split()[2] if str(e).startswith("missing tensor") else ""
        if mtp and missing and is_mtp_name(cfg, missing):
            hint = " (the MTP layer's tensors are absent: pass --no-mtp to convert without it)"
        raise WeightError(f"{e}{hint}") from None
    import jax.numpy as jnp
    np_dtype = np.dtype(jnp.dtype(dtype))

    def out_dtype(rule):
        return np.dtype(np.float32) if rule.float32 else np_dtype

    def param_bytes(rule):
        n = sum(int(np.prod(s, dtype=np.int64)) for s in rule.hf_shapes)
        return n * out_dtype(rule).itemsize

    items = plan_items(rules, param_bytes, item_bytes)
    bytes_in = sum(reader.nbytes(reader.canonical.get(n, n)) for r in rules for n in r.hf)
    bytes_out = sum(param_bytes(r) for r in rules)
    n_tensors = sum(len(r.hf) for r in rules)
    n_params = sum(int(np.prod(s, dtype=np.int64)) for r in rules for s in r.hf_shapes)
    dst = _check_dst(dst, overwrite, is_converted)
    _check_space(os.path.dirname(dst), bytes_out + (1 << 20))
    log.info("converting %s -> %s: %d tensors, %.2f GB -> %d Orbax items (%s)", src, dst, n_tensors,
             bytes_in / 1e9, len(items), dtype)

    ocp, ckptr = _orbax(saving=True)
    bar = _progress(bytes_in, "converting", progress)
    counted = [0]
    lock = threading.Lock()

    def on_read(nb):
        with lock:
            counted[0] += 1
            bar.update(nb)
            bar.set_postfix_str(f"{counted[0]}/{n_tensors} tensors", refresh=False)

    creader = _Counting(reader, on_read)
    manifest = []
    try:
        with atomic_dir(dst) as tmp:
            os.makedirs(os.path.join(tmp, "params"))
            for i, (item, tree) in enumerate(_produce(items, creader, np_dtype)):
                rel = os.path.join("params", f"{i:04d}")
                try:
                    ckptr.save(os.path.join(tmp, rel), args=ocp.args.PyTreeSave(tree))
                except Exception as e:
                    raise ConvertError(f"writing {os.path.join(dst, rel)}: {_first_line(e)}") from None
                del tree
                manifest.append({"dir": rel, "params": {
                    _key(p): {"shape": list(_param_shape(r, j)), "dtype": str(out_dtype(r))}
                    for r in item for j, p in enumerate(r.params)}})
            copied = _copy_extra(src, tmp)
            dt = time.perf_counter() - t0
            summary = {"source": os.path.abspath(src), "params": n_params, "tensors": n_tensors,
                       "bytes_read": bytes_in, "bytes_written": bytes_out, "seconds": round(dt, 3),
                       "gb_per_s": round(bytes_in / dt / 1e9, 3)}
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"format": FORMAT, "version": VERSION, "dtype": dtype, "mtp": bool(mtp and
                           cfg.num_nextn_predict_layers > 0), "files": copied, "summary": summary,
                           "items": manifest}, f, indent=1)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    summary.update(seconds=round(dt, 3), gb_per_s=round(bytes_in / dt / 1e9, 3))
    log.info("converted %s -> %s: %s params in %d tensors, %.2f GB read, %.2f GB written (%s), %.1f s, "
             "%.2f GB/s", src, dst, _count(n_params), n_tensors, bytes_in / 1e9, bytes_out / 1e9, dtype, dt,
             bytes_in / dt / 1e9)
    return summary


def _param_shape(rule, j):
    """Shape of rule.params[j] from the rule's HF shapes (the layouts of weights.py)."""
    s = rule.hf_shapes[0]
    if rule.kind == "same":
        return s
    if rule.kind == "T":
        return s[::-1]
    if rule.kind == "split":
        return (s[0] // len(rule.params),) + tuple(s[1:])
    if rule.kind == "splitT":
        return (s[1], s[0] // len(rule.params))
    if rule.kind == "stack":
        return (len(rule.hf),) + tuple(s[::-1])
    raise ValueError(f"rule {rule.hf[0]}: unknown layout {rule.kind!r}")


def _produce(items, reader, np_dtype):
    """Yields (item rules, nested param tree) built by a background thread, at most one ahead of the
    consumer: while item k is being saved, item k+1 is read; item k+2 waits for k's save to end."""
    from lingjax.weights import materialize
    q: queue.Queue = queue.Queue()
    permits = threading.Semaphore(2)
    stop = threading.Event()

    def work():
        try:
            for item in items:
                permits.acquire()
                if stop.is_set():
                    return
                flat = {}
                for rule in item:
                    if stop.is_set():
                        return
                    for p, v in zip(rule.params, materialize(reader, rule, np_dtype)):
                        flat[p] = v
                q.put((item, _nested(flat)))
                del flat
            q.put(None)
        except BaseException as e:   # handed to the consumer, re-raised there
            q.put(e)

    th = threading.Thread(target=work, name="lingjax-convert-reader", daemon=True)
    th.start()
    try:
        while True:
            got = q.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
            del got
            permits.release()
    finally:
        stop.set()
        permits.release()
        permits.release()
        th.join()


# ------------------------------------------------------------------------------------------ loading
def read_marker(path: str) -> dict:
    from lingjax.weights import WeightError
    p = os.path.join(path, MARKER)
    try:
        with open(p) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise WeightError(f"{path} is not a lingjax checkpoint (no {MARKER})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WeightError(f"{p}: not a {FORMAT} marker")
    if meta.get("version") != VERSION:
        raise WeightError(f"{p}: format version {meta.get('version')}; this lingjax reads version {VERSION}")
    return meta


def _restore_item(path, item, want, restore_args_for):
    """Restore the params `want` (param path -> (shape, dtype)) of one item."""
    from lingjax.weights import WeightError
    ocp, ckptr = _orbax()
    d = os.path.join(path, item["dir"])
    flat = {p: restore_args_for(p, *want[p]) for p in want}
    try:
        return ckptr.restore(d, args=ocp.args.PyTreeRestore(item=_nested({p: 0 for p in flat}),
                                                            restore_args=_nested(flat)))
    except Exception as e:
        raise WeightError(f"{d}: cannot restore ({_first_line(e)})") from None


def load_converted(path: str, dtype=None, *, mtp: bool = True, place=None, sharding=None):
    """Load a lingjax checkpoint directory -> (cfg, model), one Orbax item at a time.

    dtype: model dtype (default: the stored one; expert_bias stays float32).
    place(path, np_array): as in weights.load_hf, puts each param where it belongs.
    sharding(path, shape, dtype) -> jax.sharding.Sharding | None: restore that param straight into a
    sharded jax.Array; Orbax then reads, on each device, only the bytes of that device's shard."""
    import jax.numpy as jnp
    import numpy as np

    from lingjax.config import BailingConfig, ConfigError
    from lingjax.weights import WeightError, abstract_model, rules_for, set_param

    meta = read_marker(path)
    try:
        cfg = BailingConfig.from_json(path)
    except ConfigError as e:
        raise ConfigError(f"{os.path.join(path, 'config.json')}: {e}") from None
    dtype = jnp.dtype(dtype or meta["dtype"])
    if mtp and cfg.num_nextn_predict_layers > 0 and not meta["mtp"]:
        raise WeightError(f"{path} was converted without the MTP layer (--no-mtp); load it with mtp=False")
    mtp = mtp and meta["mtp"]
    stored = {}
    for item in meta["items"]:
        for k, v in item["params"].items():
            stored[k] = (item, tuple(v["shape"]), v["dtype"])
    model = abstract_model(cfg, dtype, mtp=mtp)
    wanted = {}
    for rule in rules_for(cfg, mtp=mtp):
        for j, p in enumerate(rule.params):
            k = _key(p)
            if k not in stored:
                raise WeightError(f"{path}: param {k} is missing from {MARKER}")
            shape = tuple(_param_shape(rule, j))
            if stored[k][1] != shape:
                raise WeightError(f"{path}: param {k} has shape {list(stored[k][1])}, config.json needs {list(shape)}")
            wanted[p] = (stored[k][0]["dir"], shape, np.dtype(np.float32) if rule.float32 else np.dtype(dtype))
    ocp, _ = _orbax()

    def restore_args_for(p, shape, dt):
        s = sharding(p, shape, dt) if sharding is not None else None
        if s is not None:
            return ocp.ArrayRestoreArgs(sharding=s, global_shape=shape, dtype=dt)
        return ocp.RestoreArgs(restore_type=np.ndarray)

    for item in meta["items"]:
        want = {p: (shape, dt) for p, (d, shape, dt) in wanted.items() if d == item["dir"]}
        if not want:
            continue
        tree = _restore_item(path, item, want, restore_args_for)
        for p, (shape, dt) in want.items():
            v = _leaf(tree, p)
            if tuple(v.shape) != shape:
                raise WeightError(f"{os.path.join(path, item['dir'])}: param {_key(p)} has shape "
                                  f"{list(v.shape)}, expected {list(shape)}")
            if isinstance(v, np.ndarray):
                v = np.asarray(v, dt)
                v = place(p, v) if place else jnp.asarray(v)
            set_param(model, p, v)
        del tree
    return cfg, model


# ------------------------------------------------------------------------------------------ export
def export(src: str, dst: str, *, dtype: str | None = None, overwrite: bool = False, progress: bool = False,
           shard_bytes: int = 4 << 30) -> dict:
    """lingjax checkpoint directory src -> HF checkpoint directory dst (safetensors shards + index,
    config and tokenizer files), one Orbax item and one tensor at a time."""
    import jax.numpy as jnp
    import numpy as np

    from lingjax.config import BailingConfig
    from lingjax.weights import HFStreamWriter, rules_for, transpose_into

    t0 = time.perf_counter()
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: no such directory")
    meta = read_marker(src)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if _same_dir(src, dst) or _same_dir(dst, src):
        raise ConvertError(f"{dst}: the output must not be the source directory or inside it")
    cfg = BailingConfig.from_json(src)
    hf_dt = np.dtype(jnp.dtype(dtype or meta["dtype"]))
    rules = rules_for(cfg, mtp=meta["mtp"])
    plan = [(n, s, np.dtype(np.float32) if r.float32 else hf_dt) for r in rules for n, s in zip(r.hf, r.hf_shapes)]
    dir_of = {k: item for item in meta["items"] for k in item["params"]}
    dst = _check_dst(dst, overwrite, lambda d: os.path.isfile(os.path.join(d, "config.json")))
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in plan)
    _check_space(os.path.dirname(dst), total + (1 << 20))
    bar = _progress(total, "exporting", progress)
    ocp, _ = _orbax()
    try:
        with atomic_dir(dst) as tmp:
            writer = HFStreamWriter(tmp, plan, shard_bytes)
            try:
                cur_dir, tree = None, None
                for rule in rules:
                    item = dir_of.get(_key(rule.params[0]))
                    if item is None:
                        raise ConvertError(f"{src}: param {_key(rule.params[0])} is missing from {MARKER}")
                    if item["dir"] != cur_dir:
                        tree = None
                        want = {_unkey(k): (tuple(v["shape"]), np.dtype(v["dtype"])) for k, v in item["params"].items()}
                        tree = _restore_item(src, item, want, lambda p, s, d: ocp.RestoreArgs(restore_type=np.ndarray))
                        cur_dir = item["dir"]
                    values = [_leaf(tree, p) for p in rule.params]
                    dt = np.dtype(np.float32) if rule.float32 else hf_dt
                    for name, t in zip(rule.hf, rule.to_hf(values)):
                        writer.write(name, _contiguous(t, dt, transpose_into))
                        bar.update(t.size * dt.itemsize)
                tree = None
                writer.finish()
            finally:
                writer.close()
            _copy_extra(src, tmp)
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    log.info("exported %s -> %s: %d tensors, %.2f GB in %d files, %.1f s, %.2f GB/s", src, dst, len(plan),
             total / 1e9, len(writer.files), dt, total / dt / 1e9)
    return {"tensors": len(plan), "bytes_written": total, "files": writer.files, "seconds": round(dt, 3)}


def _contiguous(t, dt, transpose_into):
    """t as a C-contiguous array of dtype dt; a transposed view goes through the fast transpose."""
    import numpy as np
    if t.ndim == 2 and not t.flags.c_contiguous and t.T.flags.c_contiguous:
        out = np.empty(t.shape, dt)
        transpose_into(out, t.T)
        return out
    return np.ascontiguousarray(t, dt)


def _count(n: int) -> str:
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ------------------------------------------------------------------------------------------ CLI
def convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="HF checkpoint directory (config.json, *.safetensors, optional "
                   "model.safetensors.index.json, tokenizer files)")
    p.add_argument("dst", metavar="DST", help="output lingjax checkpoint directory (must not exist, see --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="stored param dtype (expert_bias stays float32); default %(default)s")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP (NextN) layer")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="lingjax checkpoint directory (made by `lingjax convert`)")
    p.add_argument("dst", metavar="DST", help="output HF checkpoint directory (must not exist, see --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="tensor dtype of the safetensors (expert_bias stays float32); default: the stored one")
    p.add_argument("--shard-gb", type=float, default=4.0, metavar="GB", help="safetensors shard size; default %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.add_argument("--debug", action="store_true", help="debug logging, and show tracebacks of errors")


@contextlib.contextmanager
def _cli_errors():
    """WeightError / ConvertError -> the CLI's one-line error; SIGTERM -> cleanup as for Ctrl-C."""
    import signal

    from lingjax.weights import WeightError
    try:
        from lingjax.cli import CLIError
    except ImportError:
        CLIError = ConvertError
    prev = None
    if threading.current_thread() is threading.main_thread():
        def on_term(*_):
            raise KeyboardInterrupt
        prev = signal.signal(signal.SIGTERM, on_term)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # conversion runs on the host CPU
    try:
        yield
    except (WeightError, ConvertError) as e:
        raise CLIError(_first_line(e)) from None
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _log_info():
    if not log.isEnabledFor(logging.INFO):     # the summary is part of the command's output
        log.setLevel(logging.INFO)


def convert_run(args) -> int:
    _log_info()
    with _cli_errors():
        convert(args.src, args.dst, dtype=args.dtype, mtp=not args.no_mtp, overwrite=args.overwrite,
                progress=not args.no_progress)
    return 0


def export_run(args) -> int:
    _log_info()
    with _cli_errors():
        export(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
               shard_bytes=int(args.shard_gb * (1 << 30)))
    return 0


CONVERT_HELP = "HF checkpoint directory -> lingjax (Orbax) checkpoint directory"
EXPORT_HELP = "lingjax checkpoint directory -> HF checkpoint directory"
