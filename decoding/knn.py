"""kNN-LM (Khandelwal et al. 2020) as a distribution transform that composes with every strategy.

A request that lists `KnnLm(datastore=...)` has, at every step, its next-token distribution
replaced by the interpolation of the model's with the distribution of the nearest corpus
positions in the named datastore (`retrieval.knn.mix`):

    p(y) = (1 - lambda) p_LM(y) + lambda sum over neighbours i with value y of softmax(-d_i / T)

The query is the last layer's FFN input at the current position (the `ffn_input:-1` capture:
the same activation the datastore's keys are), d_i the squared L2 distance to neighbour i.

Place in the chain (order 50): after logit bias, min-new-tokens and penalties, so p_LM is the
request's processed distribution; before temperature, top-k / top-p and min-p, which then act on
the interpolated distribution. The output rows are log-probabilities (valid logits for everything
downstream). Greedy, sampling, contrastive and beam search all choose from it. The `logprobs` a
client gets are the kNN-LM model's own distribution: the raw model log-probabilities (no bias,
penalties or temperature, like every other request's logprobs) interpolated with the same
neighbours, i.e. exactly what `polydecode eval perplexity` scores.

Batching: each step, the rows of every request that uses kNN-LM are grouped by (datastore,
nprobe, recompute) and each group is ONE `Datastore.search` for the group's largest k; a row
keeps the first k of its neighbours in FAISS order, which are the neighbours a search of its
own k returns. A row's result does not depend on the other rows.

Adaptive retrieval (`entropy_threshold` > 0, beyond the paper): a row whose distribution at
`apply` (the request's processed one, as above) has entropy below the threshold is left out of
the step's search and keeps the model's distribution, in its sampled tokens and its logprobs
alike. The sampler runs `apply` before `apply_to_logprobs`, so the decision is made once per
step, on that distribution.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import msgspec
import torch

from decoding.base import Capture, InvalidArgument, NotFound, SamplingBatch, Transform
from decoding.registry import register_transform
from retrieval import stores
from retrieval.knn import mix, row_entropy

MAX_K = 4096
MAX_NPROBE = 65536
QUERY = Capture("ffn_input", layer=-1)
"""The kNN-LM key of the current position: the last layer's FFN input after its norm."""


def _require(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


class KnnLm(msgspec.Struct, frozen=True, kw_only=True, tag="knn_lm"):
    """Interpolate the next-token distribution with a datastore's nearest neighbours."""

    datastore: str
    """Name of a datastore this process opened (`polydecode serve --datastore NAME=DIR`)."""
    k: int = 1024
    """Neighbours retrieved per step."""
    lmbda: float = 0.25
    """Weight of the kNN distribution (proto and flags: `lambda`); 0 gives the model's own
    distribution, 1 the kNN distribution alone."""
    temperature: float = 1.0
    """Softmax temperature over negative squared distances."""
    nprobe: int = 32
    """Inverted lists an IVFPQ index visits (ignored by a flat index)."""
    recompute: bool = True
    """Exact squared distances from the stored keys instead of FAISS's PQ approximations."""
    entropy_threshold: float = 0.0
    """Adaptive retrieval: at a step where the entropy (nats) of the request's distribution is
    below this, no search runs and the row keeps the model's distribution. 0: always search."""

    def __post_init__(self) -> None:
        _require(bool(self.datastore), "datastore", "must name a loaded datastore")
        _require(1 <= self.k <= MAX_K, "k", f"must be in [1, {MAX_K}]")
        _require(0.0 <= self.lmbda <= 1.0, "lmbda", "must be in [0, 1]")
        _require(math.isfinite(self.temperature) and self.temperature > 0, "temperature",
                 "must be a finite number > 0")
        _require(1 <= self.nprobe <= MAX_NPROBE, "nprobe", f"must be in [1, {MAX_NPROBE}]")
        _require(math.isfinite(self.entropy_threshold) and self.entropy_threshold >= 0,
                 "entropy_threshold", "must be a finite number >= 0")


class _Neighbours(NamedTuple):
    """One search: the rows of a step that use one datastore with one (nprobe, recompute)."""

    rows: list[int]
    params: list[KnnLm]
    dists: torch.Tensor  # [len(rows), max k] float32 squared L2, +inf where missing
    values: torch.Tensor  # [len(rows), max k] int64 token ids


@register_transform(KnnLm)
class KnnLmTransform(Transform):
    order: ClassVar[int] = 50
    captures: ClassVar[tuple[Capture, ...]] = (QUERY,)
    changes_model: ClassVar[bool] = True

    def __init__(self) -> None:
        # The neighbours of the last batch: `apply` and `apply_to_logprobs` of one step share
        # one search. Keyed by identity: a new batch is built every step.
        self._last: tuple[SamplingBatch, list[_Neighbours]] | None = None

    @classmethod
    def check_loaded(cls, params: KnnLm) -> None:
        if stores.get_datastore(params.datastore) is None:
            loaded = ", ".join(stores.datastore_names()) or "none"
            raise NotFound("datastore", f"unknown datastore {params.datastore!r}; "
                                        f"loaded: {loaded}")

    def is_active(self, batch: SamplingBatch) -> bool:
        return bool(batch.rows_using(KnnLm)[0])

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        return self._interpolate(logits, batch, normalized=False)

    def apply_to_logprobs(self, log_probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        return self._interpolate(log_probs, batch, normalized=True)

    def _interpolate(self, logits: torch.Tensor, batch: SamplingBatch,
                     normalized: bool) -> torch.Tensor:
        """Replaces the rows that search this step by their interpolated log-probabilities."""
        device = logits.device
        for found in self._neighbours(batch, logits):
            # One mix per distinct k: each row sees exactly its own k columns, as alone.
            for k in sorted({p.k for p in found.params}):
                index = [j for j, p in enumerate(found.params) if p.k == k]
                rows = torch.tensor([found.rows[j] for j in index], device=device)
                lm = logits[rows] if normalized else torch.log_softmax(logits[rows], dim=-1)
                temperature = torch.tensor([found.params[j].temperature for j in index],
                                           dtype=torch.float32, device=device)
                lmbda = torch.tensor([found.params[j].lmbda for j in index],
                                     dtype=torch.float32, device=device)
                index = torch.tensor(index, device=device)
                logits[rows] = mix(lm, found.dists[index, :k], found.values[index, :k],
                                   temperature, lmbda)
        return logits

    def _neighbours(self, batch: SamplingBatch, logits: torch.Tensor) -> list[_Neighbours]:
        """One search per (datastore, nprobe, recompute) for all of its rows that search this
        step (`logits`: the distribution the adaptive rows decide on), memoised for the
        batch."""
        if self._last is not None and self._last[0] is batch:
            return self._last[1]
        groups: dict[tuple[str, int, bool], list[tuple[int, KnnLm]]] = {}
        for i, params in _searching(*batch.rows_using(KnnLm), logits):
            key = (params.datastore, params.nprobe, params.recompute)
            groups.setdefault(key, []).append((i, params))
        found = [_search(batch, key, members) for key, members in groups.items()]
        self._last = (batch, found)
        return found


def _searching(rows: list[int], params: list[KnnLm],
               logits: torch.Tensor) -> list[tuple[int, KnnLm]]:
    """The (row, params) that search this step: all but the adaptive rows whose entropy is
    below their threshold."""
    adaptive = [j for j, p in enumerate(params) if p.entropy_threshold > 0]
    if not adaptive:
        return list(zip(rows, params))
    entropy = row_entropy(logits[torch.tensor([rows[j] for j in adaptive],
                                              device=logits.device)]).tolist()
    skipped = {j for j, h in zip(adaptive, entropy) if h < params[j].entropy_threshold}
    return [(i, p) for j, (i, p) in enumerate(zip(rows, params)) if j not in skipped]


def _search(batch: SamplingBatch, key: tuple[str, int, bool],
            members: list[tuple[int, KnnLm]]) -> _Neighbours:
    """The group's largest k neighbours of each of its rows' queries, in one FAISS call."""
    name, nprobe, recompute = key
    rows, params = [i for i, _ in members], [p for _, p in members]
    store = stores.get_datastore(name)
    assert store is not None, f"datastore {name!r} closed under a running request"
    queries = torch.stack([batch.rows[i].captures[QUERY.name] for i in rows])
    dists, values = store.search(queries.float().cpu().numpy(), max(p.k for p in params),
                                 nprobe, recompute)
    device = batch.temperature.device
    return _Neighbours(rows, params, torch.from_numpy(dists).to(device),
                       torch.from_numpy(values).to(device))
