"""`polydecode eval perplexity`: the model's perplexity on a text, with or without kNN-LM.

Every token of every document after its first is scored once, in the windows a datastore build
uses (`retrieval.corpus.plan_windows`), through the engine's batched prefill: the windows'
"final_hidden@all" captures go through the model's own LM head (`Engine.compute_logits`), and
with a datastore their "ffn_input:-1@all" captures are the kNN queries: one batched
`Datastore.search` for all scored positions of the windows an engine step finished, then
`retrieval.knn.mix`, the same interpolation the decoding transform applies. A sweep of lambdas,
kNN temperatures and adaptive-retrieval entropy thresholds shares one pass (the search depends
on none of them): at threshold h, the positions where the model's entropy is below h are scored
by the model alone, as the decoding transform's `entropy_threshold` does, and `searched` is the
fraction of positions that needed a search.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import torch

from engine.loader import model_fingerprint
from retrieval.corpus import DEFAULT_STRIDE, DEFAULT_WINDOW, read_corpus, tokenize_corpora
from retrieval.datastore import Datastore
from retrieval.knn import mix, row_entropy
from retrieval.prefill import HIDDEN_CAPTURE, KEY_CAPTURE, prefill_windows, progress_bar

if TYPE_CHECKING:
    from engine.engine import Engine

_ROWS_PER_MIX = 512
"""Rows whose LM head runs at once: [rows, vocab] float32 logits (100 MB at 49k tokens)."""


class KnnSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The search (k, nprobe, recompute) and the grid of (temperature, lambda, entropy
    threshold) it is scored with: every point costs O(rows x k) on top of one search, so a
    sweep is one pass."""

    k: int = 1024
    lambdas: tuple[float, ...] = (0.25,)
    temperatures: tuple[float, ...] = (1.0,)
    entropy_thresholds: tuple[float, ...] = (0.0,)
    nprobe: int = 32
    recompute: bool = True

    def __post_init__(self) -> None:
        for name in ("k", "nprobe"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be positive")
        if not self.temperatures or not all(t > 0 for t in self.temperatures):
            raise ValueError(f"temperature={self.temperatures!r}: each must be positive")
        if not self.lambdas or not all(0 <= lam <= 1 for lam in self.lambdas):
            raise ValueError(f"lambda={self.lambdas!r}: each value must be in [0, 1]")
        if not self.entropy_thresholds or not all(math.isfinite(h) and h >= 0
                                                  for h in self.entropy_thresholds):
            raise ValueError(f"entropy_threshold={self.entropy_thresholds!r}: each must be "
                             f"finite and >= 0")

    @property
    def grid(self) -> list[tuple[float, float]]:
        """(temperature, lambda) pairs; each is scored at every entropy threshold."""
        return [(t, lam) for t in self.temperatures for lam in self.lambdas]


def open_datastore_for(engine: Engine, path: Path) -> Datastore:
    """Opens a datastore, refusing one whose keys another model computed."""
    store = Datastore.open(path)
    fingerprint = model_fingerprint(engine.loaded.model_dir)
    if store.meta.fingerprint != fingerprint:
        raise ValueError(f"datastore {path} was built with model {store.meta.model!r} "
                         f"(fingerprint {store.meta.fingerprint[:12]}), not the loaded "
                         f"{engine.loaded.model_dir.name!r} ({fingerprint[:12]})")
    if store.meta.key_kind != KEY_CAPTURE.name.removesuffix("@all"):
        raise ValueError(f"datastore {path}: keys are {store.meta.key_kind!r}, expected "
                         f"{KEY_CAPTURE.name.removesuffix('@all')!r}")
    return store


def evaluate_perplexity(engine: Engine, corpus_specs: list[str],
                        datastore: Datastore | None = None, knn: KnnSettings | None = None,
                        window: int | None = None, stride: int | None = None,
                        max_tokens: int | None = None, show_progress: bool = True
                        ) -> list[dict]:
    """One result per (temperature, lambda) of `knn.grid` and entropy threshold (just the
    model's when there is no datastore): {"tokens", "nll" (mean nats per token), "ppl",
    "base_nll", "base_ppl", "model", "datastore", "k", "lambda", "knn_temperature",
    "entropy_threshold", "searched", ...}. Window and stride default to the datastore's, else
    the build defaults."""
    meta = datastore.meta if datastore is not None else None
    window = window or (meta.window if meta and meta.window else DEFAULT_WINDOW)
    stride = stride or (meta.stride if meta and meta.stride else min(DEFAULT_STRIDE, window))
    knn = knn or KnnSettings()
    grid = knn.grid if datastore is not None else []
    tokens = tokenize_corpora([read_corpus(s) for s in corpus_specs], engine.tokenizer.encode,
                              window, stride, max_tokens)
    captures = [HIDDEN_CAPTURE] + ([KEY_CAPTURE] if datastore is not None else [])
    thresholds = knn.entropy_thresholds
    base_nll, nll = 0.0, np.zeros((len(grid), len(thresholds)))
    searched = np.zeros(len(thresholds))
    bar = progress_bar(show_progress, total=tokens.num_scored, desc="perplexity", unit="tok")
    for batch in prefill_windows(engine, tokens, captures, range(len(tokens.windows))):
        targets = torch.tensor([t for wid, _ in batch
                                for t in tokens.targets(tokens.windows[wid])])
        hidden = torch.cat([c[HIDDEN_CAPTURE.name] for _, c in batch])
        neighbours = None
        if datastore is not None:  # one search for every scored position of the step
            queries = torch.cat([c[KEY_CAPTURE.name] for _, c in batch]).numpy()
            neighbours = [torch.from_numpy(a) for a in datastore.search(
                queries, knn.k, nprobe=knn.nprobe, recompute=knn.recompute)]
        base, mixed, above = _score(engine, hidden, targets, neighbours, grid, thresholds)
        base_nll -= base
        nll -= mixed
        searched += above
        bar.update(len(targets))
    bar.close()
    n = tokens.num_scored
    common = {"tokens": n, "base_nll": base_nll / n, "base_ppl": math.exp(base_nll / n),
              "model": engine.loaded.model_dir.name, "corpus": corpus_specs,
              "window": window, "stride": stride}
    if datastore is None:
        return [{**common, "nll": base_nll / n, "ppl": math.exp(base_nll / n),
                 "datastore": None}]
    return [{**common, "nll": float(v) / n, "ppl": math.exp(float(v) / n),
             "datastore": str(datastore.path), "keys": len(datastore), "k": knn.k,
             "lambda": lam, "knn_temperature": t, "entropy_threshold": h,
             "searched": round(float(s) / n, 4), "nprobe": knn.nprobe,
             "recompute": knn.recompute}
            for (t, lam), row in zip(grid, nll) for h, v, s in zip(thresholds, row, searched)]


def _score(engine: Engine, hidden: torch.Tensor, targets: torch.Tensor, neighbours,
           grid: list[tuple[float, float]], thresholds: tuple[float, ...]
           ) -> tuple[float, np.ndarray, np.ndarray]:
    """Summed log-probability of the targets under the model; per (temperature, lambda) and
    entropy threshold under kNN-LM (`neighbours`: the rows' (distances, values)); and per
    threshold the number of rows searched. In row blocks."""
    base, mixed = 0.0, np.zeros((len(grid), len(thresholds)))
    above = np.zeros(len(thresholds))
    for i in range(0, len(targets), _ROWS_PER_MIX):
        rows = slice(i, i + _ROWS_PER_MIX)
        target = targets[rows, None]
        lm = torch.log_softmax(engine.compute_logits(hidden[rows]), dim=-1)
        lm_target = lm.gather(1, target)[:, 0]
        base += lm_target.double().sum().item()
        if not grid:
            continue
        entropy = row_entropy(lm)
        search = [entropy >= h for h in thresholds]  # h = 0: every row
        above += [int(s.sum()) for s in search]
        for j, (temperature, lam) in enumerate(grid):
            out = mix_at_targets(lm, neighbours[0][rows], neighbours[1][rows], target[:, 0],
                                 temperature, lam)
            for m, s in enumerate(search):
                mixed[j, m] += torch.where(s, out, lm_target).double().sum().item()
    return base, mixed, above


def mix_at_targets(lm_log_probs: torch.Tensor, dists: torch.Tensor, values: torch.Tensor,
                   targets: torch.Tensor, temperature: float, lmbda: float) -> torch.Tensor:
    """`retrieval.knn.mix(...)` at each row's target only ([rows] log-probabilities).

    The interpolation is per token, so `mix` runs on a two-token vocabulary {the target,
    every other token}: the neighbours voting for the target go to token 0, all others to 1,
    and the model's probabilities become (p(target), 1 - p(target)). Token 0 of the result is
    exactly the target's entry of the full-vocabulary `mix`, at O(rows x k) instead of a
    [rows, vocab] distribution per lambda.
    """
    lm_target = lm_log_probs.gather(1, targets[:, None])                    # [rows, 1]
    two_lm = torch.cat([lm_target, torch.log1p(-lm_target.exp())], dim=1)  # [rows, 2]
    two_values = (values != targets[:, None]).long()                       # [rows, k]
    return mix(two_lm, dists, two_values, temperature, lmbda)[:, 0]
