"""Checkpoint loading, below the engine: an HF checkpoint directory (config.json + *.safetensors, read by
lingjax.weights) or a lingjax (Orbax) one written by `lingjax convert` (layout in lingjax/convert.py's
docstring), recognised by its marker file.

    cfg, model = load_model(path, jnp.bfloat16, mesh=None)     # either layout
    cfg, model = load_converted(path, dtype, mtp=False)        # the converted layout only

Imports only the standard library at the top (jax, numpy, orbax load inside the functions).
"""
from __future__ import annotations

import contextlib
import json
import os

MARKER = "lingjax_checkpoint.json"
FORMAT, VERSION = "lingjax-orbax", 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message (one line) names the path and the problem."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during convert / export; `signum` gives the CLI its exit status 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT / SIGTERM handling of the convert and export commands (installed by
    lingjax/cli/convert.py's `converter_errors`).
    Outside a `deferred()` block a signal raises Interrupted at once; inside one (an Orbax save or
    restore, whose worker threads and event loop must not be abandoned halfway: they would keep writing
    into the temporary directory being deleted and print asyncio tracebacks at exit) it is noted and
    raised when the block ends, a fraction of a second later. Once raised, further signals are
    ignored, so a second Ctrl-C cannot cut the clean-up short."""

    def __init__(self):
        self.depth, self.pending, self.fired = 0, None, False

    def handler(self, signum, _frame):
        if self.fired:
            return
        if self.depth:
            self.pending = self.pending or signum
            return
        self.fired = True
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None and not self.fired:
                signum, self.pending, self.fired = self.pending, None, True
                raise Interrupted(signum)


_SIGNALS = _Signals()


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _key(path) -> str:
    return ".".join(map(str, path))


def _unkey(s: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in s.split("."))


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


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


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
    items = meta.get("items")
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("params"), dict)
                                              for i in items):
        raise WeightError(f"{p}: 'items' must be a list of objects with 'dir' and 'params'")
    root = os.path.realpath(path)
    for item in items:
        d = item.get("dir")
        if not isinstance(d, str) or not d or os.path.isabs(d) or \
                not os.path.realpath(os.path.join(root, d)).startswith(root + os.sep):
            raise WeightError(f"{p}: item dir {d!r} is not a directory inside the checkpoint; refusing it")
    return meta


def _restore_item(path, item, want, restore_args_for):
    """Restore the params `want` (param path -> (shape, dtype)) of one item."""
    from lingjax.weights import WeightError
    ocp, ckptr = _orbax()
    d = os.path.join(os.path.abspath(path), item["dir"])       # Orbax needs absolute paths
    flat = {p: restore_args_for(p, *want[p]) for p in want}
    with _SIGNALS.deferred():
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
    from lingjax.weights import WeightError, abstract_model, all_finite, rules_for, set_param

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
    wanted, fp8 = {}, {}          # fp8: param path -> its ".q" manifest entry (block, act)
    for rule in rules_for(cfg, mtp=mtp):
        for j, p in enumerate(rule.params):
            k = _key(p)
            if k not in stored and k + ".q" in stored and k + ".scale" in stored:     # an FP8 param
                item, qshape, qdt = stored[k + ".q"]
                shape = tuple(_param_shape(rule, j))
                if qshape != shape or qdt != "float8_e4m3fn":
                    raise WeightError(f"{path}: FP8 param {k} is {qdt} {list(qshape)}, config.json needs "
                                      f"float8_e4m3fn {list(shape)}")
                fp8[p] = item["params"][k + ".q"]
                wanted[p + ("q",)] = (item["dir"], shape, np.dtype(np.uint8))
                sitem, sshape, _ = stored[k + ".scale"]
                wanted[p + ("scale",)] = (sitem["dir"], sshape, np.dtype(np.float32))
                continue
            if k not in stored:
                raise WeightError(f"{path}: param {k} is missing from {MARKER}")
            shape = tuple(_param_shape(rule, j))
            if stored[k][1] != shape:
                raise WeightError(f"{path}: param {k} has shape {list(stored[k][1])}, config.json needs {list(shape)}")
            wanted[p] = (stored[k][0]["dir"], shape, np.dtype(np.float32) if rule.float32 else np.dtype(dtype))
    ocp, _ = _orbax()

    def restore_args_for(p, shape, dt):
        s = sharding(p, shape, dt) if sharding is not None and p[-1] not in ("q", "scale") else None
        if s is not None:
            return ocp.ArrayRestoreArgs(sharding=s, global_shape=shape, dtype=dt)
        return ocp.RestoreArgs(restore_type=np.ndarray)

    parts = {}
    for item in meta["items"]:
        want = {p: (shape, dt) for p, (d, shape, dt) in wanted.items() if d == item["dir"]}
        if not want:
            continue
        tree = _restore_item(path, item, want, restore_args_for)
        for p, (shape, dt) in want.items():
            if p[:-1] in fp8:
                parts.setdefault(p[:-1], {})[p[-1]] = np.asarray(_leaf(tree, p), dt)
                if len(parts[p[:-1]]) == 2:
                    _set_fp8(model, path, p[:-1], fp8[p[:-1]], parts.pop(p[:-1]), place)
                continue
            v = _leaf(tree, p)
            if tuple(v.shape) != shape:
                raise WeightError(f"{os.path.join(path, item['dir'])}: param {_key(p)} has shape "
                                  f"{list(v.shape)}, expected {list(shape)}")
            if isinstance(v, np.ndarray):
                v = np.asarray(v, dt)
            if not all_finite(v):
                raise WeightError(f"{os.path.join(path, item['dir'])}: param {_key(p)} holds NaN or Inf values")
            if isinstance(v, np.ndarray):
                v = place(p, v) if place else jnp.asarray(v)
            set_param(model, p, v)
        del tree
    return cfg, model


def _set_fp8(model, path, p, entry, parts, place):
    """Set the FP8 param p from its restored uint8 bits and float32 scale."""
    import numpy as np

    from lingjax import quant
    from lingjax.weights import WeightError, set_param, to_device
    scale = parts["scale"]
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise WeightError(f"{path}: scale of FP8 param {_key(p)} holds values that are not finite and positive")
    block, act = tuple(entry.get("block", ())), entry.get("act")
    if len(block) != 2 or act not in quant.ACTS:
        raise WeightError(f"{path}: FP8 param {_key(p)} has no valid block / act in {MARKER}")
    q = parts["q"].view(quant.FP8_NP)
    if scale.ndim != q.ndim or scale.shape[:-2] != q.shape[:-2]:
        raise WeightError(f"{path}: FP8 param {_key(p)} has scale shape {list(scale.shape)} for values {list(q.shape)}")
    w = quant.FP8Weight(q, scale, block, act)
    set_param(model, p, place(p, w) if place else to_device(w))


def load_model(path, dtype=None, mesh=None, *, mtp: bool = False):
    """(config, model) from a checkpoint directory: an HF one (config.json + *.safetensors) or a
    `lingjax convert` output (its marker file says which); without the MTP layer unless `mtp` (the
    engine runs it only for speculative decoding). mesh: each param goes straight to its shards.
    dtype: default bfloat16. Raises CheckpointError with a one-line message naming the problem."""
    import jax.numpy as jnp
    from lingjax.config import ConfigError
    dtype = jnp.bfloat16 if dtype is None else dtype
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory {path} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory")
    from lingjax.weights import WeightError, load_hf
    from lingjax.sharding import ShardingError, place_fn
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
            return load_converted(path, dtype, mtp=mtp, place=place, sharding=sharding)
        return load_hf(path, dtype=dtype, mtp=mtp, place=place)
    except (ConfigError, WeightError, ShardingError) as e:
        raise CheckpointError(f"{path}: {e}") from None
