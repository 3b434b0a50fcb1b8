"""RankGen (Krishna et al. 2022): generation with a learned scorer in the loop.

Each round, every live beam draws `num_samples` nucleus samples of `tokens_per_round` new
tokens; every candidate's whole continuation so far is scored against the prompt by a scorer
(`decoding.scorers`, or `self`: the served model's mean token log-probability), and the best `beam_size` survive (finished beams of earlier rounds compete
with their scores). Over-generate-and-rerank is beam_size 1 with one round; beam_size 1 and
num_samples 1 is plain sampling, token for token (the draws use the same counter-based noise as
the `sampling` strategy, keyed by the request's seed and the token's position; sample j > 0 of a
round uses a seed derived from it).

Candidates are branches: a beam's first sample continues its branch, the others fork it (KV
shared); the losers of a round are freed. Every round's survivors are recorded with their
scores; the final candidates are the last survivors, best first.
"""

from __future__ import annotations

import math

import msgspec
import torch

from decoding.base import (Candidate, Fork, InvalidArgument, NotFound, SelectionStrategy,
                           StepDecision, StepView)
from decoding.registry import register_strategy
from decoding.sampling import exponential_race
from decoding.scorers import get_scorer, scorer_names
from decoding.transforms import apply_top_k_top_p

SELF = "self"
"""The served model as the scorer: a candidate's mean token log-probability given the prompt,
summed as its tokens are drawn (their logits are already computed: no extra forward)."""
MAX_BEAMS = 8
MAX_SAMPLES = 32
MAX_CANDIDATES = 64
_SEED_STRIDE = 0x9E3779B97F4A7C15 % 2**63


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


class RankGen(msgspec.Struct, frozen=True, kw_only=True, tag="rankgen"):
    """Beam search over sampled chunks, ranked by a scorer."""

    beam_size: int = 2
    num_samples: int = 10
    tokens_per_round: int = 20
    top_p: float = 0.9
    temperature: float = 1.0
    scorer: str = "minilm"
    """A loaded scorer (`GetModelInfo.scorers`)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        _require(1 <= self.beam_size <= MAX_BEAMS, "beam_size", f"must be in [1, {MAX_BEAMS}]")
        _require(1 <= self.num_samples <= MAX_SAMPLES, "num_samples",
                 f"must be in [1, {MAX_SAMPLES}]")
        _require(self.beam_size * self.num_samples <= MAX_CANDIDATES, "num_samples",
                 f"beam_size x num_samples must be at most {MAX_CANDIDATES}")
        _require(self.tokens_per_round >= 1, "tokens_per_round", "must be >= 1")
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _require(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
                 "must be a finite number > 0")
        _require(bool(self.scorer), "scorer", "must name a loaded scorer")
        _require(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")


class _Seq(msgspec.Struct):
    branch: int | None
    tokens: list[int]
    seed: int
    round_tokens: int = 0
    score: float = 0.0
    done: bool = False
    logprob: float = 0.0
    """Sum of the model's log-probabilities of `tokens` (the `self` scorer)."""


@register_strategy(RankGen)
class RankGenStrategy(SelectionStrategy):
    streams_output = False

    def __init__(self, params: RankGen) -> None:
        super().__init__(params)
        self._beams: list[_Seq] | None = None
        self._candidates: list[_Seq] = []
        self._next_branch = 1
        self.rounds: list[list[tuple[list[int], float]]] = []
        """Each round's survivors (tokens, score), best first."""

    @staticmethod
    def max_branches(params) -> int:
        return params.beam_size * params.num_samples

    @classmethod
    def check_loaded(cls, params: RankGen) -> None:
        if params.scorer != SELF and get_scorer(params.scorer) is None:
            raise NotFound("scorer", f"unknown scorer {params.scorer!r}; loaded: "
                                     f"{', '.join(scorer_names()) or 'none'}")

    def _sample(self, logits: torch.Tensor, seeds: list[int],
                steps: list[int]) -> tuple[list[int], list[float]]:
        """One nucleus draw per row, with the `sampling` strategy's noise; and each drawn
        token's log-probability under the (untempered, unfiltered) distribution."""
        n = logits.shape[0]
        scaled = logits.float() / self.params.temperature
        if self.params.top_p < 1:
            scaled = apply_top_k_top_p(scaled, torch.full((n,), logits.shape[1]),
                                       torch.full((n,), self.params.top_p))
        tokens = exponential_race(scaled.softmax(dim=-1), torch.tensor(seeds),
                                  torch.tensor(steps))
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None])
        return tokens.tolist(), logprobs[:, 0].tolist()

    def step(self, view: StepView) -> StepDecision:
        rows = {b: i for i, b in enumerate(view.branch_ids)}
        if self._beams is None:
            seed = self.params.seed if self.params.seed is not None else view.seed
            self._beams = [_Seq(view.branch_ids[0], [], seed)]
        if not self._candidates:  # the beams' logits are here: a new round starts
            return self._start_round(view, rows)
        return self._continue_round(view, rows)

    def _start_round(self, view: StepView, rows: dict[int, int]) -> StepDecision:
        live = [b for b in self._beams if not b.done]
        forks, appends = [], []
        logits, seeds, steps, parents = [], [], [], []
        for beam in live:
            for j in range(self.params.num_samples):
                logits.append(view.logits[rows[beam.branch]])
                seeds.append((beam.seed + j * _SEED_STRIDE) % 2**63)
                steps.append(len(beam.tokens))
                parents.append(beam)
        tokens, logprobs = self._sample(torch.stack(logits), seeds, steps)
        self._candidates = []
        for j, (beam, token, seed, lp) in enumerate(zip(parents, tokens, seeds, logprobs)):
            first = j % self.params.num_samples == 0
            branch = beam.branch
            if first:
                appends.append((branch, token))
            else:
                branch, self._next_branch = self._next_branch, self._next_branch + 1
                forks.append(Fork(parent=beam.branch, child=branch, token=token))
            self._candidates.append(_Seq(branch, beam.tokens + [token], seed, 1,
                                         logprob=beam.logprob + lp))
        decision = StepDecision(forks=forks, appends=appends)
        self._drop(decision, self._mark_done(view))
        return self._maybe_rank(decision, view)

    def _continue_round(self, view: StepView, rows: dict[int, int]) -> StepDecision:
        running = [c for c in self._candidates
                   if not c.done and c.round_tokens < self.params.tokens_per_round]
        tokens, logprobs = self._sample(
            torch.stack([view.logits[rows[c.branch]] for c in running]),
            [c.seed for c in running], [len(c.tokens) for c in running])
        appends = []
        for cand, token, lp in zip(running, tokens, logprobs):
            cand.tokens.append(token)
            cand.logprob += lp
            cand.round_tokens += 1
            appends.append((cand.branch, token))
        decision = StepDecision(appends=appends)
        self._drop(decision, self._mark_done(view))
        return self._maybe_rank(decision, view)

    def _mark_done(self, view: StepView) -> list[_Seq]:
        """Candidates that just ended (EOS or max_new_tokens)."""
        eos = () if view.ignore_eos else view.eos_token_ids
        ended = []
        for cand in self._candidates:
            if not cand.done and cand.tokens and (cand.tokens[-1] in eos
                                                  or len(cand.tokens) >= view.max_new_tokens):
                cand.done = True
                ended.append(cand)
        return ended

    @staticmethod
    def _drop(decision: StepDecision, seqs: list[_Seq]) -> None:
        """Ends these sequences' branches (they keep their tokens): a fork made this step is
        not made, an append is not applied, an existing branch is freed. A branch left idle
        would never report again, and the strategy waits for every branch."""
        dropped = {c.branch for c in seqs if c.branch is not None}
        if not dropped:
            return
        new = {f.child for f in decision.forks}
        decision.forks = [f for f in decision.forks if f.child not in dropped]
        decision.appends = [(b, t) for b, t in decision.appends if b not in dropped]
        decision.frees = sorted(set(decision.frees) | {b for b in dropped if b not in new})
        for c in seqs:
            c.branch = None

    def _maybe_rank(self, decision: StepDecision, view: StepView) -> StepDecision:
        """At the end of a round: score, keep the best beam_size, free the others."""
        if any(not c.done and c.round_tokens < self.params.tokens_per_round
               for c in self._candidates):
            return decision
        pool = self._candidates + [b for b in self._beams if b.done]
        if self.params.scorer == SELF:
            for cand in pool:
                cand.score = cand.logprob / max(len(cand.tokens), 1)
        elif len(pool) > 1:
            texts = [view.decode(c.tokens) for c in pool]
            prompt = view.decode(view.prompt_token_ids)
            scores = get_scorer(self.params.scorer).score([prompt] * len(pool), texts).tolist()
            for cand, score in zip(pool, scores):
                cand.score = float(score)
        order = sorted(range(len(pool)), key=lambda i: -pool[i].score)
        keep = [pool[i] for i in order[:self.params.beam_size]]
        self.rounds.append([(list(c.tokens), c.score) for c in keep])
        if all(b.done for b in keep):  # finishing frees every branch
            self._beams, self._candidates = keep, []
            return StepDecision(finished=True, candidates=[
                Candidate(token_ids=list(b.tokens), score=b.score) for b in keep], rounds=[
                [Candidate(token_ids=t, score=s) for t, s in kept] for kept in self.rounds])
        return self._prune(decision, keep)

    def _prune(self, decision: StepDecision, keep: list[_Seq]) -> StepDecision:
        """The round's losers' branches end; the survivors start the next round when their
        last token's logits arrive."""
        kept = {id(c) for c in keep}
        self._drop(decision, [c for c in self._candidates if id(c) not in kept])
        for cand in keep:
            cand.round_tokens = 0
        self._beams, self._candidates = keep, []
        return decision
