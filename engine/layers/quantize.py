"""Weight-only int8 and int4 quantization of linear layers (applied from outside the model code).

int8: each output channel of a weight gets one symmetric scale, `w ~= scale[n] * w_int8[n, :]`, and
the product runs in `engine.kernels.quant_linear.int8_linear` (a streaming C++ kernel for up to 64
rows; beyond, torch's fused int8-weight GEMM `aten._weight_int8pack_mm` in bfloat16 and its float32
GEMM on the codes in float32), which converts weights on the fly: a quarter of float32's weight
bytes, which is what batch-1 decode is bound by. Activations stay in the model dtype. The LM head is
quantized too (it is the largest GEMM of a small model); the embedding table stays in the model
dtype.

int4: groups of 32 weights along the input axis get an asymmetric grid, `w ~= (q - 8) * scale +
zero` with q in 0..15, scale = (max - min) / 15 and zero = min + 8 scale, the form of
llama.cpp's Q4_1 blocks (`w = q * d + min`, 32 weights a block). The product runs in torch's
fused int4 GEMM for the CPU (`aten._weight_int4pack_mm_for_cpu`, weights in its packed nibble
layout, unpacked on the fly): an eighth of float32's weight bytes. A Q4_1 checkpoint converted to
float (SmolLM2's GGUF) is re-quantized to the same grid, since every block's min and max are on
it. Activations are bfloat16 (the kernel's fast path; float32 is refused); the LM head gets int8
(see `quantize_linears`), the embedding stays in bfloat16.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.quant_linear import int8_linear

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32


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
        out = int8_linear(x.reshape(-1, self.in_features), self.weight_int8, self.scales)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int4WeightOnlyLinear(nn.Module):
    """Bias-free linear layer with int4 weights in groups of `INT4_GROUP` along the input axis
    (the Q4_1 form; see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if linear.weight.device.type != "cpu":
            raise ValueError("quantization='int4' runs on the CPU only (its GEMM is torch's "
                             "int4 CPU kernel)")
        if linear.weight.dtype != torch.bfloat16:
            # torch's int4 CPU GEMM vectorises bfloat16 activations only: SmolLM2 decodes at
            # ~8 tokens/s with float32 ones against ~130 with bfloat16.
            raise ValueError(f"quantization='int4' needs dtype='bfloat16' (the model is "
                             f"{linear.weight.dtype}): torch's int4 CPU kernel is slow in "
                             f"float32")
        if self.in_features % INT4_GROUP:
            raise ValueError(f"int4: in_features={self.in_features} is not a multiple of the "
                             f"group size {INT4_GROUP}")
        weight = linear.weight.detach().float()
        groups = weight.view(self.out_features, -1, INT4_GROUP)              # [out, G, 32]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)                 # [out, G]
        scale = ((high - low) / 15).clamp(min=1e-10)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
        codes = q.to(torch.int32).view(self.out_features, self.in_features)
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes, 1))
        # [G, out, 2] (scale, zero) with zero = low + 8 scale: w = (q - 8) * scale + zero.
        self.register_buffer("scales_and_zeros", torch.stack(
            [scale.T, (low + 8 * scale).T], dim=-1).contiguous().to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.contiguous(), self.weight_int4, INT4_GROUP, self.scales_and_zeros)
        return out if self.bias is None else out + self.bias


_LINEARS = {"int8": Int8WeightOnlyLinear, "int4": Int4WeightOnlyLinear}


def quantize_linears(model: nn.Module, method: str) -> int:
    """Replaces every `nn.Linear` of `model` per `method`; returns how many were replaced.
    With int4 the LM head (`lm_head`) gets int8, as llama.cpp's Q4_1 files keep the (tied)
    output matrix in Q8_0: it is the one matrix where 4 bits cost real accuracy."""
    if method == "none":
        return 0
    if method not in _LINEARS:
        raise ValueError(f"quantization={method!r}: must be one of {QUANTIZATIONS}")
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                kind = "int8" if method == "int4" and name == "lm_head" else method
                setattr(module, name, _LINEARS[kind](child))
                count += 1
    return count
