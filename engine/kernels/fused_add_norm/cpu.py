"""Residual add + normalisation in torch (the CPU path): float32 math, one pass per op."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_add_norm_torch(x, residual, weight, bias, eps, kind, scale):
    h = x.float() + residual.float()
    if kind == "rms":
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    elif kind == "layer":
        normed = F.layer_norm(h, weight.shape, weight.float(), bias.float(), eps)
    else:
        normed = (h - h.mean(-1, keepdim=True)) * weight.float()
        if bias is not None:
            normed = normed + bias.float()
    if scale != 1.0:
        normed = normed * scale
    return normed.to(weight.dtype), h.to(residual.dtype)
