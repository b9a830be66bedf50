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
