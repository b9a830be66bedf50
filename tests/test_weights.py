"""Loading a tiny random model written in the exact HF layout (bf16 safetensors, two shards +
index, MTP layer), and the named errors for missing, renamed and misshapen tensors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lingjax.testing import tiny_config, write_tiny_checkpoint
from lingjax.weights import CheckpointReader, WeightError, hf_tensors, load_hf

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny"))
    write_tiny_checkpoint(path, tiny_config(), seed=0, shards=2)
    return path


def test_layout(ckpt):
    files = sorted(os.listdir(ckpt))
    assert "model.safetensors.index.json" in files
    assert [f for f in files if f.endswith(".safetensors")] == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]
    names = CheckpointReader(ckpt).names()
    assert "model.layers.4.eh_proj.weight" in names                     # MTP layer at L = 4
    assert "model.layers.1.attention.kv_b_proj.weight" in names         # MLA at 1, 3
    assert "model.layers.0.attention.query_key_value.weight" in names   # linear at 0, 2
    assert "model.layers.0.mlp.gate_proj.weight" in names               # dense first layer
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in names


def test_loads_and_runs(ckpt):
    cfg, m32 = load_hf(ckpt, dtype=jnp.float32)
    _, m16 = load_hf(ckpt, dtype=jnp.bfloat16)
    assert m16.mtp[0].eh_proj.kernel[...].dtype == jnp.bfloat16
    assert m16.layers[2].mlp.expert_bias[...].dtype == jnp.float32      # never rounded to bf16
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 40)))
    l32, l16 = m32(tokens), m16(tokens)
    assert l32.dtype == l16.dtype == jnp.float32 and l32.shape == (2, 40, cfg.vocab_size)
    assert np.isfinite(np.asarray(l32)).all()
    # bf16 activations follow the float32 run to bf16 accuracy for the typical token (~1e-2
    # relative after 4 layers); a few tokens whose bf16 router picks another expert diverge more,
    # which is why this bounds the median token and not the worst one.
    a32, a16 = np.asarray(l32), np.asarray(l16)
    err = np.linalg.norm(a16 - a32, axis=-1) / np.linalg.norm(a32, axis=-1)
    assert np.median(err) < 3e-2
    mtp = m32.mtp_logits(tokens, m32.hidden(tokens))
    assert mtp.shape == l32.shape and np.isfinite(np.asarray(mtp)).all()
    # The weights round-trip: params -> HF tensors reproduces the checkpoint bit for bit.
    reader = CheckpointReader(ckpt)
    for name, t in hf_tensors(cfg, m32):
        np.testing.assert_array_equal(t.astype(np.float32), reader.get(name).astype(np.float32), err_msg=name)


def edit_shard(src, dst, fn):
    shutil.copytree(src, dst)
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    name = "model.layers.2.attention.g_proj.weight"
    shard = os.path.join(dst, index["weight_map"][name])
    tensors = load_file(shard)
    fn(tensors, name)
    save_file(tensors, shard)
    return str(dst)


def test_missing_tensor(ckpt, tmp_path):
    path = edit_shard(ckpt, tmp_path / "c", lambda t, n: t.pop(n))
    with pytest.raises(WeightError, match=r"missing tensor model\.layers\.2\.attention\.g_proj\.weight \(expected shape \[64, 64\]\)"):
        load_hf(path)


def test_renamed_tensor(ckpt, tmp_path):
    path = edit_shard(ckpt, tmp_path / "c", lambda t, n: t.__setitem__(n.replace("g_proj", "gate_proj"), t.pop(n)))
    with pytest.raises(WeightError, match=r"g_proj\.weight"):
        load_hf(path)
    # ... and with the missing one put back, the stray name is reported as unexpected.
    def add_stray(t, n):
        t["model.layers.2.attention.gate_projx.weight"] = t[n]
    path2 = edit_shard(ckpt, tmp_path / "d", add_stray)
    with pytest.raises(WeightError, match=r"unexpected tensor model\.layers\.2\.attention\.gate_projx\.weight"):
        load_hf(path2)


def test_misshapen_tensor(ckpt, tmp_path):
    path = edit_shard(ckpt, tmp_path / "c", lambda t, n: t.__setitem__(n, t[n][:, :32].copy()))
    with pytest.raises(WeightError, match=r"tensor model\.layers\.2\.attention\.g_proj\.weight has shape \[64, 32\], expected \[64, 64\]"):
        load_hf(path)


def test_truncated_shard(ckpt, tmp_path):
    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    shard = dst / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match="model-00002-of-00002.safetensors"):
        load_hf(str(dst))


def test_without_mtp_weights_loads_with_mtp_disabled(tmp_path):
    cfg = tiny_config()
    write_tiny_checkpoint(str(tmp_path), cfg, mtp=False, shards=1)
    with pytest.raises(WeightError, match=r"missing tensor model\.layers\.4\.enorm\.weight"):
        load_hf(str(tmp_path))
    _, model = load_hf(str(tmp_path), mtp=False, dtype=jnp.float32)
    assert len(model.mtp) == 0
