"""The byte-level token vocabulary that constraint backends match text against.

A grammar speaks of bytes; a model emits token ids. `token_vocabulary` gives every id the exact
bytes it adds to the output, derived from the tokenizer's own decoder:

- ByteLevel (GPT-2, SmolLM2, Llama 3): each character of a token string stands for one byte
  (GPT-2's printable-byte table), so a token may hold part of a UTF-8 character, e.g. the
  first two bytes of "€". Those partial tokens are kept as they are: a backend that matches
  bytes lets them through where the grammar allows the whole character.
- Metaspace with byte fallback (SentencePiece Llama / Mistral): "▁" is a space and `<0xNN>`
  the byte NN.

Special tokens (chat markers, padding, EOS) have no bytes: they are never allowed inside
constrained text. EOS is listed separately; backends allow it only where the grammar accepts.
"""

from __future__ import annotations

import functools
import json
import re

import msgspec

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenVocabulary(msgspec.Struct, frozen=True):
    tokens: list[bytes]
    """Index = token id: the bytes the token adds to the text; b"" for special tokens."""
    eos_token_ids: tuple[int, ...]
    special_ids: frozenset[int]
    """Ids that are never part of constrained text (EOS among them)."""

    def __len__(self) -> int:
        return len(self.tokens)


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (character -> byte)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_vocabulary(tokenizer) -> TokenVocabulary:
    """The vocabulary of an `engine.tokenizer.Tokenizer` (its HF fast tokenizer's decoder
    decides how token strings map to bytes). Raises ValueError for a decoder it does not
    know, rather than guess."""
    hf = tokenizer.hf
    decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = _decoder_kinds(decoder)
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special}
    special |= set(tokenizer.eos_token_ids)
    pieces = hf.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    if "ByteLevel" in kinds:
        table = _byte_level_table()
        to_bytes = lambda piece: bytes(table[c] for c in piece)  # noqa: E731
    elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        to_bytes = _sentencepiece_bytes
    else:
        raise ValueError(f"tokenizer decoder {sorted(kinds)}: no byte mapping for constraints")
    tokens = [b"" if i in special or piece is None else to_bytes(piece)
              for i, piece in enumerate(pieces)]
    return TokenVocabulary(tokens, tuple(tokenizer.eos_token_ids), frozenset(special))


def _decoder_kinds(decoder: dict) -> set[str]:
    kinds = {decoder.get("type", "")}
    for inner in decoder.get("decoders", []) or []:
        kinds |= _decoder_kinds(inner)
    return kinds


def _sentencepiece_bytes(piece: str) -> bytes:
    fallback = _BYTE_FALLBACK.match(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
