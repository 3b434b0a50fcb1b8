"""Held-out text prefixes and their human continuations, cut from real corpora.

Every document of the corpus specs (`retrieval.corpus`: `kjv:heldout`, `pydoc:topics`, files)
is tokenized whole, as a text prompt is, and cut into consecutive, non-overlapping segments of
`prefix_tokens + continuation_tokens` tokens (a document's tail shorter than that is dropped).
`num` segments are taken evenly spaced over all of them, in document order, so the set is fixed
by the corpus, the tokenizer and the three numbers. A segment's first `prefix_tokens` are the
prompt and the rest is the reference: what the human author wrote next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from retrieval.corpus import read_corpus


class Sample(msgspec.Struct, frozen=True):
    source: str
    """The document: "<spec> <name>", and the segment's first token index in it."""
    prefix_ids: list[int]
    reference_ids: list[int]
    prefix: str
    reference: str


def held_out_samples(corpus_specs: Sequence[str], encode: Callable[[str], list[int]],
                     decode: Callable[[list[int]], str], num: int, prefix_tokens: int,
                     continuation_tokens: int) -> list[Sample]:
    """`num` (prefix, human continuation) samples; ValueError if the corpora hold fewer."""
    if num < 1 or prefix_tokens < 1 or continuation_tokens < 1:
        raise ValueError("num, prefix_tokens and continuation_tokens must be positive")
    length = prefix_tokens + continuation_tokens
    segments: list[tuple[str, list[int]]] = []
    for spec in corpus_specs:
        for doc in read_corpus(spec).documents:
            ids = encode(doc.text)
            segments += [(f"{spec} {doc.name} @{start}", ids[start:start + length])
                         for start in range(0, len(ids) - length + 1, length)]
    if len(segments) < num:
        raise ValueError(f"{', '.join(corpus_specs)} holds {len(segments)} segments of "
                         f"{length} tokens, fewer than the {num} asked for")
    picked = [segments[i * len(segments) // num] for i in range(num)]
    return [Sample(source, ids[:prefix_tokens], ids[prefix_tokens:],
                   decode(ids[:prefix_tokens]), decode(ids[prefix_tokens:]))
            for source, ids in picked]
