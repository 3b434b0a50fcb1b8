"""The decoding pipeline of one step: transforms, then one selection strategy per generation.

Every sampled row of the step (whatever its strategy) is one row of a single `SamplingBatch`;
the registered transforms run over it in chain order, each once for all rows that use it. Then
the batchable strategies (greedy, sampling) choose for all of their rows at once and their
tokens are appended and emitted; every other generation whose branches have all reported sees a
`StepView` and answers a `StepDecision`, applied here in its documented order. Every effect on
memory or output goes through the `StrategyPort` (engine/pipeline/ports.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from decoding import registry
from decoding.base import Capture, SamplingBatch, SamplingRow, StepDecision, StepView
from engine.errors import ResourceExhausted
from engine.kernels.layer_ops import row_argmax
from engine.pipeline.generation import Generation
from engine.messages import RequestOutput, TokenLogprob
from engine.pipeline.ports import StrategyPort
from engine.core.request import Request, RequestStatus
from engine.pipeline.sampler import Sampler, make_output, select

CAPTURE_FINAL_HIDDEN = Capture("final_hidden")
"""The LM-head input (final-norm hidden state) of a sampled row."""
CAPTURE_PROMPT_HIDDEN = Capture("final_hidden", all_positions=True)
"""The LM-head inputs of every token a sequence computes (prompt chunks)."""


class StrategyRunner:
    """All live generations of an engine and the pipeline that advances them."""

    def __init__(self, port: StrategyPort, vocab_size: int, sampler: Sampler | None = None,
                 device: torch.device | str = "cpu", lm_head=None) -> None:
        self.port = port
        self.lm_head = lm_head
        """float32 [rows, hidden] LM-head inputs -> float32 [rows, vocab] logits: the rows of
        `logits_of_choice` strategies that the model runner deferred."""
        self.vocab_size = vocab_size
        self.sampler = sampler or Sampler()
        self.device = device
        self.by_id: dict[str, Generation] = {}

    # ---- generations -------------------------------------------------------------------------

    def add(self, gen: Generation) -> None:
        """Starts a generation: its prompt's branch (0) is queued through the port."""
        strategy = gen.strategy
        # Plug-in transforms' captures (kNN-LM's query) only for the requests that use them.
        captures = set(gen.captures).union(*(registry.entry(t).cls.captures
                                             for t in gen.params.transforms))
        if strategy.needs_hidden:
            captures.add(CAPTURE_FINAL_HIDDEN)
        if strategy.needs_prompt_hidden:
            captures.add(CAPTURE_PROMPT_HIDDEN)
        # Every prompt position must be computed to be captured: no prefix-cache hits.
        root = Request(gen.req_id, gen.prompt_token_ids, generation=gen, branch=0,
                       seed=gen.seed, captures=frozenset(captures), extra_key=gen.extra_key,
                       layout=gen.layout,
                       no_prefix_cache=any(c.all_positions for c in captures))
        if gen.constraint is not None:
            root.constraint_state = gen.constraint.state(gen.constraint_stats)
        gen.branches[0] = root
        self.port.add(gen, root)
        self.by_id[gen.req_id] = gen

    def add_forked(self, gen: Generation, parent: Request, seed: int) -> None:
        """Starts a generation whose prompt branch is a fork of another generation's sequence
        (it continues from every token the parent has)."""
        root = self.port.fork(parent, gen.req_id, 0, seed, keep=set(), generation=gen)
        if gen.constraint is not None:  # the whole output is constrained, parent's part too
            root.constraint_state = gen.constraint.state(gen.constraint_stats)
        gen.branches[0] = root
        self.port.add(gen, None)
        self.by_id[gen.req_id] = gen

    def abort(self, req_id: str) -> RequestOutput | None:
        gen = self.by_id.get(req_id)
        if gen is None:
            return None
        self._end(gen, RequestStatus.FINISHED_ABORTED)
        return self.port.abort_output(gen)

    def collect_prompt_captures(self, chunks: dict[str, tuple[int, dict[str, torch.Tensor]]],
                                requests: dict[str, Request]) -> None:
        """Keeps the all-position captures of prompt branches that asked (see
        `Generation.add_prompt_chunk`)."""
        for req_id, (start, chunk) in chunks.items():
            requests[req_id].generation.add_prompt_chunk(start, chunk)

    # ---- one step ------------------------------------------------------------------------------

    def prepare(self, sequences: list[Request]) -> None:
        """Lets the transforms start logits-free work for the scheduled sequences."""
        for transform in self.sampler.transforms:
            transform.prepare(sequences)

    def step(self, rows: list[Request], logits: torch.Tensor,
             captures: dict[str, dict[str, torch.Tensor]],
             deferred: list[Request] = ()) -> list[RequestOutput]:
        """Runs the pipeline over this step's sampled rows (`logits[i]` is `rows[i]`'s) and
        the `deferred` rows (no logits yet: branches of `logits_of_choice` strategies, their
        hidden states in `captures`). The deferred generations choose first; the LM head
        runs on their chosen rows, which join the others for one pass of the transforms."""
        chosen = self._choose(deferred, captures)
        missing = [c for c in chosen if c.entry[0] is None]
        num_eager = len(rows)
        if missing:
            rows = rows + [c.gen.branches[c.branch] for c in missing]
            extra = self.lm_head(torch.stack([c.entry[1] for c in missing]))
            logits = torch.cat([logits, extra]) if num_eager else extra
            captures = captures | {c.gen.branches[c.branch].req_id: c.entry[2]
                                   for c in missing if c.entry[2] is not None}
        outputs: list[RequestOutput] = []
        if rows:
            batch, processed = self._process(rows, logits, captures)
            raw_logprobs = None
            if batch.max_num_logprobs is not None:
                raw_logprobs = self.sampler.log_probs(logits, batch)
            batchable = [i for i, r in enumerate(rows) if r.generation.strategy.batchable]
            outputs = self._select(rows, batchable, processed, batch, raw_logprobs, captures)
            if len(batchable) + len(missing) < len(rows):
                outputs += self._run_strategies(rows[:num_eager], processed, captures)
            for j, c in enumerate(missing):
                c.view.logits = processed[num_eager + j][None].float()
        for c in chosen:
            if c.entry[0] is not None:
                c.view.logits = c.entry[0][None]
            c.view.chosen = c.branch
        _prepare_steps([(c.gen, c.view) for c in chosen])
        for c in chosen:
            if not _still_computed(c.gen, c.ready):
                # An earlier generation's fork preempted one of its branches: it waits for the
                # recompute and chooses again (`choose` has no effect until `step`).
                c.gen.ready = {b: v for b, v in c.ready.items() if _computed(c.gen, b)}
                c.gen.held_prompt_hidden = c.view.prompt_hidden
                continue
            out = self._apply(c.gen, c.gen.strategy.step(c.view))
            if out is not None:
                outputs.append(out)
        return outputs

    def _process(self, rows: list[Request], logits: torch.Tensor,
                 captures: dict[str, dict[str, torch.Tensor]]):
        """(the rows' SamplingBatch, their logits after the transforms)."""
        batch = SamplingBatch.build(
            [SamplingRow(params=r.generation.params, prompt_token_ids=r.prompt_token_ids,
                         output_token_ids=r.output_token_ids, seed=r.seed,
                         eos_token_ids=r.generation.eos_token_ids,
                         captures=captures.get(r.req_id),
                         constraint=r.constraint_state) for r in rows],
            self.vocab_size, logits.device, argmax=row_argmax)
        log_first = [r.generation.strategy.log_softmax_first for r in rows]
        processed = logits
        if any(log_first):
            mask = torch.tensor(log_first, device=logits.device)[:, None]
            processed = torch.where(mask, logits.log_softmax(dim=-1), logits)
        # process before log_probs: transforms decide on the processed rows (kNN-LM).
        return batch, self.sampler.process(processed, batch)

    def _select(self, rows: list[Request], index: list[int], processed: torch.Tensor,
                batch: SamplingBatch, raw_logprobs: torch.Tensor | None,
                captures: dict) -> list[RequestOutput]:
        """Greedy / sampling: one vectorised call per strategy for all its rows."""
        if not index:
            return []
        chosen = select(processed, batch, [type(rows[i].generation.strategy) for i in index],
                        index)
        if raw_logprobs is not None and len(index) < len(rows):
            raw_logprobs = raw_logprobs[torch.tensor(index, device=raw_logprobs.device)]
        token_ids = chosen.tolist()
        logprobs = _logprobs(rows, index, make_output(chosen, raw_logprobs,
                                                      batch.max_num_logprobs))
        outputs = []
        for j, i in enumerate(index):
            seq, token = rows[i], token_ids[j]
            gen = seq.generation
            seq.append_token(token)
            gen.append_token(token)
            status = self.port.check_stop(gen)
            if status is not None:
                self._end(gen, status)
            else:
                gen.sync_stats()
            client = captures.get(seq.req_id) if gen.captures else None
            outputs.append(self.port.emit(gen, [token], logprobs[j], client))
        return outputs

    def _run_strategies(self, rows: list[Request], processed: torch.Tensor,
                        captures: dict) -> list[RequestOutput]:
        """Steps the non-batchable generations whose branches have all reported."""
        touched: dict[str, Generation] = {}
        for i, seq in enumerate(rows):
            if not seq.generation.strategy.batchable:
                self._report(seq, processed[i].float(), captures, touched)
        pending = []
        for gen in self._complete(touched):
            view = self._view(gen)
            if gen.strategy.logits_of_choice:  # its logits came with the rows (not deferred)
                branch = gen.strategy.choose(view)
                view.logits, view.chosen = view.logits[view.branch_ids.index(branch)][None], branch
            pending.append((gen, view))
        _prepare_steps(pending)
        outputs = []
        for gen, view in pending:
            out = self._apply(gen, gen.strategy.step(view))
            if out is not None:
                outputs.append(out)
        return outputs

    def _choose(self, deferred: list[Request], captures: dict) -> list[_Chosen]:
        """Reports the deferred rows; each generation they complete names its branch."""
        touched: dict[str, Generation] = {}
        for seq in deferred:
            self._report(seq, None, captures, touched)
        chosen = []
        for gen in self._complete(touched):
            ready, view = gen.ready, self._view(gen)
            branch = gen.strategy.choose(view)
            chosen.append(_Chosen(gen, view, branch, ready))
        return chosen

    def _report(self, seq: Request, processed: torch.Tensor | None, captures: dict,
                touched: dict[str, Generation]) -> None:
        """Marks a branch ready with its processed logits (None: deferred) and captures."""
        gen = seq.generation
        row_captures = captures.get(seq.req_id)
        hidden = row_captures[CAPTURE_FINAL_HIDDEN.name] if gen.strategy.needs_hidden else None
        gen.ready[seq.branch] = (processed, hidden, row_captures)
        touched[gen.req_id] = gen

    @staticmethod
    def _complete(touched: dict[str, Generation]) -> list[Generation]:
        """The touched generations whose every branch is ready."""
        complete = []
        for gen in touched.values():
            # A ready branch may have been preempted since (its KV is gone): it recomputes
            # and reports again.
            gen.ready = {b: v for b, v in gen.ready.items() if _computed(gen, b)}
            if len(gen.ready) == len(gen.branches):
                complete.append(gen)
        return complete

    def _view(self, gen: Generation) -> StepView:
        """The view of every branch (all ready), in branch order; clears `gen.ready`. Its
        logits are None when a branch's are deferred."""
        params, ready = gen.params, gen.ready
        branch_ids = sorted(ready)
        seqs = [gen.branches[b] for b in branch_ids]
        logits = None if any(ready[b][0] is None for b in branch_ids) else \
            torch.stack([ready[b][0] for b in branch_ids])
        hidden = torch.stack([ready[b][1] for b in branch_ids]) \
            if gen.strategy.needs_hidden else None
        gen.ready = {}
        prompt_hidden, gen.held_prompt_hidden = gen.held_prompt_hidden, None
        root = gen.branches.get(0)
        if root is not None and CAPTURE_PROMPT_HIDDEN in root.captures \
                and gen.strategy.needs_prompt_hidden:
            prompt_hidden = gen.take_prompt_capture(
                CAPTURE_PROMPT_HIDDEN.name, keep=CAPTURE_PROMPT_HIDDEN in gen.captures)
            # Handed over once: the prompt branch may live on as a candidate branch.
            root.captures = root.captures - {CAPTURE_PROMPT_HIDDEN}
            root.no_prefix_cache = any(c.all_positions for c in root.captures)
        return StepView(branch_ids=branch_ids, logits=logits, hidden=hidden,
                        prompt_hidden=prompt_hidden,
                        output_token_ids=[s.output_token_ids for s in seqs],
                        eos_token_ids=gen.eos_token_ids,
                        max_new_tokens=params.max_new_tokens,
                        min_new_tokens=params.min_new_tokens, ignore_eos=params.ignore_eos,
                        seed=gen.seed, condition=gen.condition,
                        prompt_token_ids=gen.prompt_token_ids, decode=self.port.decode)

    # ---- applying a decision -------------------------------------------------------------------

    def _apply(self, gen: Generation, decision: StepDecision) -> RequestOutput | None:
        if decision.finished:  # every branch is freed with the request
            return self._finish_with_candidates(gen, decision.candidates or [],
                                                decision.rounds)
        # Emitted tokens first: when one of them ends the request, its forks would only
        # take blocks (and preempt other requests for them) to be freed at once.
        status, emitted = self._append_emitted(gen, decision.emit)
        if status is not None:
            self._end(gen, status)
            return self.port.emit(gen, emitted, None, None)
        try:
            self._apply_branches(gen, decision)
        except ResourceExhausted:  # no block to fork into: this request ends, not the engine
            self._end(gen, RequestStatus.FINISHED_ABORTED)
            return self.port.emit(gen, emitted, None, None)
        if not decision.emit:
            assert gen.branches, "a strategy freed every branch without finishing"
            return None
        gen.sync_stats()
        return self.port.emit(gen, emitted, None, None)

    def _append_emitted(self, gen: Generation, tokens: list[int]):
        """Appends `tokens` to the generation up to the first that stops it."""
        status, emitted = None, []
        for token in tokens:
            gen.append_token(token)
            emitted.append(token)
            status = self.port.check_stop(gen)
            if status is not None:
                break
        return status, emitted

    def _apply_branches(self, gen: Generation, decision: StepDecision) -> None:
        # Branches no fork reads are freed first: their KV makes room for the forks.
        parents = {fork.parent for fork in decision.forks}
        for branch in decision.frees:
            if branch not in parents:
                self.port.free(gen.release(branch))
        for fork in decision.forks:
            parent = gen.branches[fork.parent]
            child = self.port.fork(parent, gen.sequence_id(fork.child), fork.child,
                                   parent.seed, keep=set(gen.branches.values()))
            child.append_token(fork.token)
            gen.branches[fork.child] = child
        for branch, token in decision.appends:
            gen.branches[branch].append_token(token)
        for branch in decision.frees:
            if branch in parents:
                self.port.free(gen.release(branch))

    def _end(self, gen: Generation, status: RequestStatus) -> None:
        """Frees every branch; the generation takes `status`."""
        gen.sync_stats()
        for branch in list(gen.branches):
            self.port.free(gen.release(branch))
        gen.status = status
        del self.by_id[gen.req_id]

    def _finish_with_candidates(self, gen: Generation, candidates,
                                rounds=None) -> RequestOutput:
        best = candidates[0].token_ids if candidates else []
        status = RequestStatus.FINISHED_LENGTH
        for token in best:
            gen.append_token(token)
            status = self.port.check_stop(gen) or status
        gen.candidates = [(c.token_ids, c.score) for c in candidates]
        if rounds is not None:
            gen.rounds = [[(c.token_ids, c.score) for c in kept] for kept in rounds]
        self._end(gen, status)
        return self.port.emit(gen, best, None, None)


class _Chosen(NamedTuple):
    """A `logits_of_choice` generation's pick: its view, the branch, and every branch's ready
    entry (processed logits or None, hidden, captures)."""

    gen: Generation
    view: StepView
    branch: int
    ready: dict

    @property
    def entry(self) -> tuple:
        """The chosen branch's ready entry."""
        return self.ready[self.branch]


def _prepare_steps(pending: list[tuple[Generation, StepView]]) -> None:
    """Each strategy class's batched work for all of its generations that step now."""
    by_class: dict[type, list[tuple[Generation, StepView]]] = {}
    for gen, view in pending:
        by_class.setdefault(type(gen.strategy), []).append((gen, view))
    for cls, items in by_class.items():
        cls.prepare_steps([gen.strategy for gen, _ in items], [view for _, view in items])


def _computed(gen: Generation, branch: int) -> bool:
    seq = gen.branches.get(branch)
    return seq is not None and seq.num_computed_tokens == seq.num_tokens


def _still_computed(gen: Generation, ready: dict) -> bool:
    """Whether the branches a view was built from are the generation's, all still computed
    (no fork of another generation has preempted one since)."""
    return set(ready) == set(gen.branches) and all(_computed(gen, b) for b in ready)


def _logprobs(rows: list[Request], index: list[int], out) -> list[TokenLogprob | None]:
    """Per selected row: the chosen token's logprob and the top-n it asked for."""
    if out.logprobs is None:
        return [None] * len(index)
    chosen, top_ids, top_vals = (out.logprobs.tolist(), out.top_logprob_ids.tolist(),
                                 out.top_logprobs.tolist())
    result: list[TokenLogprob | None] = []
    for j, i in enumerate(index):
        n = rows[i].generation.params.logprobs
        top = list(zip(top_ids[j][:n], top_vals[j][:n])) if n else []
        result.append(None if n is None else TokenLogprob(
            token_id=int(out.token_ids[j]), logprob=chosen[j], top=top))
    return result
