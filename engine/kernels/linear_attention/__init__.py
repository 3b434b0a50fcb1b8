"""Decode step of decayed linear attention: one new token per sequence, state updated in its
slot of the pool."""

from __future__ import annotations

import torch

from engine.kernels.linear_attention.cpu import load_extension
from engine.kernels.linear_attention.reference import linear_decode_reference


def is_available() -> bool:
    """True when the compiled CPU kernel can be used."""
    return load_extension() is not None


def linear_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                  pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`S = exp(-s) S + k^T v; o = q S` for each sequence's state, in place.

    Args:
        q, k: [num_seqs, num_heads, d_k]; v: [num_seqs, num_heads, d_v]; one dtype.
        s: [num_heads] float32 decay rates.
        pool: [num_slots, num_heads, d_k, d_v] float32, contiguous.
        slots: [num_seqs] int64 distinct slot ids in [0, num_slots) (distinctness is the
            caller's allocator's guarantee; the range is checked by the kernel).

    Returns:
        [num_seqs, num_heads, d_v] float32.
    """
    if q.shape != k.shape or v.shape[:2] != q.shape[:2] or pool.shape[1:] != (
            q.shape[1], q.shape[2], v.shape[2]):
        raise ValueError(f"expected q, k [B, H, d_k], v [B, H, d_v] and pool [slots, H, d_k, "
                         f"d_v], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"{tuple(pool.shape)}")
    if slots.shape != q.shape[:1] or s.shape != q.shape[1:2]:
        raise ValueError(f"expected slots [{q.shape[0]}] and s [{q.shape[1]}], got "
                         f"{tuple(slots.shape)} and {tuple(s.shape)}")
    if not (q.device == k.device == v.device == pool.device == slots.device):
        raise ValueError("q, k, v, pool and slots must be on one device")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if pool.dtype != torch.float32 or not pool.is_contiguous() or slots.dtype != torch.int64:
        raise ValueError("pool must be contiguous float32 and slots int64")
    ext = load_extension()
    if ext is None or q.device.type != "cpu":
        return linear_decode_reference(q, k, v, s, pool, slots)
    lambdas = torch.exp(-s.float()).contiguous()
    return ext.linear_decode(q.contiguous(), k.contiguous(), v.contiguous(), lambdas, pool,
                             slots.contiguous())
