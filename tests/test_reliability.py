"""Issue 20: what a new user ran into, each as a test that failed before its fix.

Paths relative to the working directory (defect 1); --out / --json written only to a regular file or a
new path, through a symlink to its target, with umask permissions (2); NaN / Inf weights refused on
load and convert (4); Ctrl-C and SIGTERM (6); one-line errors for bad input (7); the converted
checkpoint's item dirs stay inside it (8). main() runs in-process; the signal tests run a subprocess."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lingjax import bench, cli, convert as cv
from lingjax.testing import write_tiny_checkpoint

FAST = ["--dtype", "float32", "--prefill-chunk", "4", "--max-batch", "2"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rel") / "tiny")
    write_tiny_checkpoint(d, seed=3, dtype=np.float32)
    return d


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("relc") / "conv")
    assert cli.main(["convert", hf, dst, "--dtype", "float32", "--no-progress"]) == 0
    return dst


def run(capsys, argv):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, want_rc, *want):
    assert rc == want_rc, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lingjax: error: "), err
    for w in want:
        assert w in lines[0], lines[0]
    return lines[0]


def last_line_error(rc, err, want_rc, *want):
    """As one_line_error, for convert / export, which log their plan (one INFO line) before failing."""
    assert rc == want_rc and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("lingjax: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for w in want:
        assert w in errors[0], errors[0]


def leftovers(parent):
    return [f for f in os.listdir(parent) if ".lingjax-" in f]


# ------------------------------------------------------------------------------------------ defect 1
def test_relative_paths(hf, tmp_path, monkeypatch, capsys):
    """convert to a relative DST, then generate / score / export / --model . from relative paths."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(hf, "src")
    os.mkdir("c4")
    assert run(capsys, ["convert", "src", "c4/conv", "--dtype", "float32", "--no-progress"])[0] == 0
    want = run(capsys, ["generate", "--model", hf, "--prompt", "12+3=", "--max-new-tokens", "4"] + FAST)
    assert want[0] == 0, want[2]
    assert run(capsys, ["generate", "--model", "c4/conv", "--prompt", "12+3=", "--max-new-tokens", "4"] + FAST)[:2] \
        == want[:2]
    with open("in.json", "w") as f:
        json.dump([[5, 6, 7]], f)
    rc, _, err = run(capsys, ["score", "--model", "c4/conv", "--tokens", "in.json", "--out", "o.npz"] + FAST)
    assert rc == 0 and np.load("o.npz")["logits_0"].shape == (3, 98), err
    assert run(capsys, ["export", "c4/conv", "exp", "--no-progress"])[0] == 0
    assert load_file("exp/model.safetensors").keys() >= {"lm_head.weight"}
    monkeypatch.chdir(tmp_path / "c4" / "conv")
    assert run(capsys, ["generate", "--model", ".", "--prompt", "12+3=", "--max-new-tokens", "4"] + FAST)[:2] \
        == want[:2]


# ------------------------------------------------------------------------------------------ defect 2
def score_to(capsys, hf, tmp_path, out):
    (tmp_path / "in.json").write_text("[[5, 6, 7]]")
    return run(capsys, ["score", "--model", hf, "--tokens", str(tmp_path / "in.json"), "--out", str(out)] + FAST)


def test_out_is_never_a_fifo_and_follows_symlinks(hf, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rc, _, err = score_to(capsys, hf, tmp_path, fifo)
    one_line_error(rc, err, 1, f"--out {fifo}: not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    link_to_fifo = tmp_path / "to_fifo"
    link_to_fifo.symlink_to(fifo)
    one_line_error(*score_to(capsys, hf, tmp_path, link_to_fifo)[::2], 1, "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link_to_fifo.is_symlink()

    real = tmp_path / "real.npz"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.npz"
    link.symlink_to(real)
    assert score_to(capsys, hf, tmp_path, link)[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(real)      # the link stays, its target is written
    assert np.load(real)["logits_0"].shape == (3, 98)
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o640              # a replaced file keeps its mode
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "new_target.npz")
    assert score_to(capsys, hf, tmp_path, dangling)[0] == 0
    assert dangling.is_symlink() and np.load(tmp_path / "new_target.npz")["logits_0"].shape == (3, 98)
    assert not leftovers(tmp_path)


def test_out_gets_umask_permissions(hf, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert score_to(capsys, hf, tmp_path, tmp_path / "a.npz")[0] == 0
        assert stat.S_IMODE(os.stat(tmp_path / "a.npz").st_mode) == 0o640
        os.umask(0o022)
        assert score_to(capsys, hf, tmp_path, tmp_path / "b.npz")[0] == 0
        assert stat.S_IMODE(os.stat(tmp_path / "b.npz").st_mode) == 0o644
    finally:
        os.umask(old)


def test_bench_json_checked_before_the_benchmark(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(bench, "bench_generate", boom)
    rc, out, err = run(capsys, ["bench", "--random-tiny", "--json", str(tmp_path / "missing" / "b.json")])
    one_line_error(rc, err, 1, "--json", "does not exist")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(*run(capsys, ["bench", "--random-tiny", "--json", str(fifo)])[::2], 1, "not a regular file")


# ------------------------------------------------------------------------------------------ defect 4
def poison(src, dst, name, value):
    """Copy the checkpoint src to dst with one element of tensor `name` set to value."""
    shutil.copytree(src, dst)
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            t = load_file(os.path.join(dst, f))
            if name in t:
                t[name] = t[name].copy()
                t[name].reshape(-1)[7] = value
                save_file(t, os.path.join(dst, f), metadata={"format": "pt"})
                return dst
    raise KeyError(name)


@pytest.mark.parametrize("name, value", [("model.layers.2.attention.g_proj.weight", np.nan),
                                         ("model.layers.1.mlp.experts.5.up_proj.weight", np.inf),
                                         ("model.word_embeddings.weight", -np.inf)])
def test_non_finite_weights_refused(hf, tmp_path, capsys, name, value):
    bad = poison(hf, str(tmp_path / "bad"), name, value)
    rc, out, err = run(capsys, ["generate", "--model", bad, "--prompt", "1+1="] + FAST)
    one_line_error(rc, err, 1, name, "NaN or Inf")
    assert out == ""
    rc, _, err = run(capsys, ["convert", bad, str(tmp_path / "conv"), "--no-progress"])
    last_line_error(rc, err, 1, name, "NaN or Inf")
    assert not (tmp_path / "conv").exists() and not leftovers(tmp_path)


def test_non_finite_converted_param_refused(converted, tmp_path, capsys):
    """A converted checkpoint whose stored values went bad (edited, or written by another tool)."""
    import orbax.checkpoint as ocp
    dst = tmp_path / "conv"
    shutil.copytree(converted, dst)
    meta = json.load(open(dst / cv.MARKER))
    item = next(i for i in meta["items"] if "norm.weight" in i["params"])
    ck = ocp.PyTreeCheckpointer()
    tree = ck.restore(str(dst / item["dir"]))
    tree["norm"]["weight"] = np.asarray(tree["norm"]["weight"]).copy()
    tree["norm"]["weight"][0] = np.nan
    shutil.rmtree(dst / item["dir"])
    ck.save(str(dst / item["dir"]), tree)
    rc, _, err = run(capsys, ["generate", "--model", str(dst), "--prompt", "1+1="] + FAST)
    one_line_error(rc, err, 1, "norm.weight", "NaN or Inf")


def test_bad_config_number_is_one_line(hf, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    cfg = json.load(open(bad / "config.json"))
    for field, value, want in (("rope_theta", 0, "rope_theta must be a finite number > 0"),
                               ("rms_norm_eps", "x", "rms_norm_eps must be a finite number > 0, got 'x'")):
        (bad / "config.json").write_text(json.dumps(dict(cfg, **{field: value})))
        rc, out, err = run(capsys, ["generate", "--model", str(bad), "--prompt", "1+1="] + FAST)
        one_line_error(rc, err, 1, str(bad / "config.json"), want)
        rc, _, err = run(capsys, ["convert", str(bad), str(tmp_path / "conv"), "--no-progress"])
        one_line_error(rc, err, 1, want)
    (bad / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    one_line_error(*run(capsys, ["generate", "--model", str(bad), "--prompt", "1"] + FAST)[::2], 1,
                   "missing required field hidden_size")


# ------------------------------------------------------------------------------------------ defect 6
def test_ctrl_c_in_generate_prints_the_finished_results(hf, capsys, monkeypatch):
    prompts = ["1+2=", "sort:zyxwvutsrqponm=", "33+44=", "sort:abc="]
    argv = ["generate", "--model", hf, "--max-new-tokens", "3", "--jsonl", "--ignore-eos"] + FAST
    for p in prompts:
        argv += ["--prompt", p]
    rc, out, err = run(capsys, argv)
    assert rc == 0, err
    full = [json.loads(line) for line in out.splitlines()]

    class Bar:                  # Ctrl-C arrives as the first requests finish
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def update(self, n):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.generate, "progress_bar", Bar)
    rc, out, err = run(capsys, argv)
    assert rc == 130 and "lingjax: interrupted" in err and "Traceback" not in err
    got = [json.loads(line) for line in out.splitlines()]
    assert 1 <= len(got) < len(prompts)
    assert got == [full[g["index"]] for g in got]          # exactly what the full run printed for them
    rc, out, err = run(capsys, [a for a in argv if a != "--jsonl"])                  # text mode too
    assert rc == 130 and out.startswith("=== ") and "Traceback" not in err


def _signal_run(tmp_path, script, args, sig):
    """Run `script` (which prints WRITING once writing has begun) as the CLI, send sig, return it."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", script] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "WRITING"
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


SLOW_CONVERT = """
import sys, time
import lingjax.convert as cv
from lingjax import cli
plan = cv.plan_items
cv.plan_items = lambda rules, nbytes, item_bytes=0: plan(rules, nbytes, 20000)   # many small items
drop = cv._drop_cache
def slow(path, said=[]):
    drop(path)
    if not said:
        print("WRITING", flush=True)
        said.append(1)
    time.sleep(0.05)
cv._drop_cache = slow
sys.exit(cli.main(sys.argv[1:]))
"""

SLOW_EXPORT = """
import sys, time
import lingjax.convert as cv
from lingjax import cli
restore = cv._restore_item
def slow(*a, said=[]):
    tree = restore(*a)
    if not said:
        print("WRITING", flush=True)
        said.append(1)
    time.sleep(0.3)
    return tree
cv._restore_item = slow
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_convert(hf, tmp_path, sig, code):
    dst = tmp_path / "out"
    rc, err = _signal_run(tmp_path, SLOW_CONVERT, ["convert", hf, str(dst), "--no-progress"], sig)
    assert rc == code, err
    assert err.strip().splitlines()[-1] == "lingjax: interrupted", err
    assert "Traceback" not in err and "Error" not in err and "loop" not in err, err
    assert not dst.exists() and leftovers(tmp_path) == []


def test_sigterm_during_export(converted, tmp_path):
    dst = tmp_path / "out"
    rc, err = _signal_run(tmp_path, SLOW_EXPORT, ["export", converted, str(dst), "--no-progress"], signal.SIGTERM)
    assert rc == 143 and err.strip() == "lingjax: interrupted", err
    assert not dst.exists() and leftovers(tmp_path) == []


def test_signal_deferred_while_orbax_writes():
    from lingjax import checkpoint as ck
    s = ck._Signals()
    with pytest.raises(cv.Interrupted) as e:
        with s.deferred():
            s.handler(signal.SIGTERM, None)       # noted, not raised, inside the block
            s.handler(signal.SIGINT, None)
            reached = True
    assert reached and e.value.signum == signal.SIGTERM
    s.handler(signal.SIGINT, None)                # after the first, further signals do not cut the clean-up
    s2 = ck._Signals()
    with pytest.raises(cv.Interrupted):
        s2.handler(signal.SIGINT, None)           # outside a block: at once


# ------------------------------------------------------------------------------------------ defect 7
def test_huge_top_k_is_top_k_off(hf, capsys):
    base = ["generate", "--model", hf, "--prompt", "ab", "--temperature", "1", "--seed", "3",
            "--max-new-tokens", "6", "--ignore-eos"] + FAST
    rc, out, err = run(capsys, base + ["--top-k", "10000000000"])
    assert rc == 0, err
    assert (rc, out) == run(capsys, base + ["--top-k", "0"])[:2]


def test_deeply_nested_tokens_file(hf, tmp_path, capsys):
    (tmp_path / "in.json").write_text("[" * 100000 + "]" * 100000)
    rc, _, err = run(capsys, ["score", "--model", hf, "--tokens", str(tmp_path / "in.json"),
                              "--out", str(tmp_path / "o.npz")] + FAST)
    one_line_error(rc, err, 1, "nested too deeply")


def test_prompt_with_bytes_that_are_not_utf8(hf, capsys):
    bad = b"12\xff+3=".decode("utf-8", "surrogateescape")     # how Python hands such argv bytes over
    rc, out, err = run(capsys, ["generate", "--model", hf, "--prompt", bad] + FAST)
    one_line_error(rc, err, 1, "not valid UTF-8")
    assert out == ""


def test_closed_stdin_and_stdout(hf, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)                   # what Python sets when fd 0 is closed
    one_line_error(*run(capsys, ["generate", "--model", hf, "--prompt-file", "-"] + FAST)[::2], 1,
                   "--prompt-file -: standard input is closed")
    monkeypatch.setattr(sys, "stdout", None)
    rc = cli.main(["generate", "--model", hf, "--prompt", "1+1="] + FAST)
    one_line_error(rc, capsys.readouterr().err, 1, "standard output is closed")


@pytest.mark.parametrize("gb", ["0", "-1", "nan", "inf", "x"])
def test_export_shard_gb_must_be_positive(converted, tmp_path, capsys, gb):
    rc, _, err = run(capsys, ["export", converted, str(tmp_path / "out"), "--shard-gb", gb])
    one_line_error(rc, err, 2, "argument --shard-gb: expected a number of GB > 0")
    assert not (tmp_path / "out").exists()


def test_unencodable_characters_warn(hf, capsys):
    rc, out, err = run(capsys, ["generate", "--model", hf, "--prompt", "1é+2€=", "--max-new-tokens", "2"] + FAST)
    assert rc == 0
    assert "prompt 0: 2 character(s) the tokenizer cannot encode became '<pad>'" in err, err
    rc, out, err = run(capsys, ["generate", "--model", hf, "--prompt", "1+2=", "--max-new-tokens", "2"] + FAST)
    assert rc == 0 and "cannot encode" not in err


# ------------------------------------------------------------------------------------------ defect 8
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_marker_dirs_stay_inside_the_checkpoint(converted, tmp_path, capsys, how):
    dst = tmp_path / "conv"
    shutil.copytree(converted, dst)
    outside = tmp_path / "outside"
    meta = json.load(open(dst / cv.MARKER))
    first = meta["items"][0]["dir"]
    shutil.copytree(dst / first, outside)          # a valid item, but outside the checkpoint
    if how == "symlink":
        shutil.rmtree(dst / first)
        os.symlink(outside, dst / first)
    else:
        meta["items"][0]["dir"] = "../outside" if how == "dotdot" else str(outside)
        (dst / cv.MARKER).write_text(json.dumps(meta))
    rc, _, err = run(capsys, ["generate", "--model", str(dst), "--prompt", "1+1="] + FAST)
    one_line_error(rc, err, 1, cv.MARKER, "not a directory inside the checkpoint")
    rc, _, err = run(capsys, ["export", str(dst), str(tmp_path / "exp"), "--no-progress"])
    last_line_error(rc, err, 1, "not a directory inside the checkpoint")


def test_all_finite_finds_every_position():
    """The fast check (float32 sums; bfloat16 as float32 words at two offsets) misses no element and
    does not call huge but finite values non-finite."""
    import ml_dtypes

    from lingjax.weights import all_finite
    rng = np.random.default_rng(0)
    for dt in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64):
        for n in (1, 2, 3, 4, 5, 8, 17):
            for pos in range(n):
                for bad in (np.nan, np.inf, -np.inf):
                    a = rng.standard_normal((n, 3)).astype(dt)
                    assert all_finite(a)
                    a[pos, pos % 3] = bad
                    assert not all_finite(a), (dt, n, pos, bad)
    assert all_finite(np.full(1000, 3e38, np.float32)) and all_finite(np.full(1001, 3e38).astype(ml_dtypes.bfloat16))
    assert all_finite(np.zeros((3, 0), np.float32))
    import jax.numpy as jnp                                   # device arrays (sharded restores): on the device
    assert all_finite(jnp.ones((4, 3), jnp.bfloat16)) and not all_finite(jnp.array([1.0, jnp.nan, 2.0]))
