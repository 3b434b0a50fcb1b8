"""AWRS: adaptive weighted rejection sampling (Lipkin et al. 2025) with sequential Monte Carlo.

Target: the model's distribution over whole outputs conditioned on a Boolean condition C (the
request's constraint, a server-registered predicate, or both): p(y | y in C). Masking the
vocabulary every step gives the *locally* constrained distribution, which is biased towards
prefixes that are easy to continue; AWRS instead samples each token from p(x) 1[x ok] / Z by
rejection and returns an unbiased estimate of the local normaliser Z, the particle's incremental
importance weight, so that weighted particles approximate the *global* target.

One token (`awrs_sample`): draw tokens without replacement in Gumbel-key order (keys log p + G,
G ~ Gumbel) and check each against the condition until one passes; that token is an exact draw
from the locally constrained distribution. The log-weight log Z-hat comes from:

- the recursive estimator (default): with R the rejected mass so far and q = p_x / (1 - R) the
  probability of the visited token among the rest, a rejection multiplies the estimate by
  (1 - q); at the first accepted x one more token is checked, and the last factor is 1 if it
  passes too, else q. E[Z-hat] = Z by E f = P(x) f(x) + (1 - P(x)) E[f | X != x], applied
  recursively with a one-coin estimate of the tail.
- the geometric estimator, when the most likely token has p >= 2/3 (where it needs fewer checks
  in expectation, 1 + 2(1 - p)/p < 2): simulate sampling *with* replacement until 2 accepts,
  adding Geometric(1 - R) - 1 phantom draws of already rejected tokens before each real one;
  Z-hat = min(1, n_acc) / (n_acc + n_rej - 1), the Rao-Blackwellised negative-binomial
  estimate.

Both follow genlm-control 0.4.1's `recursive_awrs` / `geometric_awrs` (threshold log(2/3)).

Sequences (`AwrsStrategy`): N particles are branches of the generation (they share KV blocks).
Each step every live particle draws a token with `awrs_sample` and adds its log-weight; a
particle ends at EOS, and at the last allowed token EOS is forced with weight += log p(EOS) (or
-inf where the text is not complete): the target is then p(y | y in C, |y| <= max_new_tokens).
A particle whose every token is rejected dies (weight -inf). When the effective sample size
1 / sum w_i^2 of the normalised weights drops below ess_threshold * N, N ancestors are drawn
(multinomial, by weight) and every weight becomes the mean weight: a particle drawn k times is
continued by its own branch once and forked k - 1 times (KV shared, never copied), the others
are freed. At the end one particle is drawn by weight; it is the output, and every particle is
returned as a candidate with its log-weight (the first is the drawn one).

The distribution AWRS draws from is the transformed one (bias, penalties, kNN-LM, at the
strategy's temperature): a constraint mask does not apply to these rows, AWRS checks instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec
import numpy as np
import torch

from decoding.base import (Candidate, Fork, InvalidArgument, SelectionStrategy, StepDecision,
                           StepView)
from decoding.registry import register_strategy

MAX_PARTICLES = 64
GEOMETRIC_THRESHOLD = math.log(2 / 3)
"""Above this top log-probability the geometric estimator needs fewer checks (genlm-control)."""
MAX_ACCEPTS = 2
MASK_AFTER = 64
"""Rejections after which a grammar condition's exact mask finishes the draw (see
`_recursive`): 64 one-token checks cost about what one llguidance mask does."""
_LAZY_ORDER = 256
"""Tokens ordered by key up front; the rest only when a walk gets that far."""


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


class Awrs(msgspec.Struct, frozen=True, kw_only=True, tag="awrs"):
    """Adaptive weighted rejection sampling with sequential Monte Carlo."""

    num_particles: int = 1
    ess_threshold: float = 0.5
    """Resample when the effective sample size < ess_threshold * num_particles; 0: never."""
    max_rejects: int = 0
    """Rejections per token before the particle dies; 0: no limit (else >= 2)."""
    predicate: str = ""
    """A server-registered predicate on the decoded text; "": the request's constraint alone."""
    temperature: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _require(1 <= self.num_particles <= MAX_PARTICLES, "num_particles",
                 f"must be in [1, {MAX_PARTICLES}]")
        _require(0.0 <= self.ess_threshold <= 1.0, "ess_threshold", "must be in [0, 1]")
        _require(self.max_rejects == 0 or self.max_rejects >= 2, "max_rejects",
                 "must be 0 (no limit) or >= 2 (weights need two checks)")
        _require(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
                 "must be a finite number > 0")
        _require(self.seed is None or 0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")


# ---- one token ---------------------------------------------------------------------------------

def _order(keys: np.ndarray) -> list[int]:
    """Token ids by descending key: the first `_LAZY_ORDER` now, the rest if asked for."""
    n = min(_LAZY_ORDER, keys.shape[0])
    head = np.argpartition(-keys, n - 1)[:n] if n < keys.shape[0] else np.arange(n)
    head = head[np.argsort(-keys[head], kind="stable")]
    return head.tolist()


class _Walk:
    """Tokens in descending key order, ordered lazily (most walks stop in the first few)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self.order = _order(keys)
        self.full = len(self.order) == keys.shape[0]

    def __getitem__(self, i: int) -> int | None:
        if i >= len(self.order) and not self.full:
            seen = np.zeros(self.keys.shape[0], dtype=bool)
            seen[self.order] = True
            rest = np.nonzero(~seen)[0]
            rest = rest[np.argsort(-self.keys[rest], kind="stable")]
            self.order += rest.tolist()
            self.full = True
        return self.order[i] if i < len(self.order) else None


def awrs_sample(logp: np.ndarray, accept: Callable[[int], bool], rng: np.random.Generator,
                max_rejects: float = math.inf,
                mask: Callable[[], np.ndarray] | None = None) -> tuple[int | None, float]:
    """One token and its log-weight (log of an unbiased estimate of the accepted mass).

    `logp`: [V] float64 normalised log-probabilities (-inf: impossible). `accept(token)` is the
    condition (called at most once per token). `mask()`, when given, returns the exact accepted
    set as a [V] bool array (or None where it has none), asked after `MASK_AFTER` rejections
    (see `_recursive`). Returns (None
    or the last rejected token, -inf) when nothing is accepted within `max_rejects`.
    """
    cache: dict[int, bool] = {}

    def ok(token: int) -> bool:
        if token not in cache:
            cache[token] = bool(accept(token))
        return cache[token]

    # The choice is a deterministic function of the step (the top token's check), so each
    # estimator stays unbiased; a rejected top token would make the geometric run long.
    top = int(np.argmax(logp))
    if float(logp[top]) >= GEOMETRIC_THRESHOLD and ok(top):
        return _geometric(logp, ok, rng, max_rejects)
    return _recursive(logp, ok, rng, max_rejects, mask)


def _gumbel_keys(logp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return logp + rng.gumbel(size=logp.shape[0])


def _recursive(logp, ok, rng, max_rejects, mask=None) -> tuple[int | None, float]:
    """The recursive estimator. After `MASK_AFTER` rejections, with an exact `mask` of the
    accepted set, the rest of the walk is replaced by its exact value: the walk's next accepted
    token is a draw from p restricted to the mask, and the estimate it would give has
    expectation M (1 - R)^-1 Z = Z (M, the product of (1 - q) over the rejections, telescopes
    to 1 - R): so the token is drawn from the masked distribution with weight exactly Z.

    The mass 1 - R of the tokens not yet rejected is kept as a running difference until it is
    small, then summed afresh over those tokens: a valid continuation of probability 1e-9 (EOS
    where nothing else fits) is still reached and weighted, where 1 - R computed as a difference
    would have cancelled to noise (genlm-control kills the particle at R >= 1 - 1e-5)."""
    p = np.exp(logp)
    walk = _Walk(_gumbel_keys(logp, rng))
    num_possible = int(np.count_nonzero(p > 0))
    remaining, summed, log_m, n_rejects = 1.0, False, 0.0, 0
    token = None
    for i in range(num_possible):
        if mask is not None and n_rejects == MASK_AFTER and n_rejects < max_rejects:
            allowed, mask = mask(), None
            if allowed is not None:
                return _masked_draw(logp, allowed, rng, token)
        token = walk[i]
        last = i == num_possible - 1
        q = 1.0 if last else min(p[token] / remaining, 1.0)
        if ok(token):
            if last or n_rejects == max_rejects - 1:
                return token, log_m
            nxt = walk[i + 1]
            return token, log_m if ok(nxt) else log_m + math.log(q)
        if last or n_rejects == max_rejects - 1:
            return token, -math.inf
        n_rejects += 1
        remaining -= p[token]
        if remaining < 1e-4 and not summed:
            live = np.ones(p.shape[0], dtype=bool)
            live[walk.order[:i + 1]] = False
            remaining, summed = float(p[live].sum()), True
        if remaining <= 0.0:
            return token, -math.inf
        log_m += math.log1p(-q)
    return token, -math.inf


def _masked_draw(logp, allowed: np.ndarray, rng, last) -> tuple[int | None, float]:
    if allowed.shape[0] < logp.shape[0]:  # a model vocabulary wider than the tokenizer's
        allowed = np.pad(allowed, (0, logp.shape[0] - allowed.shape[0]))
    masked = np.where(allowed, logp, -math.inf)
    if not np.isfinite(masked).any():
        return last, -math.inf
    token = int(np.argmax(masked + rng.gumbel(size=masked.shape[0])))
    return token, float(np.logaddexp.reduce(masked[np.isfinite(masked)]))


def _geometric(logp, ok, rng, max_rejects) -> tuple[int | None, float]:
    p = np.exp(logp)
    live = logp.copy()
    rejected_mass, n_rejects, n_accepts, first = 0.0, 0, 0, None
    last_rejected = None
    for _ in range(MAX_ACCEPTS):
        walk = _Walk(_gumbel_keys(live, rng))
        accepted = False
        i = 0
        while True:
            token = walk[i]
            i += 1
            if token is None or not np.isfinite(live[token]):
                break  # every possible token is rejected
            if rejected_mass > 0:
                if rejected_mass >= 1.0:
                    return last_rejected, -math.inf
                n_rejects += int(rng.geometric(1.0 - rejected_mass)) - 1
                if n_rejects >= max_rejects:
                    break
            if ok(token):
                n_accepts += 1
                first = token if first is None else first
                accepted = True
                break
            n_rejects += 1
            rejected_mass += p[token]
            live[token] = -math.inf
            last_rejected = token
            if n_rejects >= max_rejects:
                break
        if not accepted or n_rejects >= max_rejects:
            break
    if n_accepts == 0:
        return last_rejected, -math.inf
    n_rejects = min(n_rejects, max_rejects)
    estimate = min(MAX_ACCEPTS - 1, n_accepts) / (n_accepts + n_rejects - 1)
    return first, math.log(estimate)


# ---- sequences ---------------------------------------------------------------------------------

class _Particle:
    __slots__ = ("branch", "tokens", "log_weight", "condition", "done")

    def __init__(self, branch: int | None, tokens: list[int], log_weight: float, condition,
                 done: bool = False) -> None:
        self.branch = branch
        """The branch whose KV holds this particle's text (None once it is done)."""
        self.tokens = tokens
        self.log_weight = log_weight
        self.condition = condition
        self.done = done

    def clone(self) -> _Particle:
        return _Particle(self.branch, list(self.tokens), self.log_weight,
                         self.condition.copy(), self.done)


def effective_sample_size(log_weights: np.ndarray) -> float:
    finite = log_weights[np.isfinite(log_weights)]
    if finite.size == 0:
        return 0.0
    w = np.exp(finite - finite.max())
    w /= w.sum()
    return float(1.0 / np.sum(w * w))


@register_strategy(Awrs)
class AwrsStrategy(SelectionStrategy):
    checks_constraint = True
    streams_output = False

    def __init__(self, params: Awrs) -> None:
        super().__init__(params)
        self._particles: list[_Particle] | None = None
        self._rng: np.random.Generator | None = None
        self._next_branch = 1
        self.num_resamples = 0

    @staticmethod
    def max_branches(params) -> int:
        return params.num_particles

    def step(self, view: StepView) -> StepDecision:
        if self._particles is None:
            seed = self.params.seed if self.params.seed is not None else view.seed
            self._rng = np.random.default_rng(seed)
            start = view.condition.start()
            self._particles = [_Particle(view.branch_ids[0], [], 0.0,
                                         start if i == 0 else start.copy())
                               for i in range(self.params.num_particles)]
        rows = {b: i for i, b in enumerate(view.branch_ids)}
        logp = torch.log_softmax(view.logits.double() / self.params.temperature, dim=-1).numpy()
        eos = view.eos_token_ids
        chosen: dict[int, int] = {}  # particle index -> token drawn this step
        for j, particle in enumerate(self._particles):
            if particle.done:
                continue
            token, log_w = self._draw(particle, logp[rows[particle.branch]], eos,
                                      view.max_new_tokens)
            particle.log_weight += log_w
            if token is None or not math.isfinite(particle.log_weight):
                particle.done, particle.log_weight = True, -math.inf
                continue
            particle.condition.advance(token)
            particle.tokens.append(token)
            chosen[j] = token
            if token in eos:
                particle.done = True
        old_branches = {p.branch for p in self._particles if p.branch is not None}
        self._maybe_resample()
        return self._decide(old_branches, chosen)

    def _draw(self, particle: _Particle, logp: np.ndarray, eos: tuple[int, ...],
              max_new_tokens: int) -> tuple[int | None, float]:
        # EOS ids share one slot (the first id) holding their total probability.
        if len(eos) > 1:
            logp = logp.copy()
            logp[eos[0]] = np.logaddexp.reduce(logp[list(eos)])
            logp[list(eos[1:])] = -math.inf
        if len(particle.tokens) >= max_new_tokens - 1:  # the last token: EOS or nothing
            ok = particle.condition.check(eos[0])
            return eos[0], float(logp[eos[0]]) if ok else -math.inf
        return awrs_sample(logp, particle.condition.check, self._rng,
                           self.params.max_rejects or math.inf, particle.condition.mask)

    def _maybe_resample(self) -> None:
        n = len(self._particles)
        weights = np.array([p.log_weight for p in self._particles])
        if n == 1 or self.params.ess_threshold == 0 or not np.isfinite(weights).any():
            return
        if all(p.done for p in self._particles):
            return
        if effective_sample_size(weights) >= self.params.ess_threshold * n:
            return
        finite = np.isfinite(weights)
        mean = np.logaddexp.reduce(weights[finite]) - math.log(n)
        probs = np.exp(weights - weights[finite].max())
        probs /= probs.sum()
        ancestors = self._rng.choice(n, size=n, p=probs)
        used: set[int] = set()
        fresh = []
        for a in sorted(ancestors.tolist()):
            source = self._particles[a]
            fresh.append(source if a not in used else source.clone())
            used.add(a)
        for particle in fresh:
            particle.log_weight = mean
        self._particles = fresh
        self.num_resamples += 1

    def _decide(self, old_branches: set[int], chosen: dict[int, int]) -> StepDecision:
        """Branches for the live particles: a branch continues with the first live particle
        that holds it, is forked for the others, and freed when none holds it."""
        forks, appends, kept = [], [], set()
        for particle in self._particles:
            if particle.done:
                particle.branch = None
                continue
            parent, token = particle.branch, particle.tokens[-1]
            if parent not in kept:
                kept.add(parent)
                appends.append((parent, token))
            else:
                child, self._next_branch = self._next_branch, self._next_branch + 1
                forks.append(Fork(parent=parent, child=child, token=token))
                particle.branch = child
        frees = sorted(old_branches - kept)
        if not kept:
            return StepDecision(frees=frees, finished=True, candidates=self._candidates())
        return StepDecision(forks=forks, appends=appends, frees=frees)

    def _candidates(self) -> list[Candidate]:
        """Every particle with its log-weight; the first is drawn by weight (the output)."""
        weights = np.array([p.log_weight for p in self._particles])
        order = list(range(len(self._particles)))
        if np.isfinite(weights).any():
            probs = np.exp(weights - weights[np.isfinite(weights)].max())
            probs /= probs.sum()
            pick = int(self._rng.choice(len(order), p=probs))
            order.remove(pick)
            order.insert(0, pick)
        return [Candidate(token_ids=list(self._particles[i].tokens),
                          score=float(self._particles[i].log_weight)) for i in order]
