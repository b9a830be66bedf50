"""Tensor parallelism: the device mesh, partition specs, sharded loading and caches, and the
`jax.shard_map` wrappers that run the whole model step (or the full forward) on local shards.

Mesh: axes ("data", "tp"), data = 1 today (room for data parallelism over requests). Everything
below shards over "tp" only; a spec that does not name "data" is replicated over it.

What is sharded over tp (PartitionSpecs of the Flax `kernel [in, out]` layout):

  linear attention   q/k/v/g_proj kernel  P(None, tp)   heads (column-parallel, head-major columns)
                     g_norm weight        P(tp)         the GroupRMSNorm channels of those heads
                     dense kernel         P(tp, None)   row-parallel: partial sums, one psum
                     query/key_layernorm  replicated    ([D], shared by all heads)
  MLA                q_b_proj / q_proj    P(None, tp)   heads
                     kv_b_proj            P(None, tp)   heads (W_UK, W_UV of the absorbed form)
                     dense                P(tp, None)   row-parallel, one psum
                     q_a_proj, kv_a_proj_with_mqa and their norms: replicated (the latent is one
                     MQA head shared by all heads; every device computes it, ~d x (q_lora + 576))
  MoE experts        w_gate/w_up/w_down   P(tp, None, None)  expert parallel: E/tp whole experts
                     router gate, expert_bias: replicated (every device routes every token)
  shared expert,     gate/up P(None, tp), down P(tp, None): tensor parallel over the width
  dense MLP
  lm_head            P(None, tp) over the vocabulary when tp divides it (logits come out
                     vocab-sharded, gathered after the shard_map), else replicated
  embeddings, final norm, layer norms, MTP enorm/hnorm/eh_proj: replicated

Caches: each linear layer's states [rows, H, D, D] shard on H (each device holds its heads' state for
every row); the MLA latent pages [num_pages, page_size, r + rope] are replicated (one MQA head: every
device needs all of it for its heads, and writes the same values).

Collectives per layer: exactly one psum at the end of each attention block and one at the end of
each MoE / dense MLP block (the routed and shared-expert partials are summed before it). When tp
does not divide group_norm_size a GroupRMSNorm group spans devices and each linear-attention layer
adds one small psum of per-group sums of squares ([T, group_norm_size] floats; SPEC §2.7).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lingjax import cache as cache_lib
from lingjax import quant
from lingjax.config import BailingConfig
from lingjax.model.parallel import TP

log = logging.getLogger(__name__)

DATA = "data"
REPLICATED = P()

# Module names under which a Dense is column-parallel (sharded outputs) or row-parallel (sharded inputs).
COLUMN = {"q_proj", "k_proj", "v_proj", "g_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj"}
ROW = {"dense", "down_proj"}
REPLICATED_MODULES = {"q_a_proj", "kv_a_proj_with_mqa", "eh_proj"}
EXPERTS = {"w_gate", "w_up", "w_down"}


class ShardingError(ValueError):
    """A tensor-parallel setting that cannot be served; the message is meant for the user."""


# ------------------------------------------------------------------------------------------- mesh
def make_mesh(tp: int | None = None, devices=None) -> Mesh:
    """A ("data", "tp") mesh of shape (1, tp) over `devices` (default: all devices of all processes,
    in jax.devices() order, which keeps each process's devices contiguous)."""
    devices = list(jax.devices() if devices is None else devices)
    tp = len(devices) if tp is None else tp
    if not (isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1):
        raise ShardingError(f"tp must be an integer >= 1, got {tp!r}")
    if tp > len(devices):
        raise ShardingError(f"tp={tp} needs {tp} devices, but only {len(devices)} are visible "
                            f"({jax.process_count()} process(es), platform {devices[0].platform})")
    return jax.make_mesh((1, tp), (DATA, TP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[:tp])


def tp_of(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[TP]


def check_tp(cfg: BailingConfig, tp: int) -> None:
    """Refuse a tp that does not divide what it shards, naming the field."""
    if tp == 1:
        return
    need = [("num_attention_heads", cfg.num_attention_heads, "attention heads")]
    if any(cfg.is_moe(l) for l in range(cfg.num_hidden_layers)) or cfg.num_nextn_predict_layers:
        need.append(("num_experts", cfg.num_experts, "routed experts (expert parallel)"))
        if cfg.num_shared_experts > 0:
            need.append(("shared expert width", cfg.shared_intermediate_size, "shared-expert width"))
    if cfg.first_k_dense_replace > 0:
        need.append(("intermediate_size", cfg.intermediate_size, "dense-MLP width"))
    for name, v, what in need:
        if v % tp:
            raise ShardingError(f"tp={tp} does not divide {name}={v}: the {what} are split evenly over the "
                                f"tp devices; pick a tp that divides {v}")


# ------------------------------------------------------------------------------------------- specs
def param_spec(path, cfg: BailingConfig, tp: int) -> P:
    """PartitionSpec of the param at `path` (e.g. ('layers', 0, 'attention', 'q_proj', 'kernel'))."""
    names = [p for p in path if isinstance(p, str)]
    leaf = names[-1] if names else None
    owner = names[-2] if len(names) > 1 else None
    if leaf == "lm_head":
        return P(None, TP) if cfg.vocab_size % tp == 0 else REPLICATED
    if leaf == "word_embeddings":
        return REPLICATED
    if leaf in EXPERTS:
        return P(TP, None, None)
    if leaf in ("gate", "expert_bias") and owner == "mlp":
        return REPLICATED
    if leaf == "kernel":
        if owner in COLUMN:
            return P(None, TP)
        if owner in ROW:
            return P(TP, None)
        if owner in REPLICATED_MODULES:
            return REPLICATED
    if leaf == "bias":
        if owner in COLUMN:
            return P(TP)
        if owner in ROW or owner in REPLICATED_MODULES:
            return REPLICATED
    if leaf == "weight":                         # norms
        return P(TP) if owner == "g_norm" else REPLICATED
    raise ShardingError(f"no partition rule for param {'.'.join(map(str, path))}")


def fp8_spec(spec: P, w, tp: int):
    """Specs of an FP8 weight's two arrays (lingjax.quant.FP8Weight, values or shapes) given its
    weight's spec: q as the weight; the scale follows it on the expert axis and, on the in / out
    axes, wherever each device's slice of the weight is whole blocks (per-channel scales always;
    128x128 blocks when weight dim / tp is a multiple of 128). Elsewhere the scale stays whole on
    that axis and quant.dequantize picks this device's blocks by its tp index. A K-major q (stored
    [..., out, in]) takes the weight's spec with its last two axes swapped."""
    shape = w.shape                                  # the param layout [..., in, out]
    nd = len(shape)
    axes = list(spec) + [None] * (nd - len(spec))
    s_axes = list(axes)
    for a in (nd - 2, nd - 1):
        b, n = w.block[a - (nd - 2)], shape[a]
        if axes[a] is None:
            continue
        if b == 0 or w.scale.shape[a] == 1 or (n // tp) % b or n % tp:
            s_axes[a] = None
    q_axes = axes[:-2] + axes[:-3:-1] if w.kmajor else axes
    return quant.FP8Weight(P(*q_axes), P(*s_axes), w.block, w.act, w.kmajor)


def _key_path(kp) -> tuple:
    out = []
    for k in kp:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name not in ("value", "raw_value"):
                out.append(k.name)
    return tuple(out)


def state_specs(state, cfg: BailingConfig, tp: int):
    """A pytree of PartitionSpecs matching an nnx State of the model (nnx.split(model)[1])."""
    def spec(kp, x):
        s = param_spec(_key_path(kp), cfg, tp)
        return fp8_spec(s, x, tp) if quant.is_fp8(x) else s
    return jax.tree_util.tree_map_with_path(spec, state, is_leaf=quant.is_fp8)


def state_shardings(state, cfg: BailingConfig, mesh: Mesh):
    tp = tp_of(mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, cfg, tp),
                        is_leaf=lambda x: isinstance(x, P))


def cache_specs() -> cache_lib.Caches:
    """A prefix of the Caches pytree: every linear layer's states on H, every MLA page pool replicated."""
    return cache_lib.Caches(linear=P(None, TP, None, None), mla=REPLICATED)


def logits_spec(cfg: BailingConfig, tp: int, ndim: int = 2) -> P:
    return P(*([None] * (ndim - 1)), TP) if tp > 1 and cfg.vocab_size % tp == 0 else REPLICATED


# ------------------------------------------------------------------------------------------- placement
def place_fn(cfg: BailingConfig, mesh: Mesh) -> Callable:
    """The `place(path, np_array) -> jax.Array` hook of the loaders: each device receives only its
    shard of the tensor (the host holds one tensor at a time; in a multi-process run each process
    transfers only its own devices' shards)."""
    tp = tp_of(mesh)
    check_tp(cfg, tp)

    def put(value, spec):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec), lambda idx: value[idx])

    def place(path, value):
        spec = param_spec(path, cfg, tp)
        if quant.is_fp8(value):             # an FP8 weight and its scale, sharded together
            s = fp8_spec(spec, value, tp)
            return quant.FP8Weight(put(value.q, s.q), put(value.scale, s.scale), value.block, value.act, value.kmajor)
        return put(value, spec)
    return place


def shard_state(state, cfg: BailingConfig, mesh: Mesh):
    """Put an nnx State onto the mesh per the specs (a no-op for params loaded with place_fn)."""
    check_tp(cfg, tp_of(mesh))
    shardings = state_shardings(state, cfg, mesh)

    def put(x, s):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
            return x
        if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.device_put(x, s)
        return _put_host(np.asarray(jax.device_get(x)), s)
    return jax.tree.map(put, state, shardings)


def _put_host(value: np.ndarray, sharding: NamedSharding):
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, REPLICATED)


def host_to_global(value: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds identically -> a global array replicated over the mesh
    (what jit needs for inputs in a multi-process run)."""
    return _put_host(np.asarray(value), replicated(mesh))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Move a (small, host- or single-device-resident) model onto the mesh, in place; returns it."""
    graphdef, state = nnx.split(model)
    nnx.update(model, shard_state(state, model.cfg, mesh))
    return model


def init_caches(cfg: BailingConfig, mesh: Mesh | None, num_rows: int, num_pages: int, page_size: int,
                **kw) -> cache_lib.Caches:
    """Caches allocated directly in their shards (linear states split over heads, MLA replicated)."""
    if tp_of(mesh) == 1:
        return cache_lib.init_caches(cfg, num_rows, num_pages, page_size, **kw)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(), is_leaf=lambda x: isinstance(x, P))
    return jax.jit(lambda: cache_lib.init_caches(cfg, num_rows, num_pages, page_size, **kw),
                   out_shardings=shardings)()


# ------------------------------------------------------------------------------------------- shard_map
def shard_step(graphdef, cfg: BailingConfig, mesh: Mesh | None, *, gather_logits: bool = True,
               check_vma: bool = True) -> Callable:
    """`step(state, batch, caches, rows=None) -> (logits, caches)`: BailingModel.step inside one
    shard_map over tp (call it under jit). With mesh None or tp = 1 it is the plain model step (no
    shard_map, no collectives). Logits are gathered to replicated unless gather_logits=False."""
    def body(state, batch, caches, rows):
        return nnx.merge(graphdef, state).step(batch, caches, rows=rows)

    tp = tp_of(mesh)
    if tp == 1:
        return lambda state, batch, caches, rows=None: body(state, batch, caches, rows)
    check_tp(cfg, tp)
    lspec = logits_spec(cfg, tp)

    def step(state, batch, caches, rows=None):
        f = jax.shard_map(body, mesh=mesh, in_specs=(state_specs(state, cfg, tp), REPLICATED, cache_specs(), REPLICATED),
                          out_specs=(lspec, cache_specs()), check_vma=check_vma)
        logits, caches = f(state, batch, caches, rows)
        if gather_logits and lspec != REPLICATED:
            logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, REPLICATED))
        return logits, caches
    return step


def shard_forward(graphdef, cfg: BailingConfig, mesh: Mesh | None, *, gather_logits: bool = True,
                  check_vma: bool = True) -> Callable:
    """`forward(state, tokens [B, T], positions=None) -> float32 logits [B, T, V]`: the full-sequence
    forward (no cache) inside one shard_map over tp (call it under jit)."""
    def body(state, tokens, positions):
        return nnx.merge(graphdef, state)(tokens, positions)

    tp = tp_of(mesh)
    if tp == 1:
        return lambda state, tokens, positions=None: body(state, tokens, positions)
    check_tp(cfg, tp)
    lspec = logits_spec(cfg, tp, 3)

    def forward(state, tokens, positions=None):
        f = jax.shard_map(body, mesh=mesh, in_specs=(state_specs(state, cfg, tp), REPLICATED, REPLICATED),
                          out_specs=lspec, check_vma=check_vma)
        logits = f(state, tokens, positions)
        if gather_logits and lspec != REPLICATED:
            logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, REPLICATED))
        return logits
    return forward


# ------------------------------------------------------------------------------------------- multi-host
def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Start JAX's distributed runtime (one process per host) from arguments, else from the
    environment: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID,
    or a cluster JAX detects by itself (SLURM, Open MPI, ...) when LINGJAX_DISTRIBUTED=1.
    Returns True when it was started (False: single process). Call before any other JAX call."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None and process_id is None:
        if env.get("LINGJAX_DISTRIBUTED") == "1":
            jax.distributed.initialize()          # cluster auto-detection
            return True
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise ShardingError("multi-host needs all three of --coordinator HOST:PORT, --num-processes N and "
                            "--process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ShardingError(f"process id {process_id} is outside [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    log.info("distributed runtime: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
