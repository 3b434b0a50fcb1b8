"""The per-layer ops in torch, written as the Hugging Face Llama code computes them (the
rounding the C++ kernels reproduce)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_reference(x, residual, weight, eps, scale=1.0):
    h = x if residual is None else residual + x
    h32 = h.float()
    out = weight * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (out if scale == 1.0 else out * scale), h


def rotary_store_reference(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads):
    d = cos.shape[-1]
    q_size, kv_size = num_heads * d, num_kv_heads * d
    q = qkv[:, :q_size].view(-1, num_heads, d)
    k = qkv[:, q_size:q_size + kv_size].view(-1, num_kv_heads, d)
    v = qkv[:, q_size + kv_size:].view(-1, num_kv_heads, d)
    cos, sin = cos.view(-1, 1, d), sin.view(-1, 1, d)
    for x in (q, k):
        rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1)
        x.copy_(x * cos + rotated * sin)
    k_cache.view(-1, num_kv_heads, d).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, d).index_copy_(0, slots, v)


def silu_and_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
