"""The engine: schedule -> run the model -> sample -> apply -> emit, one step at a time.

`Engine` is synchronous and single-threaded; `engine.async_engine.AsyncEngine` runs it on a
background thread for the server.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Callable, Sequence

import torch

from constraints.compiler import ConstraintCompiler, ConstraintStats
from constraints.condition import Condition
from constraints.predicates import get_predicate, predicate_names
from decoding import registry
from decoding.base import Capture, NotFound
from engine.core.cache_manager import create_cache_manager
from engine.config import EngineConfig
from engine.errors import InvalidArgument
from engine.pipeline.generation import Generation
from engine.execution.loaded_model import load_model
from engine.messages import CompletionOutput, RequestOutput
from engine.execution.model_runner import ModelRunner
from engine.pipeline.output_processor import OutputProcessor
from engine.pipeline.ports import EnginePort
from engine.prompt import StructuredPrompt
from engine.prompt import layout as prompt_layout
from engine.sampling_params import SamplingParams
from engine.core.scheduler import Scheduler
from engine.pipeline.strategy_runner import StrategyRunner
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
        self.loaded = load_model(config.model)
        self.runner = ModelRunner(self.loaded, config.cache, config.model.attention_backend)
        self.tokenizer = Tokenizer(self.loaded.model_dir)
        self.vocab_size = self.loaded.vocab_size
        max_positions = self.loaded.max_position_embeddings
        self.max_model_len = config.model.max_model_len or max_positions
        if self.max_model_len > max_positions:
            raise ValueError(f"max_model_len={self.max_model_len}: the model has position "
                             f"embeddings for {max_positions} tokens")
        if config.model.cuda_graphs and self.runner.device.type == "cuda":
            try:
                self.runner.enable_decode_graphs(config.scheduler.max_num_seqs,
                                                 self.max_model_len)
            except RuntimeError as exc:  # a failed capture costs speed, not the server
                self.runner.graphs = None
                warnings.warn(f"CUDA graph capture failed, decode steps run eagerly: {exc}")
        self.kv_cache = create_cache_manager(self.loaded.memory, self.runner.num_blocks,
                                             config.cache)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache)
        self.outputs = OutputProcessor(self.tokenizer)
        self.port = EnginePort(self.scheduler, self.outputs, self.max_model_len)
        self.generations = StrategyRunner(self.port, self.vocab_size,
                                          device=self.runner.device, lm_head=self.compute_logits)
        self._seed_rng = random.Random(config.seed)
        self.constraints = ConstraintCompiler(self.tokenizer, config.constraint_backend,
                                              config.max_constraint_compile_s)
        self._req_counter = itertools.count()

    # ---- requests ----------------------------------------------------------------------------

    def make_request(self, prompt: str | Sequence[int] | StructuredPrompt,
                     params: SamplingParams | None = None, req_id: str | None = None,
                     captures: Sequence[str | Capture] = (), extra_key=None,
                     compiled=None) -> Generation:
        """Validates and tokenizes a request without touching engine state (thread-safe).

        A constrained request's constraint is compiled here (blocking, under the time limit)
        unless `compiled` is given (`self.constraints.compile_async` on a server's loop).

        A `StructuredPrompt` (parallel sets: Set-Based Prompting) gets its own position ids and
        attention structure, and its own prefix-cache key. Captures are `Capture`s or their
        names ("final_hidden", "ffn_input:-1").
        """
        params = params or SamplingParams()
        layout = None
        if isinstance(prompt, StructuredPrompt):
            layout = prompt_layout(prompt, self.tokenizer.encode)
            token_ids = layout.token_ids
            extra_key = (extra_key, layout.structure_key)
        else:
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        wanted = frozenset(Capture.parse(c) if isinstance(c, str) else c for c in captures)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        req_id = req_id if req_id is not None else f"req-{next(self._req_counter)}"
        gen = Generation(req_id, token_ids, params, seed, self.tokenizer.eos_token_ids,
                         captures=wanted, extra_key=extra_key, layout=layout)
        self._validate(gen)
        constraint = params.constraint
        if constraint is not None:
            gen.constraint = compiled or self.constraints.compile(constraint)
            gen.constraint_stats = ConstraintStats()
        if type(gen.strategy).checks_constraint:
            gen.condition = self._condition(gen)
        if layout is not None and self.kv_cache.state_slots:
            self._validate_sets_fit_one_chunk(layout)
        return gen

    def _validate(self, gen: Generation) -> None:
        token_ids, params = gen.prompt_token_ids, gen.params
        if not token_ids:
            raise InvalidArgument("prompt", "must contain at least one token")
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise InvalidArgument("prompt", f"token ids must be in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidArgument("prompt", f"{len(token_ids)} tokens leave no room to generate "
                                  f"within max_model_len={self.max_model_len}")
        params.validate_for_vocab(self.vocab_size)
        params.check_loaded()
        max_tokens = min(len(token_ids) + params.max_new_tokens, self.max_model_len)
        if self.kv_cache.state_slots:  # one whole-sequence state per branch
            needed, unit = gen.max_branches, "state slots"
        else:  # branches share the prompt's full blocks; each needs its own for the rest
            bs = self.kv_cache.block_size
            shared = len(token_ids) // bs
            needed = shared + gen.max_branches * (-(-max_tokens // bs) - shared)
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
        num_layers = self.loaded.num_hidden_layers
        for capture in gen.captures:
            if capture.layer is not None and not -num_layers <= capture.layer < num_layers:
                raise InvalidArgument("captures", f"{capture.name}: the model has "
                                      f"{num_layers} layers")

    def _condition(self, gen: Generation) -> Condition:
        """The condition of a strategy that checks tokens itself (AWRS): the request's
        constraint and / or the predicate its params name."""
        name = getattr(gen.params.selection, "predicate", "")
        predicate = get_predicate(name) if name else None
        if name and predicate is None:
            raise NotFound("strategy.predicate", f"unknown predicate {name!r}; registered: "
                           f"{', '.join(predicate_names()) or 'none'}")
        if gen.constraint is None and predicate is None:
            raise InvalidArgument("strategy.predicate", f"{registry.entry(gen.params.selection).name} "
                                  f"needs a constraint or a predicate to check")
        gen.constraint_stats = gen.constraint_stats or ConstraintStats()
        return Condition(self.constraints.vocab, gen.constraint_stats, gen.constraint, predicate)

    def _validate_sets_fit_one_chunk(self, layout) -> None:
        # A state slot cannot hold a half-computed parallel set (see StateCacheManager), so
        # the prompt up to its last set member runs in one step.
        budget = self.config.scheduler.max_num_batched_tokens
        if layout.member_span[1] > budget:
            raise InvalidArgument(
                "prompt", f"on a linear-attention model the prompt's parallel sets and "
                f"everything before them ({layout.member_span[1]} tokens) must fit one step "
                f"(max_num_batched_tokens={budget})")

    def add_request(self, prompt: str | Sequence[int] | Generation,
                    params: SamplingParams | None = None, req_id: str | None = None,
                    captures: Sequence[str | Capture] = ()) -> str:
        """Queues a request and returns its id. Raises InvalidArgument or ResourceExhausted."""
        gen = prompt if isinstance(prompt, Generation) else self.make_request(
            prompt, params, req_id, captures)
        self._check_unique(gen.req_id, "request_id")
        self.generations.add(gen)
        return gen.req_id

    def _check_unique(self, req_id: str, field: str) -> None:
        if req_id in self.generations.by_id or req_id in self.scheduler.requests:
            raise InvalidArgument(field, f"{req_id!r} is already running")

    def abort(self, req_id: str) -> RequestOutput | None:
        """Stops a request and frees its KV blocks; returns its final output, or None if unknown."""
        return self.generations.abort(req_id)

    def fork(self, req_id: str, child_id: str | None = None,
             params: SamplingParams | None = None) -> str:
        """Starts a new request that continues a running one, sharing its KV blocks.

        The child starts with the parent's tokens and computed state; full blocks are shared
        by reference count and the partially filled last block is copied before the next step
        (the same fork that strategies' branches use). The child inherits every token the
        parent has, including the last sampled one, so the two diverge from the next sampled
        token on (the child draws its own seed). A parent still in prefill shares only what is
        computed; the child computes the rest of the prompt itself.
        """
        parent = self.generations.by_id.get(req_id)
        seq = parent.branches.get(0) if parent is not None else None
        if seq is None or seq.status.name != "RUNNING":
            raise InvalidArgument("request_id", f"{req_id!r} is not a running request")
        child_id = child_id or f"{req_id}/fork-{next(self._req_counter)}"
        self._check_unique(child_id, "child_id")
        params = params or parent.params
        seed = self._seed_rng.getrandbits(63)
        child = Generation(child_id, parent.prompt_token_ids, params, seed,
                           parent.eos_token_ids, captures=parent.captures,
                           extra_key=parent.extra_key, layout=parent.layout)
        child.all_token_ids = list(seq.all_token_ids)
        self.generations.add_forked(child, seq, seed)
        return child_id

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [num_rows, vocab_size] of LM-head inputs [num_rows, hidden_size]
        (e.g. a "final_hidden@all" capture): exactly what the engine samples from."""
        return self.loaded.module.compute_logits(
            hidden.to(device=self.loaded.device, dtype=self.loaded.dtype))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one forward pass over every scheduled sequence, then the decoding pipeline
        over the rows it sampled; returns this step's deltas."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        self.generations.prepare([item.request for item in sched.scheduled])
        run = self.runner.execute(sched)
        self.scheduler.update_from_output(sched)
        by_id = {item.request.req_id: item.request for item in sched.scheduled}
        if run.prompt_chunks:
            self.generations.collect_prompt_captures(run.prompt_chunks, by_id)
        if not run.req_ids and not run.deferred:
            return []
        return self.generations.step([by_id[req_id] for req_id in run.req_ids], run.logits,
                                     run.captures, [by_id[req_id] for req_id in run.deferred])

    # ---- offline API -------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: Callable[[int], object] | None = None,
                 max_in_flight: int | None = None) -> list[CompletionOutput]:
        """Generates for all prompts in one continuously batched run; results in input order.

        Requests are fed in as the waiting queue has room, so any number of prompts works;
        `max_in_flight` caps how many run at once (a strategy that forks k branches per
        request fills the batch with max_num_seqs / k requests: more only preempt each other).
        `progress` is called after every step with the number of requests it finished.
        """
        params_list = list(params) if isinstance(params, (list, tuple)) else \
            [params or SamplingParams()] * len(prompts)
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, params_list)]
        pending = list(reversed(reqs))
        limit = max_in_flight or len(reqs)
        in_flight = 0
        try:
            while pending or self.has_unfinished_requests():
                while pending and in_flight < limit and \
                        self.scheduler.admission_error(pending[-1].num_tokens) is None:
                    self.add_request(pending.pop())
                    in_flight += 1
                finished = sum(out.finished for out in self.step())
                in_flight -= finished
                if progress is not None:
                    progress(finished)
        except BaseException:
            for req in reqs:
                self.abort(req.req_id)
            raise
        return [self.outputs.completion(i, req) for i, req in enumerate(reqs)]
