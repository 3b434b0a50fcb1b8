"""Runs every strategy on the held-out prefixes through one engine, then measures them.

Generation: each strategy's requests (one per prefix) go through `Engine.generate` together,
continuously batched, one strategy after another in one job under one progress bar; at most
max_num_seqs / (branches per request) requests run at once (`branches`), so a forking strategy
fills the batch without its requests preempting each other. The prefix
cache is emptied before each, so no strategy reuses another's prefill; its wall time over its
emitted tokens is its cost in ms per token at that batch, and the tokens its requests ran
forward past their prompts (candidates, beams, samples, branches: `num_forward_tokens` less the
prefill) over the emitted tokens are its forward tokens per token.

Measurement (`measure`): rep-n and diversity of the continuation texts; coherence and MAUVE on
MiniLM sentence embeddings (or the served model's mean-pooled hidden states, `features="model"`)
against the human continuations of the same prefixes; perplexity of the emitted tokens given
the prefix under the served model. The human continuations get every measure but MAUVE, as the
reference row.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from quality import metrics
from quality.samples import Sample
from quality.scoring import score_continuations, perplexity
from quality.strategies import describe

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams

MAUVE_SEEDS = (25, 26, 27, 28, 29)
"""k-means seeds MAUVE's spread is taken over; 25 (mauve-text's default) gives the value."""


class Generated(msgspec.Struct):
    """One strategy's continuations of every sample and what they cost."""

    name: str
    settings: str
    token_ids: list[list[int]]
    texts: list[str]
    time_s: float
    emitted_tokens: int
    decode_forward_tokens: int


def generate_all(engine: Engine, samples: Sequence[Sample],
                 strategies: dict[str, SamplingParams], show_progress: bool = True
                 ) -> list[Generated]:
    from tqdm import tqdm

    bar = tqdm(total=len(samples) * len(strategies), desc="generating", unit="text",
               file=sys.stderr, disable=not show_progress, dynamic_ncols=True)
    runs = []
    try:
        for name, params in strategies.items():
            bar.set_postfix_str(name)
            if not engine.kv_cache.reset_prefix_cache():
                raise RuntimeError("KV blocks still owned between strategies")
            limit = max(1, engine.config.scheduler.max_num_seqs // branches(params))
            start = time.perf_counter()
            outs = engine.generate([s.prefix_ids for s in samples], params, progress=bar.update,
                                   max_in_flight=limit)
            elapsed = time.perf_counter() - start
            prefill = sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)
            runs.append(Generated(
                name=name, settings=describe(params), token_ids=[o.token_ids for o in outs],
                texts=[o.text for o in outs], time_s=elapsed,
                emitted_tokens=sum(len(o.token_ids) for o in outs),
                decode_forward_tokens=sum(o.num_forward_tokens for o in outs) - prefill))
    finally:
        bar.close()
    return runs


def branches(params: SamplingParams) -> int:
    """Sequences a request of these params runs at once: contrastive search's k candidates,
    beam search's beams, RankGen's beams x samples, AWRS's particles; else 1."""
    from decoding.awrs import Awrs
    from decoding.params import BeamSearch, Contrastive
    from decoding.rankgen import RankGen

    strategy = params.strategy
    if isinstance(strategy, Contrastive):
        return strategy.top_k
    if isinstance(strategy, BeamSearch):
        return strategy.num_beams
    if isinstance(strategy, RankGen):
        return strategy.beam_size * strategy.num_samples
    if isinstance(strategy, Awrs):
        return strategy.num_particles
    return 1


def measure(engine: Engine, samples: Sequence[Sample], runs: Sequence[Generated],
            features: str = "minilm", show_progress: bool = True) -> list[dict]:
    """One row per run and a last one for the human continuations ("human")."""
    from tqdm import tqdm

    from decoding.scorers.minilm import MiniLmScorer

    texts = [[s.reference for s in samples], *[r.texts for r in runs]]
    ids = [[s.reference_ids for s in samples], *[r.token_ids for r in runs]]
    prefixes = [s.prefix_ids for s in samples]
    bar = tqdm(total=len(samples) * len(ids), desc="scoring", unit="text", file=sys.stderr,
               disable=not show_progress, dynamic_ncols=True)
    with bar:
        scored = [score_continuations(engine, prefixes, group, progress=bar.update)
                  for group in ids]
    encoder = MiniLmScorer()
    prefix_emb = encoder.embed([s.prefix for s in samples]).numpy()
    text_emb = [encoder.embed(group).numpy() for group in texts]
    feats = text_emb if features == "minilm" else [
        np.stack([s.features for s in group]) for group in scored]
    human = _text_row(texts[0], prefix_emb, text_emb[0], scored[0])
    rows = []
    for run, group, emb, sc, feat in zip(runs, texts[1:], text_emb[1:], scored[1:], feats[1:]):
        mean, std = metrics.mauve_spread(feat, feats[0], MAUVE_SEEDS)
        rows.append({"strategy": run.name, "settings": run.settings,
                     **_text_row(group, prefix_emb, emb, sc),
                     "mauve": round(metrics.mauve(feat, feats[0], MAUVE_SEEDS[0]), 4),
                     "mauve_mean": round(mean, 4), "mauve_std": round(std, 4),
                     **_cost(run)})
    greedy = next((r for r in rows if r["strategy"] == "greedy"), None)
    for row in rows if greedy is not None else ():
        row["ms_vs_greedy"] = round(row["ms_per_token"] / greedy["ms_per_token"], 2)
    return [*rows, {"strategy": "human", "settings": "the corpus's own continuation", **human}]


def _text_row(texts: Sequence[str], prefix_emb: np.ndarray, emb: np.ndarray,
              scored) -> dict:
    row = {f"rep_{n}": round(metrics.rep_n(texts, n), 2) for n in metrics.REP_NS}
    return {**row, "diversity": round(metrics.diversity(texts), 4),
            "coherence": round(metrics.coherence(prefix_emb, emb), 4),
            "ppl": round(perplexity(scored), 3)}


def _cost(run: Generated) -> dict:
    return {"ms_per_token": round(1000 * run.time_s / run.emitted_tokens, 3),
            "forward_per_token": round(run.decode_forward_tokens / run.emitted_tokens, 3),
            "time_s": round(run.time_s, 2), "emitted_tokens": run.emitted_tokens}
