"""`lingjax bench` runs end to end and reports what it measured."""
import json

from lingjax.cli import main


def test_bench_random_tiny(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--random-tiny", "--dtype", "float32", "--batch", "1", "2", "--prompt-len", "5",
               "--new-tokens", "4", "--repeats", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "decode tok/s" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["new_tokens"] == 4 * r["batch"]              # ignore_eos: every request runs to the end
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert 1 <= r["compilations"] <= 4


def test_bench_rejects_bad_flags(capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        main(["bench", "--random-tiny", "--batch", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lingjax: error: argument --batch: expected an integer >= 1, got '0' (see `lingjax bench --help`)"]
