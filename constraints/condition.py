"""The Boolean condition AWRS checks tokens against: a grammar matcher, a predicate, or both.

`Condition` belongs to one generation; `start()` gives a particle's state. A state answers
`check(token)`: may the particle's text continue with `token` (the grammar's prefix check, a
`validate` of one token without changing the matcher, and the predicate on the decoded text
with the token's bytes appended); EOS passes where the text is complete (the grammar accepts
and the predicate's `complete` holds). Special tokens other than EOS never pass. `advance`
appends a token; `copy` forks a particle; `mask` is the accepted set at once, where a grammar
alone is the condition (AWRS uses it after many rejections).

A predicate sees text, and a token may end in the middle of a UTF-8 character: that partial
character is shown to the predicate as U+FFFD. A predicate over ASCII text (most structured
formats) loses nothing and never walks into a byte sequence it cannot complete; one that accepts
some non-ASCII character but not U+FFFD cannot produce that character where the tokenizer splits
it. (Letting partial characters pass unchecked instead kills particles: the walk accepts them
before EOS and nothing valid follows.) Every check is counted in the generation's stats.
"""

from __future__ import annotations


import numpy as np

from constraints.backends import mask_words
from constraints.compiler import Compiled, ConstraintStats
from constraints.predicates import Predicate
from constraints.vocabulary import TokenVocabulary
from decoding.constraint import unpack_bitmask


def _text(data: bytes) -> str:
    """The text of `data`; invalid or incomplete UTF-8 becomes U+FFFD."""
    return data.decode("utf-8", errors="replace")


class Condition:
    def __init__(self, vocab: TokenVocabulary, stats: ConstraintStats,
                 compiled: Compiled | None = None, predicate: Predicate | None = None) -> None:
        assert compiled is not None or predicate is not None
        self.vocab = vocab
        self.stats = stats
        self.compiled = compiled
        self.predicate = predicate
        self.eos = frozenset(vocab.eos_token_ids)

    def start(self) -> ConditionState:
        matcher = self.compiled.matcher() if self.compiled is not None else None
        return ConditionState(self, matcher, b"")


class ConditionState:
    __slots__ = ("cond", "matcher", "data")

    def __init__(self, cond: Condition, matcher, data: bytes) -> None:
        self.cond = cond
        self.matcher = matcher
        self.data = data

    def check(self, token: int) -> bool:
        cond = self.cond
        cond.stats.checks += 1
        ok = self._check(token)
        if not ok:
            cond.stats.rejected_tokens += 1
        return ok

    def _check(self, token: int) -> bool:
        cond = self.cond
        if token in cond.eos:
            if self.matcher is not None and not self.matcher.accepts():
                return False
            return cond.predicate is None or cond.predicate.complete(_text(self.data))
        if token in cond.vocab.special_ids or token >= len(cond.vocab.tokens):
            return False
        if self.matcher is not None and not self.matcher.check(token):
            return False
        if cond.predicate is not None:
            return cond.predicate.prefix(_text(self.data + cond.vocab.tokens[token]))
        return True

    def mask(self) -> np.ndarray | None:
        """The exact set `check` accepts now, as a [V] bool array, when a mask can say it: a
        grammar alone (a predicate has no mask), and not where llguidance forces bytes (its
        mask then keeps only their canonical tokenization, fewer than `check` accepts)."""
        if self.matcher is None or self.cond.predicate is not None:
            return None
        forced = getattr(self.matcher, "forced", None)
        if forced is not None and forced():
            return None
        size = len(self.cond.vocab.tokens)
        row = np.zeros(mask_words(size), dtype=np.int32)
        self.matcher.fill_mask(row)
        allowed = unpack_bitmask(row[None], size)[0].numpy()
        self.cond.stats.masks += 1
        self.cond.stats.masked_tokens += size - int(allowed.sum())
        return allowed

    def advance(self, token: int) -> None:
        if token in self.cond.eos:
            return
        if self.matcher is not None:
            self.matcher.consume(token)
        self.data += self.cond.vocab.tokens[token]

    def copy(self) -> ConditionState:
        matcher = self.matcher.copy() if self.matcher is not None else None
        return ConditionState(self.cond, matcher, self.data)
