"""Tokenizer wrapper: the model directory's Hugging Face tokenizer plus the stop-token set."""

from __future__ import annotations

import functools
import json
import re
import secrets
from pathlib import Path

from tokenizers import Tokenizer as BackendTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast


def _has_remote_code(model_dir: Path) -> bool:
    config = model_dir / "config.json"
    return config.is_file() and "auto_map" in json.loads(config.read_text())


def load_hf_tokenizer(model_dir: Path):
    """`AutoTokenizer.from_pretrained(dir)`, except for checkpoints that ship their own Python
    code (`auto_map`, e.g. TransNormerLLM): that code is never run, their `tokenizer.json` is
    read directly."""
    model_dir = Path(model_dir)
    if not _has_remote_code(model_dir):
        return AutoTokenizer.from_pretrained(str(model_dir))
    if (model_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    raise FileNotFoundError(
        f"{model_dir}: the checkpoint's tokenizer is custom code (auto_map) and there is no "
        f"tokenizer.json; convert its tokenizer to tokenizer.json once (e.g. load it with "
        f"transformers and save_pretrained a fast tokenizer)")


def _unique_marker(texts: list[str]) -> str:
    """A private-use-area string that occurs in none of `texts` (random: unguessable)."""
    while True:
        mark = f"\ue000{secrets.token_hex(8)}\ue001"
        if not any(mark in text for text in texts):
            return mark


class Tokenizer:
    """Encodes exactly as `AutoTokenizer.from_pretrained(dir)(text)` does; with
    `split_special_tokens`, text that spells a special token (e.g. "<|im_end|>") is encoded as
    plain text instead of as that control token. Safe to call from several threads."""

    def __init__(self, model_dir: Path) -> None:
        self.hf = load_hf_tokenizer(model_dir)
        self.eos_token_ids = self._eos_token_ids(Path(model_dir))
        special = sorted((t.content for t in self.hf.added_tokens_decoder.values() if t.special),
                         key=len, reverse=True)  # longest first: a token may prefix another
        self._special_re = re.compile("|".join(map(re.escape, special)) or "(?!)")

    @functools.cached_property
    def _plain_backend(self) -> BackendTokenizer:
        # HF's `split_special_tokens=True` flips `encode_special_tokens` on the one Rust backend
        # every thread shares, so a concurrent default encode could run with it flipped. This
        # copy has the flag set once and is only read afterwards. Built on first use (~0.2 s);
        # two threads racing here at worst build two equal copies.
        backend = BackendTokenizer.from_str(self.hf.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = True
        return backend

    def _eos_token_ids(self, model_dir: Path) -> tuple[int, ...]:
        # generation_config.json may list several end tokens (chat models); the tokenizer knows
        # one. Generation stops on any of them, as transformers' generate() does.
        ids: list[int] = []
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def encode(self, text: str, add_special_tokens: bool = True,
               split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds the tokenizer's own (e.g. BOS).

        With `split_special_tokens`, as `self.hf(text, split_special_tokens=True)`: special
        token spellings in `text` are tokenized as ordinary text.
        """
        if split_special_tokens:
            return self._plain_backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self.hf(text, add_special_tokens=add_special_tokens).input_ids

    def apply_chat_template(self, text_or_messages: str | list[dict[str, str]],
                            split_special_tokens: bool = False) -> list[int]:
        """Token ids of a conversation (`{"role", "content"}` dicts; a string is one user
        turn) in the model's chat template, with the assistant's generation prompt appended.

        With `split_special_tokens`, special token spellings inside message contents are
        tokenized as plain text, so a message cannot forge a turn; the template's own markup
        keeps its control tokens. The ids are then those of the default, except that each such
        spelling's control token id is replaced by the spelling's plain-text ids.
        """
        messages = text_or_messages if isinstance(text_or_messages, list) else \
            [{"role": "user", "content": text_or_messages}]
        if split_special_tokens:
            return self._chat_ids_as_text(messages)
        out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)
        return list(out["input_ids"])

    def _chat_ids_as_text(self, messages: list[dict[str, str]]) -> list[int]:
        # Each special token spelling in a content is wrapped in a random marker before
        # rendering; the rendered text is then split at the markers: odd pieces are the
        # spellings (plain text), even pieces template markup and the rest of the contents
        # (encoded as HF does). Only the spellings are cut out: cutting out whole contents would
        # change how whitespace at their edges merges with the markup ("\n  hi" is not
        # "\n" + "  hi"), and a conversation without spellings would no longer match HF.
        # NOTE: spellings are found in the raw content; a special token that the tokenizer
        # matches only after its normalizer runs (`normalized=True`) is not found.
        mark = _unique_marker([m["content"] for m in messages])
        marked = [{**m, "content": self._special_re.sub(lambda s: mark + s[0] + mark,
                                                        m["content"])} for m in messages]
        rendered = self.hf.apply_chat_template(marked, add_generation_prompt=True,
                                               tokenize=False)
        pieces = rendered.split(mark)
        if len(pieces) % 2 == 0:  # the template dropped or cut a marked spelling
            raise ValueError("the chat template does not keep message contents whole; "
                             "cannot tokenize special token text in them as plain text")
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            ids += self.encode(piece, add_special_tokens=False, split_special_tokens=i % 2 == 1)
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)
