"""The narrow ports through which the strategy runner changes the engine.

`StrategyRunner` (engine/pipeline/strategy_runner.py) never reaches into the scheduler, the KV cache or
the output processor: every effect of a decision goes through one `StrategyPort` method, and
`EnginePort` is the engine's one implementation of them. `Engine.fork` uses the same `fork`, so
there is one copy-on-write rule. Tests drive the runner with a fake port and no model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from engine.errors import ResourceExhausted
from engine.core.request import Request, RequestStatus

if TYPE_CHECKING:
    from engine.core.cache_manager import CacheManager
    from engine.pipeline.generation import Generation
    from engine.messages import RequestOutput, TokenLogprob
    from engine.pipeline.output_processor import OutputProcessor
    from engine.core.scheduler import Scheduler


class StrategyPort(Protocol):
    """What the runner may do: queue, fork and free sequences; stop-check and emit output."""

    def add(self, gen: Generation, seq: Request | None) -> None:
        """Opens a new generation's output state and queues its prompt sequence (None: the
        sequence is already running, a fork of another generation's)."""

    def fork(self, parent: Request, child_id: str, branch: int, seed: int,
             keep: set[Request], generation: Generation | None = None) -> Request:
        """A running copy of `parent` sharing its KV blocks (the partial last block is copied
        before the next step), a branch of `generation` (default: the parent's); may preempt a sequence outside `keep` to find a block.
        Raises ResourceExhausted when no block can be had."""

    def free(self, seq: Request) -> None:
        """Ends a sequence and returns its KV blocks (those no sibling shares)."""

    def check_stop(self, gen: Generation) -> RequestStatus | None:
        """Whether the token just appended to `gen` ends it (EOS, stop token or string,
        max_new_tokens, context length); detokenizes it."""

    def emit(self, gen: Generation, token_ids: list[int], logprob: TokenLogprob | None,
             captures: dict | None) -> RequestOutput:
        """The client's delta for this step (the final one when `gen` is finished)."""

    def abort_output(self, gen: Generation) -> RequestOutput:
        """The final output of an aborted generation."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of token ids, special tokens skipped."""


class EnginePort:
    """`StrategyPort` over the engine's scheduler, KV cache manager and output processor."""

    def __init__(self, scheduler: Scheduler, outputs: OutputProcessor,
                 max_model_len: int) -> None:
        self.scheduler = scheduler
        self.kv_cache: CacheManager = scheduler.kv
        self.outputs = outputs
        self.max_model_len = max_model_len

    def add(self, gen: Generation, seq: Request | None) -> None:
        if seq is not None:
            self.scheduler.add_request(seq)
        self.outputs.add(gen)

    def fork(self, parent: Request, child_id: str, branch: int, seed: int,
             keep: set[Request], generation: Generation | None = None) -> Request:
        if parent.status != RequestStatus.RUNNING:
            raise ResourceExhausted(f"{parent.req_id!r} is not running: nothing to fork")
        copies = self.kv_cache.fork(parent.req_id, child_id, parent.num_computed_tokens)
        while copies is None:  # no block for the copied partial block: make room
            if not self.scheduler.preempt_one(keep=keep):
                raise ResourceExhausted("no free KV block to fork a branch into")
            copies = self.kv_cache.fork(parent.req_id, child_id, parent.num_computed_tokens)
        child = parent.fork(child_id, branch, seed, generation)
        self.scheduler.add_block_copies(copies, child)
        self.scheduler.add_running(child)
        return child

    def free(self, seq: Request) -> None:
        if not seq.is_finished:
            self.scheduler.finish(seq, RequestStatus.FINISHED_ABORTED)

    def check_stop(self, gen: Generation) -> RequestStatus | None:
        return self.outputs.check_stop(gen, self.max_model_len)

    def emit(self, gen: Generation, token_ids: list[int], logprob: TokenLogprob | None,
             captures: dict | None) -> RequestOutput:
        return self.outputs.emit(gen, token_ids, logprob, captures)

    def abort_output(self, gen: Generation) -> RequestOutput:
        return self.outputs.finish(gen)

    def decode(self, token_ids: list[int]) -> str:
        return self.outputs.tokenizer.decode(token_ids, skip_special_tokens=True)
