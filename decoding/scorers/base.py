"""The scorer interface and the registry of loaded scorers."""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch


class Scorer(abc.ABC):
    """Scores continuations against their prefixes; higher is better."""

    name: str = ""

    @abc.abstractmethod
    def score(self, prefixes: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        """[n] float32 scores of the pairs (prefixes[i], continuations[i])."""


class LazyScorer(Scorer):
    """A scorer built on first use (the bundled MiniLM loads in about a second)."""

    def __init__(self, build) -> None:
        self._build, self._scorer = build, None

    def score(self, prefixes: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        if self._scorer is None:
            self._scorer = self._build()
        return self._scorer.score(prefixes, continuations)


_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, scorer: Scorer) -> Scorer:
    if not name:
        raise ValueError("a scorer needs a name")
    scorer.name = name
    _SCORERS[name] = scorer
    return scorer


def unregister_scorer(name: str) -> None:
    _SCORERS.pop(name, None)


def get_scorer(name: str) -> Scorer | None:
    return _SCORERS.get(name)


def scorer_names() -> list[str]:
    """Loaded scorers, and `self` (the served model, built into the rankgen strategy)."""
    return sorted([*_SCORERS, "self"])
