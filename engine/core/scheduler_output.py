"""What the scheduler hands to the model runner for one step."""

from __future__ import annotations

import msgspec

from engine.core.request import Request


class ScheduledRequest(msgspec.Struct, kw_only=True):
    request: Request
    num_new_tokens: int
    """Tokens `all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]`
    are fed this step."""
    block_ids: list[int]
    """The request's whole block table after this step's allocation."""
    samples: bool
    """True when this step computes the last known token, so its logits are sampled."""


class SchedulerOutput(msgspec.Struct, kw_only=True):
    scheduled: list[ScheduledRequest]
    block_copies: list[tuple[int, int, int]] = []
    """(src, dst, rows) KV block copies to perform before the forward (copy-on-write of
    forks): the first `rows` token slots of block src into block dst (0: the whole block or
    state slot)."""
    preempted_req_ids: list[str] = []

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.block_copies
