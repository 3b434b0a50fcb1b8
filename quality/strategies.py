"""The strategies `bench quality` compares: a name, the papers' usual settings, the params.

Every preset generates exactly `max_new_tokens` tokens (min_new_tokens = max_new_tokens keeps
EOS out, as the papers compare fixed-length continuations), seeded where it samples.

    greedy        the most likely token
    sampling      ancestral sampling, temperature 1 (the model's own distribution)
    topk          top-k sampling, k = 40 (Fan et al. 2018)
    nucleus       top-p sampling, p = 0.95 (Holtzman et al. 2020)
    contrastive   contrastive search, k = 4, alpha = 0.6 (Su et al. 2022)
    beam          beam search, 4 beams
    rankgen       RankGen beam search over sampled chunks (Krishna et al. 2022): 2 beams x
                  10 samples of 20 tokens, top-p 0.9, ranked by the bundled MiniLM scorer
    awrs          AWRS (Lipkin et al. 2025): ancestral sampling conditioned on "no word 4-gram
                  twice" (`constraints.predicates.no_repeated_4gram`), one particle
    knn           nucleus sampling (p = 0.95) from the kNN-LM mixture (lambda 0.25, k 1024)
                  of a datastore built with the served model (only with a datastore)
"""

from __future__ import annotations

from constraints.predicates import get_predicate, no_repeated_4gram, register_predicate
from decoding.awrs import Awrs
from decoding.knn import KnnLm
from decoding.params import BeamSearch, Contrastive
from decoding.rankgen import RankGen
from engine.sampling_params import SamplingParams

NO_REPEAT_PREDICATE = "no_repeated_4gram"
DEFAULT_STRATEGIES = ("greedy", "sampling", "topk", "nucleus", "contrastive", "beam",
                      "rankgen", "awrs")
"""Run when --strategies is not given (plus knn when a datastore is)."""


def _fields(name: str, seed: int, datastore: str | None) -> dict:
    if name == "greedy":
        return dict(temperature=0.0)
    if name == "sampling":
        return dict(temperature=1.0, seed=seed)
    if name == "topk":
        return dict(temperature=1.0, top_k=40, seed=seed)
    if name == "nucleus":
        return dict(temperature=1.0, top_p=0.95, seed=seed)
    if name == "contrastive":
        return dict(strategy=Contrastive(top_k=4, penalty_alpha=0.6))
    if name == "beam":
        return dict(strategy=BeamSearch(num_beams=4))
    if name == "rankgen":
        return dict(strategy=RankGen(beam_size=2, num_samples=10, tokens_per_round=20,
                                     top_p=0.9, scorer="minilm", seed=seed))
    if name == "awrs":
        if get_predicate(NO_REPEAT_PREDICATE) is None:
            register_predicate(NO_REPEAT_PREDICATE, no_repeated_4gram)
        return dict(strategy=Awrs(num_particles=1, predicate=NO_REPEAT_PREDICATE, seed=seed))
    if name == "knn":
        if datastore is None:
            raise ValueError("strategy knn needs a datastore (--datastore DIR)")
        return dict(temperature=1.0, top_p=0.95, seed=seed,
                    transforms=(KnnLm(datastore=datastore, lmbda=0.25, k=1024),))
    raise ValueError(f"unknown strategy {name!r}; known: {', '.join(PRESET_NAMES)}")


PRESET_NAMES = (*DEFAULT_STRATEGIES, "knn")


def preset(name: str, max_new_tokens: int, seed: int = 0,
           datastore: str | None = None) -> SamplingParams:
    """The params of strategy `name` (ValueError for an unknown one, or knn without a
    datastore name)."""
    return SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          **_fields(name, seed, datastore))


def describe(params: SamplingParams) -> str:
    """The settings that make a preset what it is, for the table."""
    parts: list[str] = []
    if params.strategy is not None:
        parts.append(repr(params.strategy))
    elif params.temperature == 0:
        parts.append("greedy")
    else:
        parts += [f"temperature={params.temperature:g}"]
        parts += [f"top_k={params.top_k}"] if params.top_k else []
        parts += [f"top_p={params.top_p:g}"] if params.top_p < 1 else []
    parts += [repr(t) for t in params.transforms]
    return ", ".join(parts)

