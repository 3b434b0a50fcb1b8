"""Messages the engine emits: per-step deltas and offline completions."""

from __future__ import annotations

import msgspec

from constraints.compiler import ConstraintReport


class TokenLogprob(msgspec.Struct, frozen=True, gc=False):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []
    """The top-n (token id, logprob) alternatives, most likely first."""


class Candidate(msgspec.Struct, frozen=True, gc=False):
    """One of the finished sequences a strategy returned (e.g. a beam), best first."""

    token_ids: list[int]
    text: str
    score: float


class RequestOutput(msgspec.Struct, frozen=True, gc=False, kw_only=True):
    """What one step produced for one request (a streamed delta)."""

    req_id: str
    new_token_ids: list[int]
    new_text: str
    num_output_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    """"stop" (EOS, stop token or stop string), "length" or "abort"."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request, if any."""
    logprobs: list[TokenLogprob] | None = None
    captures: dict | None = None
    """Capture name -> tensor for this step, when the request asked for activations."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_forward_tokens: int = 0
    """Tokens run forward for this request so far (prefill chunks, recomputes, decodes)."""
    queue_time: float | None = None
    """Seconds from arrival to the first step that ran the request (None: never ran)."""
    candidates: list[Candidate] | None = None
    """On the final output of a strategy that returns several sequences (beam search)."""
    constraint: ConstraintReport | None = None
    """On the final output of a constrained request: masks and checks it cost."""
    rounds: list[list[Candidate]] | None = None
    """On the final output of a strategy that reports intermediate survivors (RankGen's
    rounds, best first)."""


class CompletionOutput(msgspec.Struct, kw_only=True):
    """The whole result of one request, as the offline `Engine.generate` returns it."""

    index: int
    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    num_forward_tokens: int = 0
    """Tokens run forward for this request in all (prefill chunks, recomputes, decodes of
    every branch: contrastive candidates, beams, samples)."""
    candidates: list[Candidate] | None = None
    """The n best sequences of strategies that return several (beam search), best first;
    `token_ids` / `text` are the first of them."""
    constraint: ConstraintReport | None = None
