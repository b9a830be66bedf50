"""The engine's invariance tests with the Pallas linear-attention kernels behind the dispatch point
(issue 6 item 4): on this CPU the GPU kernels (raw Triton) run in Triton's interpreter and the TPU
(Mosaic) kernels in Pallas interpret mode. Score logits must equal the model-core full forward (float32, <= 1e-5 relative) with
prefill chunks and decodes mixed in one step, decodes packed first or last."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lingjax import engine as engine_lib
from lingjax.engine import Engine, EngineError
from lingjax.testing import write_tiny_checkpoint
from lingjax.weights import load_hf

LENGTHS = (1, 20, 9, 3, 12)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    write_tiny_checkpoint(str(d), seed=3, dtype=np.float32, shards=1)
    return load_hf(str(d), dtype=jnp.float32, mtp=False)[1]


@pytest.mark.parametrize("impl", ["gpu_interpret", "tpu_interpret"])
def test_engine_score_with_kernels(model, impl):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in LENGTHS]
    T = max(LENGTHS)
    tokens = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    for order in ("first", "last"):
        eng = Engine(model, max_batch=3, prefill_chunk=5, max_len=32, decode_order=order, kernels=impl)
        out = eng.score(seqs)
        for i, (o, n) in enumerate(zip(out, LENGTHS)):
            ref = full[i, :n]
            assert np.abs(o - ref).max() / np.abs(ref).max() <= 1e-5, (impl, order, i)


def test_engine_passes_its_kernels_option_to_the_dispatch(model, monkeypatch):
    """Guards the test above: the engine's `kernels` reaches the dispatch point (a bogus value put on the
    model's layers fails when the step is traced), so the interpret runs do go through the Pallas
    kernels; the engine refuses a bogus option itself; the caller's model is left unchanged."""
    with pytest.raises(EngineError, match="kernels must be None or one of"):
        Engine(model, max_batch=2, prefill_chunk=4, max_len=16, kernels="bogus")
    monkeypatch.setattr(engine_lib, "KERNELS", engine_lib.KERNELS + ("bogus",))
    eng = Engine(model, max_batch=2, prefill_chunk=4, max_len=16, kernels="bogus")
    assert model.layers[0].attention.kernels is None and eng.model.layers[0].attention.kernels == "bogus"
    with pytest.raises(ValueError, match="bogus"):
        eng.score([[5, 6, 7], [8]])


def test_engine_score_with_mosaic_gpu_kernels(tmp_path):
    """kernels="mosaic_gpu" in the engine (Mosaic GPU interpret mode): the engine feeds the
    kernels float32 q/k/v (SPEC §2.2), which the Mosaic decode takes (head dim a multiple of 64, so
    a model with head_dim 64) and its prefill leaves to the Triton kernels' f32 path. Lengths 9, 9, 1
    with chunks of 8 and two rows: steps (8, 8), then (1, 1) and (1), decode-only (the decode kernel;
    a fresh slot in the last). Scores equal the full forward (<= 1e-5 relative)."""
    from lingjax.testing import tiny_config
    cfg = tiny_config(head_dim=64, num_attention_heads=2, num_key_value_heads=2)
    write_tiny_checkpoint(str(tmp_path), cfg, seed=5, shards=1)
    model = load_hf(str(tmp_path), dtype=jnp.float32, mtp=False)[1]
    rng = np.random.default_rng(1)
    lengths = (9, 9, 1)
    seqs = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in lengths]
    tokens = np.zeros((len(seqs), max(lengths)), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    out = Engine(model, max_batch=2, prefill_chunk=8, max_len=32, kernels="mosaic_gpu_interpret").score(seqs)
    for i, (o, n) in enumerate(zip(out, lengths)):
        ref = full[i, :n]
        assert np.abs(o - ref).max() / np.abs(ref).max() <= 1e-5, i


def test_model_and_cli_kernels_option(monkeypatch):
    """BailingModel(kernels=) reaches every linear-attention layer; the CLI's --kernels defaults to
    $LINGJAX_KERNELS (the only use of that variable) and reaches the engine."""
    from flax import nnx as _nnx
    from lingjax import cli
    from lingjax.model import BailingModel, LinearAttention
    from lingjax.testing import tiny_config
    m = BailingModel(tiny_config(), dtype=jnp.float32, rngs=_nnx.Rngs(0), mtp=True, kernels="tpu_interpret")
    las = [x for _, x in _nnx.iter_modules(m) if isinstance(x, LinearAttention)]
    assert las and all(x.kernels == "tpu_interpret" for x in las)
    assert cli.build_parser().parse_args(["generate", "--prompt", "x"]).kernels is None
    assert cli.build_parser().parse_args(["generate", "--prompt", "x", "--kernels", "gpu"]).kernels == "gpu"
    monkeypatch.setenv("LINGJAX_KERNELS", "reference")
    assert cli.build_parser().parse_args(["bench"]).kernels == "reference"

