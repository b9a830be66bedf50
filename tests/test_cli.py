"""`lingjax score` / `lingjax generate`: results equal the engine's and the model's, bad input gives one
line `lingjax: error: ...` and exit status 1 (bad input / run) or 2 (bad command line), never a
traceback, never a half-written output file. main() runs in-process (one JAX import, shared compiled
steps); two subprocess runs check the real console entry point."""
import io
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lingjax import cli
from lingjax.cli import common, generate
from lingjax.engine import Engine, SamplingParams
from lingjax.testing import CHAT_TEMPLATE, write_tiny_checkpoint
from lingjax.tokenizer import Tokenizer
from lingjax.weights import load_hf

FAST = ["--dtype", "float32", "--prefill-chunk", "4", "--max-batch", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    write_tiny_checkpoint(str(d), seed=2, dtype=np.float32)
    return str(d)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_hf(ckpt, dtype=jnp.float32, mtp=False)[1]


def run(capsys, argv):
    """main(argv) -> (exit status, stdout, stderr), whether main returns or argparse exits."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, want_rc, want):
    assert rc == want_rc, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lingjax: error: "), err
    assert want in lines[0], lines[0]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------ score
def test_score_writes_full_forward_logits(capsys, ckpt, model, tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (9, 1, 14)]
    (tmp_path / "in.json").write_text(json.dumps(seqs))
    out = tmp_path / "out.npz"
    rc, _, err = run(capsys, ["score", "--model", ckpt, "--tokens", str(tmp_path / "in.json"), "--out", str(out)]
                     + FAST)
    assert rc == 0, err
    z = np.load(out)
    assert sorted(z.files) == ["logits_0", "logits_1", "logits_2"]
    padded = np.zeros((len(seqs), 14), np.int32)                     # causal: right padding is harmless
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(padded)))
    for i, s in enumerate(seqs):
        got = z[f"logits_{i}"]
        ref = full[i, :len(s)]
        assert got.dtype == np.float32 and got.shape == (len(s), model.cfg.vocab_size)
        assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-5
    assert [f for f in os.listdir(tmp_path) if f.startswith(".lingjax-")] == []


def test_score_output_is_atomic(capsys, ckpt, tmp_path, monkeypatch):
    (tmp_path / "in.json").write_text("[[1, 2, 3]]")
    out = tmp_path / "out.npz"

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    rc, _, err = run(capsys, ["score", "--model", ckpt, "--tokens", str(tmp_path / "in.json"), "--out", str(out)]
                     + FAST)
    assert_one_line_error(rc, err, 1, "disk full")
    assert os.listdir(tmp_path) == ["in.json"]                       # no OUT, no temporary file


# ------------------------------------------------------------------------------------------ generate
def test_generate_single_prompt_streams_greedy_text(capsys, ckpt, model):
    rc, out, err = run(capsys, ["generate", "--model", ckpt, "--prompt", "hello", "--max-new-tokens", "6",
                                "--ignore-eos"] + FAST)
    assert rc == 0, err
    tok = Tokenizer(ckpt)
    ids = Engine(model, max_batch=2, prefill_chunk=4).generate(
        [tok.encode("hello")], SamplingParams(max_new_tokens=6, ignore_eos=True))[0].token_ids
    assert len(ids) == 6
    assert out == tok.decode(ids) + "\n"


def test_streamer_writes_as_tokens_arrive(ckpt):
    tok = Tokenizer(ckpt)
    buf = io.StringIO()
    writes = []
    buf.write = lambda s, w=buf.write: (writes.append(s), w(s))[1]
    s = generate.Streamer(tok, buf)
    ids = tok.encode("abc")
    for t in ids:
        s(0, t)
    s.finish()
    assert writes == ["a", "b", "c", "\n"]


def test_generate_many_prompts_queue_and_sample(capsys, ckpt, model):
    prompts = ["one", "two two", "3", "four!", "x y z"]                  # 5 prompts, 2 slots: they queue
    argv = ["generate", "--model", ckpt, "--max-new-tokens", "5", "--jsonl", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.9", "--seed", "4"] + FAST
    for p in prompts:
        argv += ["--prompt", p]
    rc, out, err = run(capsys, argv)
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == list(range(5)) and [r["prompt"] for r in rows] == prompts
    tok = Tokenizer(ckpt)
    ref = Engine(model, max_batch=1, prefill_chunk=64).generate(
        [tok.encode(p) for p in prompts],
        SamplingParams(max_new_tokens=5, temperature=0.9, top_k=20, top_p=0.9, seed=4, stop_token_ids=(1,)))
    assert [r["token_ids"] for r in rows] == [o.token_ids for o in ref]
    assert [r["finish_reason"] for r in rows] == [o.finish_reason for o in ref]
    assert all(r["text"] == tok.decode(r["token_ids"]) for r in rows)


def test_chat_template(ckpt, capsys):
    tok = Tokenizer(ckpt)
    assert CHAT_TEMPLATE and tok.chat("hi", system="be brief") == "system: be brief\nuser: hi\nassistant: "
    assert generate.encode(tok, "hi", chat=True) == tok.encode("user: hi\nassistant: ")
    rc, out, err = run(capsys, ["generate", "--model", ckpt, "--prompt", "hi", "--chat", "--max-new-tokens", "2",
                                "--jsonl"] + FAST)
    assert rc == 0, err and len(json.loads(out)["token_ids"]) <= 2


def test_default_model(capsys, ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CHECKPOINTS_DIR", tmp_path / "checkpoints")
    rc, _, err = run(capsys, ["generate", "--prompt", "hi"])
    assert_one_line_error(rc, err, 1, "no --model given")
    (tmp_path / "checkpoints").mkdir()
    os.symlink(ckpt, tmp_path / "checkpoints" / "tiny")
    assert common.default_model_dir() == tmp_path / "checkpoints" / "tiny"


# ------------------------------------------------------------------------------------------ bad input
SCORE_FILE_CASES = [
    ("[[]]", 1, "sequence 0 is empty"),
    ("[[1, 2], [3, 500]]", 1, "sequence 1: token id 500 at position 1 is outside the vocabulary [0, 98)"),
    (json.dumps([[1] * 3000]), 1, "sequence 0 has 3000 tokens; the context (max_len=2048)"),
    ("[]", 1, "non-empty JSON list"),
    ("{\"a\": 1}", 1, "non-empty JSON list"),
    ("[[1, 2", 1, "not valid JSON"),
    ("[[1, \"x\"]]", 1, "not an integer id"),
]


@pytest.mark.parametrize("content, want_rc, want", SCORE_FILE_CASES)
def test_score_bad_input_file(capsys, ckpt, tmp_path, content, want_rc, want):
    (tmp_path / "in.json").write_text(content)
    out = tmp_path / "out.npz"
    rc, _, err = run(capsys, ["score", "--model", ckpt, "--tokens", str(tmp_path / "in.json"), "--out", str(out)])
    assert_one_line_error(rc, err, want_rc, want)
    assert not out.exists()


@pytest.mark.parametrize("extra, want_rc, want", [
    (["--prefill-chunk", "0"], 2, "argument --prefill-chunk: expected an integer >= 1, got '0'"),
    (["--max-batch", "x"], 2, "argument --max-batch: expected an integer >= 1, got 'x'"),
    (["--max-len", "-3"], 2, "argument --max-len"),
    (["--dtype", "float16"], 2, "argument --dtype: invalid choice"),
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--max-len", "5000"], 1, "--max-len 5000 exceeds the model's max_position_embeddings=2048"),
    (["MODEL=/nonexistent"], 1, "no such directory"),
    (["TOKENS=/nonexistent.json"], 1, "no such file"),
    (["OUT=/nonexistent/dir/out.npz"], 1, "does not exist"),
])
def test_score_bad_flags(capsys, ckpt, tmp_path, extra, want_rc, want):
    (tmp_path / "in.json").write_text("[[1, 2, 3]]")
    paths = {"MODEL": ckpt, "TOKENS": str(tmp_path / "in.json"), "OUT": str(tmp_path / "out.npz")}
    for e in list(extra):
        if "=" in e:
            k, v = e.split("=", 1)
            paths[k] = v
            extra = [x for x in extra if x != e]
    rc, _, err = run(capsys, ["score", "--model", paths["MODEL"], "--tokens", paths["TOKENS"], "--out",
                              paths["OUT"]] + extra)
    assert_one_line_error(rc, err, want_rc, want)
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("argv, want_rc, want", [
    (["--prompt", ""], 1, "prompt 0 is empty"),
    (["--prompt", "hello world", "--max-len", "8"], 1, "prompt 0 has 11 tokens; the context (max_len=8) holds 7"),
    ([], 1, "no prompt: pass --prompt TEXT"),
    (["--prompt", "a", "--system", "s"], 1, "--system needs --chat"),
    (["--prompt-file", "/nonexistent.txt"], 1, "--prompt-file /nonexistent.txt"),
    (["--prompt", "a", "--temperature", "-1"], 2, "argument --temperature: expected a number in [0.0, inf)"),
    (["--prompt", "a", "--temperature", "nan"], 2, "argument --temperature"),
    (["--prompt", "a", "--top-p", "0"], 2, "argument --top-p: expected a number in (0.0, 1.0]"),
    (["--prompt", "a", "--top-p", "1.5"], 2, "argument --top-p"),
    (["--prompt", "a", "--top-k", "-1"], 2, "argument --top-k: expected an integer >= 0"),
    (["--prompt", "a", "--max-new-tokens", "0"], 2, "argument --max-new-tokens: expected an integer >= 1"),
    (["--prompt", "a", "--seed", "x"], 2, "argument --seed: invalid int value"),
])
def test_generate_bad_input(capsys, ckpt, argv, want_rc, want):
    rc, out, err = run(capsys, ["generate", "--model", ckpt] + argv)
    assert_one_line_error(rc, err, want_rc, want)
    assert out == ""


def test_no_command(capsys):
    rc, _, err = run(capsys, [])
    assert rc == 2 and err.strip().splitlines()[-1] == "lingjax: error: choose a command (see `lingjax --help`)"


def test_help_explains_every_flag(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("score", "generate"):
        p = sub.choices[name]
        for a in p._actions:
            assert a.help and len(a.help) > 10, (name, a.option_strings)
        rc, out, _ = run(capsys, [name, "--help"])
        assert rc == 0 and all(opt in out for a in p._actions for opt in a.option_strings)


def test_console_entry_point_errors_are_one_line(tmp_path):
    """The real process: no traceback on stderr, exit statuses 1 and 2."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))))
    p = subprocess.run([sys.executable, "-m", "lingjax.cli", "score", "--model", str(tmp_path / "missing"),
                        "--tokens", str(tmp_path / "in.json"), "--out", str(tmp_path / "o.npz")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == f"lingjax: error: --tokens {tmp_path / 'in.json'}: no such file"
    p = subprocess.run([sys.executable, "-m", "lingjax.cli", "generate", "--prompt", "x", "--top-p", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_python_m_lingjax_cli_reports_user_errors_cleanly(tmp_path):
    """`python -m lingjax.cli` (the package's __main__.py) prints the one-line message, not an internal error."""
    p = subprocess.run([sys.executable, "-m", "lingjax.cli", "convert", str(tmp_path / "missing"),
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "no such directory" in p.stderr and "internal error" not in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()


def test_serve_prefix_save_last_flag_reaches_the_engine(ckpt):
    """`lingjax serve --no-prefix-save-last` builds an engine that saves prefix states only where prompts branch
    (Engine.prefix_cache_save_last False; the behaviour itself: tests/test_prefix_cache.py); the default keeps
    the save at each prompt's last block."""
    parser = cli.build_parser()
    for flags, want in (([], True), (["--no-prefix-save-last"], False)):
        args = parser.parse_args(["serve", "--model", str(ckpt), "--dtype", "float32", "--max-batch", "2",
                                  "--no-warmup", *flags])
        _, eng = common.build_engine(args, str(ckpt), 64)
        assert eng.prefix_cache_save_last is want and eng.state_rows > 0            # the prefix cache is on


def test_xla_option_values():
    """--xla-option NAME=VALUE (Engine(xla_options=...)): the value's type as XLA's option parser wants it."""
    import argparse
    from lingjax.cli.common import xla_option
    assert xla_option("xla_gpu_enable_command_buffer=") == ("xla_gpu_enable_command_buffer", "")
    assert xla_option("xla_gpu_enable_command_buffer=FUSION,CUBLAS") == ("xla_gpu_enable_command_buffer", "FUSION,CUBLAS")
    assert xla_option("xla_gpu_graph_min_graph_size=1") == ("xla_gpu_graph_min_graph_size", 1)
    assert xla_option("xla_gpu_enable_triton_gemm=False") == ("xla_gpu_enable_triton_gemm", False)
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
        xla_option("xla_gpu_enable_command_buffer")
