"""The engine: schedule -> run the model -> sample -> apply -> emit, one step at a time.

`Engine` is synchronous and single-threaded; `engine.async_engine.AsyncEngine` runs it on a
background thread for the server.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import torch

from engine.config import EngineConfig
from engine.errors import InvalidArgument, ResourceExhausted
from engine.generation import Generations, max_branches
from engine.kv_cache_manager import KVCacheManager
from engine.messages import CompletionOutput, RequestOutput, TokenLogprob
from engine.model_runner import CAPTURE_FINAL_HIDDEN, ModelRunner
from engine.output_processor import OutputProcessor
from engine.prompt import StructuredPrompt
from engine.prompt import layout as prompt_layout
from engine.request import Request, RequestStatus
from engine.sampler import Sampler, SamplingBatch, SamplingRow
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.state_cache_manager import StateCacheManager
from engine.tokenizer import Tokenizer


class Engine:
    """Continuous-batching generation over one model.

    Requests are added at any time (`add_request`), advanced together by `step()`, and leave
    when they finish or are aborted; every exit path frees the request's KV blocks.
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.model.num_threads:
            torch.set_num_threads(config.model.num_threads)
        self.runner = ModelRunner(config.model, config.cache)
        self.tokenizer = Tokenizer(self.runner.model_dir)
        self.vocab_size = self.runner.config.vocab_size
        max_positions = self.runner.config.max_position_embeddings
        self.max_model_len = config.model.max_model_len or max_positions
        if self.max_model_len > max_positions:
            raise ValueError(f"max_model_len={self.max_model_len}: the model has position "
                             f"embeddings for {max_positions} tokens")
        self.kv_cache = (StateCacheManager(self.runner.num_blocks)
                         if self.runner.uses_state_slots else
                         KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                        config.cache.enable_prefix_caching))
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.sampler = Sampler()
        self.outputs = OutputProcessor(self.tokenizer)
        self.generations = Generations(self)
        self._seed_rng = random.Random(config.seed)
        self._req_counter = itertools.count()

    # ---- requests ----------------------------------------------------------------------------

    def make_request(self, prompt: str | Sequence[int] | StructuredPrompt,
                     params: SamplingParams | None = None, req_id: str | None = None,
                     captures: Sequence[str] = (), extra_key=None) -> Request:
        """Validates and tokenizes a request without touching engine state (thread-safe).

        A `StructuredPrompt` (parallel sets: Set-Based Prompting) gets its own position ids and
        attention structure, and its own prefix-cache key.
        """
        params = params or SamplingParams()
        layout = None
        if isinstance(prompt, StructuredPrompt):
            layout = prompt_layout(prompt, self.tokenizer.encode)
            token_ids = layout.token_ids
            extra_key = (extra_key, layout.structure_key)
        else:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(token_ids, params, captures)
        if layout is not None and self.kv_cache.state_slots:
            self._validate_sets_fit_one_chunk(layout)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        req_id = req_id if req_id is not None else f"req-{next(self._req_counter)}"
        req = Request(req_id, token_ids, params, seed, self.tokenizer.eos_token_ids,
                      frozenset(captures), extra_key)
        req.layout = layout
        return req

    def _validate(self, token_ids: list[int], params: SamplingParams,
                  captures: Sequence[str]) -> None:
        if not token_ids:
            raise InvalidArgument("prompt", "must contain at least one token")
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise InvalidArgument("prompt", f"token ids must be in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidArgument("prompt", f"{len(token_ids)} tokens leave no room to generate "
                                  f"within max_model_len={self.max_model_len}")
        params.validate_for_vocab(self.vocab_size)
        max_tokens = min(len(token_ids) + params.max_new_tokens, self.max_model_len)
        if self.kv_cache.state_slots:  # one whole-sequence state per branch
            needed, unit = max_branches(params), "state slots"
        else:  # branches share the prompt's full blocks; each needs its own for the rest
            bs = self.kv_cache.block_size
            shared = len(token_ids) // bs if params.strategy is not None else 0
            needed = shared + max_branches(params) * (-(-max_tokens // bs) - shared)
            unit = "KV blocks"
        if needed > self.kv_cache.num_blocks:
            raise InvalidArgument(
                "max_new_tokens", f"prompt ({len(token_ids)} tokens) + max_new_tokens "
                f"({params.max_new_tokens}) needs {needed} {unit} but the cache holds only "
                f"{self.kv_cache.num_blocks}; it could never be scheduled")
        sched = self.config.scheduler
        if not sched.enable_chunked_prefill and max_tokens > sched.max_num_batched_tokens:
            # Without chunking, a recompute after preemption must fit one step's budget.
            raise InvalidArgument(
                "max_new_tokens", f"prompt + max_new_tokens ({max_tokens} tokens) exceeds "
                f"max_num_batched_tokens={sched.max_num_batched_tokens} with chunked prefill off")
        for name in captures:
            if name != CAPTURE_FINAL_HIDDEN and not _is_layer_capture(
                    name, self.runner.config.num_hidden_layers):
                raise InvalidArgument("captures", f"unknown capture {name!r}")

    def _validate_sets_fit_one_chunk(self, layout) -> None:
        # A state slot cannot hold a half-computed parallel set (see StateCacheManager), so
        # the prompt up to its last set member runs in one step.
        budget = self.config.scheduler.max_num_batched_tokens
        if layout.member_span[1] > budget:
            raise InvalidArgument(
                "prompt", f"on a linear-attention model the prompt's parallel sets and "
                f"everything before them ({layout.member_span[1]} tokens) must fit one step "
                f"(max_num_batched_tokens={budget})")

    def add_request(self, prompt: str | Sequence[int] | Request,
                    params: SamplingParams | None = None, req_id: str | None = None,
                    captures: Sequence[str] = ()) -> str:
        """Queues a request and returns its id. Raises InvalidArgument or ResourceExhausted."""
        req = prompt if isinstance(prompt, Request) else self.make_request(
            prompt, params, req_id, captures)
        if req.req_id in self.scheduler.requests or req.req_id in self.generations.by_id:
            raise InvalidArgument("request_id", f"{req.req_id!r} is already running")
        if req.params.strategy is not None:
            self.generations.add(req)
        else:
            self.scheduler.add_request(req)
            self.outputs.add(req)
        return req.req_id

    def abort(self, req_id: str) -> RequestOutput | None:
        """Stops a request and frees its KV blocks; returns its final output, or None if unknown."""
        if req_id in self.generations.by_id:
            return self.generations.abort(req_id)
        req = self.scheduler.requests.get(req_id)
        if req is None or req.generation is not None:
            return None
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        return self.outputs.finish(req)

    def fork(self, req_id: str, child_id: str | None = None,
             params: SamplingParams | None = None) -> str:
        """Creates a branch of a running request that shares its KV blocks.

        The child starts with the parent's tokens and computed state; full blocks are shared
        by reference count and the partially filled last block is copied before the next step.
        The child inherits every token the parent has, including the last sampled one, so the
        branches diverge from the next sampled token on (each branch has its own seed). A
        parent still in prefill shares only what is computed; the child computes the rest
        of the prompt itself.
        """
        parent = self.scheduler.requests.get(req_id)
        if parent is None or parent.status != RequestStatus.RUNNING:
            raise InvalidArgument("request_id", f"{req_id!r} is not a running request")
        child_id = child_id or f"{req_id}/fork-{next(self._req_counter)}"
        if child_id in self.scheduler.requests:
            raise InvalidArgument("child_id", f"{child_id!r} is already a request")
        copies = self.kv_cache.fork(parent.req_id, child_id, parent.num_computed_tokens)
        if copies is None:
            raise ResourceExhausted("no free KV block to fork into")
        child = Request(child_id, parent.prompt_token_ids, params or parent.params,
                        self._seed_rng.getrandbits(63), parent.eos_token_ids, parent.captures,
                        parent.extra_key)
        child.all_token_ids = list(parent.all_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.layout = parent.layout
        self.scheduler.add_block_copies(copies, child)
        self.scheduler.add_running(child)
        self.outputs.add(child)
        return child_id

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one forward pass over every scheduled request; returns this step's deltas."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        run = self.runner.execute(sched)
        self.scheduler.update_from_output(sched)
        by_id = {item.request.req_id: item.request for item in sched.scheduled}
        if run.hidden_chunks:
            self.generations.collect_prompt_hidden(run.hidden_chunks, by_id)
        rows = [by_id[req_id] for req_id in run.req_ids]
        branch_rows = [i for i, r in enumerate(rows) if r.generation is not None]
        if not branch_rows:
            return self._sample(rows, run.logits, run.captures)
        plain_rows = [i for i, r in enumerate(rows) if r.generation is None]
        outputs = self.generations.step([rows[i] for i in branch_rows],
                                        run.logits[branch_rows], run.captures)
        if plain_rows:
            outputs += self._sample([rows[i] for i in plain_rows], run.logits[plain_rows],
                                    run.captures)
        return outputs

    def _sample(self, sampled: list[Request], logits: torch.Tensor,
                captures: dict) -> list[RequestOutput]:
        """Greedy / sampling for plain requests: one vectorised sampler call for all rows."""
        if not sampled:
            return []
        rows = [SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids,
                            output_token_ids=r.output_token_ids, seed=r.seed,
                            eos_token_ids=r.eos_token_ids) for r in sampled]
        result = self.sampler(logits, SamplingBatch.build(rows, self.vocab_size,
                                                           logits.device))
        token_ids = result.token_ids.tolist()
        logprobs = _logprobs_per_row(result, sampled, token_ids)
        outputs = []
        for i, req in enumerate(sampled):
            req.append_token(token_ids[i])
            status = self.outputs.check_stop(req, self.max_model_len)
            if status is not None:
                self.scheduler.finish(req, status)
            outputs.append(self.outputs.emit(req, [token_ids[i]], logprobs[i],
                                             captures.get(req.req_id)))
        return outputs

    # ---- offline API -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[CompletionOutput]:
        """Generates for all prompts in one continuously batched run; results in input order.

        Requests are fed in as the waiting queue has room, so any number of prompts works.
        """
        params_list = list(params) if isinstance(params, (list, tuple)) else \
            [params or SamplingParams()] * len(prompts)
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, params_list)]
        pending = list(reversed(reqs))
        try:
            while pending or self.has_unfinished_requests():
                while pending and self.scheduler.admission_error(pending[-1].num_tokens) is None:
                    self.add_request(pending.pop())
                self.step()
        except BaseException:
            for req in reqs:
                self.abort(req.req_id)
            raise
        return [self.outputs.completion(i, req) for i, req in enumerate(reqs)]


def _is_layer_capture(name: str, num_layers: int) -> bool:
    prefix, _, index = name.partition(":")
    try:
        return prefix == "ffn_input" and -num_layers <= int(index) < num_layers
    except ValueError:
        return False


def _logprobs_per_row(result, sampled: list[Request], token_ids: list[int]
                      ) -> list[TokenLogprob | None]:
    if result.logprobs is None:
        return [None] * len(sampled)
    values = result.logprobs.tolist()
    top_ids = result.top_logprob_ids.tolist() if result.top_logprob_ids is not None else None
    top_vals = result.top_logprobs.tolist() if result.top_logprobs is not None else None
    out: list[TokenLogprob | None] = []
    for i, req in enumerate(sampled):
        n = req.params.logprobs
        if n is None:
            out.append(None)
            continue
        top = list(zip(top_ids[i][:n], top_vals[i][:n])) if top_ids and n else []
        out.append(TokenLogprob(token_id=token_ids[i], logprob=values[i], top=top))
    return out
