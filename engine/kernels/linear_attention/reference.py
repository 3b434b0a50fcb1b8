"""Pure-torch reference of the linear-attention decode step on a state pool."""

from __future__ import annotations

import torch

from engine.layers.linear_attention import recurrent_step


def linear_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                            pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Gathers the slots' states, steps them (`recurrent_step`), scatters them back.
    Returns [num_seqs, num_heads, d_v] float32."""
    out, states = recurrent_step(q, k, v, s, pool[slots])
    pool[slots] = states
    return out
