"""AWRS against its definitions (Lipkin et al. 2025).

- One token, toy distributions: the sampled token is an exact draw from p(x) 1[x in A] / Z (a
  chi-square test at the 0.001 level over 20,000 draws) and exp(log-weight) is an unbiased
  estimate of Z = p(A) (the Monte Carlo mean within 4 standard errors), for the recursive
  estimator (top p < 2/3), the geometric one (top p >= 2/3), a rejection limit, an accepted
  set of mass 1e-9 (reached and weighted, not lost to rounding), and the mask that finishes
  long walks.
- Sequences: on a toy Markov model whose globally constrained distribution p(y | y in C,
  |y| <= 4) is enumerated exactly, `AwrsStrategy` (driven through its StepView / StepDecision
  interface, as the engine drives it, forks and frees included) gives weighted particle sets
  whose total variation distance to the target shrinks as the number of particles grows
  (N = 1, 4, 16, 64; mean over 60 seeded runs each).
- The default model: the first token of many seeded AWRS draws follows the masked,
  renormalised next-token distribution that Hugging Face transformers gives for the prompt.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from constraints.compiler import ConstraintStats
from constraints.condition import Condition
from constraints.predicates import Predicate, regex_prefix
from constraints.vocabulary import TokenVocabulary
from decoding.awrs import Awrs, AwrsStrategy, awrs_sample
from decoding.base import StepView


def chi_square_p(observed: list[int], expected: list[float]) -> float:
    """P(chi2 >= statistic) with len - 1 degrees of freedom."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


TOY = [
    ("recursive", [0.30, 0.22, 0.18, 0.12, 0.08, 0.05, 0.03, 0.02], {1, 4, 5, 7}, math.inf),
    ("geometric", [0.80, 0.06, 0.05, 0.04, 0.03, 0.01, 0.005, 0.005], {1, 2, 6}, math.inf),
    ("rare set", [0.40, 0.30, 0.15, 0.10, 0.03, 0.01, 0.005, 0.005], {5, 7}, math.inf),
    ("max rejects", [0.30, 0.22, 0.18, 0.12, 0.08, 0.05, 0.03, 0.02], {3, 6}, 3),
    ("one in a billion", [0.5, 0.3, 0.15, 0.05 - 1e-9, 1e-9], {4}, math.inf),
]


@pytest.mark.parametrize("name, probs, accepted, max_rejects", TOY, ids=[t[0] for t in TOY])
def test_token_is_exact_and_weight_unbiased(name, probs, accepted, max_rejects):
    p = np.array(probs)
    logp = np.log(p)
    z = p[list(accepted)].sum()
    rng = np.random.default_rng(11)
    draws, weights = 20_000, []
    counts: Counter = Counter()
    for _ in range(draws):
        token, log_w = awrs_sample(logp, lambda t: t in accepted, rng, max_rejects)
        weights.append(math.exp(log_w))
        if math.isfinite(log_w):
            assert token in accepted
            counts[token] += 1
    weights = np.array(weights)
    se = weights.std() / math.sqrt(draws)
    assert abs(weights.mean() - z) < 4 * se + 1e-12, (weights.mean(), z, se)
    if max_rejects == math.inf and len(accepted) > 1:  # every draw returns an accepted token
        order = sorted(accepted)
        observed = [counts[t] for t in order]
        expected = [draws * p[t] / z for t in order]
        assert chi_square_p(observed, expected) > 1e-3, (observed, expected)


def test_the_mask_that_finishes_a_long_walk_keeps_it_exact_and_unbiased():
    """After MASK_AFTER rejections a grammar's mask finishes the draw: still an exact draw with
    an unbiased weight (here the accepted set is rare, so most draws end that way)."""
    from decoding import awrs

    rng_p = np.random.default_rng(3)
    p = rng_p.dirichlet(np.full(300, 0.3))
    accepted = set(np.argsort(p)[100:106].tolist())
    z = p[list(accepted)].sum()
    allowed = np.zeros(300, dtype=bool)
    allowed[list(accepted)] = True
    masks = []

    def mask():
        masks.append(1)
        return allowed

    rng, draws, weights, counts = np.random.default_rng(5), 20_000, [], Counter()
    for _ in range(draws):
        token, log_w = awrs_sample(np.log(p), lambda t: t in accepted, rng, mask=mask)
        assert token in accepted
        weights.append(math.exp(log_w))
        counts[token] += 1
    assert len(masks) > draws / 2, "the mask should finish most of these draws"
    weights = np.array(weights)
    assert abs(weights.mean() - z) < 4 * weights.std() / math.sqrt(draws) + 1e-12
    order = sorted(accepted)
    observed = [counts[t] for t in order]
    expected = [draws * p[t] / z for t in order]
    assert chi_square_p(observed, expected) > 1e-3, (observed, expected)
    assert awrs.MASK_AFTER == 64


# ---- sequences on a toy Markov model -----------------------------------------------------------

A, B, EOS = 0, 1, 2
VOCAB = TokenVocabulary([b"a", b"b", b""], (EOS,), frozenset({EOS}))
PATTERN = r"(ab|ba)a{0,2}|bbb"
MAX_TOKENS = 4
# p(next | last token); the first token uses the row of EOS (start).
TRANSITIONS = np.array([[0.70, 0.20, 0.10],    # after a
                        [0.15, 0.45, 0.40],    # after b
                        [0.60, 0.40, 0.00]])   # at the start


def _logits(tokens: list[int]) -> torch.Tensor:
    last = tokens[-1] if tokens else EOS
    with np.errstate(divide="ignore"):
        return torch.tensor(np.log(TRANSITIONS[last]), dtype=torch.float32)


def _target() -> dict[tuple[int, ...], float]:
    """p(y | y matches PATTERN, |y| <= MAX_TOKENS tokens with the final EOS)."""
    check = regex_prefix(PATTERN)
    mass = {}
    for n in range(1, MAX_TOKENS):
        for body in itertools.product((A, B), repeat=n):
            text = "".join("ab"[t] for t in body)
            if check(text, complete=True):
                seq = list(body)
                prob = math.prod(TRANSITIONS[([EOS] + seq)[i], seq[i]] for i in range(n))
                mass[body + (EOS,)] = prob * TRANSITIONS[seq[-1], EOS]
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()}


def _run(num_particles: int, seed: int) -> dict[tuple[int, ...], float]:
    """One AWRS-SMC run driven like the engine drives it; the normalised particle weights."""
    stats = ConstraintStats()
    condition = Condition(VOCAB, stats, predicate=Predicate("toy", regex_prefix(PATTERN)))
    strategy = AwrsStrategy(Awrs(num_particles=num_particles, seed=seed, ess_threshold=0.5))
    branches: dict[int, list[int]] = {0: []}
    while True:
        ids = sorted(branches)
        view = StepView(branch_ids=ids, logits=torch.stack([_logits(branches[b]) for b in ids]),
                        output_token_ids=[branches[b] for b in ids], eos_token_ids=(EOS,),
                        max_new_tokens=MAX_TOKENS, seed=seed, condition=condition)
        decision = strategy.step(view)
        if decision.finished:
            break
        parents = {f.parent for f in decision.forks}
        for b in decision.frees:
            if b not in parents:
                del branches[b]
        for fork in decision.forks:
            branches[fork.child] = branches[fork.parent] + [fork.token]
        for b, token in decision.appends:
            branches[b].append(token)
        for b in decision.frees:
            branches.pop(b, None)
    weights = np.array([c.score for c in decision.candidates])
    if not np.isfinite(weights).any():
        return {}
    w = np.exp(weights - weights[np.isfinite(weights)].max())
    w /= w.sum()
    out: dict[tuple[int, ...], float] = {}
    for c, wi in zip(decision.candidates, w):
        out[tuple(c.token_ids)] = out.get(tuple(c.token_ids), 0.0) + wi
    return out


def test_smc_converges_to_the_global_distribution():
    target = _target()
    tv, pooled = {}, {}
    for n in (1, 4, 16, 64):
        dists, mean = [], {}
        for seed in range(60):
            approx = _run(n, seed)
            assert set(approx) <= set(target), f"a particle outside the language: {approx}"
            dists.append(_tv(target, approx))
            for k, v in approx.items():
                mean[k] = mean.get(k, 0.0) + v / 60
        tv[n], pooled[n] = float(np.mean(dists)), _tv(target, mean)
    print("\nmean total variation of one run:", {n: round(v, 4) for n, v in tv.items()},
          "\nof the 60 runs pooled:", {n: round(v, 4) for n, v in pooled.items()})
    assert tv[1] > tv[4] > tv[16] > tv[64]
    assert tv[64] < 0.2 and pooled[64] < 0.05


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


# ---- the default model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(model_dir):
    from engine.engine import Engine
    from tests.factories import make_engine_config

    return Engine(make_engine_config(model_dir, num_blocks=1024, max_num_seqs=256))


def test_first_token_follows_the_masked_distribution(engine, hf_model):
    from constraints.backends import mask_words
    from decoding.constraint import Constraint, unpack_bitmask
    from engine.sampling_params import SamplingParams

    prompt = "My best friend's name is"
    constraint = Constraint(regex=r" [A-Z][a-z]{2,8}")
    ids = engine.tokenizer.encode(prompt)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
    compiled = engine.constraints.compile(constraint)
    packed = np.zeros((1, mask_words(len(compiled.vocab))), dtype=np.int32)
    compiled.matcher().fill_mask(packed[0])
    allowed = unpack_bitmask(packed, logits.shape[0])[0]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).double().numpy()

    draws = 1500
    params = [SamplingParams(max_new_tokens=2, transforms=(constraint,),
                             strategy=Awrs(num_particles=1, seed=seed)) for seed in range(draws)]
    outs = engine.generate([ids] * draws, params)
    firsts = Counter(o.token_ids[0] for o in outs)
    assert all(allowed[t] for t in firsts)
    common = [t for t in np.argsort(-probs) if probs[t] * draws >= 5]
    observed = [firsts[t] for t in common] + [draws - sum(firsts[t] for t in common)]
    expected = [probs[t] * draws for t in common]
    expected.append(draws - sum(expected))
    assert len(common) >= 5
    assert chi_square_p(observed, expected) > 1e-3, list(zip(observed, expected))


def test_composes_with_set_prompts(engine):
    """A parallel set's members do not depend on their order, so neither do AWRS's particles."""
    from decoding.constraint import Constraint
    from engine.prompt import Parallel, StructuredPrompt
    from engine.sampling_params import SamplingParams

    members = ["Red apples.", "Green pears and plums.", "Yellow bananas."]
    params = SamplingParams(max_new_tokens=12, transforms=(Constraint(
        choice=("apples", "pears", "plums", "bananas")),), strategy=Awrs(num_particles=4, seed=2))
    outs = [engine.generate([StructuredPrompt(["Fruit:", Parallel(m), "The best one is"])],
                            params)[0] for m in (members, members[::-1])]
    assert outs[0].text in ("apples", "pears", "plums", "bananas")
    # The same tokens; the weights up to float summation order inside the set's attention.
    assert [c.token_ids for c in outs[0].candidates] == [c.token_ids for c in outs[1].candidates]
    assert [c.score for c in outs[0].candidates] == pytest.approx(
        [c.score for c in outs[1].candidates], rel=1e-5)
