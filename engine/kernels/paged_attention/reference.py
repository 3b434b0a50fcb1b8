"""Loop-clear float32 reference of paged decode attention (one query token per sequence)."""

from __future__ import annotations

import torch


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor,
                                     v_cache: torch.Tensor, block_tables: torch.Tensor,
                                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads,
    head_dim]; block_tables: [num_seqs, max_blocks]; context_lens: [num_seqs].
    Returns [num_seqs, num_heads, head_dim] in q's dtype."""
    num_seqs, num_heads, _ = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q, dtype=torch.float32)
    for b in range(num_seqs):
        length = int(context_lens[b])
        slots = [(int(block_tables[b, t // block_size]), t % block_size) for t in range(length)]
        keys = torch.stack([k_cache[blk, off] for blk, off in slots]).float()  # [L, kv, d]
        values = torch.stack([v_cache[blk, off] for blk, off in slots]).float()
        for h in range(num_heads):
            kv = h // group
            scores = keys[:, kv] @ q[b, h].float() * scale                    # [L]
            out[b, h] = torch.softmax(scores, dim=0) @ values[:, kv]
    return out.to(q.dtype)
