"""The float32 panel linear (see `cpu.py`): `pack_panels` lays a weight out once, `panel_linear`
multiplies by it with the C++ kernel on CPU tensors when it builds and the CPU has AVX-512,
else with torch's GEMM on the plain weight (`reference.py`)."""

from __future__ import annotations

import torch

from engine.kernels import backend
from engine.kernels.panel_linear.cpu import load_extension
from engine.kernels.panel_linear.reference import panel_linear_reference

PANEL = 32
"""Output channels per panel."""


def available() -> bool:
    """True when the C++ panel kernel runs on this machine (built, with AVX-512)."""
    ext = load_extension()
    return ext is not None and ext.panel_kernel_available()


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> panels [ceil(N / 32), K, 32]: panels[p, k, j] = weight[32 p + j, k],
    zero past N."""
    n, k = weight.shape
    padded = weight.new_zeros(-(-n // PANEL) * PANEL, k)
    padded[:n] = weight
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def panel_linear(x: torch.Tensor, panels: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 times the weight [N, K] packed as `panels` (plus bias): [M, N]."""
    n, k = weight.shape
    if not (x.dim() == 2 and x.shape[1] == k and x.dtype == torch.float32
            and weight.dtype == torch.float32 and panels.dtype == torch.float32
            and panels.shape == (-(-n // PANEL), k, PANEL)):
        raise ValueError(f"panel_linear: expected x [M, K] float32, panels [ceil(N / 32), K, 32] "
                         f"and weight [N, K] float32; got x {tuple(x.shape)} {x.dtype}, panels "
                         f"{tuple(panels.shape)}, weight {tuple(weight.shape)} {weight.dtype}")
    ext = load_extension() if x.device.type == "cpu" and backend(x.device) == "cpu" else None
    if ext is None:
        return panel_linear_reference(x, weight, bias)
    return ext.panel_linear(x, panels, weight, bias)
