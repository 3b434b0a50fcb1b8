"""The product the panel kernel computes, written plainly: x @ weight.T + bias."""

from __future__ import annotations

import torch


def panel_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias
