"""Per-strategy parameters: one msgspec Struct each, a tagged union, validated on construction.

The tag is the strategy's name everywhere (see `decoding.registry`). `SamplingParams`' flat
fields (`temperature`, `top_k`, ...) are the short form of `Greedy` / `Sampling`; the other
strategies replace how the next token is chosen while the request's transforms (penalties,
logit bias, min-new-tokens, plug-ins) and stopping criteria still apply.
"""

from __future__ import annotations

from typing import Union

import msgspec

from decoding.base import InvalidArgument

MAX_CONTRASTIVE_K = 64
MAX_BEAMS = 32


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


class Greedy(msgspec.Struct, frozen=True, kw_only=True, tag="greedy"):
    """The most likely token after the transforms (ties to the lowest token id)."""


class Sampling(msgspec.Struct, frozen=True, kw_only=True, tag="sampling"):
    """Ancestral sampling from the transformed distribution; same fields and rules as the
    flat `SamplingParams` fields it stands for."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None


class Contrastive(msgspec.Struct, frozen=True, kw_only=True, tag="contrastive"):
    """Contrastive search (Su et al. 2022), Hugging Face semantics: among the top_k most
    likely tokens v, pick argmax (1 - penalty_alpha) p(v) - penalty_alpha max_j cos(h_v, h_j)
    over the last-layer hidden states h_j of every previous position."""

    top_k: int = 4
    penalty_alpha: float = 0.6

    def __post_init__(self) -> None:
        _require(1 <= self.top_k <= MAX_CONTRASTIVE_K, "top_k",
                 f"must be in [1, {MAX_CONTRASTIVE_K}]")
        _require(0.0 <= self.penalty_alpha <= 1.0, "penalty_alpha", "must be in [0, 1]")


class BeamSearch(msgspec.Struct, frozen=True, kw_only=True, tag="beam"):
    """Beam search with Hugging Face transformers' semantics (length-normalised hypotheses,
    2 x num_beams candidates per step, early stopping as in `generate`)."""

    num_beams: int = 4
    length_penalty: float = 1.0
    """Hypothesis score = sum of logprobs / (generated length ** length_penalty)."""
    early_stopping: bool = False
    """True: stop as soon as num_beams hypotheses are finished. False: stop when no running
    beam can still beat the worst kept hypothesis (the heuristic of transformers)."""
    num_return: int = 1
    """How many best hypotheses to return (<= num_beams)."""

    def __post_init__(self) -> None:
        _require(1 <= self.num_beams <= MAX_BEAMS, "num_beams", f"must be in [1, {MAX_BEAMS}]")
        _require(1 <= self.num_return <= self.num_beams, "num_return",
                 "must be in [1, num_beams]")
        _require(-10.0 <= self.length_penalty <= 10.0, "length_penalty",
                 "must be in [-10, 10]")


StrategyParams = Union[Greedy, Sampling, Contrastive, BeamSearch]
