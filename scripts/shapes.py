"""Model shapes for the benchmarks (SPEC §1.4) and random weights made on device, in their shards.

    from shapes import preset, random_model
    cfg = preset("flash8")                       # Ling-2.6-flash shapes, 8 layers, vocab cut to 32768
    model = random_model(cfg, mesh, jnp.bfloat16)     # fill="init": the model's own (slow) initialisation

Presets:
  flash8     Ling-2.6-flash layer shapes (d 4096, 32 x 128 heads, MLA q_lora 1536 / kv_lora 512,
             256 experts of width 1024, top-8, one shared expert, dense first layer of width 9216),
             8 layers with layer_group_size 8 (7 linear + 1 MLA), vocabulary cut to 32768
  flash      the full Ling-2.6-flash: 32 layers (28 linear + 4 MLA), vocabulary 157,184
  1t         Ling-2.5-1T shapes (d 8192, 64 x 128 heads, 256 experts of width 2048, dense width 18432,
             group_norm_size 8), 80 layers (70 linear + 10 MLA), vocabulary 157,184
  tiny       small shapes for CPU smoke tests
`layers=` / `vocab=` override the depth and the vocabulary (a cut is said in every table); `experts=` the number
of routed experts (for CPU checks of a full-width command).
"""
from __future__ import annotations

FLASH = dict(hidden_size=4096, num_attention_heads=32, head_dim=128, intermediate_size=9216, num_experts=256,
             moe_intermediate_size=1024, n_group=8, topk_group=4, num_experts_per_tok=8, q_lora_rank=1536,
             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, group_norm_size=4,
             layer_group_size=8, num_hidden_layers=32, vocab_size=157184)
ONE_T = dict(FLASH, hidden_size=8192, num_attention_heads=64, intermediate_size=18432, moe_intermediate_size=2048,
             group_norm_size=8, num_hidden_layers=80)
TINY = dict(hidden_size=64, num_attention_heads=8, head_dim=16, intermediate_size=96, num_experts=16,
            moe_intermediate_size=32, n_group=4, topk_group=2, num_experts_per_tok=4, q_lora_rank=24,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, group_norm_size=2,
            layer_group_size=4, num_hidden_layers=8, vocab_size=256)
PRESETS = {"flash8": dict(FLASH, num_hidden_layers=8, vocab_size=32768), "flash": FLASH, "1t": ONE_T, "tiny": TINY}


def preset(name: str, layers: int | None = None, vocab: int | None = None, experts: int | None = None):
    """The preset's BailingConfig; layers / vocab / experts override its depth, vocabulary and number of
    routed experts (a reduced copy for CPU checks of a real-shape command)."""
    from lingjax.config import BailingConfig
    if name not in PRESETS:
        raise SystemExit(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    shapes = dict(PRESETS[name])
    if layers:
        shapes["num_hidden_layers"] = layers
    if vocab:
        shapes["vocab_size"] = vocab
    if experts:
        shapes["num_experts"] = experts
    cfg = BailingConfig(num_key_value_heads=shapes["num_attention_heads"], num_shared_experts=1,
                        first_k_dense_replace=1, routed_scaling_factor=2.5, rope_theta=6e6,
                        max_position_embeddings=262144, num_nextn_predict_layers=0, pad_token_id=0, eos_token_id=1,
                        rms_norm_eps=1e-6, **shapes)
    cfg.validate()
    return cfg


def random_model(cfg, mesh, dtype, fill: str = "hash", mtp: bool = False, **model_kw):
    """A BailingModel with random weights generated on device, each parameter directly in its shards
    (the same values at every tp).

    fill "hash" (the default): every matrix (each float parameter of >= 2 dims, all of which the
    model initialises as N(0, 0.02)) is a cheap deterministic pseudo-random fill (hash_fill: one
    integer hash of the element's indices, ~N(0, 0.02)), one jitted function per distinct (shape,
    dtype, sharding) reused across layers with the parameter's seed as an argument; the vectors (norm
    weights, biases, expert_bias) are the model's own initial values (a jit of the model's init that
    returns only them: the compiler drops the matrices' random generation).
    mtp: build the model with its MTP layer (speculative decoding benches).
    fill "init": the model's own initialisation (nnx.Rngs(0), threefry normals) in one jit: exact, slow
    at real scale (62 s for the 23.7B-parameter flash8 cut on an H200, run 2)."""
    import zlib

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from lingjax import sharding
    from lingjax.model import BailingModel

    if fill not in ("hash", "init"):
        raise ValueError(f"random_model: fill must be 'hash' or 'init', got {fill!r}")

    def make():
        return BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=mtp, **model_kw)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, cfg, mesh) if mesh is not None else None
    if fill == "init":
        state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
        return nnx.merge(graphdef, state)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    shard_leaves = treedef.flatten_up_to(shardings) if shardings is not None else [None] * len(leaves)
    is_matrix = [len(a.shape) >= 2 and jnp.issubdtype(a.dtype, jnp.floating) for _, a in leaves]

    def vectors():
        flat = treedef.flatten_up_to(nnx.split(make())[1])
        return [v for v, m in zip(flat, is_matrix) if not m]
    vec_shardings = [s for s, m in zip(shard_leaves, is_matrix) if not m]
    vec = iter(jax.jit(vectors, out_shardings=vec_shardings if shardings is not None else None)())
    fns = {}
    values = []
    for (path, a), sh, m in zip(leaves, shard_leaves, is_matrix):
        if not m:
            values.append(next(vec))
            continue
        key = (tuple(a.shape), jnp.dtype(a.dtype), sh)
        if key not in fns:
            fns[key] = jax.jit(lambda seed, shape=a.shape, dt=a.dtype: hash_fill(seed, shape, dt, 0.02),
                               out_shardings=sh)
        seed = zlib.crc32(jax.tree_util.keystr(path).encode())
        values.append(fns[key](jnp.uint32(seed)))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))


def hash_fill(seed, shape, dtype, std):
    """Deterministic pseudo-random values of about N(0, std^2): each element hashes its indices and the
    uint32 seed (murmur3's 32-bit finaliser, once per axis) and sums the hash's four bytes (Irwin-Hall:
    mean 510, sd 147.8 over [0, 1020]), centred and scaled. A few integer operations per element, one
    fused kernel that writes the array once; indices per axis, so arrays of more than 2^32 elements
    do not repeat."""
    import jax
    import jax.numpy as jnp
    u32 = jnp.uint32

    def fmix(h):
        h = h ^ (h >> 16)
        h = h * u32(0x85EBCA6B)
        h = h ^ (h >> 13)
        h = h * u32(0xC2B2AE35)
        return h ^ (h >> 16)
    h = jnp.broadcast_to(fmix(jnp.asarray(seed, u32) * u32(0x9E3779B1) + u32(1)), shape)
    for ax in range(len(shape)):
        h = fmix(h ^ (jax.lax.broadcasted_iota(u32, shape, ax) * u32(0x9E3779B1) + u32(ax + 1)))
    s = ((h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24)).astype(jnp.float32)
    return ((s - 510.0) * (std / 147.8)).astype(dtype)


QUANTIZED_LEAVES = ("kernel", "w_gate", "w_up", "w_down")


def is_quantized_param(path) -> bool:
    """The params an FP8 checkpoint holds in FP8 (quant.quantizable's choice, by param path): the
    attention and MLP / expert projections of the decoder layers; not the router, norms, embeddings,
    lm_head."""
    names = [str(p) for p in path]
    return names[0] == "layers" and names[-1] in QUANTIZED_LEAVES and ("attention" in names or "mlp" in names)


def random_fp8_model(cfg, dtype, scheme, kmajor: bool = True, mtp: bool = False, mesh=None, **model_kw):
    """A BailingModel on the default device with random weights, its projections and experts in FP8
    (quant.SCHEMES[scheme]: fp8-block or fp8-channel), each made and quantized on device one parameter
    at a time (quant.quantize_param), so that only one bf16 parameter exists at a time: full
    Ling-2.6-flash is 208 GB in bf16 (more than one H200) and about 106 GB in FP8. The other params
    are the model's own initialisation (one jitted call; the quantized ones are dropped from its
    outputs, so XLA does not make them). kmajor: the FP8 values stored K-major ([..., out, in], the
    layout the GPU FP8 kernels read fastest and the engine lays them out in; quant.with_layout), else
    in the param layout [..., in, out]. mesh: every parameter is made and quantized directly in its
    shards (lingjax.sharding's specs; an FP8 weight and its scales sharded together), so no device
    ever holds a whole bf16 expert tensor; the values do not depend on the mesh."""
    import functools
    import logging
    import time

    import jax
    from flax import nnx
    from lingjax import quant, sharding
    from lingjax.model import BailingModel
    from lingjax.weights import set_param
    fmt = quant.SCHEMES[scheme]
    block, act = quant.param_block(fmt), fmt.act

    def make():
        return BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=mtp, **model_kw)
    model = nnx.eval_shape(make)
    flat = list(nnx.to_flat_state(nnx.state(model)))

    tp = sharding.tp_of(mesh) if mesh is not None else 1
    if mesh is not None:
        sharding.check_tp(cfg, tp)

    def named(spec):
        return jax.sharding.NamedSharding(mesh, spec)

    def rest():
        state = nnx.split(make())[1]
        return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state) if not is_quantized_param(p)}
    rest_shardings = None if mesh is None else {
        "/".join(map(str, p)): named(sharding.param_spec(p, cfg, tp)) for p, _ in flat if not is_quantized_param(p)}
    t0 = time.perf_counter()
    plain = jax.jit(rest, out_shardings=rest_shardings)()
    jax.block_until_ready(plain)
    logging.getLogger("shapes").info("random_fp8_model: unquantized params (one jitted init) %.1f s",
                                     time.perf_counter() - t0)
    t0 = time.perf_counter()

    def fp8(key, shape):
        w = quant.quantize_param(0.02 * jax.random.normal(key, shape, dtype), block, act)
        return quant.FP8Weight(jax.numpy.swapaxes(w.q, -1, -2), w.scale, w.block, w.act, True) if kmajor else w
    fns = {}

    def make_fp8(path, key, shape):
        spec = sharding.param_spec(path, cfg, tp) if mesh is not None else None
        if (shape, spec) not in fns:
            out = None
            if mesh is not None:
                s = sharding.fp8_spec(spec, jax.eval_shape(functools.partial(fp8, shape=shape), key), tp)
                out = quant.FP8Weight(named(s.q), named(s.scale), s.block, s.act, s.kmajor)
            fns[shape, spec] = jax.jit(functools.partial(fp8, shape=shape), out_shardings=out)
        return fns[shape, spec](key)
    key = jax.random.key(1)
    for i, (path, var) in enumerate(flat):
        name = "/".join(map(str, path))
        if is_quantized_param(path):
            value = make_fp8(path, jax.random.fold_in(key, i), tuple(var.get_value().shape))
            jax.block_until_ready(value)
        else:
            value = plain.pop(name)
        set_param(model, tuple(path), value)
    logging.getLogger("shapes").info("random_fp8_model: FP8 params made and quantized one at a time %.1f s",
                                     time.perf_counter() - t0)
    return model


def weight_bytes(model) -> int:
    """Bytes of a model's parameters (FP8 weights: values + scales)."""
    import jax
    from flax import nnx
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(model)))


def param_counts(cfg):
    """(total params, active params per token excluding the embedding lookup, params per token of the
    lm_head) of a config, from its layer kinds (MTP excluded)."""
    d, H, D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    lin = 4 * d * H * D + H * D * d + 2 * D + H * D            # q, k, v, g, dense, qk norms, g norm
    q = (d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim) if cfg.q_lora_rank \
        else d * H * cfg.qk_head_dim
    mla = (q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
           + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * d)
    dense = 3 * d * cfg.intermediate_size
    expert = 3 * d * cfg.moe_intermediate_size
    shared = 3 * d * cfg.moe_intermediate_size * cfg.num_shared_experts
    total = active = 0
    for l, kind in enumerate(cfg.layer_kinds):
        att = mla if kind != "linear" else lin
        ffn_total = (d * cfg.num_experts + cfg.num_experts * expert + shared) if cfg.is_moe(l) else dense
        ffn_active = (d * cfg.num_experts + cfg.num_experts_per_tok * expert + shared) if cfg.is_moe(l) else dense
        total += att + ffn_total + 2 * d
        active += att + ffn_active + 2 * d
    head = d * cfg.vocab_size
    return total + 2 * head, active, head
