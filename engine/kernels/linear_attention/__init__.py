"""Decayed linear attention (lightning attention) on a pool of float32 state slots: the decode
step (one new token per sequence) and the chunked prefill of a flat batch of prompt chunks,
both updating each sequence's slot in place. Dispatched by `engine.kernels.backend`."""

from __future__ import annotations

import torch

from engine.kernels import backend
from engine.kernels.linear_attention.cpu import linear_decode_torch, load_extension
from engine.kernels.linear_attention.reference import (linear_decode_reference,
                                                       linear_prefill_reference)


def is_available() -> bool:
    """True when the compiled CPU kernel can be used."""
    return load_extension() is not None


def _check(q, k, v, s, pool, slots) -> None:
    if q.shape[1:] != k.shape[1:] or q.shape[0] != k.shape[0] or v.shape[:2] != q.shape[:2] \
            or pool.shape[1:] != (q.shape[1], q.shape[2], v.shape[2]):
        raise ValueError(f"expected q, k [N, H, d_k], v [N, H, d_v] and pool [slots, H, d_k, "
                         f"d_v], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"{tuple(pool.shape)}")
    if s.shape != q.shape[1:2]:
        raise ValueError(f"expected s [{q.shape[1]}], got {tuple(s.shape)}")
    if not (q.device == k.device == v.device == pool.device == slots.device == s.device):
        raise ValueError("q, k, v, s, pool and slots must be on one device")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if pool.dtype != torch.float32 or not pool.is_contiguous() or slots.dtype != torch.int64:
        raise ValueError("pool must be contiguous float32 and slots int64")


def linear_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                  pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`S = exp(-s) S + k^T v; o = q S` for each sequence's state, in place.

    Args:
        q, k: [num_seqs, num_heads, d_k]; v: [num_seqs, num_heads, d_v]; one dtype.
        s: [num_heads] float32 decay rates.
        pool: [num_slots, num_heads, d_k, d_v] float32, contiguous.
        slots: [num_seqs] int64 distinct slot ids in [0, num_slots), or -1 for a padding row
            (skipped: no state touched, output zero). Distinctness and range are the
            allocator's guarantee (the C++ kernel checks the range; no host sync here).

    Returns:
        [num_seqs, num_heads, d_v] float32.
    """
    if slots.shape != q.shape[:1]:
        raise ValueError(f"expected slots [{q.shape[0]}], got {tuple(slots.shape)}")
    _check(q, k, v, s, pool, slots)
    kind = backend(q.device)
    if kind == "triton":
        from engine.kernels.linear_attention import triton as kernels

        return kernels.linear_decode(q.contiguous(), k.contiguous(), v.contiguous(),
                                     s.float().contiguous(), pool, slots.contiguous())
    if kind == "cpu" and q.device.type == "cpu":
        ext = load_extension()
        if ext is None:
            return linear_decode_torch(q, k, v, s, pool, slots)
        lambdas = torch.exp(-s.float()).contiguous()
        return ext.linear_decode(q.contiguous(), k.contiguous(), v.contiguous(), lambdas, pool,
                                 slots.contiguous())
    return linear_decode_reference(q, k, v, s, pool, slots)


def linear_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                   pool: torch.Tensor, q_starts: torch.Tensor, slots: torch.Tensor
                   ) -> torch.Tensor:
    """Prompt chunks of several sequences, each continuing the state in its slot (in place).

    Args:
        q, k: [num_tokens, H, d_k]; v: [num_tokens, H, d_v]; sequence b owns rows
            [q_starts[b], q_starts[b + 1]).
        s: [H] decay rates; pool as in `linear_decode`; slots: [num_seqs] distinct slot ids.

    Returns:
        [num_tokens, H, d_v] float32.
    """
    if q_starts.shape != (slots.shape[0] + 1,):
        raise ValueError(f"expected q_starts [{slots.shape[0] + 1}], got {tuple(q_starts.shape)}")
    _check(q, k, v, s, pool, slots)
    if backend(q.device) == "triton":
        from engine.kernels.linear_attention import triton as kernels

        return kernels.linear_prefill(q.contiguous(), k.contiguous(), v.contiguous(),
                                      s.float().contiguous(), pool, q_starts.contiguous(),
                                      slots.contiguous())
    return linear_prefill_reference(q, k, v, s, pool, q_starts, slots)
