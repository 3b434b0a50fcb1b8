"""The constraint vocabulary against the tokenizer itself: the bytes of a text's tokens
concatenate to the text's UTF-8 (partial-character tokens included), and every token whose
decode is whole text decodes to its bytes (partial characters as the tokenizer shows them)."""

from __future__ import annotations

import pytest

from constraints.vocabulary import token_vocabulary
from engine.tokenizer import Tokenizer

TEXTS = ["In the beginning God created the heaven and the earth.",
         "Prix: 12,50 € — café naïve, 日本語のテキスト, emoji 🙂🚀, tabs\tand\nnewlines  ",
         '{"name": "Ruth", "verses": [1, 2, 3], "ok": true}']


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return token_vocabulary(tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_spell_the_text(tokenizer, vocab, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(vocab.tokens[i] for i in ids) == text.encode("utf-8")


def test_every_whole_token_decodes_to_its_bytes(tokenizer, vocab):
    partial = 0
    for i, token in enumerate(vocab.tokens):
        if i in vocab.special_ids:
            assert token == b""
            continue
        text = tokenizer.decode([i], skip_special_tokens=False)
        # The tokenizer shows the bytes of a partial UTF-8 character as U+FFFD, as Python's
        # lossy decode does; every other token is its bytes exactly.
        assert token.decode("utf-8", errors="replace") == text, i
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
    assert 0 < partial < len(vocab) // 10  # byte-level BPE has some, not many


def test_eos_and_chat_markers_are_special(tokenizer, vocab):
    assert set(tokenizer.eos_token_ids) <= vocab.special_ids
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False)[0] in vocab.special_ids
    assert len(vocab) == tokenizer.vocab_size
