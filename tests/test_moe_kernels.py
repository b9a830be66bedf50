"""The grouped MoE path (lingjax.kernels.moe): the layout's invariants, every implementation that runs on
the CPU (reference; tpu.py in Pallas TPU interpret mode) against an independent float64 numpy oracle
that runs every expert on every token, the reference's gradient (training runs it), the model's MoE
under expert parallelism (tp 2, 4) against the unsharded layer, and tpu.py lowering for a real TPU.

Tolerances (max abs error / max abs of the oracle): float32 1e-5 (sums of at most 384 products of O(1)
values: float32 rounding ~1e-6); bfloat16 1e-2 (inputs rounded to bf16 before the oracle sees them, so
the error is h's and y's single rounding to bf16, ~2^-8 relative, plus accumulation order).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from lingjax import sharding  # noqa: E402
from lingjax.kernels import moe  # noqa: E402
from lingjax.kernels.moe import make_layout, num_blocks  # noqa: E402
from lingjax.model.moe import MoE  # noqa: E402
from lingjax.testing import tiny_config  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def oracle(x, idx, w, wg, wu, wd):
    """float64 numpy, every expert on every token, combined by a [T, E] weight matrix built from the
    routing (pairs with ids outside [0, E) contribute nothing)."""
    x, w, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w, wg, wu, wd))
    T, k = idx.shape
    E = wg.shape[0]
    comb = np.zeros((T, E))
    for t in range(T):
        for j in range(k):
            if 0 <= idx[t, j] < E:
                comb[t, idx[t, j]] += w[t, j]
    g, u = np.einsum("td,edi->tei", x, wg), np.einsum("td,edi->tei", x, wu)
    h = g / (1 + np.exp(-g)) * u
    return np.einsum("te,ted->td", comb, np.einsum("tei,eid->ted", h, wd))


def routing(kind, T, k, E, rng):
    """idx [T, k] for the named routing pattern."""
    if kind == "uniform":
        return np.stack([rng.choice(E, k, replace=False) for _ in range(T)]).astype(np.int32)
    if kind == "skewed":                    # every token to expert E // 2 (first slot), others random
        idx = np.stack([rng.choice(np.r_[0:E // 2, E // 2 + 1:E], k, replace=False) for _ in range(T)])
        idx[:, 0] = E // 2
        return idx.astype(np.int32)
    if kind == "one_expert":                # every pair to one expert
        return np.full((T, k), E - 1, np.int32)
    if kind == "empty":                     # only experts 1, 2, 5 ever picked
        return np.stack([rng.choice([1, 2, 5], k, replace=False) for _ in range(T)]).astype(np.int32)
    if kind == "dropped":                   # ids of another device's experts (< 0 or >= E) are dropped
        idx = routing("uniform", T, k, E, rng)
        idx[rng.random((T, k)) < 0.3] = -1
        idx[rng.random((T, k)) < 0.2] = E + 3
        idx[0] = -2                         # a token with every pair dropped
        return idx
    raise AssertionError(kind)


def problem(T, k, E, d, I, kind, seed, dtype):
    rng = np.random.default_rng(seed)
    idx = routing(kind, T, k, E, rng)
    w = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    x = rng.standard_normal((T, d))
    wg, wu = (rng.standard_normal((E, d, I)) / np.sqrt(d) for _ in range(2))
    wd = rng.standard_normal((E, I, d)) / np.sqrt(I)
    npdt = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
    x, wg, wu, wd = (a.astype(npdt) for a in (x, wg, wu, wd))     # the oracle sees the rounded inputs
    return idx, w, x, wg, wu, wd


CASES = [  # (T, k, E, d, I, routing)
    (1, 4, 16, 32, 16, "uniform"),      # T = 1 (decode)
    (3, 2, 16, 32, 16, "uniform"),      # T * k < E: most experts empty
    (160, 4, 8, 32, 16, "uniform"),     # T * k >> E
    (64, 2, 8, 32, 16, "skewed"),       # every token to one expert
    (40, 2, 8, 32, 16, "one_expert"),   # every pair to one expert (the worst case of the static size)
    (50, 2, 8, 32, 16, "empty"),        # empty experts before, between and after used ones
    (48, 3, 8, 32, 16, "dropped"),      # dropped pairs (expert parallel), a token with none
    (24, 2, 4, 384, 256, "uniform"),    # several N and K tiles in tpu.py (128/256-column tiles)
]
# Pallas TPU interpret mode costs ~5 s a call on 2 cores: it runs these (every kind of block / tile
# situation once), the reference runs every case.
INTERPRET_CASES = {(1, "uniform", jnp.float32), (48, "dropped", jnp.float32), (160, "uniform", jnp.bfloat16),
                   (40, "one_expert", jnp.float32), (24, "uniform", jnp.float32)}


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("T,k,E,d,I,kind", CASES)
@pytest.mark.parametrize("block_m", [1, 8, 16])
@pytest.mark.parametrize("method", ["sort", "compare"])
def test_layout_invariants(T, k, E, d, I, kind, block_m, method):
    idx = routing(kind, T, k, E, np.random.default_rng(T))
    L = jax.tree.map(np.asarray, jax.jit(make_layout, static_argnums=(1, 2, 3))(jnp.asarray(idx), E, block_m, method))
    nb = num_blocks(T * k, E, block_m)
    P = nb * block_m
    assert L.block_m == block_m and L.row_token.shape == (P,) and L.block_expert.shape == (nb,)
    assert L.pair_row.shape == (T, k) and L.pair_row.dtype == np.int32 and L.row_token.dtype == np.int32
    valid = (idx >= 0) & (idx < E)
    # every kept pair exactly once, in a block of its own expert; dropped pairs point at the zero row P
    rows = L.pair_row[valid]
    assert len(set(rows.tolist())) == valid.sum() and rows.max(initial=0) < P
    assert (L.pair_row[~valid] == P).all()
    tok = np.broadcast_to(np.arange(T)[:, None], (T, k))
    assert (L.row_token[L.pair_row[valid]] == tok[valid]).all()
    assert (L.block_expert[L.pair_row[valid] // block_m] == idx[valid]).all()
    # padding rows (every row no pair went to) point at the zero token row T
    pad = np.ones(P, bool)
    pad[rows] = False
    assert (L.row_token[pad] == T).all()
    # used blocks first, in non-decreasing expert order, each holding >= 1 pair (its first row); -1 after
    used = int(L.num_used_blocks)
    assert (L.block_expert[used:] == -1).all() and (L.block_expert[:used] >= 0).all()
    assert (np.diff(L.block_expert[:used]) >= 0).all()
    assert (L.row_token[np.arange(used) * block_m] < T).all()
    assert used == sum(-(-int((idx == e).sum()) // block_m) for e in range(E))
    # stable: within an expert, rows follow the (token, slot) order
    for e in np.unique(idx[valid]):
        flat = np.flatnonzero(idx.reshape(-1) == e)
        assert (np.diff(L.pair_row.reshape(-1)[flat]) > 0).all()


@pytest.mark.parametrize("T,k,E,bm", [(1, 8, 256, 16), (16, 8, 256, 16), (7, 3, 5, 4), (64, 8, 32, 32)])
def test_layout_methods_build_the_same_layout(T, k, E, bm):
    """'compare' (decode sizes) and 'sort' give identical arrays, for uniform routings with dropped
    pairs and repeated experts at the flash model's E 256, k 8 (T 1, 16) and small shapes."""
    rng = np.random.default_rng(T + E)
    idx = rng.integers(-2, E + 2, (T, k)).astype(np.int32)
    f = jax.jit(make_layout, static_argnums=(1, 2, 3))
    a, b = (jax.tree.map(np.asarray, f(jnp.asarray(idx), E, bm, m)) for m in ("sort", "compare"))
    for name in ("row_token", "block_expert", "pair_row", "num_used_blocks"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.block_m == b.block_m == bm
    from lingjax.kernels.moe import gpu          # importable on the CPU (jax_triton only inside the kernels)
    assert gpu.pick_layout_method(T * k) == "compare" and gpu.pick_layout_method(4096 * 8) == "sort"


def test_sort_by_expert_packed_keys_match_stable_argsort():
    """layout._sort_by_expert: the packed single-operand sort (used while (E + 1) * n < 2^31) and the
    stable argsort (beyond) give the same order, ties in pair order."""
    from lingjax.kernels.moe.layout import _sort_by_expert
    key = jnp.asarray(np.random.default_rng(0).integers(0, 9, 300), jnp.int32)     # E = 8, 8 = dropped
    a, b = (jax.jit(_sort_by_expert, static_argnums=(1, 2))(key, 8, p) for p in (True, False))
    want = np.argsort(np.asarray(key), kind="stable")
    for order, ks in (a, b):
        assert (np.asarray(order) == want).all() and (np.asarray(ks) == np.asarray(key)[want]).all()


def test_layout_and_dispatch_errors():
    with pytest.raises(ValueError, match="unknown MoE kernel implementation 'bogus'"):
        moe.experts(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1)), jnp.zeros((3, 4, 2)),
                    jnp.zeros((3, 4, 2)), jnp.zeros((3, 2, 4)), impl="bogus")
    with pytest.raises(ValueError, match="unknown MoE kernel implementation"):
        MoE(tiny_config(), dtype=jnp.float32, rngs=nnx.Rngs(0), kernels="bogus")
    with pytest.raises(ValueError, match="do not fit"):
        moe.experts(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1)), jnp.zeros((3, 4, 2)),
                    jnp.zeros((3, 4, 2)), jnp.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="idx must be"):
        make_layout(jnp.zeros((4,), jnp.int32), 3, 8)
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        make_layout(jnp.zeros((4, 2), jnp.int32), 3, 8, "bogus")
    assert moe.resolve(None) == "reference"     # CPU backend


# ------------------------------------------------------------------------------------------ values
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
VALUE_PARAMS = ([c + (dt, "reference") for c in CASES for dt in TOL]
                + [c + (dt, "tpu_interpret") for c in CASES for dt in TOL if (c[0], c[-1], dt) in INTERPRET_CASES])


@pytest.mark.parametrize("T,k,E,d,I,kind,dtype,impl", VALUE_PARAMS)
def test_experts_match_float64_oracle(T, k, E, d, I, kind, dtype, impl):
    tol = TOL[dtype]
    idx, w, x, wg, wu, wd = problem(T, k, E, d, I, kind, seed=T * 7 + k, dtype=dtype)
    f = jax.jit(lambda *a: moe.experts(*a, impl=impl))
    got = f(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))
    assert got.dtype == dtype and got.shape == (T, d)
    want = oracle(x, idx, w, wg, wu, wd)
    assert rel(got, want) <= tol
    if kind == "dropped":
        assert float(jnp.abs(got[0].astype(jnp.float32)).max()) == 0.0     # every pair of token 0 dropped


@pytest.mark.parametrize("T,k,E,d,I,kind", [CASES[0], CASES[3], CASES[6]])
def test_experts_with_compare_layout_match_float64_oracle(T, k, E, d, I, kind):
    """The whole path with the comparison-built layout (what the GPU path runs at decode sizes)."""
    idx, w, x, wg, wu, wd = problem(T, k, E, d, I, kind, seed=T * 7 + k, dtype=jnp.float32)
    f = jax.jit(lambda *a: moe.experts(*a, impl="reference", layout_method="compare"))
    got = f(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))
    assert rel(got, oracle(x, idx, w, wg, wu, wd)) <= 1e-5


def test_experts_are_deterministic_with_bf16_activations_and_f32_weights():
    idx, w, x, wg, wu, wd = problem(64, 2, 8, 32, 16, "uniform", seed=1, dtype=jnp.float32)
    args = (jnp.asarray(x, jnp.bfloat16), jnp.asarray(idx), jnp.asarray(w),
            jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))           # float32 weights, bf16 activations
    a = np.asarray(jax.jit(moe.experts)(*args).astype(jnp.float32))
    b = np.asarray(jax.jit(moe.experts)(*args).astype(jnp.float32))
    np.testing.assert_array_equal(a, b)
    assert rel(a, oracle(np.asarray(args[0].astype(jnp.float32)), idx, w, wg, wu, wd)) <= 1e-2


# ------------------------------------------------------------------------------------------ gradient
def test_reference_gradient_matches_float64_oracle():
    """Training differentiates the reference path: gradients of x, the combine weights and the three
    expert stacks agree with the float64 dense oracle's (jax, x64) to float32 rounding, with an
    unused expert (zero gradient) and dropped pairs."""
    T, k, E, d, I = 48, 2, 8, 16, 8
    idx, w, x, wg, wu, wd = problem(T, k, E, d, I, "empty", seed=5, dtype=jnp.float32)   # experts 1, 2, 5
    idx[7, 1] = 11                                                       # a dropped pair
    idx[8, 0] = -1                                                       # another

    def dense(x, w, wg, wu, wd):
        valid = (idx >= 0) & (idx < E)
        comb = jnp.zeros((T, E), x.dtype).at[jnp.arange(T)[:, None], np.where(valid, idx, 0)].add(
            jnp.where(valid, w, 0))
        h = jax.nn.silu(jnp.einsum("td,edi->tei", x, wg)) * jnp.einsum("td,edi->tei", x, wu)
        return jnp.einsum("ted,te->td", jnp.einsum("tei,eid->ted", h, wd), comb)

    def grouped(x, w, wg, wu, wd):
        return moe.experts(x, jnp.asarray(idx), w, wg, wu, wd, impl="reference")

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))                  # noqa: E731
    grads = lambda f, a: jax.grad(loss(f), argnums=range(5))(*a)         # noqa: E731
    args = tuple(map(jnp.asarray, (x, w, wg, wu, wd)))
    with jax.enable_x64(True):
        a64 = tuple(jnp.asarray(np.asarray(a), jnp.float64) for a in args)
        want, g_want = np.asarray(jax.jit(dense)(*a64)), [np.asarray(g) for g in jax.jit(lambda *a: grads(dense, a))(*a64)]
    assert rel(jax.jit(grouped)(*args), want) <= 1e-5
    g = jax.jit(lambda *a: grads(grouped, a))(*args)
    for name, a, b in zip(("x", "w", "w_gate", "w_up", "w_down"), g, g_want):
        assert rel(a, b) <= 1e-5, name
    for unused in (0, 3, 4, 6, 7):
        assert all(float(jnp.abs(g[i][unused]).max()) == 0.0 for i in (2, 3, 4)), unused
    assert float(jnp.abs(g[1][7, 1])) == 0.0                             # the dropped pair's weight


# ------------------------------------------------------------------------------------------ expert parallel
@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices (XLA_FLAGS host device count)")
@pytest.mark.parametrize("tp,T,kernels", [(2, 40, None), (4, 3, None), (2, 3, "tpu_interpret")])
def test_moe_layer_under_tp_matches_unsharded(tp, T, kernels):
    """The model's MoE (routing, local experts by offset ids, shared expert, one psum) inside a
    shard_map over tp devices equals the unsharded layer (float32, 1e-5)."""
    cfg = tiny_config(num_experts=8, num_experts_per_tok=3)
    layer = MoE(cfg, dtype=jnp.float32, rngs=nnx.Rngs(2), kernels=kernels)
    rng = np.random.default_rng(T)
    layer.expert_bias[...] = jnp.asarray(rng.standard_normal(cfg.num_experts) * 0.1, jnp.float32)
    graphdef, state = nnx.split(layer)
    x = jnp.asarray(rng.standard_normal((T, cfg.hidden_size)), jnp.float32)
    want = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    mesh = sharding.make_mesh(tp)
    specs = jax.tree_util.tree_map_with_path(
        lambda kp, _: sharding.param_spec(("mlp",) + sharding._key_path(kp), cfg, tp), state)
    f = jax.jit(jax.shard_map(lambda s, x: nnx.merge(graphdef, s)(x), mesh=mesh,
                              in_specs=(specs, sharding.REPLICATED), out_specs=sharding.REPLICATED))
    got = f(state, x)
    assert rel(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------ TPU lowering
@pytest.mark.parametrize("T,dtype", [(1, jnp.bfloat16), (512, jnp.float32), (16384, jnp.bfloat16)])
def test_tpu_kernels_lower_for_tpu(T, dtype):
    """Pallas -> Mosaic TPU IR for a v5e (block shapes against the (8, 128) tiling, scalar-prefetch
    index maps): two kernels (gate_up, down), at tiled shapes (d 1024, I 512: 512-column tiles) and
    block_m 16 (T 1), 32 (T 512) and 512 (T 16384)."""
    from jax._src.mesh import AbstractDevice, AbstractMesh
    E, k, d, I = 64, 8, 1024, 512
    sd = jax.ShapeDtypeStruct
    args = (sd((T, d), dtype), sd((T, k), jnp.int32), sd((T, k), jnp.float32), sd((E, d, I), dtype),
            sd((E, d, I), dtype), sd((E, I, d), dtype))
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="TPU v5 lite", num_cores=1,
                                                                     platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(lambda *a: moe.experts(*a, impl="tpu")).trace(*args).lower(
            lowering_platforms=("tpu",)).as_text()
    assert text.count("lingjax_moe_gmm_tpu") >= 2 and text.count("tpu_custom_call") == 2
