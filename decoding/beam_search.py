"""Beam search with Hugging Face transformers' semantics (5.x `_beam_search`), on branches.

Per step, with B beams and E end-of-sequence ids:
1. Scores: processed log-softmax of every beam's logits plus the beam's running score; the
   first step has one beam (the prompt), exactly as transformers' [0, -1e9, ...] start.
2. The top K = max(2, 1 + E) * B continuations over all beams x vocabulary, best first. A
   continuation "hits" when its token is an EOS id or the sequence reaches max_new_tokens.
3. Running beams: the best B continuations after adding -1e9 to those that hit.
4. Finished hypotheses (B slots): the continuations among the first B of K that hit, scored
   sum_logprobs / generated_len ** length_penalty (generated_len counts the new token), merged
   with the kept ones; the best B stay. Nothing is added once early stopping is decided.
5. Done when no running beam can still improve (heuristic below), when early_stopping is True
   and all B slots are finished, or when every continuation hit.
The heuristic: the best running beam's score / generated_len ** length_penalty must beat the
worst kept hypothesis while all B slots are full; once it cannot, it never can again.

Continuations with score -inf (tokens a transform such as a constraint mask removed) never
become running beams: fewer than B run when fewer are possible, and none ends the search.

Branches: a parent beam whose first selected continuation is its own keeps its branch (append),
further continuations fork it, unselected parents are freed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from decoding.base import Candidate, Fork, SelectionStrategy, StepDecision, StepView
from decoding.registry import register_strategy
from decoding.params import BeamSearch as BeamParams

_NEG = -1.0e9


class _Kept(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


@register_strategy(BeamParams)
class BeamSearch(SelectionStrategy):
    log_softmax_first = True
    streams_output = False

    def __init__(self, params: BeamParams) -> None:
        super().__init__(params)
        b = params.num_beams
        self._scores = torch.zeros(1)                    # running beam scores, row order
        self._finished_scores = torch.full((b,), _NEG)
        self._finished_tokens: list[list[int]] = [[] for _ in range(b)]
        self._finished_flags = torch.zeros(b, dtype=torch.bool)
        self._improvable = True
        self._beams: list[int] = [0]                     # branch of each running beam
        self._next_branch = 1

    @staticmethod
    def max_branches(params) -> int:
        return params.num_beams

    def step(self, view: StepView) -> StepDecision:
        rows = {branch: i for i, branch in enumerate(view.branch_ids)}
        order = [rows[branch] for branch in self._beams]
        outputs = [view.output_token_ids[i] for i in order]
        logprobs = view.logits[order] + self._scores[:, None]          # [beams, V]
        vocab, b = logprobs.shape[1], self.params.num_beams
        k = min(max(2, 1 + len(view.eos_token_ids)) * b, logprobs.numel())
        top_scores, top_index = logprobs.flatten().topk(k)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        gen_len = len(outputs[0]) + 1
        at_limit = gen_len >= view.max_new_tokens
        eos = () if view.ignore_eos else view.eos_token_ids
        hits = torch.tensor([at_limit or t in eos for t in tokens])
        self._update_finished(top_scores, hits, parents, tokens, outputs, gen_len)
        keep = (top_scores + hits.float() * _NEG).topk(b)
        possible = torch.isfinite(keep.values)  # a -inf continuation (a masked token) never runs
        keep = _Kept(keep.values[possible], keep.indices[possible])
        decision = self._next_beams(keep, parents, tokens)
        self._check_improvable(gen_len)
        done = (not self._beams or not self._improvable or bool(hits.all())
                or (self.params.early_stopping and bool(self._finished_flags.all())))
        if done:
            decision.finished = True
            decision.candidates = self._candidates()
        return decision

    def _update_finished(self, top_scores, hits, parents, tokens, outputs, gen_len) -> None:
        b = self.params.num_beams
        just = hits.clone()
        just[b:] = False
        scores = top_scores / (gen_len ** self.params.length_penalty)
        if self.params.early_stopping and bool(self._finished_flags.all()):
            scores = scores + _NEG
        if not self._improvable:
            scores = scores + _NEG
        scores = scores + (~just).float() * _NEG
        merged = torch.cat([self._finished_scores, scores])
        best = merged.topk(b).indices.tolist()
        old_tokens, old_flags = self._finished_tokens, self._finished_flags.tolist()
        new_tokens, new_flags = [], []
        for i in best:
            if i < b:
                new_tokens.append(old_tokens[i])
                new_flags.append(old_flags[i])
            else:
                c = i - b
                new_tokens.append(outputs[parents[c]] + [tokens[c]])
                new_flags.append(bool(just[c]))
        self._finished_scores = merged[best]
        self._finished_tokens = new_tokens
        self._finished_flags = torch.tensor(new_flags)

    def _next_beams(self, keep, parents, tokens) -> StepDecision:
        forks, appends, reused = [], [], set()
        beams = []
        for c in keep.indices.tolist():
            parent_branch = self._beams[parents[c]]
            if parent_branch not in reused:
                reused.add(parent_branch)
                appends.append((parent_branch, tokens[c]))
                beams.append(parent_branch)
            else:
                child, self._next_branch = self._next_branch, self._next_branch + 1
                forks.append(Fork(parent=parent_branch, child=child, token=tokens[c]))
                beams.append(child)
        frees = [branch for branch in self._beams if branch not in reused]
        self._beams, self._scores = beams, keep.values
        return StepDecision(forks=forks, appends=appends, frees=frees)

    def _check_improvable(self, gen_len: int) -> None:
        if not self._beams or not self._improvable or not bool(self._finished_flags.all()):
            return  # an empty slot has score -1e9: anything running can still beat it
        best_running = self._scores[0] / (gen_len ** self.params.length_penalty)
        self._improvable = bool(best_running > self._finished_scores.min())

    def _candidates(self) -> list[Candidate]:
        n = self.params.num_return
        return [Candidate(token_ids=self._finished_tokens[i],
                          score=float(self._finished_scores[i])) for i in range(n)]
