"""The served model's view of texts: perplexity of continuations and mean-pooled features.

Each (prefix, continuation) pair runs as one prompt of `prefix + continuation` tokens through
the engine's batched prefill with the all-position "final_hidden@all" capture (the LM-head
input); the positions len(prefix) - 1 ... len(prefix) + len(continuation) - 2 go through the
model's own LM head (`Engine.compute_logits`) and score the continuation's tokens. The
continuation's perplexity under the model is exp(sum of their negative log-likelihoods / their
count), pooled over a set of texts. The features of a continuation are the mean of the hidden
states at its own positions (the prefix is context, not pooled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import torch

from engine.sampling_params import SamplingParams
from retrieval.prefill import HIDDEN_CAPTURE

if TYPE_CHECKING:
    from engine.engine import Engine

_PARAMS = SamplingParams(max_new_tokens=1, temperature=0.0)


class Scored(msgspec.Struct, frozen=True):
    """Per text: the summed negative log-likelihood of its continuation, the number of tokens
    it covers, and the continuation's mean-pooled final hidden state."""

    nll: float
    num_tokens: int
    features: np.ndarray


def score_continuations(engine: Engine, prefixes: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]],
                        progress: Callable[[int], object] | None = None) -> list[Scored]:
    """One `Scored` per pair, in order; `progress(n)` after every step that finished n."""
    limit = engine.config.scheduler.max_num_seqs
    pending = list(reversed(range(len(prefixes))))
    in_flight: set[str] = set()
    results: list[Scored | None] = [None] * len(prefixes)
    try:
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                i = pending.pop()
                in_flight.add(engine.add_request([*prefixes[i], *continuations[i]], _PARAMS,
                                                 req_id=f"score-{i}",
                                                 captures=[HIDDEN_CAPTURE]))
            finished = [out for out in engine.step() if out.finished]
            for out in finished:
                in_flight.discard(out.req_id)
                i = int(out.req_id.removeprefix("score-"))
                if out.finish_reason == "abort" or not out.captures:
                    raise RuntimeError(f"scoring text {i} ended without its hidden states")
                results[i] = _score(engine, out.captures[HIDDEN_CAPTURE.name],
                                    len(prefixes[i]), continuations[i])
            if progress is not None and finished:
                progress(len(finished))
    finally:
        for req_id in in_flight:
            engine.abort(req_id)
    return results  # type: ignore[return-value]


def _score(engine: Engine, hidden: torch.Tensor, num_prefix: int,
           continuation: Sequence[int]) -> Scored:
    n = len(continuation)
    rows = hidden[num_prefix - 1:num_prefix + n - 1]  # row t predicts token t + 1
    log_probs = torch.log_softmax(engine.compute_logits(rows), dim=-1)
    target = torch.tensor(list(continuation), dtype=torch.long)[:, None]
    nll = -log_probs.gather(1, target).double().sum().item()
    features = hidden[num_prefix:num_prefix + n].float().mean(dim=0).numpy()
    return Scored(nll, n, features)


def perplexity(scored: Sequence[Scored]) -> float:
    """exp(mean negative log-likelihood per token), pooled over the texts."""
    tokens = sum(s.num_tokens for s in scored)
    return float(np.exp(sum(s.nll for s in scored) / tokens)) if tokens else float("nan")
