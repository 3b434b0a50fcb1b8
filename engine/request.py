"""Request: one sequence scheduled by the engine (a branch of a generation)."""

from __future__ import annotations

import enum
import time

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


class Request:
    """Token state of one sequence.

    `all_token_ids` is prompt + generated tokens; `num_computed_tokens` of them have K/V in the
    cache. The scheduler only ever reasons about these two counts: prefill, chunked prefill,
    prefix hits and recompute after preemption are all "compute the next tokens".
    """

    def __init__(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, eos_token_ids: tuple[int, ...] = (),
                 captures: frozenset[str] = frozenset(), extra_key=None) -> None:
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.eos_token_ids = eos_token_ids
        self.captures = captures
        self.extra_key = extra_key
        """Hashed into every prefix-cache block (prompts with equal tokens but different
        structure must not share KV)."""
        self.all_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        """When a step first ran this request (the end of its queueing time)."""
        self.layout = None
        """PromptLayout of a structured prompt (position ids and set membership per prompt
        token); None for a sequential prompt."""
        self.no_prefix_cache = False
        """Compute every prompt token (a strategy needs the hidden states of all of them)."""
        self.generation = None
        """The strategy generation this request is a branch of (None: a plain request)."""
        self.branch = 0
        self.candidates = None
        """Finished sequences a strategy returned: list of (token_ids, text, score)."""
        self.num_forward_tokens = 0
        """Tokens the model ran forward for this request, recomputes included (its cost)."""
        self.detokenizer = None
        self.stop_reason: int | str | None = None
        self.output_text = ""
        """Set when the request finishes (the streamed deltas carry it before that)."""
        self.logprobs = None

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

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.req_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")
