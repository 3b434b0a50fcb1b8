"""Loop-clear float64 reference of residual add + normalisation."""

from __future__ import annotations

import torch


def fused_add_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, eps: float, kind: str,
                             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual; returns (norm(h) * scale, h), both float64, row by row."""
    h = x.double() + residual.double()
    out = torch.empty_like(h)
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros_like(w)
    for t in range(h.shape[0]):
        row = h[t]
        if kind == "rms":
            normed = row / torch.sqrt((row * row).mean() + eps) * w
        elif kind == "layer":
            centered = row - row.mean()
            normed = centered / torch.sqrt((centered * centered).mean() + eps) * w + b
        else:  # "centered": the LayerNorm-free form, weight already holds gamma / sigma
            normed = (row - row.mean()) * w + b
        out[t] = normed * scale
    return out, h
