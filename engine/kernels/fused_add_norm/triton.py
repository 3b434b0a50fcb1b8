"""Triton residual add + RMSNorm / LayerNorm / centred (LayerNorm-free) norm, one program per
token: `h = x + residual` is written back as the new residual stream and normalised in
float32 in the same pass (one read of each input, one write of each output), times an
optional constant (the LayerNorm-Scaling factor 1/sqrt(l))."""

from __future__ import annotations

import triton
import triton.language as tl

KINDS = {"rms": 0, "layer": 1, "centered": 2}


@triton.jit
def _add_norm(x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, residual_out_ptr, hidden,
              eps, scale, KIND: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < hidden
    x = tl.load(x_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(residual_ptr + row * hidden + cols, mask=ok, other=0.0).to(tl.float32)
    h = x + r
    tl.store(residual_out_ptr + row * hidden + cols,
             h.to(residual_out_ptr.dtype.element_ty), mask=ok)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if KIND == 0:
        normed = h * tl.rsqrt(tl.sum(h * h, 0) / hidden + eps) * w
    else:
        centered = tl.where(ok, h - tl.sum(h, 0) / hidden, 0.0)
        if KIND == 1:
            normed = centered * tl.rsqrt(tl.sum(centered * centered, 0) / hidden + eps) * w
        else:
            normed = centered * w
    if HAS_BIAS:
        normed += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, (normed * scale).to(out_ptr.dtype.element_ty),
             mask=ok)


def fused_add_norm_triton(x, residual, weight, bias, eps, kind, scale):
    import torch

    num_tokens, hidden = x.shape
    out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    residual_out = torch.empty_like(residual)
    if num_tokens:
        _add_norm[(num_tokens,)](x, residual, weight, bias if bias is not None else weight, out,
                                 residual_out, hidden, eps, scale, KIND=KINDS[kind],
                                 HAS_BIAS=bias is not None and kind != "rms",
                                 BLOCK=triton.next_power_of_2(hidden))
    return out, residual_out
