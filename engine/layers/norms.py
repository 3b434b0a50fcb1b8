"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import backend, layer_ops
from engine.kernels.fused_add_norm import fused_add_norm


class _AddNorm:
    """`add_forward(x, residual, scale)` = (norm(residual + x) * scale, residual + x): the
    residual add and the next norm, one fused kernel on the Triton backend."""

    kind = ""

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, scale: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if backend(x.device) == "triton":
            return fused_add_norm(x, residual, self.weight, getattr(self, "bias", None),
                                  getattr(self, "eps", 0.0), self.kind,
                                  1.0 if scale is None else scale)
        if self._cpu_fused(x, residual):
            return layer_ops.add_rms_norm(x, residual, self.weight, self.eps,
                                          1.0 if scale is None else scale)
        h = residual + x
        out = self(h)
        return (out if scale is None else out * scale), h

    def _cpu_fused(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        """The C++ RMSNorm applies: CPU tensors of the weight's dtype, contiguous rows."""
        return (self.kind == "rms" and x.device.type == "cpu" and x.dim() == 2
                and x.dtype == self.weight.dtype and x.is_contiguous()
                and (residual is None or (residual.dtype == x.dtype
                                          and residual.is_contiguous()))
                and layer_ops.compiled() is not None)


class RMSNorm(_AddNorm, nn.Module):
    """RMSNorm computed in float32 and cast back, matching the reference Llama numerics."""

    kind = "rms"

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu_fused(x, None):
            return layer_ops.add_rms_norm(x, None, self.weight, self.eps)[0]
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(_AddNorm, nn.Module):
    """LayerNorm `(x - mean) / sqrt(var + eps) * weight + bias` computed in float32.

    The output is cast to the parameters' dtype (the model's compute dtype), so a float32
    residual stream can feed low-precision linears directly.
    """

    kind = "layer"

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden_size] -> same shape, in the parameters' dtype."""
        out = F.layer_norm(x.float(), self.weight.shape, self.weight.float(),
                           self.bias.float(), self.eps)
        return out.to(self.weight.dtype)


class CenteredNorm(_AddNorm, nn.Module):
    """A LayerNorm whose per-token std is replaced by a fixed per-module scale:
    `(x - mean(x)) * weight + bias`, where `weight` already holds gamma / sigma_bar.

    This is the LayerNorm-free GPT-2 norm (models.md section 1.3): mean subtraction is kept,
    the variance normalisation is gone. Computed in float32 and cast to the parameters' dtype.
    """

    kind = "centered"

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden_size] -> same shape, in the parameters' dtype."""
        x32 = x.float()
        out = torch.addcmul(self.bias.float(), x32 - x32.mean(-1, keepdim=True),
                            self.weight.float())
        return out.to(self.weight.dtype)
