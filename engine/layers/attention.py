"""Paged attention over a flat, continuously batched token stream (CPU: the C++ paged kernel
for decode rows and plain prompt chunks, whose tokens the model runner hands it as rows over
their own prefixes, and torch SDPA for chunks with set-structured masks; Triton backend: one
varlen kernel launch for the whole step).

The KV cache of a layer is a pair of tensors `[num_blocks + 1, block_size, num_kv_heads,
head_dim]`; the extra last block is the null block, never handed out by the block pool and
kept at zero, which padded gathers point to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.execution.attention_metadata import AttentionMetadata
from engine.kernels.paged_attention import paged_attention, paged_decode_attention


class PagedAttention(nn.Module):
    """Stores the new K/V rows into the cache, then attends each query to its own context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                stored: bool = False) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        `stored`: the caller already wrote k and v at `meta.slot_mapping`.

        Returns [num_tokens, num_heads * head_dim].
        """
        k_cache, v_cache = kv_cache
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if not stored:
            flat_k.index_copy_(0, meta.slot_mapping, k)
            flat_v.index_copy_(0, meta.slot_mapping, v)
        if meta.varlen is not None:  # the Triton backend: the whole step in one launch
            vl = meta.varlen
            return paged_attention(q.contiguous(), k_cache, v_cache, vl.block_tables,
                                   vl.seq_lens, vl.q_starts, self.scale, vl.max_q_len,
                                   vl.set_start, vl.member_start, vl.num_splits,
                                   check_bounds=False).view(q.shape[0], -1)
        if not meta.prefills:  # an all-decode step: no output buffer to assemble
            return self._decode(q, k_cache, v_cache, meta).view(q.shape[0], -1)
        out = torch.empty_like(q)
        if meta.num_decode_tokens:
            n = meta.num_decode_tokens
            out[:n] = self._decode(q[:n], k_cache, v_cache, meta)
        for chunk in meta.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], flat_k, flat_v, chunk)
        return out.view(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if meta.decode_block_tables is not None:
            return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                          meta.decode_context_lens, self.scale,
                                          check_bounds=False)
        num_seqs = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        # One query per sequence: fold the query heads sharing a KV head into the query-length
        # axis, so GQA needs no K/V expansion: q [B, kv_heads, group, d], k [B, kv_heads, S, d].
        q = q.view(num_seqs, self.num_kv_heads, group, self.head_dim)
        # index_select on the flattened slot ids is several times faster on CPU than
        # advanced indexing with a 2-D index tensor.
        slots = meta.decode_slots.flatten()
        shape = (num_seqs, -1, self.num_kv_heads, self.head_dim)
        k = flat_k.index_select(0, slots).view(shape).transpose(1, 2)  # [B, kv_heads, S, d]
        v = flat_v.index_select(0, slots).view(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.decode_mask,
                                             scale=self.scale)
        return out.reshape(num_seqs, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat_k: torch.Tensor,
                 flat_v: torch.Tensor, chunk) -> torch.Tensor:
        if chunk.context_slots is not None:
            k = flat_k.index_select(0, chunk.context_slots)
            v = flat_v.index_select(0, chunk.context_slots)
        # [len, heads, d] -> [1, heads, len, d]
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=chunk.mask, is_causal=chunk.mask is None,
            scale=self.scale, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)
