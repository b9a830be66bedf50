"""HF safetensors <-> lingjax params (SPEC §6). One table of rules, used both ways:

    Rule(hf names, param paths, to_params, to_hf)

`to_params` turns the HF tensors (PyTorch layout, [out, in]) into lingjax params (Flax layout,
kernel [in, out]; experts stacked; fused QKV split into Q, K, V); `to_hf` is its exact inverse.
The loader, the converter and the exporter all walk the same table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lingjax.config import BailingConfig

log = logging.getLogger(__name__)

Path = tuple  # a param path inside the model, e.g. ('layers', 0, 'attention', 'q_proj', 'kernel')


class WeightError(ValueError):
    """A checkpoint that does not match its config: missing, unexpected or misshapen tensors."""


# Buffers that may be present in a checkpoint but are not parameters (SPEC §6 layout notes).
def is_skipped(name: str) -> bool:
    return "rotary_emb" in name or "inv_freq" in name or "slope" in name


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    params: tuple[Path, ...]
    to_params: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]
    hf_shapes: tuple[tuple[int, ...], ...]
    float32: bool = False       # kept in float32 whatever the model dtype (expert_bias)
    # How `materialize` streams it: "same", "T" (transpose), "split" / "splitT" (row blocks, transposed
    # or not), "stack" (per-expert [out, in] -> [E, in, out]); "" = generic (to_params on the list).
    kind: str = ""


def _same(name, path, shape, float32=False):
    return Rule((name,), (path,), lambda a: [a[0]], lambda p: [p[0]], (tuple(shape),), float32, kind="same")


def _transposed(name, path, shape):
    return Rule((name,), (path,), lambda a: [a[0].T], lambda p: [p[0].T], (tuple(shape),), kind="T")


def _linear(prefix, path, d_out, d_in, bias=False):
    rules = [_transposed(prefix + ".weight", path + ("kernel",), (d_out, d_in))]
    if bias:
        rules.append(_same(prefix + ".bias", path + ("bias",), (d_out,)))
    return rules


def _split_rows(name, paths, shape, n, transpose):
    """One HF tensor whose rows are n equal blocks -> n params (e.g. fused QKV)."""
    def to_params(a):
        blocks = np.split(a[0], n, axis=0)
        return [b.T for b in blocks] if transpose else blocks

    def to_hf(p):
        return [np.concatenate([x.T for x in p] if transpose else list(p), axis=0)]
    return Rule((name,), tuple(paths), to_params, to_hf, (tuple(shape),), kind="splitT" if transpose else "split")


def _stacked(names, path, shape):
    """E per-expert HF tensors [out, in] -> one param [E, in, out]."""
    return Rule(tuple(names), (path,), lambda a: [np.stack([x.T for x in a])],
                lambda p: [x.T for x in p[0]], tuple(tuple(shape) for _ in names), kind="stack")


def _mlp_rules(prefix, path, d, width, bias):
    return (_linear(prefix + ".gate_proj", path + ("gate_proj",), width, d, bias)
            + _linear(prefix + ".up_proj", path + ("up_proj",), width, d, bias)
            + _linear(prefix + ".down_proj", path + ("down_proj",), d, width, bias))


def _layer_rules(cfg: BailingConfig, l: int, path: Path) -> list[Rule]:
    d, H, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    p = f"model.layers.{l}."
    rules = [_same(p + "input_layernorm.weight", path + ("input_layernorm", "weight"), (d,)),
             _same(p + "post_attention_layernorm.weight", path + ("post_attention_layernorm", "weight"), (d,))]
    a, ap = p + "attention.", path + ("attention",)
    if cfg.is_mla(l):
        qk, r, rope = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            rules += _linear(a + "q_a_proj", ap + ("q_a_proj",), cfg.q_lora_rank, d, cfg.use_qkv_bias)
            rules += [_same(a + "q_a_layernorm.weight", ap + ("q_a_layernorm", "weight"), (cfg.q_lora_rank,))]
            rules += _linear(a + "q_b_proj", ap + ("q_b_proj",), H * qk, cfg.q_lora_rank)
        else:
            rules += _linear(a + "q_proj", ap + ("q_proj",), H * qk, d)
        rules += _linear(a + "kv_a_proj_with_mqa", ap + ("kv_a_proj_with_mqa",), r + rope, d, cfg.use_qkv_bias)
        rules += [_same(a + "kv_a_layernorm.weight", ap + ("kv_a_layernorm", "weight"), (r,))]
        rules += _linear(a + "kv_b_proj", ap + ("kv_b_proj",), H * (cfg.qk_nope_head_dim + cfg.v_head_dim), r)
        rules += _linear(a + "dense", ap + ("dense",), d, H * cfg.v_head_dim, cfg.use_qkv_bias)
    else:
        HD = H * D
        rules.append(_split_rows(a + "query_key_value.weight",
                                 [ap + (n, "kernel") for n in ("q_proj", "k_proj", "v_proj")], (3 * HD, d), 3, True))
        if cfg.use_qkv_bias:
            rules.append(_split_rows(a + "query_key_value.bias",
                                     [ap + (n, "bias") for n in ("q_proj", "k_proj", "v_proj")], (3 * HD,), 3, False))
        rules += [_same(a + "query_layernorm.weight", ap + ("query_layernorm", "weight"), (D,)),
                  _same(a + "key_layernorm.weight", ap + ("key_layernorm", "weight"), (D,))]
        rules += _linear(a + "g_proj", ap + ("g_proj",), HD, d)
        rules += [_same(a + "g_norm.weight", ap + ("g_norm", "weight"), (HD,))]
        rules += _linear(a + "dense", ap + ("dense",), d, HD, cfg.use_bias)
    m, mp = p + "mlp.", path + ("mlp",)
    if cfg.is_moe(l):
        E, I = cfg.num_experts, cfg.moe_intermediate_size
        rules += [_transposed(m + "gate.weight", mp + ("gate",), (E, d)),
                  _same(m + "gate.expert_bias", mp + ("expert_bias",), (E,), float32=True)]
        for proj, key, shape in (("gate_proj", "w_gate", (I, d)), ("up_proj", "w_up", (I, d)),
                                 ("down_proj", "w_down", (d, I))):
            rules.append(_stacked([f"{m}experts.{e}.{proj}.weight" for e in range(E)], mp + (key,), shape))
        if cfg.num_shared_experts > 0:
            rules += _mlp_rules(m + "shared_experts", mp + ("shared_experts",), d, cfg.shared_intermediate_size, cfg.use_bias)
    else:
        rules += _mlp_rules(m[:-1], mp, d, cfg.intermediate_size, cfg.use_bias)
    return rules


def rules_for(cfg: BailingConfig, mtp: bool = True) -> list[Rule]:
    """Every tensor of the HF checkpoint that `cfg` describes, in checkpoint order."""
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    rules = [_same("model.word_embeddings.weight", ("word_embeddings",), (V, d))]
    for l in range(L):
        rules += _layer_rules(cfg, l, ("layers", l))
    rules += [_same("model.norm.weight", ("norm", "weight"), (d,)),
              _transposed("lm_head.weight", ("lm_head",), (V, d))]
    for i in range(cfg.num_nextn_predict_layers if mtp else 0):
        l, path = L + i, ("mtp", i)
        p = f"model.layers.{l}."
        rules += [_same(p + "enorm.weight", path + ("enorm", "weight"), (d,)),
                  _same(p + "hnorm.weight", path + ("hnorm", "weight"), (d,)),
                  _transposed(p + "eh_proj.weight", path + ("eh_proj", "kernel"), (d, 2 * d)),
                  _same(p + "final_layernorm.weight", path + ("final_layernorm", "weight"), (d,))]
        rules += _layer_rules(cfg, l, path + ("block",))
    return rules


def is_mtp_name(cfg: BailingConfig, name: str) -> bool:
    L = cfg.num_hidden_layers
    return any(name.startswith(f"model.layers.{L + i}.") for i in range(max(cfg.num_nextn_predict_layers, 1)))


# ------------------------------------------------------------------------------------------ reading
HF_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
             "F8_E4M3": ml_dtypes.float8_e4m3fn}     # FP8 weights: only with their scales (lingjax.quant)
FLOAT8 = "F8_E4M3"


class CheckpointReader:
    """Lazy, tensor-at-a-time view of an HF checkpoint directory (single file or sharded + index;
    any other *.safetensors beside them, such as a separate MTP file, is read too).

    Headers are read (and checked) through safetensors' lazy `safe_open`; tensor bytes are then read
    with pread() straight into a fresh numpy array, one copy and no mmap, so reading a 200 GB
    checkpoint tensor by tensor does not grow the process's resident set by the bytes read
    (safetensors' numpy reader maps whole files; every page it touches stays in the RSS)."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        self.drop_cache = False    # drop the bytes read from the page cache (POSIX_FADV_DONTNEED)
        if not os.path.isdir(path):
            raise WeightError(f"{path}: not a directory")
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        index = os.path.join(path, "model.safetensors.index.json")
        weight_map = None
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightError(f"{index}: malformed index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if shard not in files:
                    raise WeightError(f"{index}: names shard {shard}, which is missing")
        if not files:
            raise WeightError(f"{path}: no *.safetensors files")
        self.where: dict[str, str] = {}
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.offsets: dict[str, tuple[int, int]] = {}      # absolute [start, end) byte range in its file
        self._handles = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            try:
                h = safe_open(fpath, framework="numpy")
            except Exception as e:   # truncated or corrupt header
                raise WeightError(f"{fpath}: cannot read safetensors file ({e})") from None
            self._handles[fname] = h
            size = os.path.getsize(fpath)
            offsets = _header_offsets(fpath)
            end = 0
            for name in h.keys():
                sl = h.get_slice(name)
                dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                if name in self.where:
                    raise WeightError(f"tensor {name} appears in both {self.where[name]} and {fname}")
                self.where[name], self.meta[name] = fname, (dtype, shape)
                self.offsets[name] = offsets[name]
                nbytes = int(np.prod(shape, dtype=np.int64)) * (np.dtype(HF_DTYPES[dtype]).itemsize if dtype in HF_DTYPES else 1)
                end += nbytes
            if end > size or max((e for _, e in offsets.values()), default=0) > size:
                raise WeightError(f"{fpath}: file is truncated ({size} bytes, tensors need more than that)")
        self.canonical = {canonical(n): n for n in self.where}

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The whole tensor, read into `out` when given (C-contiguous, its shape and dtype)."""
        if name not in self.where:
            raise WeightError(f"missing tensor {name}")
        dtype, shape = self.meta[name]
        if dtype not in HF_DTYPES:
            try:
                return self._handles[self.where[name]].get_tensor(name)
            except Exception as e:
                raise WeightError(f"{os.path.join(self.path, self.where[name])}: cannot read tensor {name} ({e})") from None
        return self.read_rows(name, 0, shape[0] if shape else 1, out)

    def read_rows(self, name: str, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [r0, r1) (along axis 0) of a tensor, read with pread() into `out` when given (a
        C-contiguous array of the tensor's dtype and exactly that many elements), else a fresh array."""
        if name not in self.where:
            raise WeightError(f"missing tensor {name}")
        dtype, shape = self.meta[name]
        fpath = os.path.join(self.path, self.where[name])
        dt = np.dtype(HF_DTYPES[dtype])
        rshape = (r1 - r0,) + tuple(shape[1:]) if shape else ()
        if out is None:
            out = np.empty(rshape, dt)
        elif out.dtype != dt or out.size != int(np.prod(rshape, dtype=np.int64)) or not out.flags.c_contiguous:
            raise ValueError(f"read_rows({name}, {r0}, {r1}): out is {out.dtype}{list(out.shape)}, needs {dt}{list(rshape)}")
        start, end = self.offsets[name]
        total = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if end - start != total:
            raise WeightError(f"{fpath}: tensor {name} holds {end - start} bytes, its shape {list(shape)} needs {total}")
        row = total // shape[0] if shape and shape[0] else 0
        try:
            _pread_into(fpath, start + r0 * row, out, self.drop_cache)
        except OSError as e:
            raise WeightError(f"{fpath}: cannot read tensor {name} ({e})") from None
        return out

    def dtype(self, name: str) -> np.dtype | None:
        """The numpy dtype of a tensor (None for a safetensors dtype lingjax does not read)."""
        d = HF_DTYPES.get(self.meta[name][0])
        return None if d is None else np.dtype(d)

    def nbytes(self, name: str) -> int:
        dtype, shape = self.meta[name]
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(HF_DTYPES.get(dtype, np.uint8)).itemsize


def _header_offsets(fpath: str) -> dict[str, tuple[int, int]]:
    """name -> absolute [start, end) of its bytes, from the safetensors header (8-byte little-endian
    header length, JSON header, then the data buffer)."""
    with open(fpath, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _pread_into(fpath: str, offset: int, out: np.ndarray, drop_cache: bool = False) -> None:
    buf = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(fpath, os.O_RDONLY)
    try:
        pos = 0
        while pos < len(buf):
            n = os.preadv(fd, [buf[pos:pos + (1 << 30)]], offset + pos)
            if n <= 0:
                raise OSError(f"file ends after {offset + pos} bytes (truncated while reading?)")
            pos += n
        if drop_cache:
            os.posix_fadvise(fd, offset, len(buf), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


ALIASES = {".mlp.gate.e_score_correction_bias": ".mlp.gate.expert_bias",
           ".mlp.experts.e_score_correction_bias": ".mlp.gate.expert_bias"}


def canonical(name: str) -> str:
    for old, new in ALIASES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def fp8_rule(reader: CheckpointReader, rule: Rule, fmt) -> bool:
    """Whether the checkpoint holds `rule`'s tensors in FP8 (then with their scales; lingjax.quant).
    An FP8 checkpoint's quantization config says how; which tensors are FP8 is what it holds (its
    `ignore` list leaves some in bf16)."""
    if fmt is None:
        return False
    fp8 = [reader.meta[reader.canonical.get(n, n)][0] == FLOAT8 for n in rule.hf if reader.canonical.get(n, n) in reader.meta]
    return bool(fp8) and all(fp8)


def scale_name(name: str, fmt) -> str:
    return name[: -len("weight")] + fmt.scale_suffix


def _scale_shape(shape, fmt) -> tuple:
    out, inn = shape
    if fmt.strategy == "tensor":
        return (1,)
    if fmt.strategy == "channel":
        return (out, 1)
    return (-(-out // 128), -(-inn // 128))


def validate(cfg: BailingConfig, reader: CheckpointReader, mtp: bool = True, fmt=None) -> list[Rule]:
    """Check every tensor name, shape and dtype against the config before anything is loaded.
    Returns the rules to apply. Raises WeightError naming the first problem found. fmt: the FP8
    format of the checkpoint (lingjax.quant.Format; None: no FP8 tensors allowed)."""
    from lingjax import quant
    present = {c: n for c, n in reader.canonical.items() if not is_skipped(n)}
    rules = rules_for(cfg, mtp=mtp)
    expected = {}
    for rule in rules:
        for name, shape in zip(rule.hf, rule.hf_shapes):
            expected[name] = shape
    fp8_names = set()
    for name, shape in expected.items():
        if name not in present:
            raise WeightError(f"missing tensor {name} (expected shape {list(shape)}) in {reader.path}")
        dtype, got = reader.meta[present[name]]
        if tuple(got) != shape:
            raise WeightError(f"tensor {name} has shape {list(got)}, expected {list(shape)} from config.json")
        if dtype not in HF_DTYPES:
            raise WeightError(f"tensor {name} has dtype {dtype}; supported: {', '.join(HF_DTYPES)}")
        if dtype == FLOAT8:
            if fmt is None:
                raise WeightError(f"tensor {name} is float8_e4m3fn but config.json has no FP8 quantization_config")
            fp8_names.add(name)
    for rule in rules:
        fp8 = [n in fp8_names for n in rule.hf]
        if not any(fp8):
            continue
        if not all(fp8):
            raise WeightError(f"tensor {rule.hf[fp8.index(False)]} is not FP8 but {rule.hf[fp8.index(True)]} "
                              f"(the same stacked param) is")
        if not quant.quantizable(rule):
            raise WeightError(f"tensor {rule.hf[0]} is FP8; lingjax keeps it unquantized (only the attention and "
                              f"MLP / expert projections may be FP8)")
        for name, shape in zip(rule.hf, rule.hf_shapes):
            sn, want = scale_name(name, fmt), _scale_shape(shape, fmt)
            if sn not in present:
                raise WeightError(f"tensor {name} is float8_e4m3fn but its scale {sn} is missing in {reader.path}")
            sdt, sshape = reader.meta[present[sn]]
            if sdt not in ("F32", "BF16", "F16"):
                raise WeightError(f"scale {sn} has dtype {sdt}; expected F32, BF16 or F16")
            if tuple(sshape) != want and not (fmt.strategy == "tensor" and tuple(sshape) in ((), (1, 1))):
                raise WeightError(f"scale {sn} has shape {list(sshape)}, expected {list(want)} for {fmt.strategy} "
                                  f"FP8 ({fmt.method})")
            expected[sn] = tuple(sshape)
    for name in present:
        if name not in expected and not (not mtp and is_mtp_name(cfg, name)):
            raise WeightError(f"unexpected tensor {name} in {reader.path} (not described by config.json)")
    return rules


def all_finite(x) -> bool:
    """Whether every element of x (a numpy or jax array) is finite, without a temporary the size of x.

    Host arrays: NaN and Inf survive a sum, so one float32 sum decides (numpy's fastest reduction);
    only a non-finite sum, which an overflow of huge finite values could also give, is confirmed
    element by element in blocks. bfloat16 (whose casts are slow) is summed as float32 words: on a
    little-endian machine the word made of elements (i, i+1) takes its sign and exponent from element
    i+1, so it is non-finite exactly when element i+1 is; the words at offsets 0 and 1 cover every
    element but the first, checked by itself. Device arrays: one jitted reduction on the device."""
    if not isinstance(x, np.ndarray):
        return bool(_all_finite_on_device(x))
    with np.errstate(all="ignore"):        # an overflowing or NaN sum is an answer, not a warning
        return _all_finite_host(x.reshape(-1))


def _all_finite_host(flat: np.ndarray) -> bool:
    if flat.dtype == np.dtype(ml_dtypes.bfloat16) and flat.size > 2 and sys.byteorder == "little":
        u = flat.view(np.uint16)
        m = (flat.size - 1) // 2 * 2
        quick = (np.isfinite(np.float32(flat[0])) and np.isfinite(np.add.reduce(u[:m].view(np.float32)))
                 and np.isfinite(np.add.reduce(u[1:1 + m].view(np.float32)))
                 and np.isfinite(np.float32(flat[-1])))
    elif flat.dtype.kind == "f" or flat.dtype == np.dtype(ml_dtypes.bfloat16):
        quick = np.isfinite(np.add.reduce(flat, dtype=np.float32 if flat.dtype.itemsize <= 4 else flat.dtype))
    else:
        return True
    if quick:
        return True
    block = 1 << 22
    return all(bool(np.isfinite(flat[i:i + block]).all()) for i in range(0, flat.size, block))


@jax.jit
def _all_finite_on_device(x):
    return jnp.isfinite(x).all()


def check_finite(reader: "CheckpointReader", rule: Rule, values) -> None:
    """Raise WeightError naming the HF tensor of `rule` that holds a NaN or Inf, unless every array of
    `values` (the rule's params) is finite. Costs one reduction per param; only a failure reads the
    rule's source tensors again, to name the one at fault."""
    if all(all_finite(v) for v in values):
        return
    for n in rule.hf:
        if not all_finite(reader.get(reader.canonical.get(n, n))):
            raise WeightError(f"tensor {n} in {reader.path} holds NaN or Inf values")
    raise WeightError(f"tensor {rule.hf[0]} in {reader.path} is not finite once cast to the model dtype "
                      f"(values beyond its range)")


def read_rule(reader: CheckpointReader, rule: Rule) -> list[np.ndarray]:
    return [reader.get(reader.canonical.get(n, n)) for n in rule.hf]


# Transposes of at least this many elements go through XLA on the host CPU (tiled, several threads,
# ~3x numpy's strided copy); smaller ones through numpy. Both move bits only: the result is exact.
JAX_TRANSPOSE_MIN = 1 << 20
_UINT = {2: np.uint16, 4: np.uint32}


@jax.jit
def _jT(x):
    return x.T


def transpose_into(out: np.ndarray, x: np.ndarray) -> None:
    """out[...] = x.T for 2-D x (cast to out.dtype as numpy casts). Row blocks of x (~16 MiB) are
    transposed as unsigned-int bit patterns, so no float is ever touched by XLA."""
    a, b = x.shape
    if x.size < JAX_TRANSPOSE_MIN or x.dtype.itemsize not in _UINT:
        out[...] = x.T
        return
    u = _UINT[x.dtype.itemsize]
    cpu = jax.devices("cpu")[0]
    rows = max(1, min(a, (16 << 20) // max(1, b * x.dtype.itemsize)))
    for i in range(0, a, rows):
        t = np.asarray(_jT(jax.device_put(x[i:i + rows].view(u), cpu)))
        if out.dtype == x.dtype:
            out[:, i:i + rows].view(u)[...] = t
        else:
            out[:, i:i + rows] = t.view(x.dtype)


BLOCK_BYTES = 16 << 20     # source bytes read (and transposed) at a time


def aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """An uninitialised uint8 buffer whose start is `align`-byte aligned: XLA then uses a host array
    in place (jax.device_put on the CPU aliases 64-byte-aligned numpy arrays instead of copying)."""
    b = np.empty(nbytes + align, np.uint8)
    o = -b.ctypes.data % align
    return b[o:o + nbytes]


class Scratch:
    """A reusable read buffer: the source rows of a tensor pass through it on their way to the output,
    so streaming a checkpoint allocates (and the kernel faults in and zeroes) no fresh memory per tensor."""

    def __init__(self):
        self.buf = aligned_empty(0)

    def __call__(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if n > self.buf.size:
            self.buf = aligned_empty(max(n, BLOCK_BYTES))
        return self.buf[:n].view(dtype).reshape(shape)


def _row_blocks(shape, itemsize):
    rows = shape[0]
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    step = max(1, min(rows, BLOCK_BYTES // max(1, row)))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def materialize(reader: CheckpointReader, rule: Rule, dtype, alloc: Callable | None = None,
                scratch: Scratch | None = None) -> list[np.ndarray]:
    """The params of one rule as numpy arrays of `dtype` (float32 for rule.float32), streamed: each
    output is allocated once (by `alloc(shape, dtype)`, default np.empty) and filled from the source in
    row blocks of <= BLOCK_BYTES read through `scratch` (read straight into the output when no
    transpose or cast is needed), so the peak is the outputs plus one block, and the memory touched
    per tensor is the output's. Bitwise equal to `to_params(read_rule(...))` cast to dtype."""
    dt = np.dtype(np.float32 if rule.float32 else jnp.dtype(dtype))
    alloc = alloc or np.empty
    scratch = scratch or Scratch()
    names = [reader.canonical.get(n, n) for n in rule.hf]
    src_dt = [reader.dtype(n) for n in names]
    if rule.kind not in ("same", "T", "split", "splitT", "stack") or None in src_dt or not rule.hf_shapes[0]:
        return [np.asarray(v, dt) for v in rule.to_params(read_rule(reader, rule))]
    transposed = rule.kind in ("T", "splitT", "stack")
    shape = tuple(rule.hf_shapes[0])
    if rule.kind == "stack":       # E tensors [out, in] -> [E, in, out]
        outs = [alloc((len(names),) + shape[::-1], dt)]
        parts = [(n, s, outs[0][e], 0) for e, (n, s) in enumerate(zip(names, src_dt))]
    else:                          # one tensor -> k row blocks, each transposed or not
        k = len(rule.params)
        rows = shape[0] // k
        outs = [alloc(((rows,) + shape[1:])[::-1] if transposed else (rows,) + shape[1:], dt) for _ in range(k)]
        parts = [(names[0], src_dt[0], o, j * rows) for j, o in enumerate(outs)]
    for name, sdt, out, first in parts:       # (source tensor, its dtype, the output, first source row)
        n_rows = out.shape[-1] if transposed else out.shape[0]
        for r0, r1 in _row_blocks((n_rows,) + shape[1:], sdt.itemsize):
            if not transposed and sdt == dt:
                reader.read_rows(name, first + r0, first + r1, out[r0:r1])
                continue
            x = reader.read_rows(name, first + r0, first + r1, scratch((r1 - r0,) + shape[1:], sdt))
            if transposed:
                transpose_into(out[:, r0:r1], x)
            else:
                out[r0:r1] = x
    return outs


# ------------------------------------------------------------------------------------------ params
def set_param(model: nnx.Module, path: Path, value):
    obj = model
    for key in path[:-1]:
        obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    var = getattr(obj, path[-1])
    if tuple(var.shape) != tuple(value.shape):
        raise WeightError(f"param {'.'.join(map(str, path))}: shape {tuple(value.shape)} != model {tuple(var.shape)}")
    var.set_value(value)


def get_param(model: nnx.Module, path: Path):
    obj = model
    for key in path:
        obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    return obj.get_value()          # an array, or an FP8Weight


def abstract_model(cfg: BailingConfig, dtype, mtp: bool = True):
    from lingjax.model import BailingModel
    return nnx.eval_shape(lambda: BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=mtp))


def load_hf(path: str, dtype=jnp.bfloat16, *, mtp: bool = True, place: Callable | None = None,
            progress: bool = False, **config_overrides):
    """Load an HF checkpoint directory -> (cfg, model). `place(path, array)` may put each param on
    its devices (sharded loading); by default params go to the default device one at a time."""
    from lingjax import quant
    from lingjax.config import BailingConfig as _C
    cfg = _C.from_json(path, **config_overrides)
    try:
        fmt = quant.read_format(path)
    except quant.QuantError as e:
        raise WeightError(str(e)) from None
    reader = CheckpointReader(path)
    rules = validate(cfg, reader, mtp=mtp, fmt=fmt)
    model = abstract_model(cfg, dtype, mtp=mtp)
    it = rules
    if progress:
        from tqdm import tqdm
        it = tqdm(rules, desc="loading", unit="tensor")
    for rule in it:
        if fp8_rule(reader, rule, fmt):
            values = read_fp8_rule(reader, rule, fmt)
        else:
            values = [np.asarray(v, np.float32 if rule.float32 else jnp.dtype(dtype))
                      for v in rule.to_params(read_rule(reader, rule))]
            check_finite(reader, rule, values)
        for ppath, value in zip(rule.params, values):
            set_param(model, ppath, place(ppath, value) if place else to_device(value))
    return cfg, model


def to_device(value):
    """A host param (numpy array or FP8Weight of numpy arrays) on the default device."""
    return jax.tree.map(jnp.asarray, value)


def read_fp8_rule(reader: CheckpointReader, rule: Rule, fmt) -> list:
    """The params of an FP8 rule as FP8Weights of numpy arrays (q float8_e4m3fn, scale float32);
    WeightError when a scale is not finite and positive."""
    from lingjax import quant
    qs = read_rule(reader, rule)
    scales = []
    for n in rule.hf:
        sn = scale_name(n, fmt)
        s = np.asarray(reader.get(reader.canonical.get(sn, sn)), np.float32)
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise WeightError(f"scale {sn} in {reader.path} holds values that are not finite and positive")
        scales.append(s)
    try:
        return quant.from_hf(rule.kind, qs, scales, fmt, n_parts=len(rule.params))
    except quant.QuantError as e:
        raise WeightError(f"tensor {rule.hf[0]}: {e}") from None


def hf_tensors(cfg: BailingConfig, model: nnx.Module, hf_dtype=None, mtp: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """The model's params as HF tensors, one rule at a time (export); FP8 params dequantized to float32
    (`lingjax export` writes FP8 checkpoints)."""
    from lingjax import quant
    for rule in rules_for(cfg, mtp=mtp and len(getattr(model, "mtp", [])) > 0):
        values = [np.asarray(jax.device_get(quant.dequantize(v) if quant.is_fp8(v) else v))
                  for v in (get_param(model, p) for p in rule.params)]
        for name, t in zip(rule.hf, rule.to_hf(values)):
            if hf_dtype is not None and not rule.float32:
                t = t.astype(hf_dtype)
            yield name, np.ascontiguousarray(t)


def write_hf(cfg: BailingConfig, tensors: Sequence[tuple[str, np.ndarray]] | Iterator, out_dir: str,
             shard_bytes: int | None = None, extra_files: dict[str, str] | None = None,
             num_shards: int | None = None) -> None:
    """Write config.json + safetensors, sharded with an index when shard_bytes (a size cap) or
    num_shards (an exact count; tensors must then be a list) is given."""
    from safetensors.numpy import save_file
    os.makedirs(out_dir, exist_ok=True)
    if num_shards and num_shards > 1:
        total = sum(t.nbytes for _, t in tensors)
        shard_bytes = -(-total // num_shards)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    shards, cur, cur_bytes = [], {}, 0
    for name, t in tensors:
        if shard_bytes and cur and cur_bytes + t.nbytes > shard_bytes and (
                not num_shards or len(shards) < num_shards - 1):
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = t
        cur_bytes += t.nbytes
    if cur:
        shards.append(cur)
    if len(shards) == 1 and not shard_bytes:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.nbytes for s in shards for t in s.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for fname, text in (extra_files or {}).items():
        with open(os.path.join(out_dir, fname), "w") as f:
            f.write(text)


ST_DTYPES = {np.dtype(v): k for k, v in HF_DTYPES.items()}


class HFStreamWriter:
    """Writes an HF checkpoint (safetensors shards + index) one tensor at a time, so exporting never
    holds more than one tensor. The plan (every name, shape and dtype, in writing order) is known up
    front, which fixes the shards and each file's header before any data is written."""

    def __init__(self, out_dir: str, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                 shard_bytes: int | None = 4 << 30):
        self.out_dir, self.plan = out_dir, [(n, tuple(s), np.dtype(d)) for n, s, d in plan]
        shards, cur, cur_bytes = [], [], 0
        for name, shape, dt in self.plan:
            nb = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if shard_bytes and cur and cur_bytes + nb > shard_bytes:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append((name, shape, dt, nb))
            cur_bytes += nb
        if cur:
            shards.append(cur)
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = shards
        self._i = self._j = 0          # shard, tensor within shard
        self._f = None
        self.total = sum(t[3] for s in shards for t in s)

    def _open(self):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dt, nb in self.shards[self._i]:
            header[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self._f = open(os.path.join(self.out_dir, self.files[self._i]), "wb")
        self._f.write(len(h).to_bytes(8, "little") + h)

    def write(self, name: str, t: np.ndarray) -> None:
        if self._i >= len(self.shards):
            raise WeightError(f"export: tensor {name} is not in the plan (all planned tensors are written)")
        pname, shape, dt, _ = self.shards[self._i][self._j]
        if name != pname or tuple(t.shape) != shape or t.dtype != dt:
            raise WeightError(f"export: got tensor {name} {list(t.shape)} {t.dtype}, expected {pname} {list(shape)} {dt}")
        if self._f is None:
            self._open()
        self._f.write(memoryview(np.ascontiguousarray(t).reshape(-1).view(np.uint8)))
        self._j += 1
        if self._j == len(self.shards[self._i]):
            self._f.close()
            self._f, self._i, self._j = None, self._i + 1, 0

    def finish(self) -> None:
        if self._i != len(self.shards):
            raise WeightError(f"export: stopped before tensor {self.shards[self._i][self._j][0]}")
        if len(self.files) > 1:
            weight_map = {t[0]: f for f, s in zip(self.files, self.shards) for t in s}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
