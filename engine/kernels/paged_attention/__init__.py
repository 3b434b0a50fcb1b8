"""Paged decode attention: one query token per sequence against its block-table context."""

from __future__ import annotations

import torch

from engine.kernels.paged_attention.cpu import load_extension
from engine.kernels.paged_attention.reference import paged_decode_attention_reference


def is_available() -> bool:
    """True when the compiled CPU kernel can be used."""
    return load_extension() is not None


def _check_tables(q, k_cache, v_cache, block_tables, context_lens) -> None:
    # The kernel trusts these bounds when it computes addresses, so they are checked here.
    num_seqs = q.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or \
            context_lens.shape != (num_seqs,):
        raise ValueError(f"expected block_tables [{num_seqs}, max_blocks] and context_lens "
                         f"[{num_seqs}], got {tuple(block_tables.shape)} and "
                         f"{tuple(context_lens.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if num_seqs == 0:
        return
    max_len = block_tables.shape[1] * k_cache.shape[1]
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 1 or hi > max_len:
        raise ValueError(f"context_lens must be in [1, {max_len}], got [{lo}, {hi}]")
    if int(block_tables.min()) < 0 or int(block_tables.max()) >= k_cache.shape[0]:
        raise ValueError(f"block ids must be in [0, {k_cache.shape[0]})")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float, check_bounds: bool = True) -> torch.Tensor:
    """Attention of one new token per sequence over its cached context.

    Args:
        q: [num_seqs, num_heads, head_dim], contiguous.
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous, q's dtype.
        block_tables: [num_seqs, max_blocks] int64; entries past a sequence's blocks are unused.
        context_lens: [num_seqs] int64, each >= 1 and <= max_blocks * block_size; the new
            token's K/V must already be stored.
        scale: softmax scale (usually head_dim ** -0.5).
        check_bounds: verify context lengths and block ids against the cache (two tensor
            reductions and a host sync). The engine builds the tables from its own block
            manager once per step and passes False in every layer.

    Returns:
        [num_seqs, num_heads, head_dim] in q's dtype.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [num_seqs, num_heads, head_dim] and caches [num_blocks, "
                         f"block_size, num_kv_heads, head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"num_heads={q.shape[1]} must be a multiple of num_kv_heads="
                         f"{k_cache.shape[2]} and head_dim must match ({q.shape[2]} vs "
                         f"{k_cache.shape[3]})")
    if block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64:
        raise ValueError("block_tables and context_lens must be int64")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if check_bounds:
        _check_tables(q, k_cache, v_cache, block_tables, context_lens)
    ext = load_extension()
    if ext is None or q.device.type != "cpu":
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables,
                                                context_lens, scale)
    return ext.paged_decode_attention(q.contiguous(), k_cache, v_cache,
                                      block_tables.contiguous(), context_lens.contiguous(),
                                      scale)
