"""Scorers of continuations given a prefix, for reranking strategies (RankGen).

A `Scorer` answers `score(prefixes, continuations) -> [n] float32`, pair i being
(prefixes[i], continuations[i]), batched. Built-ins: `minilm` (the bundled all-MiniLM-L6-v2
bi-encoder, cosine) and RankGen-format T5 encoders loaded from a directory
(`rankgen_t5.T5RankGenScorer`); the server registers them by name (`--scorer NAME=DIR`).
"""

from decoding.scorers.base import (LazyScorer, Scorer, get_scorer, register_scorer,  # noqa: F401
                                   scorer_names)

register_scorer("minilm", LazyScorer(lambda: __import__(
    "decoding.scorers.minilm", fromlist=["MiniLmScorer"]).MiniLmScorer()))
