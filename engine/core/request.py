"""Request: one sequence the scheduler runs (a branch of a `engine.generation.Generation`)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from decoding.base import Capture
    from engine.pipeline.generation import Generation
    from engine.prompt import PromptLayout


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


class TokenSequence:
    """Prompt + generated tokens and a status: what a scheduled sequence and a client-visible
    generation both are (subclasses set `all_token_ids`, `num_prompt_tokens`, `status`)."""

    __slots__ = ()
    all_token_ids: list[int]
    num_prompt_tokens: int
    status: RequestStatus

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)


class Request(TokenSequence):
    """Token state of one scheduled sequence.

    `all_token_ids` is prompt + generated tokens; `num_computed_tokens` of them have K/V in the
    cache. The scheduler only ever reasons about these two counts: prefill, chunked prefill,
    prefix hits and recompute after preemption are all "compute the next tokens". What the
    client sees (emitted tokens, text, stop criteria, candidates) lives on the generation.
    """

    __slots__ = ("req_id", "generation", "branch", "prompt_token_ids", "all_token_ids",
                 "num_prompt_tokens", "seed", "captures", "extra_key", "layout",
                 "no_prefix_cache", "num_computed_tokens", "num_cached_tokens",
                 "num_preemptions", "num_forward_tokens", "status", "first_scheduled_time",
                 "constraint_state")

    def __init__(self, req_id: str, prompt_token_ids: list[int], *, generation: Generation,
                 branch: int = 0, seed: int = 0, captures: frozenset[Capture] = frozenset(),
                 extra_key=None, layout: PromptLayout | None = None,
                 no_prefix_cache: bool = False) -> None:
        self.req_id = req_id
        self.generation = generation
        """The generation this sequence is a branch of (the scheduler keeps siblings
        together; it treats it as an opaque key)."""
        self.branch = branch
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.seed = seed
        """The random stream of this branch (sampling rows)."""
        self.captures = captures
        """Activations the model runner returns for this sequence's sampled rows."""
        self.extra_key = extra_key
        """Hashed into every prefix-cache block (prompts with equal tokens but different
        structure must not share KV)."""
        self.layout = layout
        """PromptLayout of a structured prompt (position ids and set membership per prompt
        token); None for a sequential prompt."""
        self.no_prefix_cache = no_prefix_cache
        self.constraint_state = None
        """The branch's constraint matcher (`constraints.compiler.ConstraintState`), when the
        generation is constrained; a fork copies it."""
        """Compute every prompt token (a strategy needs the hidden states of all of them)."""
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.num_forward_tokens = 0
        """Tokens the model ran forward for this sequence, recomputes included (its cost)."""
        self.status = RequestStatus.WAITING
        self.first_scheduled_time: float | None = None
        """When a step first ran this sequence (None: not yet)."""

    @property
    def defers_logits(self) -> bool:
        """Whether the LM head waits for the strategy to choose among this generation's
        branches (`SelectionStrategy.logits_of_choice`): the model runner returns the row's
        captured hidden state only."""
        return self.generation.strategy.logits_of_choice

    def positions(self, start: int, end: int) -> list[int]:
        """Position ids of tokens [start, end): their index, or the structured prompt's layout
        (generated tokens continue one past the last prompt position)."""
        if self.layout is None:
            return list(range(start, end))
        prompt = self.layout.positions
        n = len(prompt)
        head = prompt[start:min(end, n)]
        first_new, after = max(start, n), self.layout.next_position
        return head + list(range(after + first_new - n, after + end - n))

    def needs_structure_mask(self, start: int, end: int) -> bool:
        """Whether tokens [start, end) include set members (which must not see each other)."""
        if self.layout is None:
            return False
        first, last = self.layout.member_span
        return start < last and end > first

    def fork(self, child_id: str, branch: int, seed: int,
             generation: Generation | None = None) -> Request:
        """A copy with this sequence's tokens and computed count (its KV is shared by the
        cache manager's fork), a branch of `generation` (default: this one's); it drops the
        capture of every prompt position."""
        child = Request(child_id, self.prompt_token_ids,
                        generation=generation or self.generation,
                        branch=branch, seed=seed,
                        captures=frozenset(c for c in self.captures if not c.all_positions),
                        extra_key=self.extra_key, layout=self.layout)
        child.all_token_ids = list(self.all_token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        if self.constraint_state is not None and child.generation is self.generation:
            child.constraint_state = self.constraint_state.fork()
        return child

    def __repr__(self) -> str:
        return (f"Request({self.req_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")
