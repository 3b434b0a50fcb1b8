"""Continuous batching scheduler.

Every step gives each request `min(remaining tokens, budget left)` new tokens. Running requests
go first (oldest first), so decodes are never starved by prefills; waiting requests are admitted
while budget, sequence slots and KV blocks remain. When a running request cannot get a block,
the most recently admitted running request is preempted by recompute: its blocks are freed
(full ones keep their prefix hash, so resuming often hits its own cache) and it re-enters the
head of the waiting queue with `num_computed_tokens = 0`.
"""

from __future__ import annotations

import time
from collections import deque

from engine.core.cache_manager import CacheManager
from engine.config import SchedulerConfig
from engine.errors import ResourceExhausted
from engine.core.request import Request, RequestStatus
from engine.core.scheduler_output import ScheduledRequest, SchedulerOutput


class Scheduler:
    """Owns the waiting and running queues and decides, each step, how many tokens every
    request computes. Pure Python: it sees KV memory only through the CacheManager facade."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: CacheManager) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._pending_copies: dict[int, tuple[int, Request, int]] = {}
        """dst block -> (src block, owner, rows) of the copies queued for the next step (a
        block reallocated within the step keeps the copy of its last owner)."""
        self._num_waiting_tokens = 0
        self._blocked_head: Request | None = None
        """A set prompt on a state-slot model that found too little budget for its first
        chunk: the next steps reserve that budget before running requests take theirs."""
        self.num_preemptions = 0
        """Total preemptions since start (a recompute-cost statistic)."""

    # ---- admission and removal -------------------------------------------------------------

    def admission_error(self, num_tokens: int, num_pending: int = 0) -> str | None:
        """Why a request of `num_tokens` cannot join the waiting queue now (None if it can).

        `num_pending` counts requests already accepted upstream but not yet queued.
        """
        cfg = self.config
        if len(self.waiting) + num_pending >= cfg.max_waiting_requests:
            return f"waiting queue is full ({cfg.max_waiting_requests} requests)"
        # An empty queue takes any prompt: a single prompt above the cap could otherwise
        # never run.
        if self.waiting and self._num_waiting_tokens + num_tokens > cfg.max_waiting_tokens:
            return f"waiting queue is full ({cfg.max_waiting_tokens} prompt tokens)"
        return None

    def add_request(self, req: Request) -> None:
        """Queues `req`; raises ResourceExhausted when the waiting queue is at its cap."""
        error = self.admission_error(req.num_tokens)
        if error is not None:
            raise ResourceExhausted(error)
        self.requests[req.req_id] = req
        self.waiting.append(req)
        self._num_waiting_tokens += req.num_tokens

    def add_running(self, req: Request) -> None:
        """Adds a request whose KV blocks already exist (a fork) straight to the running set."""
        req.status = RequestStatus.RUNNING
        self.requests[req.req_id] = req
        self.running.append(req)

    def add_block_copies(self, copies: list[tuple[int, int]], owner: Request) -> None:
        """Queues (src, dst) KV block copies into `owner`'s blocks for the next step: a fork's
        partial last block, of which only the slots of `owner`'s computed tokens are filled
        (state slots, `block_size` 1, are copied whole). A copy whose source is itself the
        destination of a pending copy (a fork of a fork within one step) is redirected to the
        original source: all copies of a step run at once, before anything is written."""
        rows = owner.num_computed_tokens % self.kv.block_size
        pending = self._pending_copies
        for src, dst in copies:
            pending[dst] = (pending[src][0] if src in pending else src, owner, rows)

    def _take_block_copies(self) -> list[tuple[int, int, int]]:
        """The pending copies whose owner still holds the destination block: a branch
        preempted or freed before its copy ran gave the block back, and it may belong to
        another request by now (two copies into one block would race)."""
        copies, self._pending_copies = self._pending_copies, {}
        return [(src, dst, rows) for dst, (src, owner, rows) in copies.items()
                if owner.status == RequestStatus.RUNNING
                and dst in self.kv.get_block_ids(owner.req_id)]

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Removes `req` from the queues and frees its KV blocks."""
        assert status.is_finished
        if req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
            self._num_waiting_tokens -= req.num_tokens
        elif req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        req.status = status
        self.kv.free(req.req_id)
        self.requests.pop(req.req_id, None)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plans one step: running requests first (preempting on KV shortage), then waiting
        ones if nothing was preempted. Block copies queued by forks ride along."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        reserved = self._reserved_budget()
        budget = self._schedule_running(budget - reserved, scheduled, preempted) + reserved
        if not preempted:
            self._schedule_waiting(budget, scheduled)
            while not scheduled and self.waiting and self._preempt_parked(preempted):
                self._schedule_waiting(budget, scheduled)
        copies = self._take_block_copies()
        return SchedulerOutput(scheduled=scheduled, block_copies=copies,
                               preempted_req_ids=[r.req_id for r in preempted])

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest],
                          preempted: list[Request]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_computed_tokens == req.num_tokens:
                # A strategy branch whose last token is computed, waiting for its siblings
                # (see engine.generation); it stays preemptable.
                assert req.generation is not None, req
                i += 1
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate_or_preempt(req, num_new, preempted):
                continue  # `req` itself was preempted; running[i] is now the next request
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, req: Request, num_new: int, preempted: list[Request]) -> bool:
        while self.kv.allocate_slots(req.req_id, req.all_token_ids, req.num_computed_tokens,
                                     num_new, extra_key=req.extra_key) is None:
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _preempt_parked(self, preempted: list[Request]) -> bool:
        """Nothing could run: every running request is a strategy branch parked until its
        siblings report, and the waiting ones (those siblings among them) lack KV blocks.
        Frees a parked branch, preferring other generations than the waiting head's so that
        its generation can complete its step. Returns False when none is parked."""
        head = self.waiting[0].generation
        parked = [i for i, r in enumerate(self.running)
                  if r.num_computed_tokens == r.num_tokens]
        if not parked:
            return False
        others = [i for i in parked if self.running[i].generation is not head]
        victim = self.running.pop((others or parked)[-1])
        self._preempt(victim, to_front=False)  # behind the head it makes room for
        preempted.append(victim)
        return True

    def preempt_one(self, keep) -> bool:
        """Preempts the most recently admitted running request not in `keep` (to make room
        for a fork); returns False when there is none."""
        for i in range(len(self.running) - 1, -1, -1):
            if self.running[i] not in keep:
                self._preempt(self.running.pop(i))
                return True
        return False

    def _preempt(self, req: Request, to_front: bool = True) -> None:
        self.kv.free(req.req_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        if to_front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)
        self._num_waiting_tokens += req.num_tokens

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached, num_cached = (None, 0) if req.no_prefix_cache else \
                self.kv.lookup_prefix(req.all_token_ids, req.extra_key)
            num_new = req.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if num_cached + num_new < self._first_chunk_end(req):
                self._blocked_head = req
                break
            if self.kv.allocate_slots(req.req_id, req.all_token_ids, num_cached, num_new,
                                      cached=cached, extra_key=req.extra_key) is None:
                break
            self.waiting.popleft()
            self._num_waiting_tokens -= req.num_tokens
            if req is self._blocked_head:
                self._blocked_head = None
            req.status = RequestStatus.RUNNING
            if req.num_preemptions == 0:  # report prefix hits of the first admission only
                req.num_cached_tokens = num_cached
            req.num_computed_tokens = num_cached
            self.running.append(req)
            scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

    def _reserved_budget(self) -> int:
        """Budget held back from running requests for a blocked set prompt at the head of the
        queue (without it, a set prompt near the budget would wait behind every decode)."""
        head = self.waiting[0] if self.waiting else None
        if head is None or head is not self._blocked_head:
            return 0
        return self._first_chunk_end(head)

    def _first_chunk_end(self, req: Request) -> int:
        """Tokens a request's first chunk must reach: a state slot cannot hold a half-computed
        parallel set, so on state-slot models a structured prompt's sets run in one chunk."""
        if req.layout is None or not self.kv.state_slots:
            return 0
        return req.layout.member_span[1]

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        return ScheduledRequest(
            request=req, num_new_tokens=num_new, block_ids=self.kv.get_block_ids(req.req_id),
            samples=req.num_computed_tokens + num_new == req.num_tokens)

    def update_from_output(self, output: SchedulerOutput) -> None:
        """Advances `num_computed_tokens` of every request that ran this step."""
        for item in output.scheduled:
            req = item.request
            req.num_computed_tokens += item.num_new_tokens
            req.num_forward_tokens += item.num_new_tokens
