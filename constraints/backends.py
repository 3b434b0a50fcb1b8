"""Grammar masking backends behind one interface: llguidance and outlines-core.

A `Grammar` is what a request asks for (regex, JSON schema, Lark grammar or a list of choices).
A backend compiles it once (`compile`, off the engine's path; bad input -> InvalidArgument
naming the field with the backend's message) and hands out one `Matcher` per constrained
sequence: the allowed next tokens as a packed bitmask row (bit t of word t // 32 = token t),
`consume` of the chosen token, `accepts` (may EOS come now), and `check` of one token without
changing the state (AWRS's condition).

Both backends see the same byte-level vocabulary (`constraints.vocabulary`): special tokens are
never allowed, EOS only where the grammar accepts. One difference is theirs, not ours: where a
grammar forces a run of bytes, llguidance's mask keeps only the canonical tokenization of that
run (e.g. `{"` but not `{` then `"`), while outlines-core's byte-level index allows every token
sequence spelling it; `check` accepts both in llguidance too.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Protocol

import msgspec
import numpy as np

from decoding.base import InvalidArgument
from constraints.vocabulary import TokenVocabulary

KINDS = ("regex", "json_schema", "grammar", "choice")


class Grammar(msgspec.Struct, frozen=True):
    kind: str
    """One of KINDS."""
    text: str
    """The regex, the JSON schema (JSON text), the Lark grammar; for `choice` a JSON list of
    strings."""

    @property
    def field(self) -> str:
        return f"constraint.{self.kind}"


def choice_grammar(options: list[str]) -> Grammar:
    if not options or not all(isinstance(o, str) and o for o in options):
        raise InvalidArgument("constraint.choice", "needs one or more non-empty strings")
    return Grammar("choice", json.dumps(options))


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class Matcher(Protocol):
    def fill_mask(self, row: np.ndarray) -> None: ...
    def consume(self, token: int) -> bool: ...
    def accepts(self) -> bool: ...
    def check(self, token: int) -> bool: ...
    def copy(self) -> Matcher: ...


class Backend(Protocol):
    name: str

    def compile(self, grammar: Grammar) -> object: ...
    def matcher(self, compiled: object) -> Matcher: ...


# ---- llguidance --------------------------------------------------------------------------------

class _LlgTokenizer:
    """What llguidance.TokenizerWrapper reads: token bytes, EOS, specials, and a tokenize
    callback (it tokenizes forced bytes with it, so it must be the model's own encode)."""

    def __init__(self, vocab: TokenVocabulary, encode, names: list[str]) -> None:
        # Special tokens need some bytes; llguidance marks special ids so grammar text never
        # matches them.
        self.tokens = [tok if i not in vocab.special_ids else names[i].encode()
                       for i, tok in enumerate(vocab.tokens)]
        self.eos_token_id = vocab.eos_token_ids[0]
        self.bos_token_id = None
        self.special_token_ids = sorted(vocab.special_ids)
        self._encode = encode

    def __call__(self, text: bytes) -> list[int]:
        return self._encode(text.decode("utf-8", errors="replace"))


class LlguidanceBackend:
    name = "llguidance"

    def __init__(self, vocab: TokenVocabulary, encode, names: list[str]) -> None:
        import llguidance

        self._llg = llguidance
        self.vocab = vocab
        wrapper = llguidance.TokenizerWrapper(_LlgTokenizer(vocab, encode, names))
        self.tokenizer = llguidance.LLTokenizer(wrapper, eos_token=list(vocab.eos_token_ids))

    def compile(self, grammar: Grammar) -> str:
        llg = self._llg.LLMatcher
        try:
            if grammar.kind == "regex":
                text = llg.grammar_from_regex(grammar.text)
            elif grammar.kind == "json_schema":
                text = llg.grammar_from_json_schema(grammar.text,
                                                    defaults={"whitespace_flexible": False})
            elif grammar.kind == "grammar":
                text = llg.grammar_from_lark(grammar.text)
            elif grammar.kind == "choice":
                text = self._llg.grammar_from("choice", grammar.text)
            else:
                raise InvalidArgument("constraint", f"unknown kind {grammar.kind!r}")
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(grammar.field, f"llguidance: {exc}") from None
        error = llg.validate_grammar(text, self.tokenizer)
        if error:
            raise InvalidArgument(grammar.field, f"llguidance: {error}")
        return text

    def matcher(self, compiled: str) -> _LlgMatcher:
        return _LlgMatcher(self._llg.LLMatcher(self.tokenizer, compiled, log_level=0),
                           self.vocab)


class _LlgMatcher:
    def __init__(self, matcher, vocab: TokenVocabulary) -> None:
        import llguidance.numpy as lln

        self._m, self._lln, self._vocab = matcher, lln, vocab
        self._eos = set(vocab.eos_token_ids)

    def copy(self) -> _LlgMatcher:
        return _LlgMatcher(self._m.deep_copy(), self._vocab)

    @property
    def raw(self):
        """The llguidance LLMatcher (for parallel mask fills)."""
        return self._m

    def forced(self) -> bool:
        """Whether the grammar forces the next bytes (the mask is then canonical only)."""
        return bool(self._m.compute_ff_bytes())

    def fill_mask(self, row: np.ndarray) -> None:
        self._lln.fill_next_token_bitmask(self._m, row[None], 0)
        self.fix_eos(row)

    def fix_eos(self, row: np.ndarray) -> None:
        """EOS only where the grammar accepts (after a fill of `row`)."""
        if not self._m.is_accepting():
            bits = row.view(np.uint32)
            for t in self._eos:
                bits[t // 32] &= ~np.uint32(1 << (t % 32))

    def consume(self, token: int) -> bool:
        if token in self._eos:
            return self._m.is_accepting()
        return self._m.consume_token(token)

    def accepts(self) -> bool:
        return self._m.is_accepting()

    def check(self, token: int) -> bool:
        if token in self._eos:
            return self._m.is_accepting()
        return self._m.validate_tokens([token]) == 1


# ---- outlines-core -----------------------------------------------------------------------------

class OutlinesBackend:
    name = "outlines"

    def __init__(self, vocab: TokenVocabulary, cache_size: int = 64) -> None:
        import outlines_core

        self._oc = outlines_core
        self.vocab = vocab
        by_bytes: dict[bytes, list[int]] = {}
        for i, tok in enumerate(vocab.tokens):
            if i not in vocab.special_ids and tok:
                by_bytes.setdefault(tok, []).append(i)
        self._vocabulary = outlines_core.Vocabulary(vocab.eos_token_ids[0], by_bytes)
        self._index = functools.lru_cache(maxsize=cache_size)(self._build_index)

    def regex(self, grammar: Grammar) -> str:
        if grammar.kind == "regex":
            return grammar.text
        if grammar.kind == "choice":
            return "(" + "|".join(re.escape(o) for o in json.loads(grammar.text)) + ")"
        if grammar.kind == "json_schema":
            from outlines_core.json_schema import build_regex_from_schema

            try:
                # Compact JSON, as llguidance writes it (no optional whitespace).
                return build_regex_from_schema(grammar.text, whitespace_pattern="")
            except (ValueError, TypeError) as exc:
                raise InvalidArgument(grammar.field, f"outlines: {exc}") from None
        raise InvalidArgument(grammar.field, "outlines supports regex, json_schema and choice; "
                                             "use the llguidance backend for grammars")

    def compile(self, grammar: Grammar):
        return self._index(self.regex(grammar), grammar.field)

    def _build_index(self, regex: str, field: str) -> _OutlinesIndex:
        try:
            return _OutlinesIndex(self._oc.Index(regex, self._vocabulary))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(field, f"outlines: {exc}") from None

    def matcher(self, index: _OutlinesIndex) -> _OutlinesMatcher:
        return _OutlinesMatcher(self._oc.Guide(index.index), self.vocab, index)


class _OutlinesIndex:
    """An outlines-core Index and the masks of its states met so far: a mask depends only on
    the DFA state, and writing one walks every allowed token (~0.5 ms inside a free string)."""

    MAX_STATES = 4096

    def __init__(self, index) -> None:
        self.index = index
        self.masks: dict[int, np.ndarray] = {}


class _OutlinesMatcher:
    def __init__(self, guide, vocab: TokenVocabulary, index: _OutlinesIndex) -> None:
        self._g, self._vocab, self._index = guide, vocab, index
        self._eos = set(vocab.eos_token_ids)

    def copy(self) -> _OutlinesMatcher:
        return _OutlinesMatcher(copy.copy(self._g), self._vocab, self._index)

    def fill_mask(self, row: np.ndarray) -> None:
        state, masks = self._g.get_state(), self._index.masks
        found = masks.get(state)
        if found is None:
            found = np.zeros_like(row)
            self._g.write_mask_into(found.ctypes.data, found.size, found.itemsize)
            if len(masks) < _OutlinesIndex.MAX_STATES:  # dict writes are atomic in CPython
                masks[state] = found
        row[:] = found

    def consume(self, token: int) -> bool:
        if token in self._eos:
            return self._g.is_finished()
        try:
            self._g.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def accepts(self) -> bool:
        return self._g.is_finished()

    def check(self, token: int) -> bool:
        if token in self._eos:
            return self._g.is_finished()
        return self._g.accepts_tokens([token])
