"""Workload registry shared by the benchmarks (one place, so peers run the same prompts)."""

from __future__ import annotations

import random

THROUGHPUT = {"num_prompts": 32, "min_len": 16, "max_len": 256, "max_new_tokens": 128,
              "batch1_prompt_len": 32}


def random_prompts(num_prompts: int, min_len: int, max_len: int, seed: int = 0,
                   vocab_lo: int = 100, vocab_hi: int = 49000) -> list[list[int]]:
    """Prompts of random token ids with lengths spread evenly over [min_len, max_len]."""
    rng = random.Random(seed)
    step = (max_len - min_len) / max(1, num_prompts - 1)
    lengths = [round(min_len + i * step) for i in range(num_prompts)]
    rng.shuffle(lengths)
    return [[rng.randrange(vocab_lo, vocab_hi) for _ in range(n)] for n in lengths]
