"""Loop-clear references of paged attention: float64, one query token and head at a time."""

from __future__ import annotations

import torch


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor,
                                     v_cache: torch.Tensor, block_tables: torch.Tensor,
                                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence (the decode form of `paged_attention_reference`).
    q: [num_seqs, num_heads, head_dim]; returns the same shape in q's dtype."""
    q_starts = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens,
                                     q_starts, scale).to(q.dtype)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              q_starts: torch.Tensor, scale: float,
                              set_start: torch.Tensor | None = None,
                              member_start: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence b owns query rows [q_starts[b], q_starts[b+1]), the last tokens of its
    seq_lens[b] tokens; key j is visible to the token at position i iff j <= i and (no sets, or
    j < set_start[row] or j >= member_start[row]). A row with no visible key is zero.

    Returns [num_tokens, num_heads, head_dim] float64.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    flat_k = k_cache.reshape(-1, num_kv_heads, head_dim)
    flat_v = v_cache.reshape(-1, num_kv_heads, head_dim)
    for b in range(seq_lens.shape[0]):
        first, last, length = int(q_starts[b]), int(q_starts[b + 1]), int(seq_lens[b])
        keys = torch.arange(length)
        slots = block_tables[b].cpu()[keys // block_size] * block_size + keys % block_size
        k = flat_k.cpu()[slots].double()                                # [L, kv_heads, d]
        v = flat_v.cpu()[slots].double()
        for row in range(first, last):
            position = length - (last - first) + (row - first)
            visible = keys <= position
            if set_start is not None:
                visible &= (keys < int(set_start[row])) | (keys >= int(member_start[row]))
            if not visible.any():
                continue
            for h in range(num_heads):
                scores = k[visible, h // group] @ q[row, h].cpu().double() * scale
                out[row, h] = torch.softmax(scores, dim=0) @ v[visible, h // group]
    return out
