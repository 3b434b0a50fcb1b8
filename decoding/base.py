"""The strategy plug-in interface: a strategy sees a `StepView` and answers a `StepDecision`.

A generation (one client request) owns one or more branches: sequences of tokens with KV state
that the engine schedules, batches with all other traffic and keeps in paged KV blocks. A
strategy never touches memory. Each step, for every generation whose branches produced logits,
the engine hands the strategy those rows (processed logits, and the hidden states it asked for)
and applies the strategy's decision: new branches forked from existing ones with one token
appended (they share the parent's KV blocks), branches that continue with a token, branches
freed, tokens emitted to the client's stream, and the end of the generation.

Strategy classes register themselves with `register(params_type)`; `create_strategy(params)`
builds the strategy of a request from its params Struct (see `decoding.params`).
"""

from __future__ import annotations

import abc
from typing import ClassVar

import msgspec
import torch


class StepView(msgspec.Struct, kw_only=True):
    """One generation's rows in one step."""

    branch_ids: list[int]
    """The branches that produced logits this step; row i of `logits` belongs to
    branch_ids[i]."""
    logits: torch.Tensor
    """[rows, vocab] float32. Processed by the request's logits processors (logit bias,
    min_new_tokens, repetition / frequency / presence penalties); no temperature. If the
    strategy sets `log_softmax_first`, these are the processed log-probabilities instead."""
    hidden: torch.Tensor | None = None
    """[rows, hidden_size] float32 LM-head input of each row's last token, when the strategy
    sets `needs_hidden`."""
    prompt_hidden: torch.Tensor | None = None
    """[prompt_len, hidden_size] LM-head inputs of every prompt position: given once, on the
    step that finishes the prompt, to strategies that set `needs_prompt_hidden`."""
    output_token_ids: list[list[int]]
    """Per row: the tokens the branch generated so far (its last token included)."""
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    ignore_eos: bool = False


class Fork(msgspec.Struct, frozen=True):
    """Create branch `child` = branch `parent` + [token] (KV blocks shared with the parent)."""

    parent: int
    child: int
    token: int


class Candidate(msgspec.Struct, frozen=True):
    """A finished sequence a strategy returns (e.g. a beam hypothesis)."""

    token_ids: list[int]
    score: float


class StepDecision(msgspec.Struct, kw_only=True):
    """What to do after a step. Applied in order: finish (with candidates; nothing else
    applies), emit (when an emitted token stops the request, nothing else applies), frees of
    branches no fork reads, forks, appends, the other frees."""

    forks: list[Fork] = []
    appends: list[tuple[int, int]] = []
    """(branch, token): the branch continues with `token` appended."""
    frees: list[int] = []
    """Branches to drop; their KV blocks return to the pool once no other branch shares them."""
    emit: list[int] = []
    """Tokens appended to the generation's streamed output (EOS, stop strings and
    max_new_tokens are then checked by the engine, as for sampling)."""
    finished: bool = False
    """The strategy is done (e.g. beam search): the engine frees every branch."""
    candidates: list[Candidate] | None = None
    """With `finished`: the n best sequences, best first; the first becomes the output."""


class DecodingStrategy(abc.ABC):
    """One instance per generation. Subclasses set the ClassVars and implement `step`."""

    needs_hidden: ClassVar[bool] = False
    needs_prompt_hidden: ClassVar[bool] = False
    log_softmax_first: ClassVar[bool] = False
    streams_output: ClassVar[bool] = True
    """True: tokens are emitted as they are decided (the engine applies stop criteria).
    False: the strategy finishes by itself and returns candidates (e.g. beam search)."""

    def __init__(self, params) -> None:
        self.params = params

    @staticmethod
    def max_branches(params) -> int:
        """Most branches a request with `params` keeps alive (KV budget check at admission)."""
        return 1

    @abc.abstractmethod
    def step(self, view: StepView) -> StepDecision:
        """Decides what happens after this step. Branch 0 is the prompt."""


_REGISTRY: dict[type, type[DecodingStrategy]] = {}


def register(params_type: type):
    """Class decorator: the strategy that runs requests whose params are `params_type`."""

    def wrap(cls: type[DecodingStrategy]) -> type[DecodingStrategy]:
        _REGISTRY[params_type] = cls
        return cls

    return wrap


def create_strategy(params) -> DecodingStrategy:
    try:
        cls = _REGISTRY[type(params)]
    except KeyError:
        raise TypeError(f"no strategy registered for {type(params).__name__}") from None
    return cls(params)


def strategy_class(params) -> type[DecodingStrategy]:
    return _REGISTRY[type(params)]
