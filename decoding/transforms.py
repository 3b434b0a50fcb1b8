"""The built-in distribution transforms, in chain order, and their pure tensor functions.

Each transform is driven by `SamplingParams` fields and applies, in one tensor op, to every row
of the step's batch that uses it (a row that does not is left bit-for-bit unchanged):
logit_bias (10) -> min_new_tokens mask (20) -> repetition / frequency / presence penalties (30)
-> [plug-ins, 50] -> temperature (60) -> top-k / top-p (70) -> min-p (80). Greedy rows stop
mattering after the penalties: temperature and the filters never move their argmax, and the
last three skip them.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec
import torch

from decoding.base import SamplingBatch, Transform
from decoding.registry import register_transform


class _Builtin(Transform):
    builtin: ClassVar[bool] = True
    """Driven by `SamplingParams` fields, not listed in `SamplingParams.transforms`."""


class LogitBiasParams(msgspec.Struct, frozen=True, tag="logit_bias"):
    """`SamplingParams.logit_bias`: token id -> value added to its logit."""


class MinNewTokensParams(msgspec.Struct, frozen=True, tag="min_new_tokens"):
    """`SamplingParams.min_new_tokens`: EOS and stop tokens masked until then."""


class PenaltiesParams(msgspec.Struct, frozen=True, tag="penalties"):
    """`SamplingParams.repetition_penalty`, `frequency_penalty`, `presence_penalty`."""


class TemperatureParams(msgspec.Struct, frozen=True, tag="temperature"):
    """`SamplingParams.temperature` (sampling rows)."""


class TopKTopPParams(msgspec.Struct, frozen=True, tag="top_k_top_p"):
    """`SamplingParams.top_k` and `top_p` (sampling rows)."""


class MinPParams(msgspec.Struct, frozen=True, tag="min_p"):
    """`SamplingParams.min_p` (sampling rows)."""


@register_transform(LogitBiasParams)
class LogitBias(_Builtin):
    order = 10

    def is_active(self, batch: SamplingBatch) -> bool:
        return batch.logit_bias is not None

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        row_ids, token_ids, values = batch.logit_bias
        return logits.index_put_((row_ids, token_ids), values, accumulate=True)


@register_transform(MinNewTokensParams)
class MinNewTokens(_Builtin):
    order = 20

    def is_active(self, batch: SamplingBatch) -> bool:
        return batch.min_tokens_mask is not None

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        row_ids, token_ids, values = batch.min_tokens_mask
        return logits.index_put_((row_ids, token_ids), values)


@register_transform(PenaltiesParams)
class Penalties(_Builtin):
    order = 30

    def is_active(self, batch: SamplingBatch) -> bool:
        return batch.needs_penalties

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        return apply_penalties(logits, batch)


@register_transform(TemperatureParams)
class Temperature(_Builtin):
    order = 60

    def is_active(self, batch: SamplingBatch) -> bool:
        return batch.needs_temperature

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # Greedy and strategy rows divide by 1.0, which changes no bit.
        return logits.div_(batch.temperature.unsqueeze(1))


@register_transform(TopKTopPParams)
class TopKTopP(_Builtin):
    order = 70

    def is_active(self, batch: SamplingBatch) -> bool:
        return batch.top_k_top_p_rows is not None

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows = batch.top_k_top_p_rows
        if rows.numel() == batch.num_rows:
            return apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        # Sort only the rows that filter: the sort is the most expensive op of the chain.
        logits[rows] = apply_top_k_top_p(logits[rows], batch.top_k[rows], batch.top_p[rows])
        return logits


@register_transform(MinPParams)
class MinP(_Builtin):
    order = 80

    def is_active(self, batch: SamplingBatch) -> bool:
        return batch.needs_min_p

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # Rows with min_p 0 (greedy rows among them) have threshold 0: nothing is below it.
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)
        return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias, min_new_tokens masking and penalties on `[num_rows, vocab_size]` logits.

    Returns `logits` itself when no row needs any of them, else a new tensor.
    """
    chain = (LogitBias(), MinNewTokens(), Penalties())
    active = [t for t in chain if t.is_active(batch)]
    if not active:
        return logits
    logits = logits.clone()
    for transform in active:
        logits = transform.apply(logits, batch)
    return logits


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty (HF / CTRL), then frequency and presence penalties (OpenAI).

    Repetition looks at prompt and output tokens; frequency and presence at output tokens only.
    """
    vocab_size = logits.shape[1]
    output_counts = _count_tokens(batch.output_token_ids, vocab_size)  # [num_rows, vocab_size]
    if batch.needs_repetition_penalty:
        seen = _count_tokens(batch.prompt_token_ids, vocab_size) > 0
        seen |= output_counts > 0
        penalty = torch.where(seen, batch.repetition_penalty.unsqueeze(1), 1.0)
        # Dividing a positive logit and multiplying a negative one both push it towards
        # "less likely"; a plain division would make negative logits *more* likely.
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    if batch.needs_frequency_presence:
        logits -= batch.frequency_penalty.unsqueeze(1) * output_counts
        logits -= batch.presence_penalty.unsqueeze(1) * (output_counts > 0)
    return logits


def _count_tokens(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[num_rows, max_len]` padded ids -> `[num_rows, vocab_size]` float32 occurrence counts."""
    num_rows = token_ids.shape[0]
    # One spare column absorbs the padding id (vocab_size) and is dropped after the scatter.
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k, then top-p, would drop; one descending sort serves both.

    Args:
        logits: `[num_rows, vocab_size]` float32, temperature already applied.
        top_k: `[num_rows]` int64 in [1, vocab_size]; vocab_size disables it for the row.
        top_p: `[num_rows]` float32 in (0, 1]; 1 disables it for the row.

    Returns:
        A new `[num_rows, vocab_size]` tensor.
    """
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    # top-k keeps every logit >= the k-th largest, so ties at the cut all survive (as in HF).
    kth_largest = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
    sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    # top-p keeps a token while the mass of the tokens ranked above it is < top_p: the smallest
    # prefix whose mass reaches top_p. The most likely token has mass 0 above it, so it always
    # stays. Rows with top_p == 1 are exempt: rounding could push the tail's mass past 1.0.
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    top_p = top_p.unsqueeze(1)
    sorted_logits.masked_fill_((mass_above >= top_p) & (top_p < 1), float("-inf"))
    return sorted_logits.scatter(1, sorted_ids, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero probabilities below `min_p * max(probs)` per row (the rule `MinP` applies to
    logits); the result is not renormalised. probs: `[num_rows, vocab_size]`, min_p:
    `[num_rows]`."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill(probs < threshold, 0.0)
