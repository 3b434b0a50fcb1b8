"""The batched half of the decoding pipeline: the transform chain and batchable selection.

Every step the engine turns all its sampled rows into one `SamplingBatch` (`decoding.base`)
and runs the registered transforms over it in chain order, each once for every row that uses
it; then each batchable strategy (greedy, sampling) chooses for all of its rows in one call.
Nothing loops over rows or the vocabulary in Python, and a transform no row uses is skipped
outright.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding import registry
from decoding.base import SamplingBatch, SamplingRow, Transform

__all__ = ["Sampler", "SamplerOutput", "SamplingBatch", "SamplingRow"]


@dataclass(frozen=True)
class SamplerOutput:
    """One chosen token per row, plus logprobs when any row asked for them.

    The logprob tensors are all None, or all set when any row has `logprobs is not None`; they
    come from `Sampler.log_probs` (the raw model distribution, through the transforms that change
    the model itself, such as kNN-LM) and rows that asked for fewer than `max_num_logprobs`
    alternatives slice their own prefix.
    """

    token_ids: torch.Tensor  # [num_rows] int64
    logprobs: torch.Tensor | None  # [num_rows] float32, of token_ids
    top_logprob_ids: torch.Tensor | None  # [num_rows, max_num_logprobs] int64
    top_logprobs: torch.Tensor | None  # [num_rows, max_num_logprobs] float32, descending


class Sampler:
    """Runs the transform chain and the batchable strategies over a batch of rows.

    Stage order (built-ins): logit_bias -> min_new_tokens mask -> repetition / frequency /
    presence penalties -> plug-in transforms -> temperature -> top-k -> top-p -> min-p ->
    greedy argmax or seeded sample. The input logits are never written to.
    """

    def __init__(self, transforms: list[Transform] | None = None) -> None:
        self.transforms = registry.create_transforms() if transforms is None else transforms

    def process(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The transformed `[num_rows, vocab]` logits: `logits` itself when no transform is
        active, else a new tensor (the first active transform works on a copy)."""
        owned = False
        for transform in self.transforms:
            if transform.is_active(batch):
                if not owned:
                    logits, owned = logits.clone(), True
                logits = transform.apply(logits, batch)
        return logits

    def log_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """What `logprobs` report, `[num_rows, vocab]` float32: `log_softmax` of the raw logits
        (no bias, penalties or temperature), then the active `changes_model` transforms
        (kNN-LM interpolation), which leave rows that do not use them unchanged."""
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        for transform in self.transforms:
            if transform.changes_model and transform.is_active(batch):
                log_probs = transform.apply_to_logprobs(log_probs, batch)
        return log_probs

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch,
                 strategies: list[type] | None = None) -> SamplerOutput:
        """Chooses one token per row.

        Args:
            logits: `[num_rows, vocab_size]` float32 raw model logits.
            batch: settings for the same rows, in the same order.
            strategies: the batchable strategy class of each row (default: from each row's
                params, `SamplingParams.selection`).
        """
        processed = self.process(logits, batch)  # first: transforms decide on it (kNN-LM)
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = self.log_probs(logits, batch)
        logits = processed
        if strategies is None:
            strategies = [registry.entry(row.params.selection).cls for row in batch.rows]
        return make_output(select(logits, batch, strategies), raw_logprobs,
                            batch.max_num_logprobs)


def select(logits: torch.Tensor, batch: SamplingBatch, strategies: list[type],
           index: list[int] | None = None) -> torch.Tensor:
    """Token ids of the rows `index` of the batch (None: every row; `strategies[j]` is the
    batchable strategy of row `index[j]`): each strategy once, over all of its rows."""
    groups: dict[type, list[int]] = {}
    for j, cls in enumerate(strategies):
        groups.setdefault(cls, []).append(j)
    if len(groups) == 1 and len(strategies) == batch.num_rows:  # no gather, no scatter
        return strategies[0].select(logits, batch, None)
    index = list(range(batch.num_rows)) if index is None else index
    token_ids = torch.empty(len(index), dtype=torch.int64, device=logits.device)
    for cls, members in groups.items():
        rows = torch.tensor([index[j] for j in members], dtype=torch.int64,
                            device=logits.device)
        token_ids[torch.tensor(members, device=logits.device)] = cls.select(logits[rows],
                                                                            batch, rows)
    return token_ids


def make_output(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None,
                 max_num_logprobs: int | None) -> SamplerOutput:
    """The chosen tokens with their raw logprobs and top-n alternatives (when asked)."""
    if raw_logprobs is None or max_num_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = raw_logprobs.topk(max_num_logprobs, dim=-1)  # sorted, descending
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)
