"""lingjax.tokenizer: EOS ids from every source, chat templates as transformers renders them, streaming
text that never splits a multi-byte character, stop strings that hold back what could start one."""
import json
import os

import pytest

from lingjax.tokenizer import Tokenizer, TokenizerError

CKPT = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "ling-tiny")

TOOL_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m['role'] == 'tool' %}[{{ m['tool_call_id'] }}]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_bpe_dir(tmp_path, eos_gen=(1, 7), template=TOOL_TEMPLATE):
    """A byte-level BPE tokenizer with no merges: each UTF-8 byte is its own token, so every character
    beyond ASCII spans several tokens."""
    from tokenizers import Tokenizer as T, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>"] + sorted(alphabet))}
    tok = T(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    d = tmp_path / "bpe"
    d.mkdir()
    (d / "tokenizer.json").write_text(tok.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "bos_token": "<bos>",
         "pad_token": "<pad>", "chat_template": template}))
    (d / "config.json").write_text(json.dumps({"vocab_size": len(vocab), "eos_token_id": 1}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": list(eos_gen) + [10 ** 6]}))
    return str(d)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return Tokenizer(byte_bpe_dir(tmp_path_factory.mktemp("t")))


def test_tiny_checkpoint_roundtrip_and_eos():
    tok = Tokenizer(CKPT)
    assert tok.encode("12+3=") == [4, 5, 75, 6, 83]
    assert tok.decode([4, 5, 75, 6, 83, 1]) == "12+3="
    assert tok.eos_token_ids == (1,)


def test_eos_ids_union_of_config_generation_config_and_tokenizer(bpe):
    # config.json: 1; generation_config.json: [1, 7, 10**6] (out of vocabulary: dropped); tokenizer: <eos> = 1
    assert bpe.eos_token_ids == (1, 7)


def test_chat_template_renders_as_transformers(bpe):
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(bpe.model_dir)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "calling"}, {"role": "tool", "content": "4", "tool_call_id": "c1"}]
    for gen in (True, False):
        want = ref.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=False)
        assert bpe.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen) == want
    assert bpe.apply_chat_template(msgs[:2], tools=tools) == \
        "tools: add<system>be brief<user>2+2?<assistant>"      # trim_blocks drops a newline after a tag
    assert bpe.encode_chat(msgs[:2]) == bpe.encode("<system>be brief<user>2+2?<assistant>",
                                                    add_special_tokens=False)
    assert bpe.chat("hi", system="s") == "<system>s<user>hi<assistant>"


def test_chat_template_errors_are_one_line(tmp_path):
    tok = Tokenizer(byte_bpe_dir(tmp_path, template="{{ raise_exception('no system role') }}"))
    with pytest.raises(TokenizerError, match="the chat template failed: no system role"):
        tok.chat("hi")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer(tmp_path)


TEXT = "héllo wörld: 日本語 ✓ 🙂!"


def test_streaming_never_splits_a_multibyte_character(bpe):
    ids = bpe.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8"))             # one token per byte: characters span tokens
    det = bpe.detokenizer()
    pieces = [det.add([t]) for t in ids] + [det.flush()]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    # each character appears exactly when its last byte arrives: one non-empty piece per character
    assert [p for p in pieces if p] == list(TEXT)
    # tokens fed several at a time give the same text
    det = bpe.detokenizer()
    assert "".join(det.add(ids[i:i + 3]) for i in range(0, len(ids), 3)) + det.flush() == TEXT


def test_streaming_after_a_prompt_and_a_dangling_byte(bpe):
    prompt = bpe.encode("ab")
    det = bpe.detokenizer(prompt_ids=prompt)
    ids = bpe.encode("ü c")
    assert det.add(ids[:1]) == ""                            # half of "ü"
    assert det.add(ids[1:]) == "ü c"
    det = bpe.detokenizer()
    assert det.add(bpe.encode("ü")[:1]) == ""
    assert det.flush() == "\ufffd"                           # generation ended inside a character


def stream_pieces(tok, text, stop, step=1):
    ids = tok.encode(text)
    s = tok.text_stream(stop=stop)
    pieces = []
    for i in range(0, len(ids), step):
        piece, stopped = s.add(ids[i:i + step])
        pieces.append(piece)
        if stopped:
            return pieces, True, s.text
    pieces.append(s.finish())
    return pieces, False, s.text


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stop_strings(bpe, step):
    pieces, stopped, text = stream_pieces(bpe, "one ✓ two END three", ["END", "zzz"], step)
    assert stopped and text == "one ✓ two " and "".join(pieces) == text
    assert all("E" not in p for p in pieces)                  # never emitted, not even in part
    # a partial match that does not complete is released, and the text is complete at the end
    pieces, stopped, text = stream_pieces(bpe, "an EN dash; END", ["END"], step)
    assert stopped and text == "an EN dash; "
    pieces, stopped, text = stream_pieces(bpe, "ends with EN", ["END"], step)
    assert not stopped and text == "ends with EN"
    # a multi-byte stop string; the earliest of several stop strings wins
    pieces, stopped, text = stream_pieces(bpe, "a 日本 b ✓ c", ["✓", "日本"], step)
    assert stopped and text == "a "


def test_stop_string_held_back_until_decided(bpe):
    s = bpe.text_stream(stop=["<|end|>"])
    assert s.add(bpe.encode("ok <|e")) == ("ok ", False)       # "<|e" could start the stop string
    assert s.add(bpe.encode("x")) == ("<|ex", False)           # it does not
    assert s.add(bpe.encode("<|end|>tail")) == ("", True)
    assert s.text == "ok <|ex"


def test_runs_without_torch():
    """transformers' tokenizer needs no torch: a fresh interpreter where `import torch` fails."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lingjax.tokenizer import Tokenizer\n"
            f"t = Tokenizer({CKPT!r})\n"
            "print(t.encode_chat([{'role': 'user', 'content': 'ab'}]), t.decode([13, 14, 1]), t.eos_token_ids)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                                      + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[13, 14] ab (1,)"
