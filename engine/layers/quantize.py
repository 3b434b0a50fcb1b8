"""Weight-only int8 quantization of linear layers (applied from outside the model code).

Each output channel of a weight gets one symmetric scale, `w ~= scale[n] * w_int8[n, :]`, and
the product runs in torch's fused int8-weight GEMM (`aten._weight_int8pack_mm`), which converts
weights on the fly: a quarter of float32's weight bytes, which is what batch-1 decode is bound
by. Activations stay in the model dtype. The LM head is quantized too (it is the largest GEMM
of a small model); the embedding table stays in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZATIONS = ("none", "int8")


class Int8WeightOnlyLinear(nn.Module):
    """Bias-free linear layer with per-output-channel int8 weights."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0           # [out_features]
        self.register_buffer("weight_int8", torch.round(weight / scales[:, None])
                             .clamp(-127, 127).to(torch.int8))              # [out, in]
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return out if self.bias is None else out + self.bias


def quantize_linears(model: nn.Module, method: str) -> int:
    """Replaces every `nn.Linear` of `model` per `method`; returns how many were replaced."""
    if method == "none":
        return 0
    if method != "int8":
        raise ValueError(f"quantization={method!r}: must be one of {QUANTIZATIONS}")
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8WeightOnlyLinear(child))
                count += 1
    return count
