"""Text-quality measures of open-ended generation, as the decoding papers define them.

- rep-n and diversity (Su et al. 2022, SimCTG): over a set of texts, rep-n = 100 x (1 -
  unique n-grams / total n-grams), where a text's n-grams are its runs of n whitespace-separated
  words and the unique ones are counted per text, then both counts are summed over the texts;
  diversity = prod over n = 2, 3, 4 of (1 - rep-n / 100). Every n-gram of a text counts,
  the last one included.
- coherence (Su & Collier 2022): the mean cosine of the prefix's and the continuation's
  sentence embeddings (SimCSE there; here whatever encoder the caller embeds with).
- MAUVE (Pillutla et al. 2021): the `mauve-text` package on features the caller computes,
  with its default quantisation (PCA to 90% variance, k-means into n/10 buckets).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

REP_NS = (2, 3, 4)


def ngram_counts(text: str, n: int) -> tuple[int, int]:
    """(unique, total) word n-grams of one text."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)), len(grams)


def rep_n(texts: Sequence[str], n: int) -> float:
    """SimCTG's rep-n in percent (0: no n-gram repeats inside any text); 0 for no n-grams."""
    unique = total = 0
    for text in texts:
        u, t = ngram_counts(text, n)
        unique, total = unique + u, total + t
    return 100.0 * (1.0 - unique / total) if total else 0.0


def diversity(texts: Sequence[str]) -> float:
    """prod over n = 2, 3, 4 of (1 - rep-n / 100), in [0, 1]."""
    return float(np.prod([1.0 - rep_n(texts, n) / 100.0 for n in REP_NS]))


def coherence(prefix_embeddings: np.ndarray, continuation_embeddings: np.ndarray) -> float:
    """Mean cosine of row i of each [n, d] matrix (rows need not be normalised)."""
    a = prefix_embeddings / np.linalg.norm(prefix_embeddings, axis=1, keepdims=True)
    b = continuation_embeddings / np.linalg.norm(continuation_embeddings, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).mean())


def mauve(p_features: np.ndarray, q_features: np.ndarray, seed: int = 25) -> float:
    """MAUVE between generations (p) and human texts (q), [n, d] features each, with
    `mauve-text`'s defaults (its seed 25 unless given)."""
    import mauve as mauve_text

    with _native_stderr_silenced():  # FAISS k-means warns below 39 points per bucket
        out = mauve_text.compute_mauve(p_features=np.asarray(p_features, dtype=np.float32),
                                       q_features=np.asarray(q_features, dtype=np.float32),
                                       seed=seed, verbose=False)
    return float(out.mauve)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Points file descriptor 2 at /dev/null (FAISS's C++ warnings bypass sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def mauve_spread(p_features: np.ndarray, q_features: np.ndarray,
                 seeds: Sequence[int]) -> tuple[float, float]:
    """Mean and standard deviation of MAUVE over k-means seeds: with a few hundred texts the
    quantisation alone moves MAUVE by a few points, so a table shows that spread."""
    scores = [mauve(p_features, q_features, seed) for seed in seeds]
    return float(np.mean(scores)), float(np.std(scores))
