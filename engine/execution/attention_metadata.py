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


class VarlenMetadata(msgspec.Struct, kw_only=True):
    """The whole step as one varlen batch for the Triton paged-attention kernel: every
    scheduled sequence (decode rows and prefill chunks alike) owns rows [q_starts[b],
    q_starts[b + 1]) and attends to its first seq_lens[b] cached tokens."""

    q_starts: torch.Tensor
    """[num_seqs + 1] int32 prefix sums of the query lengths."""
    seq_lens: torch.Tensor
    """[num_seqs] int32 tokens of each sequence, this step's included."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int32."""
    max_q_len: int
    set_start: torch.Tensor | None = None
    """[num_tokens] int32 first position of the token's parallel set (0 outside sets); None
    when no scheduled token is a set member."""
    member_start: torch.Tensor | None = None
    """[num_tokens] int32 first position of the token's own set member (0 outside sets)."""
    num_splits: int = 1
    """Key ranges per (sequence, kv head): > 1 only for long-context decode of few sequences."""


class LinearPrefill(msgspec.Struct, kw_only=True):
    """The plain (unmasked) prompt chunks of a state-slot model's step, batched for one
    lightning-kernel launch per layer (Triton backend)."""

    rows: torch.Tensor
    """[num_tokens] int64 rows of the chunks' tokens in the step's flat batch."""
    q_starts: torch.Tensor
    """[num_chunks + 1] int64 prefix sums of the chunk lengths."""
    slots: torch.Tensor
    """[num_chunks] int64 state slot of each chunk's sequence."""


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
    varlen: VarlenMetadata | None = None
    """Set on the Triton backend: the step as one varlen kernel launch per layer (then
    `prefills` is empty and the decode fields are unused)."""
    state_slots: torch.Tensor | None = None
    """[num_decode_tokens] int64 state slots of the decode rows (state-slot models only)."""
    linear_prefill: LinearPrefill | None = None
    """Set on the Triton backend for state-slot models: the step's plain prompt chunks (then
    `prefills` holds only the structured ones)."""
