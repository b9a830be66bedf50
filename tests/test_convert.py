"""`lingjax convert` / `lingjax export` on a tiny random checkpoint in the exact HF layout (bf16, two
shards + index, MTP layer): scoring a converted checkpoint is bitwise the same as scoring the HF
directory; export -> convert round-trips every tensor bitwise; bad sources and destinations fail with
one line naming the file or tensor and leave no DST behind."""
import contextlib
import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from lingjax import cli, convert as cv, weights
from lingjax.testing import tiny_config, write_tiny_checkpoint
from lingjax.weights import CheckpointReader, WeightError, load_hf, materialize, read_rule, rules_for

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    write_tiny_checkpoint(path, tiny_config(), seed=0, shards=2)
    return path


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("lj") / "tiny-lj")
    assert cli.main(["convert", hf, dst, "--no-progress"]) == 0
    return dst


def bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def leftovers(parent):
    return [f for f in os.listdir(parent) if ".lingjax-" in f]


# ------------------------------------------------------------------------------------------ results
def test_layout(hf, converted):
    files = sorted(os.listdir(converted))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", cv.MARKER):
        assert f in files
    assert open(os.path.join(converted, "config.json")).read() == open(os.path.join(hf, "config.json")).read()
    meta = json.load(open(os.path.join(converted, cv.MARKER)))
    assert meta["dtype"] == "bfloat16" and meta["mtp"] is True
    assert meta["summary"]["tensors"] == len(CheckpointReader(hf).names())
    assert not leftovers(os.path.dirname(converted))


def test_materialize_matches_rule_table(hf, monkeypatch):
    """The streaming fast path (`materialize`: per-expert fill, row blocks through a scratch buffer,
    XLA transposes) is bitwise the rule table's own `to_params` for every rule, with the numpy and
    the XLA transpose, whole tensors or a few rows at a time."""
    cfg, reader = tiny_config(), CheckpointReader(hf)
    for jax_min, block in ((weights.JAX_TRANSPOSE_MIN, weights.BLOCK_BYTES), (0, weights.BLOCK_BYTES), (0, 1000)):
        monkeypatch.setattr(weights, "JAX_TRANSPOSE_MIN", jax_min)
        monkeypatch.setattr(weights, "BLOCK_BYTES", block)
        for dtype in (jnp.bfloat16, jnp.float32):
            for rule in rules_for(cfg):
                want = rule.to_params(read_rule(reader, rule))
                got = materialize(reader, rule, dtype)
                for w, g in zip(want, got):
                    assert g.dtype == (np.float32 if rule.float32 else jnp.dtype(dtype))
                    assert g.shape == w.shape and g.flags.c_contiguous, rule.hf[0]
                    np.testing.assert_array_equal(bits(g), bits(np.asarray(w, g.dtype)), err_msg=rule.hf[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_then_forward_is_bitwise_hf(hf, converted, tmp_path, dtype):
    """Full forward (and the MTP head) of the converted checkpoint == of the HF directory, bitwise."""
    src = converted
    if dtype == "float32":           # stored as float32, loaded as float32
        src = str(tmp_path / "f32")
        cv.convert(hf, src, dtype="float32")
        assert json.load(open(os.path.join(src, cv.MARKER)))["dtype"] == "float32"
    cfg, m_hf = load_hf(hf, dtype=jnp.dtype(dtype))
    _, m_cv = cv.load_converted(src, jnp.dtype(dtype))
    assert m_cv.layers[2].mlp.expert_bias[...].dtype == jnp.float32
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 24)))
    a, b = m_hf(tokens), m_cv(tokens)
    np.testing.assert_array_equal(bits(a), bits(b))
    np.testing.assert_array_equal(bits(m_hf.mtp_logits(tokens, m_hf.hidden(tokens))),
                                  bits(m_cv.mtp_logits(tokens, m_cv.hidden(tokens))))


def test_convert_then_score_cli_is_bitwise_hf(hf, converted, tmp_path):
    """`lingjax score` (the engine's packed, chunked step) gives the same float32 logits bit for bit
    on the converted directory as on the HF one."""
    seqs = [[5, 9, 14, 3, 77, 40, 41], [8, 8, 20, 31]]
    tokens = tmp_path / "in.json"
    tokens.write_text(json.dumps(seqs))
    outs = []
    for model in (hf, converted):
        out = tmp_path / f"out{len(outs)}.npz"
        assert cli.main(["score", "--model", model, "--tokens", str(tokens), "--out", str(out), "--dtype", "float32",
                         "--prefill-chunk", "3", "--max-batch", "2"]) == 0
        outs.append(np.load(out))
    for i, s in enumerate(seqs):
        a, b = outs[0][f"logits_{i}"], outs[1][f"logits_{i}"]
        assert a.shape == (len(s), tiny_config().vocab_size) and a.dtype == np.float32
        np.testing.assert_array_equal(bits(a), bits(b))


def test_export_then_convert_round_trips_bitwise(hf, converted, tmp_path):
    exported = str(tmp_path / "exported")
    assert cli.main(["export", converted, exported, "--no-progress", "--shard-gb", str(300e3 / 2**30)]) == 0
    src, out = CheckpointReader(hf), CheckpointReader(exported)
    # names, shapes and dtypes equal the source's; the data too, bit for bit (read by safetensors itself)
    assert sorted(src.names()) == sorted(out.names())
    assert {n: src.meta[n] for n in src.names()} == {n: out.meta[n] for n in out.names()}
    files = sorted(f for f in os.listdir(exported) if f.endswith(".safetensors"))
    assert len(files) > 1 and os.path.isfile(os.path.join(exported, "model.safetensors.index.json"))
    theirs = {}
    for f in os.listdir(hf):
        if f.endswith(".safetensors"):
            theirs.update(load_file(os.path.join(hf, f)))
    ours = {}
    for f in files:
        ours.update(load_file(os.path.join(exported, f)))
    assert theirs.keys() == ours.keys()
    for n in theirs:
        assert theirs[n].dtype == ours[n].dtype, n
        np.testing.assert_array_equal(bits(theirs[n]), bits(ours[n]), err_msg=n)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(exported, f)).read() == open(os.path.join(hf, f)).read()
    # ... and converting the export again gives every param bit for bit
    again = str(tmp_path / "again")
    cv.convert(exported, again)
    _, m1 = cv.load_converted(converted)
    _, m2 = cv.load_converted(again)
    s1, s2 = jax.tree.leaves(nnx.state(m1)), jax.tree.leaves(nnx.state(m2))
    assert len(s1) == len(s2) > 80
    for a, b in zip(s1, s2):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(bits(a), bits(b))


def test_float32_export_restores_bf16_bits(hf, tmp_path):
    """convert --dtype float32, export --dtype bfloat16: the source's bf16 tensors exactly."""
    f32, back = str(tmp_path / "f32"), str(tmp_path / "back")
    cv.convert(hf, f32, dtype="float32", mtp=False)
    cv.export(f32, back, dtype="bfloat16")
    src, out = CheckpointReader(hf), CheckpointReader(back)
    cfg = tiny_config()
    names = [n for n in src.names() if not weights.is_mtp_name(cfg, n)]
    assert sorted(out.names()) == sorted(names)
    for n in names:
        np.testing.assert_array_equal(bits(src.get(n)), bits(out.get(n)), err_msg=n)


def test_sharded_restore_reads_each_shard(converted):
    """A converted checkpoint loads straight onto a mesh: Orbax restores each param with its target
    sharding (each device gets its own shard) and the values are the unsharded ones."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    devs = np.array(jax.devices()[:4])
    mesh = Mesh(devs, ("tp",))

    def sharding(path, shape, dtype):
        if path[-1] in ("w_gate", "w_up", "w_down"):
            return NamedSharding(mesh, P("tp", None, None))
        return None                              # the rest: host arrays through `place`
    placed = []
    _, m = cv.load_converted(converted, mtp=False, sharding=sharding,
                             place=lambda p, v: placed.append(p) or jnp.asarray(v))
    _, ref = cv.load_converted(converted, mtp=False)
    w = m.layers[2].mlp.w_up[...]
    assert w.sharding.spec == P("tp", None, None) and len(w.addressable_shards) == len(devs)
    assert w.addressable_shards[0].data.shape == (8 // len(devs), 64, 32)
    np.testing.assert_array_equal(bits(w), bits(ref.layers[2].mlp.w_up[...]))
    assert ("word_embeddings",) in placed and not any(p[-1] == "w_up" for p in placed)


def test_engine_load_model_detects_converted(converted):
    from lingjax.engine import load_model
    cfg, m = load_model(converted, jnp.float32)
    assert len(m.mtp) == 0 and m.word_embeddings[...].dtype == jnp.float32


def test_no_mtp(hf, tmp_path):
    dst = str(tmp_path / "nomtp")
    cv.convert(hf, dst, mtp=False)
    with pytest.raises(WeightError, match="without the MTP layer"):
        cv.load_converted(dst)
    _, m = cv.load_converted(dst, mtp=False)
    assert len(m.mtp) == 0
    # a source without the MTP tensors: the error says which flag to use
    src = str(tmp_path / "src")
    write_tiny_checkpoint(src, tiny_config(), mtp=False, shards=1)
    with pytest.raises(WeightError, match=r"missing tensor model\.layers\.4\.enorm\.weight .*--no-mtp"):
        cv.convert(src, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")


# ------------------------------------------------------------------------------------------ errors
def run_cli_error(capsys, argv, *patterns):
    rc = cli.main(argv)
    out = capsys.readouterr().err
    assert rc == 1, out
    assert "Traceback" not in out
    err = [line for line in out.splitlines() if line.startswith("lingjax: error: ")]
    assert len(err) == 1 and out.strip().splitlines()[-1] == err[0], out
    for p in patterns:
        assert p in err[0], (p, err[0])
    return err[0]


def edit_shard(src, dst, fn, name="model.layers.2.attention.g_proj.weight"):
    shutil.copytree(src, dst)
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    shard = os.path.join(dst, index["weight_map"][name])
    tensors = load_file(shard)
    fn(tensors, name)
    save_file(tensors, shard, metadata={"format": "pt"})
    return str(dst)


def test_truncated_shard(hf, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf, src)
    shard = src / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    dst = tmp_path / "out"
    run_cli_error(capsys, ["convert", str(src), str(dst)], "model-00002-of-00002.safetensors", "truncated")
    assert not dst.exists() and not leftovers(tmp_path)


def test_missing_tensor(hf, tmp_path, capsys):
    src = edit_shard(hf, tmp_path / "src", lambda t, n: t.pop(n))
    dst = tmp_path / "out"
    run_cli_error(capsys, ["convert", src, str(dst)], "missing tensor model.layers.2.attention.g_proj.weight")
    assert not dst.exists() and not leftovers(tmp_path)


def test_wrong_shape(hf, tmp_path, capsys):
    src = edit_shard(hf, tmp_path / "src", lambda t, n: t.__setitem__(n, t[n][:, :32].copy()))
    dst = tmp_path / "out"
    run_cli_error(capsys, ["convert", src, str(dst)], "model.layers.2.attention.g_proj.weight", "[64, 32]")
    assert not dst.exists() and not leftovers(tmp_path)


def test_wrong_dtype(hf, tmp_path, capsys):
    name = "model.layers.3.mlp.experts.5.up_proj.weight"
    src = edit_shard(hf, tmp_path / "src", lambda t, n: t.__setitem__(n, t[n].view(np.int16)), name)
    dst = tmp_path / "out"
    run_cli_error(capsys, ["convert", src, str(dst)], name, "dtype")
    assert not dst.exists()


def test_config_disagrees_with_weights(hf, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(hf, src)
    cfg = json.load(open(src / "config.json"))
    cfg["moe_intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    dst = tmp_path / "out"
    run_cli_error(capsys, ["convert", str(src), str(dst)], "model.layers.1.mlp.experts.0.gate_proj.weight",
                  "[32, 64]", "[48, 64]", "config.json")
    assert not dst.exists() and not leftovers(tmp_path)
    cfg["num_hidden_layers"] = 3                   # not a multiple of layer_group_size: names config.json
    (src / "config.json").write_text(json.dumps(cfg))
    run_cli_error(capsys, ["convert", str(src), str(dst)], str(src / "config.json"), "num_hidden_layers")
    assert not dst.exists()


@contextlib.contextmanager
def read_only_dir(path):
    """Make the directory path unwritable in a way root respects too: the immutable attribute
    (`chattr +i`, ext4 / xfs / btrfs with CAP_LINUX_IMMUTABLE), else permission bits (which stop
    only non-root users). Yields a description of the mechanism, or None when neither applies."""
    immutable = shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if immutable:
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        return
    os.chmod(path, 0o555)
    try:
        yield None if os.access(path, os.W_OK) else "chmod 0555"
    finally:
        os.chmod(path, 0o755)


def test_unwritable_dst(hf, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    dst = blocker / "out"                          # its parent is a file: nothing can be created there
    run_cli_error(capsys, ["convert", hf, str(dst)], str(dst))
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_dir(ro) as how:
        if how is None:
            pytest.skip("root on a filesystem without chattr +i: no read-only directory at hand")
        run_cli_error(capsys, ["convert", hf, str(ro / "out")], str(ro / "out"))
        assert os.listdir(ro) == []


def test_existing_dst_refused_then_overwritten(hf, converted, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    run_cli_error(capsys, ["convert", hf, str(dst)], str(dst), "--overwrite")
    run_cli_error(capsys, ["convert", hf, str(dst), "--overwrite"], "not a checkpoint")   # never deletes a stranger
    assert (dst / "keep.txt").read_text() == "mine"
    shutil.rmtree(dst)
    shutil.copytree(converted, dst)
    (dst / "stale.txt").write_text("old")
    assert cli.main(["convert", hf, str(dst), "--overwrite", "--no-progress"]) == 0
    assert not (dst / "stale.txt").exists() and cv.is_converted(str(dst)) and not leftovers(tmp_path)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_midway_leaves_dst_as_it_was(hf, converted, tmp_path, capsys, monkeypatch, exc):
    """A write that fails (disk full) or is interrupted after some items: no DST, or the old DST
    untouched, and no temporary directory left."""
    import orbax.checkpoint as ocp
    calls = [0]
    real_save = ocp.Checkpointer.save

    def failing_save(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise exc
        return real_save(self, *a, **k)
    monkeypatch.setattr(ocp.Checkpointer, "save", failing_save)
    dst = tmp_path / "out"
    if isinstance(exc, KeyboardInterrupt):
        assert cli.main(["convert", hf, str(dst)]) == 130
    else:
        run_cli_error(capsys, ["convert", hf, str(dst)], "No space left on device", str(dst))
    assert not dst.exists() and not leftovers(tmp_path)
    shutil.copytree(converted, dst)
    before = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs}
    calls[0] = 0
    assert cli.main(["convert", hf, str(dst), "--overwrite", "--dtype", "float32"]) in (1, 130)
    after = {f: os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs}
    assert before == after and not leftovers(tmp_path)
    assert json.load(open(dst / cv.MARKER))["dtype"] == "bfloat16"


def test_not_a_checkpoint(tmp_path, capsys, converted):
    run_cli_error(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")], "nope")
    run_cli_error(capsys, ["convert", converted, str(tmp_path / "out")], "already a lingjax checkpoint")
    run_cli_error(capsys, ["export", str(tmp_path), str(tmp_path / "out")], cv.MARKER)
    assert not (tmp_path / "out").exists()


def test_killed_run_leaves_no_dst_and_the_next_run_cleans_up(hf, tmp_path, capsys):
    """SIGKILL in the middle of writing (no cleanup code runs): DST is absent and the temporary
    directory, named for the dead process, is left; the next run removes it (one log line) and
    succeeds, leaving no temporary directories. A live run's temporary directory is not touched,
    and an old DST moved aside by a run killed while swapping is put back."""
    import subprocess
    import sys
    dst = tmp_path / "out"
    script = ("import sys, time\nimport lingjax.convert as cv\nreal = cv._drop_cache\n"
              "def stall(p):\n    real(p)\n    print('WRITING', flush=True)\n    time.sleep(600)\n"
              "cv._drop_cache = stall\ncv.convert(sys.argv[1], sys.argv[2])\n")
    p = subprocess.Popen([sys.executable, "-c", script, hf, str(dst)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "WRITING"
        left = leftovers(tmp_path)
        assert len(left) == 1 and f"-{p.pid}-" in left[0] and os.listdir(tmp_path / left[0] / "params")
    finally:
        p.kill()
        p.wait()
    assert not dst.exists() and leftovers(tmp_path) == left

    host = cv._owner_tag().rsplit("-", 1)[0]
    live = tmp_path / f".out.lingjax-tmp-{host}-{os.getpid()}-abcd1234"       # this process: alive
    other = tmp_path / f".out.lingjax-tmp-otherhost-{p.pid}-abcd1234"          # another host's
    unrelated = tmp_path / f".other.lingjax-tmp-{host}-{p.pid}-abcd1234"       # another DST's
    for d in (live, other, unrelated):
        d.mkdir()
    assert cli.main(["convert", hf, str(dst), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert cv.is_converted(str(dst)) and not (tmp_path / left[0]).exists()
    assert [line for line in err.splitlines() if "removed" in line and left[0] in line and str(p.pid) in line]
    assert sorted(leftovers(tmp_path)) == sorted(d.name for d in (live, other, unrelated))

    # killed between moving the old DST aside and renaming the new one into place
    marker = json.load(open(dst / cv.MARKER))
    old = tmp_path / f".out.lingjax-old-{host}-{p.pid}-abcd1234"
    old.mkdir()
    os.rename(dst, old / "x")
    assert cv.remove_stale(str(dst)) == [str(old)]
    assert json.load(open(dst / cv.MARKER)) == marker and not old.exists()
