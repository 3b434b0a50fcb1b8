"""Per-step attention metadata: everything the attention layers need besides q/k/v.

Built once per step by the model runner and shared by every layer. The flat token batch is
ordered decode-like sequences first (one new token each), then prefill chunks.
"""

from __future__ import annotations

import msgspec
import torch


class PrefillChunk(msgspec.Struct, kw_only=True):
    """One sequence contributing `q_len` (>1) new tokens at rows [q_start, q_start + q_len)."""

    q_start: int
    q_len: int
    num_context_tokens: int
    """Tokens of this sequence already in the KV cache before this chunk."""
    context_slots: torch.Tensor | None = None
    """[num_context_tokens + q_len] cache slots to gather; None when the chunk is the whole
    context so far (attention then runs on the chunk's own k/v with a causal mask)."""
    mask: torch.Tensor | None = None
    """[1, 1, q_len, num_context_tokens + q_len] bool, True where attention is allowed."""
    state_slot: int = -1
    """The sequence's state slot (state-slot models only)."""


class AttentionMetadata(msgspec.Struct, kw_only=True):
    slot_mapping: torch.Tensor
    """[num_tokens] int64: cache slot (block_id * block_size + offset) of every new token."""
    num_decode_tokens: int
    """The first `num_decode_tokens` rows are single-token steps of distinct sequences."""
    decode_block_tables: torch.Tensor | None = None
    """[num_decode_tokens, max_blocks] int64 block tables (paged kernel path)."""
    decode_context_lens: torch.Tensor | None = None
    """[num_decode_tokens] int64 context lengths, the new token included (paged kernel path)."""
    decode_slots: torch.Tensor | None = None
    """[num_decode_tokens, max_context_len] int64 slots of each decode sequence's context,
    padded with the null slot (a block kept at zero, so padding never reads stale memory);
    used by the gather + SDPA path when no paged kernel is available."""
    decode_mask: torch.Tensor | None = None
    """[num_decode_tokens, 1, 1, max_context_len] bool, True on real context positions."""
    prefills: list[PrefillChunk]
    state_slots: torch.Tensor | None = None
    """[num_decode_tokens] int64 state slots of the decode rows (state-slot models only)."""
