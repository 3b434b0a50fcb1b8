"""Contrastive search (Su et al. 2022) on forked branches: one batched forward per token.

Each step the current branch's processed distribution gives the top-k candidates v. The
strategy forks k - 1 branches, each the current one plus one of the candidates 2..k (the
children share its KV blocks or copy its state slot), and the current branch itself continues
with the first candidate, so a step holds k branches at most and copies k - 1 partial blocks.
The engine runs the k single-token branches together with all other traffic; that one
forward yields the hidden state h_v of each candidate (the LM-head input at its position),
and the LM head then runs on the winner's row alone (`logits_of_choice`): its logits are
the distribution of the position after it. The winner is
argmax_v (1 - alpha) p(v) - alpha max_j cos(h_v, h_j) over the hidden states h_j of every
previous position (prompt and generated), among the candidates with p(v) > 0 (fewer than
top_k when a transform such as a constraint mask leaves fewer); the winner's branch lives on and its logits seed the
next step, the other branches are freed. Ties go to the candidate ranked first by p(v), as with
`torch.argmax` in the Hugging Face implementation.
"""

from __future__ import annotations

import torch

from decoding.base import Fork, SelectionStrategy, StepDecision, StepView
from decoding.registry import register_strategy
from decoding.params import Contrastive


@register_strategy(Contrastive)
class ContrastiveSearch(SelectionStrategy):
    needs_hidden = True
    needs_prompt_hidden = True
    logits_of_choice = True

    def __init__(self, params: Contrastive) -> None:
        super().__init__(params)
        self._context: torch.Tensor | None = None
        """[capacity, hidden] unit-norm hidden states of every position so far."""
        self._length = 0
        self._candidates: list[tuple[int, int, float]] = []
        """(branch, token, probability) of the pending candidates, in top-k order."""
        self._next_branch = 1
        self._winner = 0
        """Index in `_candidates` of the winner the last `choose` named."""

    @staticmethod
    def max_branches(params) -> int:
        return params.top_k

    @classmethod
    def prepare_steps(cls, strategies: list[ContrastiveSearch], views: list[StepView]) -> None:
        """The next candidates of every generation that steps: one softmax and top-k over all
        of their logits rows (one call per distinct top_k), the rows' results equal to a call
        per row."""
        by_k: dict[int, list[StepView]] = {}
        for strategy, view in zip(strategies, views):
            by_k.setdefault(strategy.params.top_k, []).append(view)
        for k, group in by_k.items():
            logits = torch.cat([view.logits[:1] for view in group])
            probs, tokens = logits.softmax(dim=-1).topk(k)
            for view, p, t in zip(group, probs.tolist(), tokens.tolist()):
                view.prepared = (p, t)

    def choose(self, view: StepView) -> int:
        """The winning candidate's branch (on the prompt's step, branch 0): only its logits
        are computed. Changes nothing until `step` (the engine may call it again)."""
        if self._context is None:  # the prompt is done: branch 0 has the first logits
            return view.branch_ids[0]
        rows = {branch: i for i, branch in enumerate(view.branch_ids)}
        order = [rows[branch] for branch, _, _ in self._candidates]
        hidden = view.hidden[order]                                       # [k, d]
        probs = torch.tensor([p for _, _, p in self._candidates], dtype=torch.float32)
        unit = torch.nn.functional.normalize(hidden, dim=-1)
        penalty = (unit @ self._context[:self._length].T).max(dim=-1).values
        alpha = self.params.penalty_alpha
        scores = (1.0 - alpha) * probs - alpha * penalty
        self._winner = int(scores.argmax())
        return self._candidates[self._winner][0]

    def step(self, view: StepView) -> StepDecision:
        if self._context is None:
            self._append_context(view.prompt_hidden)
            return self._expand(view.chosen, view, emit=[])
        winner, token, _ = self._candidates[self._winner]
        self._append_context(view.hidden[view.branch_ids.index(winner)][None])
        losers = [branch for branch, _, _ in self._candidates if branch != winner]
        decision = self._expand(winner, view, emit=[token])
        decision.frees = losers
        return decision

    def _expand(self, branch: int, view: StepView, emit: list[int]) -> StepDecision:
        """Makes one branch per top-k candidate of `branch` (its logits are the view's first
        row; their top-k is `view.prepared` when the step prepared it): `branch` itself takes
        the first (forks are applied before appends, so the others fork from its current
        tokens)."""
        logits = view.logits[0]
        if view.prepared is None:
            probs, tokens = logits.softmax(dim=-1).topk(self.params.top_k)
            probs, tokens = probs.tolist(), tokens.tolist()
        else:
            probs, tokens = view.prepared
        if probs[-1] == 0.0:
            # Only tokens the transforms left possible (a constraint mask sets the rest to
            # -inf; at p = 0 a finite logit could still win on the degeneration penalty).
            k = int((logits > float("-inf")).sum())
            probs, tokens = probs[:k], tokens[:k]
        forks, self._candidates = [], [(branch, tokens[0], probs[0])]
        for p, t in zip(probs[1:], tokens[1:]):
            child, self._next_branch = self._next_branch, self._next_branch + 1
            forks.append(Fork(parent=branch, child=child, token=t))
            self._candidates.append((child, t, p))
        return StepDecision(forks=forks, appends=[(branch, tokens[0])], emit=emit)

    def _append_context(self, hidden: torch.Tensor) -> None:
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
        n = unit.shape[0]
        if self._context is None or self._length + n > self._context.shape[0]:
            capacity = max(64, 2 * (self._length + n))
            grown = torch.empty(capacity, unit.shape[1], dtype=torch.float32)
            if self._context is not None:
                grown[:self._length] = self._context[:self._length]
            self._context = grown
        self._context[self._length:self._length + n] = unit
        self._length += n
