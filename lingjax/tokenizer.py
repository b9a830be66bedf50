"""The tokenizer of a checkpoint, for the Python API, the CLI and the server.

    tok = Tokenizer("checkpoints/ling-tiny")
    ids = tok.encode("123+45=")
    ids = tok.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    params = SamplingParams(stop_token_ids=tok.eos_token_ids)       # every EOS id of the checkpoint
    stream = tok.text_stream(prompt_ids=ids, stop=["\\n\\n"])       # streaming text, stop strings
    for new_ids in ...:
        piece, stopped = stream.add(new_ids)

Built on transformers' fast tokenizer (`PreTrainedTokenizerFast`; it needs no torch), so encoding and chat
templates (`apply_chat_template`, with `add_generation_prompt`, system, tool messages and tool schemas)
render exactly as Hugging Face renders them.

End of sequence: `eos_token_ids` is the union of config.json's `eos_token_id`, generation_config.json's
`eos_token_id` (an int or a list) and the tokenizer's `eos_token`, limited to the model's vocabulary.

Streaming text. `IncrementalDetokenizer` turns a growing list of token ids into text pieces: it decodes a
short window of recent tokens (so a tokenizer that drops a leading space at the start of a decode still
spaces words right) and holds back text that ends in an incomplete UTF-8 character (U+FFFD) until the next
token completes it, so a piece never holds a broken multi-byte character. `TextStream` adds stop strings:
the text up to (not including) the first occurrence of any stop string is emitted, and text that could be
the start of a stop string is held back until it is known not to be. The concatenation of the pieces is the
final text (the server's non-streaming answers are built the same way).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"     # what a decode of an incomplete UTF-8 sequence ends with
CONTEXT_TOKENS = 6         # prompt tokens the detokenizer decodes before the first new one (spacing)


class TokenizerError(ValueError):
    """A missing or broken tokenizer, or a chat that the template cannot render; one-line message."""


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _ids(v) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def config_eos_ids(model_dir) -> list[int]:
    """EOS ids of config.json and generation_config.json (either may be an int or a list)."""
    out = []
    for name in ("config.json", "generation_config.json"):
        d = _read_json(os.path.join(str(model_dir), name))
        if isinstance(d, dict):
            out += _ids(d.get("eos_token_id"))
    return out


class Tokenizer:
    """The checkpoint's fast tokenizer (tokenizer.json + tokenizer_config.json, chat_template.jinja)."""

    def __init__(self, model_dir):
        model_dir = str(model_dir)
        if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
            raise TokenizerError(f"{model_dir} has no tokenizer.json; text in and out needs the checkpoint's "
                                 f"tokenizer")
        for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
            _read_json(os.path.join(model_dir, name))          # a broken file: one clear line, not a traceback
        from transformers import PreTrainedTokenizerFast
        try:
            self.hf = PreTrainedTokenizerFast.from_pretrained(model_dir)
        except Exception as e:          # transformers raises many kinds; the message is what matters
            raise TokenizerError(f"{model_dir}: cannot load the tokenizer ({_first_line(e)})") from None
        self.model_dir = model_dir
        cfg = _read_json(os.path.join(model_dir, "config.json")) or {}
        self.vocab_size = cfg.get("vocab_size") if isinstance(cfg.get("vocab_size"), int) else len(self.hf)
        eos = config_eos_ids(model_dir)
        if self.hf.eos_token_id is not None:
            eos.append(self.hf.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted({t for t in eos if 0 <= t < self.vocab_size}))

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's own special tokens (e.g. a BOS) if it adds any."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included), for logprobs."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                            tools: Sequence[dict] | None = None, **template_kwargs) -> str:
        """The chat rendered by the checkpoint's template, exactly as transformers renders it."""
        if not self.has_chat_template:
            raise TokenizerError(f"{self.model_dir} has no chat template (tokenizer_config.json chat_template "
                                 f"or chat_template.jinja)")
        from jinja2 import TemplateError
        try:
            return self.hf.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                               add_generation_prompt=add_generation_prompt, tokenize=False,
                                               **template_kwargs)
        except (TemplateError, ValueError, TypeError, KeyError) as e:
            raise TokenizerError(f"the chat template failed: {_first_line(e)}") from None

    def encode_chat(self, messages: Sequence[dict], **kwargs) -> list[int]:
        """Token ids of the rendered chat (the template writes any special tokens itself, as in HF)."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)

    def chat(self, text: str, system: str | None = None) -> str:
        """One user message (after an optional system message), rendered with add_generation_prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.apply_chat_template(messages)

    # ------------------------------------------------------------------ streaming
    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

    def text_stream(self, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                    skip_special_tokens: bool = True) -> "TextStream":
        return TextStream(self.detokenizer(prompt_ids, skip_special_tokens), stop)


class IncrementalDetokenizer:
    """Text pieces of a growing token sequence; never ends a piece inside a multi-byte character.

    `ids[prefix:read]` is the window already shown (decoded as context), `ids[read:]` the tokens whose text
    is not shown yet. add() decodes the window with and without the new tokens; the difference is the new
    text, unless it ends in U+FFFD (an incomplete character): then it waits for the next token."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids = [int(t) for t in list(prompt_ids)[-CONTEXT_TOKENS:]]
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def _delta(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        shown = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if not final and text.endswith(REPLACEMENT):
            return ""
        delta = text[len(shown):] if text.startswith(shown) else text[len(_common_prefix(shown, text)):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def add(self, ids: Iterable[int]) -> str:
        """Append new token ids -> the text they complete ("" while a character is incomplete)."""
        self.ids.extend(int(t) for t in ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end decodes as U+FFFD)."""
        return self._delta(final=True)


class TextStream:
    """Incremental text with stop strings: add(ids) -> (piece, stopped). After `stopped`, nothing more."""

    def __init__(self, detok: IncrementalDetokenizer, stop: Sequence[str] = ()):
        self.detok = detok
        self.stop = [s for s in stop if s]
        self.pending = ""              # decoded, not yet emitted (could be the start of a stop string)
        self.stopped = False
        self.text = ""                 # everything emitted so far

    def _emit(self, final: bool) -> str:
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
        elif final:
            out, self.pending = self.pending, ""
        else:
            hold = _longest_stop_prefix_suffix(self.pending, self.stop)
            out = self.pending[:len(self.pending) - hold]
            self.pending = self.pending[len(self.pending) - hold:]
        self.text += out
        return out

    def add(self, ids: Iterable[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += self.detok.add(ids)
        return self._emit(final=False), self.stopped

    def finish(self) -> str:
        """At the end of generation: the held-back text (still cut at a stop string)."""
        if self.stopped:
            return ""
        self.pending += self.detok.flush()
        return self._emit(final=True)


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _first_line(e) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
