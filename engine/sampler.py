"""Vectorised batch sampling: logits processors, greedy argmax and seeded sampling.

Every step the engine turns its running requests into one `SamplingBatch` and calls `Sampler`
once on the logits of the last position of each row. Nothing loops over rows or the vocabulary
in Python; per-row settings are tensors broadcast against `[num_rows, vocab_size]`, and each
processing stage is skipped outright when no row in the batch uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgspec
import torch

from engine.sampling_params import SamplingParams

# splitmix64 constants (Steele, Lea & Flood 2014), written as the signed int64 values with the
# same bits, because torch has no uint64 arithmetic.
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MUL1 = 0xBF58476D1CE4E5B9 - 2**64
_MUL2 = 0x94D049BB133111EB - 2**64
_UNIFORM_BITS = 23


class SamplingRow(msgspec.Struct, frozen=True, kw_only=True):
    """What the sampler needs to know about one request for one step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    """Tokens generated so far; its length is the step index used to draw random numbers."""
    seed: int
    """The request's seed, or one the engine drew at admission; in [0, 2**63)."""
    eos_token_ids: tuple[int, ...] = ()
    """Masked together with `params.stop_token_ids` while below `params.min_new_tokens`."""


class SparseLogitEdit(NamedTuple):
    """A list of `(row, token_id)` logits to change, as three flat tensors of one length."""

    row_ids: torch.Tensor  # [num_edits] int64
    token_ids: torch.Tensor  # [num_edits] int64
    values: torch.Tensor  # [num_edits] float32


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling state for a batch of rows, as tensors on the logits' device.

    Built once per step by `SamplingBatch.build`. Per-row tensors have shape `[num_rows]`. The
    boolean flags let `Sampler` skip whole stages: an all-greedy batch with no penalties, bias or
    min_new_tokens masking costs exactly one argmax.
    """

    num_rows: int
    vocab_size: int
    temperature: torch.Tensor  # float32; 1.0 on greedy rows so that dividing is harmless
    is_greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # int64 in [1, vocab_size]; vocab_size where the filter is off
    top_p: torch.Tensor  # float32 in (0, 1]
    min_p: torch.Tensor  # float32 in [0, 1]
    repetition_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    seeds: torch.Tensor  # int64
    steps: torch.Tensor  # int64, number of output tokens so far
    prompt_token_ids: torch.Tensor | None  # [num_rows, max_prompt_len], padded with vocab_size
    output_token_ids: torch.Tensor | None  # [num_rows, max_output_len], padded with vocab_size
    logit_bias: SparseLogitEdit | None
    min_tokens_mask: SparseLogitEdit | None  # values are -inf
    top_k_top_p_rows: torch.Tensor | None  # [num_filtered] int64 rows that use top-k or top-p
    all_greedy: bool
    all_random: bool
    needs_repetition_penalty: bool
    needs_frequency_presence: bool
    needs_min_p: bool
    max_num_logprobs: int | None  # None when no row asked for logprobs

    @property
    def needs_penalties(self) -> bool:
        return self.needs_repetition_penalty or self.needs_frequency_presence

    @classmethod
    def build(cls, rows: Sequence[SamplingRow], vocab_size: int,
              device: torch.device | str = "cpu") -> SamplingBatch:
        """Gather per-row settings into tensors. Row i of the batch is `rows[i]`.

        Token ids in the rows must already be checked against `vocab_size`
        (`SamplingParams.validate_for_vocab`).
        """
        params = [row.params for row in rows]
        greedy = [p.is_greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        filtered = [i for i, p in enumerate(params)
                    if not greedy[i] and (top_k[i] < vocab_size or p.top_p < 1)]
        needs_rep = any(p.repetition_penalty != 1 for p in params)
        needs_freq = any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)
        num_logprobs = [p.logprobs for p in params if p.logprobs is not None]

        def f32(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        def i64(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            temperature=f32([1.0 if g else p.temperature for g, p in zip(greedy, params)]),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=i64(top_k),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            seeds=i64([row.seed for row in rows]),
            steps=i64([len(row.output_token_ids) for row in rows]),
            prompt_token_ids=(_pad([r.prompt_token_ids for r in rows], vocab_size, device)
                              if needs_rep else None),
            output_token_ids=(_pad([r.output_token_ids for r in rows], vocab_size, device)
                              if needs_rep or needs_freq else None),
            logit_bias=_gather_logit_bias(rows, device),
            min_tokens_mask=_gather_min_tokens_mask(rows, device),
            top_k_top_p_rows=i64(filtered) if filtered else None,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            needs_repetition_penalty=needs_rep,
            needs_frequency_presence=needs_freq,
            needs_min_p=any(p.min_p > 0 and not g for g, p in zip(greedy, params)),
            max_num_logprobs=max(num_logprobs) if num_logprobs else None,
        )


# NOTE: the two gatherers and `_pad` walk token lists, never the vocabulary. A persistent
# batch (updating rows in place between steps) would save rebuilding them; not yet profiled.
def _pad(token_ids: list[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """Right-pad to `[num_rows, max_len]`. The pad id is vocab_size so that scatters into a
    `vocab_size + 1`-wide buffer land padding in a spare last column."""
    max_len = max(map(len, token_ids), default=0)
    padded = [list(ids) + [pad_id] * (max_len - len(ids)) for ids in token_ids]
    return torch.tensor(padded, dtype=torch.int64, device=device).view(len(token_ids), max_len)


def _make_edit(edits: list[tuple[int, int, float]], device) -> SparseLogitEdit | None:
    if not edits:
        return None
    row_ids, token_ids, values = zip(*edits)
    return SparseLogitEdit(torch.tensor(row_ids, dtype=torch.int64, device=device),
                           torch.tensor(token_ids, dtype=torch.int64, device=device),
                           torch.tensor(values, dtype=torch.float32, device=device))


def _gather_logit_bias(rows: Sequence[SamplingRow], device) -> SparseLogitEdit | None:
    edits = [(i, token_id, bias) for i, row in enumerate(rows)
             for token_id, bias in row.params.logit_bias.items()]
    return _make_edit(edits, device)


def _gather_min_tokens_mask(rows: Sequence[SamplingRow], device) -> SparseLogitEdit | None:
    edits = [(i, token_id, float("-inf")) for i, row in enumerate(rows)
             if len(row.output_token_ids) < row.params.min_new_tokens
             for token_id in sorted(set(row.eos_token_ids) | set(row.params.stop_token_ids))]
    return _make_edit(edits, device)


@dataclass(frozen=True)
class SamplerOutput:
    """One sampled token per row, plus logprobs when any row asked for them.

    The logprob tensors are all None, or all set when any row has `logprobs is not None`; they
    come from `log_softmax` of the raw model logits (before any processing) and rows that asked
    for fewer than `max_num_logprobs` alternatives slice their own prefix.
    """

    token_ids: torch.Tensor  # [num_rows] int64
    logprobs: torch.Tensor | None  # [num_rows] float32, of token_ids
    top_logprob_ids: torch.Tensor | None  # [num_rows, max_num_logprobs] int64
    top_logprobs: torch.Tensor | None  # [num_rows, max_num_logprobs] float32, descending


class Sampler:
    """Chooses the next token for every row of a batch.

    Stage order: logit_bias -> min_new_tokens mask -> repetition / frequency / presence
    penalties -> greedy argmax -> temperature -> top-k -> top-p -> min-p -> seeded sample.
    The input logits are never written to.
    """

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: `[num_rows, vocab_size]` float32 raw model logits.
            batch: settings for the same rows, in the same order.
        """
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        logits = apply_logits_processors(logits, batch)
        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, batch)
        return _make_output(token_ids, raw_logprobs, batch.max_num_logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy_ids = None if batch.all_random else logits.argmax(dim=-1)
        # A fresh tensor, so the in-place stages below never touch the caller's logits.
        logits = logits / batch.temperature.unsqueeze(1)
        if batch.top_k_top_p_rows is not None:
            logits = _apply_top_k_top_p_to_rows(logits, batch)
        probs = logits.softmax(dim=-1)
        if batch.needs_min_p:
            probs = apply_min_p(probs, batch.min_p)
        # NOTE: greedy rows of a mixed batch are sampled too and then discarded; selecting the
        # random rows first would cost a gather and a scatter on every mixed step.
        sampled = exponential_race(probs, batch.seeds, batch.steps)
        return sampled if greedy_ids is None else torch.where(batch.is_greedy, greedy_ids, sampled)


def _make_output(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None,
                 max_num_logprobs: int | None) -> SamplerOutput:
    if raw_logprobs is None or max_num_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = raw_logprobs.topk(max_num_logprobs, dim=-1)  # sorted, descending
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logit_bias, min_new_tokens masking and penalties on `[num_rows, vocab_size]` logits.

    Returns `logits` itself when no row needs any of them, else a new tensor.
    """
    if batch.logit_bias is None and batch.min_tokens_mask is None and not batch.needs_penalties:
        return logits
    logits = logits.clone()
    if batch.logit_bias is not None:
        row_ids, token_ids, values = batch.logit_bias
        logits.index_put_((row_ids, token_ids), values, accumulate=True)
    if batch.min_tokens_mask is not None:
        row_ids, token_ids, values = batch.min_tokens_mask
        logits.index_put_((row_ids, token_ids), values)
    if batch.needs_penalties:
        logits = apply_penalties(logits, batch)
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


def _apply_top_k_top_p_to_rows(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    rows = batch.top_k_top_p_rows
    assert rows is not None
    if rows.numel() == batch.num_rows:
        return apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    # Sort only the rows that filter: the sort is the most expensive op in the sampler.
    logits[rows] = apply_top_k_top_p(logits[rows], batch.top_k[rows], batch.top_p[rows])
    return logits


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
    """Zero probabilities below `min_p * max(probs)` per row; the result is not renormalised
    (`exponential_race` does not need it). probs: `[num_rows, vocab_size]`, min_p: `[num_rows]`.
    """
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill(probs < threshold, 0.0)


def exponential_race(probs: torch.Tensor, seeds: torch.Tensor,
                     steps: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from the (possibly unnormalised) `[num_rows, vocab_size]` probs.

    The exponential race: with independent E_v ~ Exp(1), E_v / p_v ~ Exp(rate p_v), and the
    smallest of independent exponentials is the one with rate p_v with probability
    p_v / sum(p). So `argmax(p / E)` is an exact categorical draw, with no cumsum and no
    normalisation (it is Gumbel-max in disguise: -log E is Gumbel). Zero-probability tokens can
    never win. The noise for row r is a pure function of (seeds[r], steps[r], token id), which
    makes a seeded request's tokens independent of its batch neighbours and row position.

    Returns:
        `[num_rows]` int64 token ids.
    """
    exponentials = random_exponentials(seeds, steps, probs.shape[1])
    return (probs / exponentials).argmax(dim=-1)


def random_exponentials(seeds: torch.Tensor, steps: torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """`[num_rows, vocab_size]` float32 Exp(1) samples, all > 0 and finite (at most 16.7)."""
    # u >= 2**-24 keeps E finite, and u <= 1 - 2**-24 keeps E > 0: an E of 0 would make p / E
    # infinite for a token that should merely be likely.
    return hash_uniform(seeds, steps, vocab_size).log_().neg_()


# NOTE: this materialises `[num_rows, vocab_size]` int64 buffers. A fused kernel
# (engine/kernels/sampling) could generate the noise in registers if profiling asks for it.
def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counter-based uniforms: u[r, v] = U(seeds[r], steps[r], v), a pure function of its key.

    Args:
        seeds: `[num_rows]` int64 in [0, 2**63).
        steps: `[num_rows]` int64 >= 0.
        vocab_size: number of columns.

    Returns:
        `[num_rows, vocab_size]` float32 on the grid (k + 0.5) / 2**23, inside (0, 1).
    """
    # Each (seed, step) pair is hashed into the starting state of its own splitmix64 stream,
    # which is then read at positions 1..vocab_size. Hashing twice matters: had the state been
    # `mix(seed) + step * gamma`, step t + 1 would replay step t's stream shifted by one token.
    row_states = _mix64_(_mix64_(seeds + _GAMMA) + (steps + 1) * _GAMMA)  # [num_rows]
    counters = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device)
    bits = _mix64_(row_states.unsqueeze(1) + counters * _GAMMA)  # [num_rows, vocab_size]
    # The top 23 bits k give (k + 0.5) / 2**23, which float32 holds exactly (24 significant
    # bits), so u is never 0 or 1. float32 rather than float64 halves the cost of the log;
    # the resulting E = -log(u) has a resolution of 2**-23 (relative, near E = 1).
    uniform = _shift_right(bits, 64 - _UNIFORM_BITS, out=bits).float()
    return uniform.add_(0.5).mul_(2.0 ** -_UNIFORM_BITS)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in place on an int64 tensor (a bijection on 64-bit words).

    torch int64 multiplication wraps modulo 2**64 exactly as uint64 would, and xor does not care
    about signedness; only the right shifts need care (see `_shift_right`). In place with one
    scratch buffer because on CPU these passes are memory-bound and fresh buffers page-fault.
    """
    shifted = torch.empty_like(z)
    for shift, multiplier in ((30, _MUL1), (27, _MUL2)):
        z.bitwise_xor_(_shift_right(z, shift, out=shifted))
        z.mul_(multiplier)
    return z.bitwise_xor_(_shift_right(z, 31, out=shifted))


def _shift_right(z: torch.Tensor, shift: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int64 bits into `out`: torch's `>>` is arithmetic (copies the
    sign bit in), so clear the `shift` high bits it filled."""
    torch.bitwise_right_shift(z, shift, out=out)
    return out.bitwise_and_((1 << (64 - shift)) - 1)
