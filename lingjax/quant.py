"""FP8 weights: the weight type the layers' matmuls accept, the quantizers, and the two FP8 checkpoint
formats (compressed-tensors and block FP8) in HF layout (issue 18).

    w = FP8Weight(q, scale, block, act)       a pytree (jax.tree_util.register_dataclass)
    dequantize(w) -> float array              q * scale, each scale covering its block
    matmul(x, w)                              x @ w for a plain array or an FP8Weight

Layout. `q` is float8_e4m3fn in the param layout of the plain weight it replaces (Flax kernels
[in, out], experts stacked [E, in, out]); `scale` is float32 [..., n_in, n_out] beside it, one value
per block of `block = (rows, cols)` elements of q's last two axes (0: the whole axis). So

    per-tensor      block (0, 0)       scale [1, 1]
    per-channel     block (0, 1)       scale [1, out]            (compressed-tensors "channel": HF [out, 1])
    128x128 blocks  block (128, 128)   scale [ceil(in/128), ceil(out/128)]   (HF weight_scale_inv, transposed)
    per-column      block (128, 1)     scale [ceil(in/128), out]  (a 128x128-block tensor split along its
                                       rows at a non-multiple of 128, fused QKV: each output row keeps its
                                       block's scale, exact; merged back into blocks on export)

`act` is the format's activation scheme: "none" (weight only), "token" (dynamic per-token scales, the
compressed-tensors FP8_DYNAMIC scheme) or "group" (dynamic per-token scales per group of block[0]
input features, the block-FP8 / DeepSeek scheme). The matmul on the CPU (and as the reference of the
GPU path) quantizes x the same way (x -> fp8(x / s) * s, s = max|x| / 448 per token or token group,
as vLLM's reference does) and multiplies by the dequantized weight. HOOK: a GPU FP8 dot (XLA's
float8 dot or the MoE grouped matmul's FP8 variant, float32 accumulation, scales applied to the
output) replaces the body of `matmul` / the dequantization in kernels/moe.experts; nothing else
changes.

Tensor parallelism: a scale axis is sharded with its weight when the local shard is whole blocks
(lingjax/sharding.py fp8_spec); otherwise the scale stays whole (it is ~1/16384 of the weight) and
`dequantize` picks this device's blocks by its tp index.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint

from lingjax.model.parallel import tp_index

log = logging.getLogger(__name__)

F32 = jnp.float32
FP8 = jnp.float8_e4m3fn
FP8_NP = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0                  # largest finite float8_e4m3fn
BLOCK = 128
ACTS = ("none", "token", "group")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class FP8Weight:
    q: jax.Array                  # float8_e4m3fn, the param layout [..., in, out]
    scale: jax.Array              # float32 [..., n_in, n_out]
    block: tuple = dataclasses.field(default=(0, 1), metadata=dict(static=True))
    act: str = dataclasses.field(default="none", metadata=dict(static=True))
    kmajor: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def shape(self):
        """The param-layout shape [..., in, out] (also when q is stored K-major)."""
        s = self.q.shape
        return tuple(s[:-2]) + (s[-1], s[-2]) if self.kmajor else tuple(s)

    @property
    def ndim(self):
        return self.q.ndim

    @property
    def dtype(self):
        return self.q.dtype


def is_fp8(w) -> bool:
    return isinstance(w, FP8Weight)


def q_in_out(w: FP8Weight):
    """w's values in the param layout [..., in, out] (a transposed view of a K-major q)."""
    return w.q.swapaxes(-1, -2) if w.kmajor else w.q


def _swap_last2(a):
    """a [..., m, n] -> a [..., n, m] materialized (numpy: contiguous; jnp: one jitted transpose that
    keeps a NamedSharding's spec, its last two axes swapped)."""
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(np.swapaxes(a, -1, -2))
    sh = getattr(a, "sharding", None)
    out = None
    if isinstance(sh, jax.sharding.NamedSharding):
        spec = list(sh.spec) + [None] * (a.ndim - len(sh.spec))
        spec[-2], spec[-1] = spec[-1], spec[-2]
        out = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*spec))
    return jax.jit(lambda v: jnp.swapaxes(v, -1, -2), out_shardings=out)(a)


def with_layout(w: FP8Weight, kmajor: bool) -> FP8Weight:
    """w with q stored K-major ([..., out, in]: each output column's inputs contiguous, the layout
    Hopper's fp8 wgmma reads its B operand in, so the GPU kernels stream it with asynchronous copies)
    or in the param layout [..., in, out]; the scale keeps its [..., n_in, n_out] layout either way.
    The same weight (dequantize equal); a copy of q when the layout changes."""
    if w.kmajor == kmajor:
        return w
    return FP8Weight(_swap_last2(w.q), w.scale, w.block, w.act, kmajor)


def to_kernel_layout(model, kmajor: bool = True) -> int:
    """Lay every FP8 weight of an nnx model out K-major (kmajor=False: back to [in, out]), in place,
    one weight at a time (peak memory: the weights plus one weight's copy). The GPU FP8 kernels take
    either layout; K-major is the fast one (lingjax.engine does this when the FP8 matmuls run on the
    GPU kernels). Returns the number of weights changed."""
    from flax import nnx
    n = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        w = var.get_value()
        if is_fp8(w) and w.kmajor != kmajor:
            obj = model                                  # the model's own Variable at this path
            for key in path[:-1]:
                obj = obj[key] if isinstance(key, int) else getattr(obj, key)
            getattr(obj, path[-1]).set_value(with_layout(w, kmajor))
            n += 1
    return n


def _cdiv(a, b):
    return -(-a // b)


# ------------------------------------------------------------------------------------------ math
def _expand(scale, axis: int, n: int, b: int):
    """scale along `axis` -> one value per element of q's n elements on that axis (broadcastable)."""
    s = scale.shape[axis]
    if b == 0 or s == 1:
        return scale
    if s == _cdiv(n, b):                               # local blocks (or unsharded)
        idx = jnp.arange(n) // b
    else:                                              # the whole scale of a tp-sharded weight
        idx = (tp_index() * n + jnp.arange(n)) // b
    return jnp.take(scale, idx, axis=axis)


def dequantize(w, dtype=F32):
    """q * scale (computed in float32, cast to dtype); a plain array is cast to dtype."""
    if not is_fp8(w):
        return w.astype(dtype)
    n_in, n_out = w.shape[-2:]
    s = _expand(_expand(w.scale.astype(F32), -2, n_in, w.block[0]), -1, n_out, w.block[1])
    return (q_in_out(w).astype(F32) * s).astype(dtype)


def quantize_activation_fp8(x, act: str, group: int = BLOCK):
    """The FP8 parts of dynamic activation quantization (what an FP8 dot consumes): x [..., d] ->
    (q float8_e4m3fn [..., d], s float32 [..., G]) with x ~ q * s, s = max|x| / 448 (1 for an all-zero
    group) per token (act "token": G = 1) or per token and group of `group` features (act "group":
    G = ceil(d / group); one group when d <= group), computed in float32."""
    if act not in ("token", "group"):
        raise ValueError(f"quantize_activation_fp8: act must be 'token' or 'group', got {act!r}")
    xf = x.astype(F32)
    d = x.shape[-1]
    if act == "group" and group and d > group:
        pad = -d % group
        xg = jnp.pad(xf, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(x.shape[:-1] + (-1, group))
    else:
        xg = xf[..., None, :]
    s = jnp.max(jnp.abs(xg), axis=-1, keepdims=True) / FP8_MAX
    s = jnp.where(s > 0, s, 1.0)
    q = round_e4m3(jnp.clip(xg / s, -FP8_MAX, FP8_MAX)).astype(FP8)      # exact cast: already e4m3 values
    return q.reshape(xf.shape[:-1] + (-1,))[..., :d], s[..., 0]


def round_e4m3(v):
    """float32 v with |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), still float32, in
    integer bit arithmetic (the same algorithm as the GPU kernels' _round_e4m3). Why not
    `v.astype(float8_e4m3fn).astype(float32)`: XLA's GPU pipeline removes such a float -> float -> float
    chain of converts (SimplifyFPConversions, on under xla_allow_excess_precision, the default), so on
    the GPU that round trip does not round at all (session 4: the reference math then skipped the
    activation quantization, 2.6% from the kernels). Normal range (|v| >= 2^-6): keep 3 of float32's
    23 mantissa bits, round to nearest even; subnormals: multiples of 2^-9 (|v| * 2^9 rounded to an
    integer, ties to even, by XLA's round-nearest-even: the kernels' float32 add-and-subtract of
    1.5 * 2^23 is folded away by XLA's CPU compiler), v's sign put back."""
    v = v.astype(F32)
    bits = jax.lax.bitcast_convert_type(v, jnp.int32)
    lsb = (bits >> 20) & 1
    normal = jax.lax.bitcast_convert_type((bits + 0x7FFFF + lsb) & -0x100000, F32)
    mag = jnp.abs(v)
    sub = jax.lax.round(mag * 512.0, jax.lax.RoundingMethod.TO_NEAREST_EVEN) * jnp.float32(2.0 ** -9)
    sub = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(sub, jnp.int32) | (bits & jnp.int32(-0x80000000)), F32)
    return jnp.where(mag < 2.0 ** -6, sub, normal)


def quantize_activation(x, act: str, group: int = BLOCK):
    """Dynamic activation quantization, quantize-dequantize: per token (act "token") or per token and
    group of `group` features (act "group"): s = max|x| / 448, x -> float8_e4m3fn(x / s) * s, in
    float32, cast back to x.dtype (quantize_activation_fp8's parts multiplied back). act "none": x
    unchanged."""
    if act == "none":
        return x
    q, s = quantize_activation_fp8(x, act, group)
    d, G = x.shape[-1], s.shape[-1]
    size = group if G > 1 else d
    qg = jnp.pad(q.astype(F32), [(0, 0)] * (x.ndim - 1) + [(0, G * size - d)]).reshape(s.shape + (size,))
    return (qg * s[..., None]).reshape(x.shape[:-1] + (-1,))[..., :d].astype(x.dtype)


def matmul(x, w):
    """x [..., in] @ w [in, out] for a plain array or an FP8Weight, in x.dtype. The FP8 path (CPU and
    reference; the GPU's at prefill sizes, lingjax.kernels.fp8): dynamic activation quantization per the
    weight's format, then the dequantized weight. Its product is pinned row-major (not on a TPU): with a
    K-major weight (quant.with_layout) XLA's GPU layout assignment may give the product the transposed
    layout and carry it into its consumers. In the FP8 prefill of 4096 tokens on an H200 (session 8,
    flash8) the shared expert's down projection came out bf16[4096, 4096]{0,1}, and the fusion that adds
    it to the routed experts' combine then ran in that transposed order: its gathers of the experts'
    output rows read one element per row (12.1 of the step's 52.5 ms; scripts/results/session8/call4,
    scripts/hlo_fusion.py). Pinned: 44.1 ms (call 7)."""
    if not is_fp8(w):
        return jnp.dot(x, w.astype(x.dtype))
    x = quantize_activation(x, w.act, w.block[0] or BLOCK)
    y = jnp.dot(x, dequantize(w, x.dtype))
    if jax.default_backend() == "tpu":        # TPU layouts are tiled: not this constraint (not measured there)
        return y
    return with_layout_constraint(y, Layout(major_to_minor=tuple(range(y.ndim))))


# ------------------------------------------------------------------------------------------ quantizers
def _amax_blocks(w: np.ndarray, bo: int, bi: int) -> np.ndarray:
    """max |w| over blocks of bo rows x bi columns of the last two axes (0 = the whole axis)."""
    out, inn = w.shape[-2:]
    bo, bi = bo or out, bi or inn
    no, ni = _cdiv(out, bo), _cdiv(inn, bi)
    a = np.abs(np.asarray(w, np.float32))
    a = np.pad(a, [(0, 0)] * (w.ndim - 2) + [(0, no * bo - out), (0, ni * bi - inn)])
    return a.reshape(w.shape[:-2] + (no, bo, ni, bi)).max(axis=(-3, -1))


def _quantize(w: np.ndarray, bo: int, bi: int) -> tuple[np.ndarray, np.ndarray]:
    """HF-layout [out, in] -> (float8_e4m3fn q [out, in], float32 scale [n_out, n_in]) with
    scale = amax(block) / 448 (1 for an all-zero block) and q = round-to-nearest(w / scale)."""
    out, inn = w.shape[-2:]
    s = _amax_blocks(w, bo, bi) / np.float32(FP8_MAX)
    s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    full = np.repeat(np.repeat(s, bo or out, axis=-2)[..., :out, :], bi or inn, axis=-1)[..., :inn]
    q = np.clip(np.asarray(w, np.float32) / full, -FP8_MAX, FP8_MAX).astype(FP8_NP)
    return q, s


def quantize_param(w, block: tuple = (BLOCK, BLOCK), act: str = "group") -> FP8Weight:
    """jnp, on device: a plain weight in the param layout [..., in, out] -> FP8Weight with one float32
    scale per block (rows, cols) of the last two axes (0: the whole axis), by the HF quantizers' rule
    (scale = amax(block) / 448, 1 for an all-zero block; q = round-to-nearest(w / scale)), so that
    quantize_param(w_hf.T) == from_hf(quantize_block(w_hf)) (for models made in memory, e.g. the
    benchmarks' random weights). act: the activation scheme the weight is used with (ACTS)."""
    if act not in ACTS:
        raise ValueError(f"quantize_param: act must be one of {ACTS}, got {act!r}")
    n_in, n_out = w.shape[-2:]
    bi, bo = block[0] or n_in, block[1] or n_out
    ni, no = _cdiv(n_in, bi), _cdiv(n_out, bo)
    lead = w.shape[:-2]
    a = jnp.pad(jnp.abs(w.astype(F32)), [(0, 0)] * len(lead) + [(0, ni * bi - n_in), (0, no * bo - n_out)])
    amax = a.reshape(lead + (ni, bi, no, bo)).max(axis=(-3, -1))
    s = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(F32)
    full = jnp.repeat(jnp.repeat(s, bi, axis=-2)[..., :n_in, :], bo, axis=-1)[..., :n_out]
    q = jnp.clip(w.astype(F32) / full, -FP8_MAX, FP8_MAX).astype(FP8)
    return FP8Weight(q, s, tuple(block), act)


def quantize_block(w: np.ndarray, block: int = BLOCK):
    """HF weight [out, in] -> (q, weight_scale_inv [ceil(out/block), ceil(in/block)]) (block FP8)."""
    return _quantize(w, block, block)


def quantize_channel(w: np.ndarray):
    """HF weight [out, in] -> (q, weight_scale [out, 1]) (compressed-tensors "channel")."""
    return _quantize(w, 1, 0)


def quantize_tensor(w: np.ndarray):
    """HF weight [out, in] -> (q, weight_scale [1]) (compressed-tensors "tensor")."""
    q, s = _quantize(w, 0, 0)
    return q, s.reshape(1)


def dequantize_hf(q: np.ndarray, scale: np.ndarray, strategy: str) -> np.ndarray:
    """HF-layout q [out, in] and its scale -> float32 [out, in] (numpy, for tests and re-quantizing)."""
    out, inn = q.shape
    s = np.asarray(scale, np.float32).reshape(1, 1) if strategy == "tensor" else np.asarray(scale, np.float32)
    b = {"tensor": (0, 0), "channel": (1, 0), "block": (BLOCK, BLOCK)}[strategy]
    full = np.repeat(np.repeat(s, b[0] or out, axis=0)[:out], b[1] or inn, axis=1)[:, :inn]
    return q.astype(np.float32) * full


# ------------------------------------------------------------------------------------------ formats
class QuantError(ValueError):
    """An FP8 quantization config or tensor lingjax cannot use; the message is one line naming it."""


@dataclasses.dataclass(frozen=True)
class Format:
    """An FP8 checkpoint format: method "compressed-tensors" or "fp8" (block), weight strategy
    "tensor" | "channel" | "block", activation scheme (ACTS), and the modules its config lists as
    unquantized (ignore / modules_to_not_convert; kept to write the config back: the loader follows
    what the checkpoint holds, FP8 tensors with their scales, anything else as plain weights)."""
    method: str
    strategy: str
    act: str
    ignore: tuple = ()

    @property
    def scale_suffix(self) -> str:
        return "weight_scale_inv" if self.method == "fp8" else "weight_scale"

    @property
    def name(self) -> str:
        return "fp8-block" if self.strategy == "block" else f"fp8-{self.strategy}"

    @property
    def block(self) -> tuple:            # HF layout (rows of [out, in], cols)
        return {"tensor": (0, 0), "channel": (1, 0), "block": (BLOCK, BLOCK)}[self.strategy]

    def quantize(self, w: np.ndarray):
        return {"tensor": quantize_tensor, "channel": quantize_channel, "block": quantize_block}[self.strategy](w)

    def to_config(self) -> dict:
        """The config.json quantization_config of this format (what export writes)."""
        if self.method == "fp8":
            return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": list(self.ignore)}
        w = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None,
             "strategy": self.strategy, "block_structure": [BLOCK, BLOCK] if self.strategy == "block" else None}
        a = None if self.act == "none" else {
            "num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
            "strategy": "token" if self.act == "token" else "group", "group_size": BLOCK if self.act == "group" else None}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": a,
                                              "output_activations": None, "format": "float-quantized"}},
                "ignore": list(self.ignore), "kv_cache_scheme": None}


# What `lingjax convert --quantize` / `lingjax export --quantize` name (the formats vLLM and sglang load):
SCHEMES = {"fp8-block": Format("fp8", "block", "group", ("lm_head",)),
           "fp8-channel": Format("compressed-tensors", "channel", "token", ("lm_head",))}


def format_from_config(qc, where: str = "quantization_config") -> Format | None:
    """config.json's quantization_config -> Format (None when absent); QuantError naming the field
    for anything lingjax does not load."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise QuantError(f"{where}: expected an object")
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise QuantError(f"{where}.fmt {qc.get('fmt')!r} is not supported (only e4m3)")
        bs = qc.get("weight_block_size")
        if bs is None:
            raise QuantError(f"{where}: quant_method fp8 without weight_block_size (per-tensor fp8 with "
                             f"static scales) is not supported; expected weight_block_size [128, 128]")
        if list(bs) != [BLOCK, BLOCK]:
            raise QuantError(f"{where}.weight_block_size {bs} is not supported (only [128, 128])")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise QuantError(f"{where}.activation_scheme {qc.get('activation_scheme')!r} is not supported (only dynamic)")
        ignore = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
        return Format("fp8", "block", "group", tuple(ignore))
    if method == "compressed-tensors":
        fmt = qc.get("format")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise QuantError(f"{where}.config_groups: missing or empty")
        schemes = set()
        for gname, g in groups.items():
            gw = f"{where}.config_groups.{gname}"
            if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
                raise QuantError(f"{gw}.weights: missing")
            gfmt = g.get("format") or fmt
            if gfmt not in ("float-quantized", "naive-quantized"):
                raise QuantError(f"{gw}: format {gfmt!r} is not supported (only float-quantized FP8)")
            w = g["weights"]
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise QuantError(f"{gw}.weights: {w.get('type')} {w.get('num_bits')}-bit is not supported "
                                 f"(only float 8-bit, float8_e4m3fn)")
            if not w.get("symmetric", True) or w.get("dynamic"):
                raise QuantError(f"{gw}.weights: asymmetric or dynamic weight scales are not supported")
            st = w.get("strategy")
            if st == "block" and list(w.get("block_structure") or []) != [BLOCK, BLOCK]:
                raise QuantError(f"{gw}.weights.block_structure {w.get('block_structure')} is not supported "
                                 f"(only [128, 128])")
            if st not in ("tensor", "channel", "block"):
                raise QuantError(f"{gw}.weights.strategy {st!r} is not supported (tensor, channel or block)")
            a = g.get("input_activations")
            if a is None:
                act = "none"
            else:
                if not a.get("dynamic"):
                    raise QuantError(f"{gw}.input_activations: static activation scales (input_scale) are not "
                                     f"supported (only dynamic)")
                if a.get("type") != "float" or a.get("num_bits") != 8:
                    raise QuantError(f"{gw}.input_activations: only float 8-bit is supported")
                ast = a.get("strategy")
                if ast == "token":
                    act = "token"
                elif ast == "group" and a.get("group_size") == BLOCK:
                    act = "group"
                else:
                    raise QuantError(f"{gw}.input_activations.strategy {ast!r} (group_size "
                                     f"{a.get('group_size')}) is not supported (token, or group of 128)")
            if g.get("output_activations"):
                raise QuantError(f"{gw}.output_activations: not supported")
            schemes.add((st, act))
        if len(schemes) > 1:
            raise QuantError(f"{where}.config_groups: groups with different schemes {sorted(schemes)} are not supported")
        if qc.get("kv_cache_scheme"):
            raise QuantError(f"{where}.kv_cache_scheme: an FP8 KV cache is not supported")
        st, act = schemes.pop()
        return Format("compressed-tensors", st, act, tuple(qc.get("ignore") or ()))
    raise QuantError(f"{where}.quant_method {method!r} is not supported (supported: compressed-tensors, fp8)")


def read_format(path: str) -> Format | None:
    """The FP8 format of the checkpoint at `path` (its config.json's quantization_config), or None."""
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(p) as f:
        d = json.load(f)
    try:
        return format_from_config(d.get("quantization_config") if isinstance(d, dict) else None)
    except QuantError as e:
        raise QuantError(f"{p}: {e}") from None


# ------------------------------------------------------------------------------------------ HF <-> params
def param_block(fmt: Format) -> tuple:
    """(rows, cols) of the param layout [in, out] from the format's HF [out, in] block."""
    return fmt.block[::-1]


def _scale_2d(scale: np.ndarray, fmt: Format) -> np.ndarray:
    s = np.asarray(scale, np.float32)
    return s.reshape(1, 1) if fmt.strategy == "tensor" else s


def from_hf(kind: str, qs: list, scales: list, fmt: Format, n_parts: int = 1) -> list[FP8Weight]:
    """HF tensors of one rule (fp8 q [out, in] and their scales) -> the rule's FP8Weight params (numpy):
    "T" one transposed, "stack" E stacked [E, in, out], "splitT" n_parts row blocks (fused QKV)."""
    blk = param_block(fmt)
    if kind == "T":
        return [FP8Weight(qs[0].T, _scale_2d(scales[0], fmt).T, blk, fmt.act)]
    if kind == "stack":
        return [FP8Weight(np.stack([q.T for q in qs]), np.stack([_scale_2d(s, fmt).T for s in scales]), blk, fmt.act)]
    if kind == "splitT":
        q, s = qs[0], _scale_2d(scales[0], fmt)
        rows = q.shape[0] // n_parts
        out = []
        for j in range(n_parts):
            r0, r1 = j * rows, (j + 1) * rows
            if fmt.strategy == "tensor":
                sj, b = s, blk
            elif fmt.strategy == "channel":
                sj, b = s[r0:r1], blk
            elif rows % BLOCK == 0:
                sj, b = s[r0 // BLOCK:r1 // BLOCK], blk
            else:                         # blocks straddle the parts: one scale per output row, exact
                sj, b = np.repeat(s, BLOCK, axis=0)[r0:r1], (BLOCK, 1)
            out.append(FP8Weight(q[r0:r1].T, np.ascontiguousarray(sj.T), b, fmt.act))
        return out
    raise QuantError(f"FP8 weights in a rule of kind {kind!r} are not supported")


def to_hf(kind: str, params: list, fmt: Format) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inverse of from_hf: FP8Weight params (numpy; either layout) -> [(q [out, in], scale in the
    format's HF shape)]."""
    params = [with_layout(jax.tree.map(np.asarray, p), False) for p in params]
    def hf_scale(s, block):
        s = np.asarray(s, np.float32).T
        if block == (BLOCK, 1):                    # per-row scales of a split block tensor -> blocks
            s = s[::BLOCK]
        return s.reshape(1) if fmt.strategy == "tensor" else np.ascontiguousarray(s)
    if kind == "T":
        p = params[0]
        return [(np.ascontiguousarray(p.q.T), hf_scale(p.scale, p.block))]
    if kind == "stack":
        p = params[0]
        return [(np.ascontiguousarray(p.q[e].T), hf_scale(p.scale[e], p.block)) for e in range(p.q.shape[0])]
    if kind == "splitT":
        q = np.concatenate([p.q.T for p in params], axis=0)
        if fmt.strategy == "tensor":
            ss = {float(np.asarray(p.scale).reshape(-1)[0]) for p in params}
            if len(ss) != 1:
                raise QuantError("a fused tensor's parts have different per-tensor scales")
            return [(q, np.asarray(params[0].scale, np.float32).reshape(1))]
        s = np.concatenate([np.asarray(p.scale, np.float32) for p in params], axis=1)     # [n_in, out]
        if params[0].block == (BLOCK, 1):
            s = s.T[::BLOCK]
            return [(q, np.ascontiguousarray(s))]
        return [(q, np.ascontiguousarray(s.T))]
    raise QuantError(f"FP8 weights in a rule of kind {kind!r} are not supported")


def quantizable(rule) -> bool:
    """Whether a weights.Rule is an FP8 candidate: a linear layer's weight inside a decoder layer
    (attention and MLP / experts projections). The router, norms, embeddings, lm_head, MTP's eh_proj
    and the linear-attention state stay unquantized."""
    name = rule.hf[0]
    return (rule.kind in ("T", "splitT", "stack") and name.endswith(".weight") and ".layers." in name
            and (".attention." in name or ".mlp." in name) and not name.endswith(".mlp.gate.weight"))


def module_name(hf_name: str) -> str:
    return hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name


def without_activation_quant(model) -> None:
    """Set every FP8 weight of an nnx model to weight-only (act "none"), in place (for tests that
    compare against the dequantized model exactly)."""
    from flax import nnx
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda w: dataclasses.replace(w, act="none") if is_fp8(w) else w, state,
                                   is_leaf=is_fp8))
