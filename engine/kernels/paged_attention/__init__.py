"""Paged attention over block-table caches.

- `paged_attention`: the varlen op for a flat token batch (decode rows and prefill chunks in
  one call, grouped-query heads, set-structured masks, split-KV), dispatched by
  `engine.kernels.backend`: Triton on CUDA, C++/torch on CPU, the float64 reference otherwise.
- `paged_decode_attention`: the CPU engine's decode-only entry (one query token per sequence).
"""

from __future__ import annotations

import torch

from engine.kernels import backend, interpreted
from engine.kernels.paged_attention.cpu import dense_heads, load_extension, paged_attention_cpu
from engine.kernels.paged_attention.reference import (paged_attention_reference,
                                                      paged_decode_attention_reference)


def is_available() -> bool:
    """True when the compiled CPU kernel can be used."""
    return load_extension() is not None


def _check_shapes(q, k_cache, v_cache) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [num_tokens, num_heads, head_dim] and caches [num_blocks, "
                         f"block_size, num_kv_heads, head_dim], got {tuple(q.shape)} and "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"num_heads={q.shape[1]} must be a multiple of num_kv_heads="
                         f"{k_cache.shape[2]} and head_dim must match ({q.shape[2]} vs "
                         f"{k_cache.shape[3]})")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")


def _check_tables(num_seqs: int, k_cache, v_cache, block_tables, context_lens) -> None:
    # The kernel trusts these bounds when it computes addresses, so they are checked here.
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
        q: [num_seqs, num_heads, head_dim] with dense heads (rows may be strided).
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
    _check_shapes(q, k_cache, v_cache)
    if block_tables.dtype != torch.int64 or context_lens.dtype != torch.int64:
        raise ValueError("block_tables and context_lens must be int64")
    if check_bounds:
        _check_tables(q.shape[0], k_cache, v_cache, block_tables, context_lens)
    ext = load_extension()
    if ext is None or q.device.type != "cpu":
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables,
                                                context_lens, scale)
    return ext.paged_decode_attention(dense_heads(q), k_cache, v_cache,
                                      block_tables.contiguous(), context_lens.contiguous(),
                                      scale)


def _check_varlen(q, k_cache, v_cache, block_tables, seq_lens, q_starts, set_start,
                  member_start) -> None:
    _check_shapes(q, k_cache, v_cache)
    if not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("q, k_cache and v_cache must be contiguous")
    num_seqs = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or \
            q_starts.shape != (num_seqs + 1,):
        raise ValueError(f"expected block_tables [{num_seqs}, max_blocks] and q_starts "
                         f"[{num_seqs + 1}], got {tuple(block_tables.shape)} and "
                         f"{tuple(q_starts.shape)}")
    if (set_start is None) != (member_start is None):
        raise ValueError("set_start and member_start come together")
    if set_start is not None and (set_start.shape != q.shape[:1] or
                                  member_start.shape != q.shape[:1]):
        raise ValueError(f"set_start and member_start must be [{q.shape[0]}]")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, q_starts: torch.Tensor,
                    scale: float, max_q_len: int, set_start: torch.Tensor | None = None,
                    member_start: torch.Tensor | None = None, num_splits: int = 1,
                    check_bounds: bool = True) -> torch.Tensor:
    """Attention of every new token of a flat batch over its sequence's cached context.

    Args:
        q: [num_tokens, num_heads, head_dim], contiguous; sequence b owns rows
            [q_starts[b], q_starts[b + 1]), its last q_len tokens (their K/V already stored).
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype.
        block_tables: [num_seqs, max_blocks] int32/int64.
        seq_lens: [num_seqs] int32/int64 tokens of each sequence, the new ones included.
        q_starts: [num_seqs + 1] int32/int64 prefix sums of the query lengths.
        max_q_len: the largest query length (a host int: it sizes the launch grid).
        set_start, member_start: [num_tokens] int32 absolute positions: key j is visible to
            the token at position i iff j <= i and (j < set_start or j >= member_start);
            None for plain causal attention.
        num_splits: key ranges per (sequence, kv head), merged afterwards (long-context decode
            with few sequences); a power of two.
        check_bounds: verify lengths and block ids against the cache (host syncs).

    Returns:
        [num_tokens, num_heads, head_dim] in q's dtype; a row with no visible key is zero.
    """
    _check_varlen(q, k_cache, v_cache, block_tables, seq_lens, q_starts, set_start,
                  member_start)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    if check_bounds and seq_lens.numel():
        q_lens = q_starts[1:] - q_starts[:-1]
        if int(q_lens.min()) < 0 or int(q_lens.max()) > max_q_len or \
                int(q_starts[-1]) != q.shape[0]:
            raise ValueError("q_starts must rise by at most max_q_len and end at num_tokens")
        _check_tables(seq_lens.shape[0], k_cache, v_cache, block_tables, seq_lens)
        if bool((seq_lens < q_lens).any()):
            raise ValueError("seq_lens must count the new tokens")
    kind = backend(q.device)
    if kind == "triton":
        from engine.kernels.paged_attention.triton import varlen_paged_attention

        if interpreted() and q.dtype == torch.bfloat16:
            # The interpreter stores bfloat16 as raw bits: run the float32 kernel on copies.
            return paged_attention(q.float(), k_cache.float(), v_cache.float(), block_tables,
                                   seq_lens, q_starts, scale, max_q_len, set_start,
                                   member_start, num_splits, False).to(q.dtype)
        return varlen_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, q_starts,
                                      scale, max_q_len, set_start, member_start, num_splits,
                                      upcast=interpreted() or q.dtype == torch.float32)
    if kind == "cpu" and q.device.type == "cpu":
        return paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, q_starts, scale,
                                   max_q_len, set_start, member_start)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, q_starts,
                                     scale, set_start, member_start).to(q.dtype).to(q.device)
