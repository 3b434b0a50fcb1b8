"""The weight-only int8 linear in torch: its fused int8-weight GEMM."""

from __future__ import annotations

import torch


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor,
                          scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales)
