"""Generation: one client request, as the client sees it, and the branches that compute it.

The generation holds the client-visible sequence (prompt + emitted tokens, stop state, text,
candidates, usage) and its selection strategy; it is never scheduled itself. Its branches are
`Request`s, the sequences the scheduler runs: one for greedy and sampling, several for
strategies that fork (contrastive search, beam search). Branch 0 computes the prompt.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from decoding import registry
from engine.core.request import Request, RequestStatus, TokenSequence

if TYPE_CHECKING:
    from decoding.base import Capture
    from engine.prompt import PromptLayout
    from engine.sampling_params import SamplingParams


class Generation(TokenSequence):
    """Client-visible state of one request.

    Attributes that only exist once something happened are explicit: `status` starts WAITING,
    `stop_reason` / `output_text` / `logprobs` / `candidates` are final values set when the
    generation finishes (empty until then).
    """

    def __init__(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, eos_token_ids: tuple[int, ...], *,
                 captures: frozenset[Capture] = frozenset(), extra_key=None,
                 layout: PromptLayout | None = None) -> None:
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.eos_token_ids = eos_token_ids
        self.captures = captures
        """What the client asked the runner to return with each token."""
        self.extra_key = extra_key
        self.layout = layout
        self.strategy = registry.create_strategy(params.selection)
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_text = ""
        self.logprobs = None
        self.candidates: list[tuple[list[int], float]] | None = None
        self.rounds: list[list[tuple[list[int], float]]] | None = None
        """A strategy's intermediate survivors (RankGen rounds), when it reports them."""
        """Finished sequences a strategy returned: (token_ids, score), best first."""
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.num_cached_tokens = 0
        self.num_forward_tokens = 0
        self.branches: dict[int, Request] = {}
        self.ready: dict[int, tuple[torch.Tensor | None, torch.Tensor | None, dict | None]] = {}
        """Branch -> (processed logits, or None while deferred; hidden; the row's captures) of
        branches that computed their last token.
        A forking strategy runs once every live branch is ready: a branch that was preempted
        or scheduled in a later step (token budget) is waited for."""
        self.held_prompt_hidden: torch.Tensor | None = None
        """A prompt capture handed to a view whose `step` did not run (a branch was preempted
        between `choose` and `step`): the next view gets it."""
        self.prompt_captures: dict[str, list[torch.Tensor]] = {}
        """All-position capture name -> its chunks over prompt positions [0,
        num_prompt_captured), in order (collected from the prompt branch's steps)."""
        self.num_prompt_captured = 0
        self.freed_forward_tokens = 0
        self.constraint = None
        """The request's compiled constraint (`constraints.compiler.Compiled`), set at
        admission; its branches hold matchers of it."""
        self.constraint_stats = None
        """`constraints.compiler.ConstraintStats` of all branches, when constrained."""
        self.condition = None
        """The condition a `checks_constraint` strategy (AWRS) checks tokens against."""

    @property
    def max_branches(self) -> int:
        return type(self.strategy).max_branches(self.params.selection)

    def sequence_id(self, branch: int) -> str:
        """The scheduler id of a branch: the request id for the prompt's branch (0)."""
        return self.req_id if branch == 0 else f"{self.req_id}#{branch}"

    def add_prompt_chunk(self, start: int, chunk: dict[str, torch.Tensor]) -> None:
        """Collects the all-position captures of prompt positions [start, start + rows).

        A recompute from position 0 (after preemption) starts over; once every prompt position
        is collected, later chunks (a recompute after that) are ignored. The prompt branch
        bypasses the prefix cache, so chunks never skip a position.
        """
        if self.num_prompt_captured == self.num_prompt_tokens:
            return
        if start == 0:
            self.prompt_captures, self.num_prompt_captured = {}, 0
        assert start == self.num_prompt_captured, "prompt captures would skip positions"
        for name, rows in chunk.items():
            self.prompt_captures.setdefault(name, []).append(rows)
        self.num_prompt_captured += len(next(iter(chunk.values())))

    def take_prompt_capture(self, name: str, keep: bool = False) -> torch.Tensor | None:
        """[num_prompt_tokens, hidden] float32 of one all-position capture once every prompt
        position is collected (else None); `keep=False` releases it."""
        if self.num_prompt_captured < self.num_prompt_tokens or name not in self.prompt_captures:
            return None
        chunks = self.prompt_captures[name] if keep else self.prompt_captures.pop(name)
        whole = torch.cat(chunks)
        if keep:
            self.prompt_captures[name] = [whole]
        return whole

    def final_captures(self) -> dict[str, torch.Tensor]:
        """The client's all-position captures for its final output ({} when it asked for none,
        or when the prompt was not completely computed: an abort mid-prefill)."""
        if self.num_prompt_captured < self.num_prompt_tokens:
            return {}
        out = {}
        for capture in self.captures:
            if capture.all_positions:
                whole = self.take_prompt_capture(capture.name)
                if whole is not None:
                    out[capture.name] = whole
        return out

    def sync_stats(self) -> None:
        """Copies usage from the branches: forward tokens of all (freed ones included), queue
        time and prefix hits of the prompt's branch."""
        self.num_forward_tokens = self.freed_forward_tokens + sum(
            r.num_forward_tokens for r in self.branches.values())
        root = self.branches.get(0)
        if root is not None:
            self.first_scheduled_time = root.first_scheduled_time
            self.num_cached_tokens = root.num_cached_tokens

    def release(self, branch: int) -> Request:
        """Removes a branch, keeping its usage (the prompt's branch hands over its stats)."""
        seq = self.branches.pop(branch)
        self.freed_forward_tokens += seq.num_forward_tokens
        if branch == 0:
            self.first_scheduled_time = seq.first_scheduled_time
            self.num_cached_tokens = seq.num_cached_tokens
        return seq

    def __repr__(self) -> str:
        return (f"Generation({self.req_id!r}, {registry.entry(self.params.selection).name}, "
                f"branches={sorted(self.branches)}, {self.status.name})")
