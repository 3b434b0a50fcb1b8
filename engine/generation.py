"""Requests run by plug-in strategies (`decoding.base`): one head, many branches.

The head is the client-visible sequence (prompt + emitted tokens, detokenizer, stop criteria)
and is never scheduled. Branches are ordinary scheduler requests (`<req_id>#<n>`): they hold
KV blocks, are batched with all other traffic, can be preempted and recomputed. After every
step the strategy of each generation whose branches produced logits sees a `StepView` and
answers a `StepDecision`, which this module applies: forks share the parent's KV blocks (the
partial last block is copied before the next step), frees return blocks to the pool.
"""

from __future__ import annotations

import torch

from decoding.base import StepDecision, StepView, create_strategy, strategy_class
from engine.errors import ResourceExhausted
from engine.messages import RequestOutput
from engine.model_runner import CAPTURE_FINAL_HIDDEN, CAPTURE_PROMPT_HIDDEN
from engine.request import Request, RequestStatus
from engine.sampler import SamplingBatch, SamplingRow, apply_logits_processors


class Generation:
    __slots__ = ("head", "strategy", "branches", "ready", "prompt_hidden",
                 "freed_forward_tokens")

    def __init__(self, head: Request) -> None:
        self.head = head
        self.strategy = create_strategy(head.params.strategy)
        self.branches: dict[int, Request] = {}
        self.ready: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        """Branch -> (processed logits, hidden) of branches that computed their last token.
        The strategy runs once every live branch is ready: a branch that was preempted or
        scheduled in a later step (token budget) is waited for."""
        self.prompt_hidden: list[torch.Tensor] = []
        self.freed_forward_tokens = 0


def max_branches(params) -> int:
    """Most branches a request with these params keeps alive (for the KV check at admission)."""
    if params.strategy is None:
        return 1
    return strategy_class(params.strategy).max_branches(params.strategy)


class Generations:
    """All live strategy generations of an engine."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.by_id: dict[str, Generation] = {}

    def add(self, head: Request) -> None:
        gen = Generation(head)
        captures = set(head.captures)
        if gen.strategy.needs_hidden:
            captures.add(CAPTURE_FINAL_HIDDEN)
        root = Request(f"{head.req_id}#0", head.prompt_token_ids, head.params, head.seed,
                       head.eos_token_ids, frozenset(captures), head.extra_key)
        if gen.strategy.needs_prompt_hidden:
            root.captures = root.captures | {CAPTURE_PROMPT_HIDDEN}
            root.no_prefix_cache = True  # every prompt position must be computed
        root.generation, root.branch, root.layout = gen, 0, head.layout
        self.engine.scheduler.add_request(root)
        self.engine.outputs.add(head)
        gen.branches[0] = root
        self.by_id[head.req_id] = gen

    def collect_prompt_hidden(self, chunks: dict[str, tuple[int, torch.Tensor]],
                              requests: dict[str, Request]) -> None:
        """Keeps the prompt hidden states of branches that asked (a restart at 0 resets)."""
        for req_id, (start, hidden) in chunks.items():
            gen = requests[req_id].generation
            if start == 0:
                gen.prompt_hidden.clear()
            gen.prompt_hidden.append(hidden)

    # ---- one step ------------------------------------------------------------------------------

    def step(self, rows: list[Request], logits: torch.Tensor,
             captures: dict[str, dict[str, torch.Tensor]]) -> list[RequestOutput]:
        """Runs the strategies of every generation among `rows` and applies their decisions."""
        processed = self._process(rows, logits)
        touched: dict[str, Generation] = {}
        for i, req in enumerate(rows):
            gen = req.generation
            hidden = captures[req.req_id][CAPTURE_FINAL_HIDDEN] \
                if gen.strategy.needs_hidden else None
            gen.ready[req.branch] = (processed[i], hidden)
            touched[gen.head.req_id] = gen
        outputs = []
        for gen in touched.values():
            # A ready branch may have been preempted since (its KV is gone): it recomputes
            # and reports again.
            gen.ready = {b: v for b, v in gen.ready.items()
                         if gen.branches[b].num_computed_tokens == gen.branches[b].num_tokens}
            if len(gen.ready) < len(gen.branches):
                continue
            out = self._apply(gen, gen.strategy.step(self._view(gen)))
            if out is not None:
                outputs.append(out)
        return outputs

    def _process(self, rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        log_first = [r.generation.strategy.log_softmax_first for r in rows]
        if any(log_first):
            mask = torch.tensor(log_first)[:, None]
            logits = torch.where(mask, logits.log_softmax(dim=-1), logits)
        batch = SamplingBatch.build(
            [SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids,
                         output_token_ids=r.output_token_ids, seed=0,
                         eos_token_ids=r.eos_token_ids) for r in rows],
            self.engine.vocab_size, logits.device)
        return apply_logits_processors(logits, batch).float()

    def _view(self, gen: Generation) -> StepView:
        """The view of every branch (all ready), in branch order; clears `gen.ready`."""
        params, ready = gen.head.params, gen.ready
        branch_ids = sorted(ready)
        rows = [gen.branches[b] for b in branch_ids]
        logits = torch.stack([ready[b][0] for b in branch_ids])
        hidden = torch.stack([ready[b][1] for b in branch_ids]) \
            if gen.strategy.needs_hidden else None
        gen.ready = {}
        prompt_hidden = None
        if gen.prompt_hidden and 0 in gen.branches:
            prompt_hidden = torch.cat(gen.prompt_hidden).float()
            gen.prompt_hidden = []
            # Handed over once: the prompt branch may live on as a candidate branch.
            root = gen.branches[0]
            root.captures = root.captures - {CAPTURE_PROMPT_HIDDEN}
            root.no_prefix_cache = False
        return StepView(branch_ids=branch_ids, logits=logits, hidden=hidden,
                        prompt_hidden=prompt_hidden,
                        output_token_ids=[r.output_token_ids for r in rows],
                        eos_token_ids=gen.head.eos_token_ids,
                        max_new_tokens=params.max_new_tokens,
                        min_new_tokens=params.min_new_tokens, ignore_eos=params.ignore_eos)

    def _apply(self, gen: Generation, decision: StepDecision) -> RequestOutput | None:
        if decision.finished:  # every branch is freed with the request
            return self._finish_with_candidates(gen, decision.candidates or [])
        # Emitted tokens first: when one of them ends the request, its forks would only
        # take blocks (and preempt other requests for them) to be freed at once.
        status, emitted = self._append_emitted(gen.head, decision.emit)
        if status is not None:
            self._end(gen, status)
            return self._emit(gen, emitted)
        try:
            self._apply_branches(gen, decision)
        except ResourceExhausted:  # no block to fork into: this request ends, not the engine
            self._end(gen, RequestStatus.FINISHED_ABORTED)
            return self._emit(gen, emitted)
        if not decision.emit:
            assert gen.branches, "a strategy freed every branch without finishing"
            return None
        return self._emit(gen, emitted)

    def _append_emitted(self, head: Request, tokens: list[int]):
        """Appends `tokens` to the head up to the first that stops it: (status, appended)."""
        status, emitted = None, []
        for token in tokens:
            head.append_token(token)
            emitted.append(token)
            status = self.engine.outputs.check_stop(head, self.engine.max_model_len)
            if status is not None:
                break
        return status, emitted

    def _apply_branches(self, gen: Generation, decision: StepDecision) -> None:
        # Branches no fork reads are freed first: their KV makes room for the forks.
        parents = {fork.parent for fork in decision.forks}
        for branch in decision.frees:
            if branch not in parents:
                self._free(gen, branch)
        for fork in decision.forks:
            self._fork(gen, gen.branches[fork.parent], fork.child, fork.token)
        for branch, token in decision.appends:
            gen.branches[branch].append_token(token)
        for branch in decision.frees:
            if branch in parents:
                self._free(gen, branch)

    def _fork(self, gen: Generation, parent: Request, child_id: int, token: int) -> None:
        engine = self.engine
        req_id = f"{gen.head.req_id}#{child_id}"
        copies = engine.kv_cache.fork(parent.req_id, req_id, parent.num_computed_tokens)
        while copies is None:  # no block for the copied partial block: make room
            if not engine.scheduler.preempt_one(keep=set(gen.branches.values())):
                raise ResourceExhausted("no free KV block to fork a branch into")
            copies = engine.kv_cache.fork(parent.req_id, req_id, parent.num_computed_tokens)
        child = Request(req_id, parent.prompt_token_ids, parent.params, parent.seed,
                        parent.eos_token_ids, parent.captures - {CAPTURE_PROMPT_HIDDEN},
                        parent.extra_key)
        child.all_token_ids = parent.all_token_ids + [token]
        child.num_computed_tokens = parent.num_computed_tokens
        child.generation, child.branch, child.layout = gen, child_id, parent.layout
        engine.scheduler.add_block_copies(copies, child)
        engine.scheduler.add_running(child)
        gen.branches[child_id] = child

    def _free(self, gen: Generation, branch: int) -> None:
        req = gen.branches.pop(branch)
        gen.freed_forward_tokens += req.num_forward_tokens
        if branch == 0:  # the prompt's branch: its queueing and prefix hits are the request's
            gen.head.first_scheduled_time = req.first_scheduled_time
            gen.head.num_cached_tokens = req.num_cached_tokens
        if not req.is_finished:
            self.engine.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def _end(self, gen: Generation, status: RequestStatus) -> None:
        """Frees every branch; the head takes `status`."""
        self._sync_stats(gen)
        for branch in list(gen.branches):
            self._free(gen, branch)
        gen.head.status = status
        del self.by_id[gen.head.req_id]

    def _sync_stats(self, gen: Generation) -> None:
        head = gen.head
        head.num_forward_tokens = gen.freed_forward_tokens + sum(
            r.num_forward_tokens for r in gen.branches.values())
        root = gen.branches.get(0)
        if root is not None:
            head.first_scheduled_time = root.first_scheduled_time
            head.num_cached_tokens = root.num_cached_tokens

    def _emit(self, gen: Generation, tokens: list[int]) -> RequestOutput:
        self._sync_stats(gen)
        return self.engine.outputs.emit(gen.head, tokens, None, None)

    def _finish_with_candidates(self, gen: Generation, candidates) -> RequestOutput:
        head, outputs = gen.head, self.engine.outputs
        best = candidates[0].token_ids if candidates else []
        status = RequestStatus.FINISHED_LENGTH
        for token in best:
            head.append_token(token)
            status = outputs.check_stop(head, self.engine.max_model_len) or status
        head.candidates = [(c.token_ids, self.engine.tokenizer.decode(c.token_ids), c.score)
                           for c in candidates]
        self._end(gen, status)
        return outputs.emit(head, best, None, None)

    def abort(self, req_id: str) -> RequestOutput | None:
        gen = self.by_id.get(req_id)
        if gen is None:
            return None
        self._end(gen, RequestStatus.FINISHED_ABORTED)
        return self.engine.outputs.finish(gen.head)
