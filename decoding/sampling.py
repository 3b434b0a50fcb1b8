"""Greedy and sampling: the batchable selection strategies.

Both choose for all their rows of a step in one vectorised call on the transformed logits.
Sampling draws with the exponential race on counter-based noise, so a seeded request's tokens
depend only on (seed, step, logits), never on its batch neighbours or row position.
"""

from __future__ import annotations

import torch

from decoding.base import SamplingBatch, SelectionStrategy, torch_argmax
from decoding.params import Greedy, Sampling
from decoding.registry import register_strategy

# splitmix64 constants (Steele, Lea & Flood 2014), written as the signed int64 values with the
# same bits, because torch has no uint64 arithmetic.
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MUL1 = 0xBF58476D1CE4E5B9 - 2**64
_MUL2 = 0x94D049BB133111EB - 2**64
_UNIFORM_BITS = 23


@register_strategy(Greedy)
class GreedySearch(SelectionStrategy):
    batchable = True

    @classmethod
    def select(cls, logits: torch.Tensor, batch: SamplingBatch,
               rows: torch.Tensor | None) -> torch.Tensor:
        return batch.argmax(logits)


@register_strategy(Sampling)
class AncestralSampling(SelectionStrategy):
    batchable = True

    @classmethod
    def select(cls, logits: torch.Tensor, batch: SamplingBatch,
               rows: torch.Tensor | None) -> torch.Tensor:
        seeds, steps = batch.seeds, batch.steps
        if rows is not None:
            seeds, steps = seeds[rows], steps[rows]
        return exponential_race(logits.softmax(dim=-1), seeds, steps, batch.argmax)


def exponential_race(probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                     argmax=torch_argmax) -> torch.Tensor:
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
    return argmax(probs / exponentials)


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
