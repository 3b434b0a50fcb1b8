"""Residual add fused with the next normalisation: `h = x + residual`, then
`norm(h) * scale` for RMSNorm, LayerNorm or the LayerNorm-free centred form
(`(h - mean) * weight + bias`), all in float32. Returns (normed in weight's dtype, h in
residual's dtype). Dispatched by `engine.kernels.backend`."""

from __future__ import annotations

import torch

from engine.kernels import backend, interpreted
from engine.kernels.fused_add_norm.cpu import fused_add_norm_torch
from engine.kernels.fused_add_norm.reference import fused_add_norm_reference

KINDS = ("rms", "layer", "centered")


def fused_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float, kind: str, scale: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [num_tokens, hidden] contiguous; weight (and bias): [hidden]."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() != 2 or x.shape != residual.shape or weight.shape != x.shape[1:] or (
            bias is not None and bias.shape != weight.shape):
        raise ValueError(f"expected x, residual [tokens, hidden] and weight, bias [hidden], got "
                         f"{tuple(x.shape)}, {tuple(residual.shape)}, {tuple(weight.shape)}")
    if kind == "layer" and bias is None:
        raise ValueError("LayerNorm needs a bias")
    kind_of_backend = backend(x.device)
    if kind_of_backend == "triton":
        from engine.kernels.fused_add_norm.triton import fused_add_norm_triton

        if interpreted() and torch.bfloat16 in (x.dtype, residual.dtype, weight.dtype):
            # The interpreter stores bfloat16 as raw bits: run on float32 copies.
            out, h = fused_add_norm_triton(x.float().contiguous(), residual.float().contiguous(),
                                           weight.float(), None if bias is None else bias.float(),
                                           eps, kind, scale)
            return out.to(weight.dtype), h.to(residual.dtype)
        return fused_add_norm_triton(x.contiguous(), residual.contiguous(), weight, bias, eps,
                                     kind, scale)
    if kind_of_backend == "cpu":
        return fused_add_norm_torch(x, residual, weight, bias, eps, kind, scale)
    out, h = fused_add_norm_reference(x, residual, weight, bias, eps, kind, scale)
    return out.to(weight.dtype), h.to(residual.dtype)
