"""Tensor parallelism (lingjax.sharding): tp = 2, 4, 8 against tp = 1 on 8 simulated CPU devices.

The model: a tiny random float32 checkpoint with 8 heads, 4 GroupRMSNorm groups, 8 experts, biases on
every projection that may carry one (so the row-parallel bias rule is exercised) and a vocabulary of
128 (so the lm_head is vocab-sharded). tp = 2, 4 keep whole norm groups on a device; tp = 8 splits each
group over two devices (the cross-device norm). A second config (the default tiny one: 4 heads, 2
groups, vocab 98) covers the replicated-lm_head fallback.

Checks: full forward and engine score logits agree with tp = 1 within 1e-5 relative; greedy generate
is identical; the engine's invariance to chunking / batching / packing order holds at tp = 4; params
and caches really are sharded; bad tp values get one-line errors; and two processes on localhost
(4 CPU devices each, JAX's distributed runtime) run a tp = 8 `lingjax score` that matches tp = 1.
"""
import json
import os
import socket
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from lingjax import sharding  # noqa: E402
from lingjax.engine import Engine, EngineError, SamplingParams, load_model  # noqa: E402
from lingjax.model import BailingModel  # noqa: E402
from lingjax.testing import tiny_config, write_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS host device count)")

MAX_LEN = 96
LENGTHS = (1, 33, 8, 17, 5, 12)
TP_CFG = dict(num_attention_heads=8, group_norm_size=4, vocab_size=128, use_bias=True, use_qkv_bias=True)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(out, ref):
    return max(float(np.abs(np.asarray(o) - r).max() / np.abs(r).max()) for o, r in zip(out, ref))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp_ckpt"))
    write_tiny_checkpoint(d, tiny_config(**TP_CFG), seed=3, dtype=np.float32, shards=2)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, jnp.float32)[1]


@pytest.fixture(scope="module")
def seqs(model):
    rng = np.random.default_rng(7)
    return [rng.integers(3, model.cfg.vocab_size, n).tolist() for n in LENGTHS]


def jit_forward(m):
    graphdef, state = nnx.split(m)
    f = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
    return lambda tokens: np.asarray(f(state, jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def refs(model, seqs):
    """tp = 1 full forward (no cache, no engine, no shard_map), all sequences in one right-padded batch
    (the model is causal, so padding after a sequence does not change its logits)."""
    T = max(LENGTHS)
    logits = jit_forward(model)([s + [0] * (T - len(s)) for s in seqs])
    return [logits[i, :n] for i, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def mesh4():
    return sharding.make_mesh(4)


@pytest.fixture(scope="module")
def model4(ckpt, mesh4):
    """The real tp path: params placed shard by shard at load. Engines of one model and mesh share
    their compiled steps, so the tp = 4 tests below compile each step shape once."""
    return load_model(ckpt, jnp.float32, mesh=mesh4)[1]


@pytest.fixture(scope="module")
def greedy1(model, seqs):
    eng = Engine(model, max_batch=3, prefill_chunk=5, max_len=MAX_LEN)
    return [o.token_ids for o in eng.generate(seqs, SamplingParams(max_new_tokens=6, ignore_eos=True))]


# ------------------------------------------------------------------------------------------ specs, errors
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_every_param_has_a_spec_that_divides(tp):
    cfg = tiny_config(**TP_CFG)
    abstract = nnx.eval_shape(lambda: BailingModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))   # MTP included
    _, state = nnx.split(abstract)
    specs = sharding.state_specs(state, cfg, tp)
    leaves = jax.tree.leaves(state)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves)
    n_sharded = 0
    for x, s in zip(leaves, spec_leaves):
        for dim, ax in zip(x.shape, s):
            if ax == "tp":
                assert dim % tp == 0
                n_sharded += 1
    assert n_sharded > 20
    with pytest.raises(sharding.ShardingError, match="no partition rule"):
        sharding.param_spec(("layers", 0, "attention", "mystery", "kernel"), cfg, tp)


def test_bad_tp_is_refused_with_a_clear_error(model):
    with pytest.raises(sharding.ShardingError, match=r"tp=3 does not divide num_attention_heads=8"):
        sharding.check_tp(model.cfg, 3)
    with pytest.raises(sharding.ShardingError, match=r"num_experts=6"):
        sharding.check_tp(tiny_config(num_experts=6, n_group=3, num_attention_heads=8), 4)
    with pytest.raises(EngineError, match="tp=16 needs 16 devices"):
        Engine(model, tp=16)


def test_cli_refuses_bad_tp(ckpt, tmp_path, capsys):
    from lingjax import cli
    toks = tmp_path / "in.json"
    toks.write_text(json.dumps([[5, 6, 7]]))
    base = ["score", "--model", ckpt, "--tokens", str(toks), "--out", str(tmp_path / "o.npz")]
    assert cli.main(base + ["--tp", "3"]) == 1
    assert "tp=3 does not divide num_attention_heads=8" in capsys.readouterr().err
    assert cli.main(base + ["--tp", "16"]) == 1
    assert "--tp 16 needs 16 devices" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


# ------------------------------------------------------------------------------------------ full forward
@pytest.mark.parametrize("variant", ["tp_cfg", "default_tiny"])
def test_full_forward_matches_tp1(variant, model, seqs, refs):
    if variant == "tp_cfg":
        m, tokens, tps = model, jnp.asarray([seqs[3][:12], seqs[5]]), (2, 4, 8)
    else:   # 4 heads, 2 groups (tp=4 splits groups), vocab 98 (lm_head replicated), no biases
        m = BailingModel(tiny_config(), dtype=jnp.float32, rngs=nnx.Rngs(5))
        tokens, tps = jnp.asarray(np.random.default_rng(0).integers(0, 98, (2, 13))), (4,)
    ref = jit_forward(m)(tokens)
    graphdef, state = nnx.split(m)
    for tp in tps:
        mesh = sharding.make_mesh(tp)
        fwd = jax.jit(sharding.shard_forward(graphdef, m.cfg, mesh))
        out = fwd(sharding.shard_state(state, m.cfg, mesh), tokens)
        assert out.shape == ref.shape
        assert rel_err([out], [ref]) <= 1e-5, tp


# ------------------------------------------------------------------------------------------ sharded load
def test_sharded_load_places_each_param_on_its_devices(model4, mesh4, model):
    cfg, m4, mesh = model4.cfg, model4, mesh4
    H, D, d, E = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size, cfg.num_experts
    cases = {
        ("layers", 0, "attention", "q_proj", "kernel"): (d, H * D // 4),
        ("layers", 0, "attention", "g_norm", "weight"): (H * D // 4,),
        ("layers", 0, "attention", "dense", "kernel"): (H * D // 4, d),
        ("layers", 0, "attention", "dense", "bias"): (d,),
        ("layers", 0, "mlp", "down_proj", "kernel"): (cfg.intermediate_size // 4, d),
        ("layers", 1, "attention", "kv_b_proj", "kernel"): (cfg.kv_lora_rank, H * 32 // 4),
        ("layers", 1, "attention", "kv_a_proj_with_mqa", "kernel"): (d, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
        ("layers", 1, "mlp", "w_up"): (E // 4, d, cfg.moe_intermediate_size),
        ("layers", 1, "mlp", "gate"): (d, E),
        ("lm_head",): (d, cfg.vocab_size // 4),
        ("word_embeddings",): (cfg.vocab_size, d),
    }
    from lingjax.weights import get_param
    for path, local in cases.items():
        x = get_param(m4, path)
        assert len(x.sharding.device_set) == 4, path
        assert {s.data.shape for s in x.addressable_shards} == {local}, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(get_param(model, path)))
    caches = sharding.init_caches(cfg, mesh, 3, 6, 8)
    assert len(caches.linear) == len(cfg.linear_layers) and len(caches.mla) == len(cfg.mla_layers)
    for lin in caches.linear:
        assert {s.data.shape for s in lin.addressable_shards} == {(3, H // 4, D, D)}
    assert all(m.sharding.is_fully_replicated and m.shape[:2] == (6, 8) for m in caches.mla)


# ------------------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_engine_score_and_greedy_generate_match_tp1(tp, model, model4, mesh4, seqs, refs, greedy1):
    if tp == 4:     # params loaded sharded
        m, kw = model4, dict(mesh=mesh4)
    else:           # a single-device model, resharded by the engine
        m, kw = model, dict(tp=tp)
    eng = Engine(m, max_batch=3, prefill_chunk=5, max_len=MAX_LEN, **kw)
    if tp > 1:
        assert {s.data.shape[1] for lin in eng.caches.linear for s in lin.addressable_shards} == {8 // tp}
    out = eng.score(seqs)
    assert [o.shape for o in out] == [(n, 128) for n in LENGTHS]
    assert rel_err(out, refs) <= 1e-5
    gen = eng.generate(seqs, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in gen] == greedy1


@pytest.mark.parametrize("chunk,max_batch,order", [(1, 3, "first"), (5, 3, "last"), (5, 3, "first"),
                                                   (16, 1, "first")])
def test_engine_mixed_batch_invariance_tp4(chunk, max_batch, order, model4, mesh4, seqs, refs):
    """The engine issue's invariance check (SPEC §7.1) at tp = 4: a request's logits do not depend on
    chunking, batching or packing order; every step is sharded over 4 devices."""
    eng = Engine(model4, mesh=mesh4, max_batch=max_batch, prefill_chunk=chunk, max_len=MAX_LEN, decode_order=order)
    steps = []
    pack = eng._pack
    eng._pack = lambda pieces: (steps.append([n for _, n in pieces]), pack(pieces))[1]
    out = eng.score(seqs)
    assert rel_err(out, refs) <= 1e-5
    if chunk == 1:
        assert all(set(s) == {1} for s in steps)
    if max_batch > 1 and chunk > 1:
        mixed = [s for s in steps if 1 in s and any(n > 1 for n in s)]
        assert mixed
        for s in mixed:
            ones = [n == 1 for n in s]
            assert ones == sorted(ones, reverse=(order == "first"))


# ------------------------------------------------------------------------------------------ multi-host
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_tp8_score_matches_tp1(ckpt, seqs, refs, tmp_path):
    """Two processes x 4 CPU devices, coordinator on 127.0.0.1, `lingjax score --tp 8`: the model is
    loaded shard by shard on 8 devices of 2 processes; process 0 writes the logits."""
    toks = tmp_path / "in.json"
    toks.write_text(json.dumps(seqs))
    out = tmp_path / "out.npz"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "lingjax.cli", "score", "--model", ckpt, "--tokens", str(toks), "--out", str(out),
               "--dtype", "float32", "--tp", "8", "--max-batch", "3", "--prefill-chunk", "5", "--max-len", str(MAX_LEN),
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    got = np.load(out)
    assert sorted(got.files) == [f"logits_{i}" for i in range(len(seqs))]
    assert rel_err([got[f"logits_{i}"] for i in range(len(seqs))], refs) <= 1e-5
