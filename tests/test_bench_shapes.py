"""scripts/shapes.py's random weights for the device benchmarks: the cheap hash fill gives every matrix
pseudo-random values of the model's initial scale (N(0, 0.02): mean within 0.002, sd within 10%, no
correlation between neighbours, many distinct values), the vectors the model's own initial values,
the model's shapes and dtypes, and the same values at tp 1 and tp 2 (sharded on simulated devices)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from shapes import hash_fill, preset, random_model  # noqa: E402

from lingjax import sharding  # noqa: E402
from lingjax.model import BailingModel  # noqa: E402


def flat(model):
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}


def flat_vars(model):
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS host device count)")
def test_hash_filled_model_matches_the_model_init_in_shape_scale_and_vectors():
    cfg = preset("tiny", layers=4)
    want = flat(BailingModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), mtp=False))
    got = flat(random_model(cfg, None, jnp.bfloat16))
    got2 = flat(random_model(cfg, sharding.make_mesh(2), jnp.bfloat16))
    assert got.keys() == want.keys() == got2.keys()
    n_mat = 0
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape and g.dtype == w.dtype, k
        np.testing.assert_array_equal(np.asarray(got2[k], np.float32), np.asarray(g, np.float32), err_msg=k)
        a = np.asarray(g, np.float32)
        if a.ndim < 2:
            np.testing.assert_array_equal(a, np.asarray(w, np.float32), err_msg=k)       # ones / zeros
        else:
            n_mat += 1
            assert abs(a.mean()) < 2e-3 and abs(a.std() - 0.02) < 2e-3 and len(np.unique(a)) > 50, k
    assert n_mat > 10
    # different parameters of one shape get different values (the seed is the parameter's path)
    a, b = [np.asarray(got[k], np.float32) for k in sorted(got) if k.endswith("q_proj/kernel")][:2]
    assert not np.array_equal(a, b)


def test_hash_fill_statistics():
    v = np.asarray(hash_fill(jnp.uint32(7), (64, 4096), jnp.float32, 1.0), np.float64)
    assert abs(v.mean()) < 0.01 and abs(v.std() - 1.0) < 0.01
    assert abs(np.corrcoef(v[:, :-1].ravel(), v[:, 1:].ravel())[0, 1]) < 0.01        # along a row
    assert abs(np.corrcoef(v[:-1].ravel(), v[1:].ravel())[0, 1]) < 0.01              # along a column
    w = np.asarray(hash_fill(jnp.uint32(8), (64, 4096), jnp.float32, 1.0), np.float64)
    assert abs(np.corrcoef(v.ravel(), w.ravel())[0, 1]) < 0.01                       # seeds


def test_random_fp8_model_and_a_bench_decode_step():
    """shapes.random_fp8_model, the FP8 benches' model (bench_e2e --quantize, profile_fp8), at tiny size
    (4 layers: linear, MLA, dense MLP, MoE): each param shapes.is_quantized_param names is an FP8Weight
    stored K-major (q float8_e4m3fn [..., out, in], 128x128-block scales [..., n_in, n_out], per-group
    activations) whose values dequantize to ~N(0, 0.02) (sd within 20%: a few thousand values per
    matrix); the other params stay plain. One decode step of the benches (bench_e2e.decode_setup:
    engine step + greedy sampling over the paged MLA cache) runs on it and gives in-vocabulary tokens.
    (The FP8 math itself is checked against the dequantized model in tests/test_fp8.py; this is the
    benches' plumbing, which had no test: session 5's device call lost every FP8 bench to a NameError.)"""
    from bench_e2e import decode_setup
    from shapes import is_quantized_param, random_fp8_model

    from lingjax import quant
    cfg = preset("tiny", layers=4)
    model = random_fp8_model(cfg, jnp.bfloat16, "fp8-block")
    n_fp8 = 0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        v = var.get_value()
        assert quant.is_fp8(v) == is_quantized_param(path), path
        if quant.is_fp8(v):
            n_fp8 += 1
            K, N = v.shape[-2:]
            assert v.kmajor and v.q.dtype == jnp.float8_e4m3fn and v.q.shape[-2:] == (N, K), path
            assert v.scale.shape[-2:] == (-(-K // 128), -(-N // 128)) and v.act == "group", path
            assert abs(float(np.asarray(quant.dequantize(v)).std()) - 0.02) < 4e-3, path
    assert n_fp8 >= 10
    f, state, caches, batch = decode_setup(model, cfg, None, 2, 8, 4)
    toks, caches = f(state, caches, batch)
    toks = np.asarray(toks)
    assert toks.shape == (2,) and ((0 <= toks) & (toks < cfg.vocab_size)).all()
    # made in its shards on a tp-2 mesh (bench_e2e --quantize --tp 2): the same values, each array (an FP8
    # weight's values and scales alike) sharded as lingjax.sharding's specs say
    if jax.device_count() >= 2:
        mesh = sharding.make_mesh(2)
        got = nnx.state(random_fp8_model(cfg, jnp.bfloat16, "fp8-block", mesh=mesh))
        want = sharding.state_shardings(got, cfg, mesh)
        leaves = jax.tree.leaves(got)
        assert len(leaves) == len(jax.tree.leaves(nnx.state(model)))
        for a, b, s in zip(leaves, jax.tree.leaves(nnx.state(model)), jax.tree.leaves(want)):
            assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)
            np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_step_bytes_count_what_a_step_reads_and_the_two_benches_agree():
    """The byte floor of the benches (bench_spec.step_bytes, which bench_e2e.step_bytes and so profile_fp8 use at
    k = 0): on the abstract tiny model (with MTP, bfloat16 and float32), param_bytes splits every parameter byte
    into exactly one role (dense + experts + lm_head + embedding + MTP = all leaves), one expert is its three
    d x I matrices; a one-token plain step touches every parameter but the embedding table and the E - top_k
    unused experts per MoE layer (one embedding row), plus the linear states read and written (float32) and the
    latents read and written in the model's dtype, counted here from the config alone; bench_e2e at tp 2
    halves all but the latents and the embedding row."""
    import dataclasses

    import jax
    from bench_e2e import step_bytes as e2e_step_bytes
    from bench_spec import param_bytes, step_bytes
    for dtype in (jnp.bfloat16, jnp.float32):
        cfg = dataclasses.replace(preset("tiny", layers=4), num_nextn_predict_layers=1)
        abstract = nnx.eval_shape(lambda: BailingModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp=True))
        pb = param_bytes(abstract)
        isz = jnp.dtype(dtype).itemsize
        d, E, I, V = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.vocab_size
        n_moe = sum(cfg.is_moe(l) for l in range(cfg.num_hidden_layers))
        leaves = {k: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(v.get_value()))
                  for k, v in flat_vars(abstract).items()}
        total = sum(leaves.values())
        assert pb["expert"] == pb["mtp_expert"] == 3 * d * I * isz
        assert pb["lm_head"] == V * d * isz and pb["embed_row"] == d * isz
        assert pb["dense"] + n_moe * E * pb["expert"] + pb["lm_head"] + V * pb["embed_row"] \
            + pb["mtp_dense"] + E * pb["mtp_expert"] == total
        mtp = sum(n for k, n in leaves.items() if k.startswith("mtp/"))
        lat = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        C = 40
        want = (total - mtp - V * d * isz - n_moe * (E - cfg.num_experts_per_tok) * pb["expert"] + d * isz
                + len(cfg.linear_layers) * cfg.num_attention_heads * cfg.head_dim ** 2 * 4 * 2
                + len(cfg.mla_layers) * (C + 1) * lat * isz)
        parts = step_bytes(cfg, pb, 1, C, 0, latent_itemsize=isz)
        assert sum(parts.values()) == pytest.approx(want, rel=1e-12)
        plain = dataclasses.replace(cfg, num_nextn_predict_layers=0)
        model = nnx.eval_shape(lambda: BailingModel(plain, dtype=dtype, rngs=nnx.Rngs(0), mtp=False))
        assert e2e_step_bytes(plain, model, 1, C, 1)[0] == pytest.approx(want, rel=1e-12)
        half = (want - parts["caches"]) / 2 + parts["caches"]
        assert e2e_step_bytes(plain, model, 1, C, 2)[0] == pytest.approx(half, rel=1e-12)


def test_uniform_distinct_expert_formula_matches_the_router_on_exchangeable_scores():
    """The floor's E (1 - (1 - top_k / E)^n) distinct experts for n tokens is what the model's group-limited router
    (lingjax.model.moe.route) gives when every token's expert scores are independent and identically distributed
    (the identity as the gate: the scores are the inputs): 12000 tokens in groups of n = 2 and n = 4 at flash's E = 256,
    top-8, 8 groups / 4 kept; the mean within 5 standard errors (~0.1 experts). (A random gate on low-dimensional
    inputs is not that: its columns' norms differ, so some experts win more often and fewer are touched;
    bench_spec --routing-stats measures what the random benchmark model does.)"""
    import functools

    from bench_spec import distinct_experts

    from lingjax.model.moe import route
    E, top, N = 256, 8, 12000
    x = jnp.asarray(np.random.default_rng(0).normal(0, 1, (N, E)), jnp.float32)
    idx, _ = jax.jit(functools.partial(route, top_k=top, n_group=8, topk_group=4, scale=1.0))(
        x, jnp.eye(E, dtype=jnp.float32), jnp.zeros(E, jnp.float32))
    for n in (2, 4):                     # the same tokens in groups of n
        ids = np.asarray(idx).reshape(N // n, n * top)
        distinct = np.array([len(np.unique(r)) for r in ids], float)
        assert abs(distinct.mean() - distinct_experts(n, E, top)) < 5 * distinct.std() / np.sqrt(N // n), n
