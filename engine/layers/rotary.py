"""Rotary position embeddings (RoPE), rotate-half convention as in Hugging Face Llama."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by position id.

    The table is computed in float32 exactly as the reference does at run time
    (`positions * inv_freq`, then cos/sin), so gathering rows gives bit-identical values.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.theta = head_dim, max_position, theta
        self.rebuild()

    def rebuild(self) -> None:
        """(Re)computes the tables on the CPU, e.g. after construction on the meta device."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        positions = torch.arange(self.max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]          # [max_position, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)                 # [max_position, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [num_tokens, 1, head_dim]: gathered once per step, used by all
        layers."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]."""
    cos, sin = cos_sin
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
