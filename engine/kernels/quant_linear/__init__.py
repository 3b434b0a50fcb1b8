"""The weight-only int8 linear `int8_linear` (see `cpu.py`): the C++ kernel on CPU tensors when
it builds, else torch's fused int8-weight GEMM (`reference.py`)."""

from __future__ import annotations

import torch

from engine.kernels import backend
from engine.kernels.quant_linear.cpu import load_extension
from engine.kernels.quant_linear.reference import int8_linear_reference


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times int8 weights [N, K] with per-channel `scales` [N] (x's dtype): [M, N]."""
    if not (x.dim() == 2 and weight.dim() == 2 and weight.shape[1] == x.shape[1]
            and weight.dtype == torch.int8 and weight.is_contiguous()
            and scales.shape == weight.shape[:1] and scales.dtype == x.dtype):
        raise ValueError(f"int8_linear: expected x [M, K], weight [N, K] int8, scales [N] of "
                         f"x's dtype; got x {tuple(x.shape)} {x.dtype}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}, scales {tuple(scales.shape)} "
                         f"{scales.dtype}")
    ext = load_extension() if x.device.type == "cpu" and backend(x.device) == "cpu" else None
    if ext is None:
        return int8_linear_reference(x, weight, scales)
    return ext.int8_linear(x.contiguous(), weight, scales)
