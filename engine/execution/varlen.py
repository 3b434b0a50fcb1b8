"""The step's attention inputs for the Triton varlen kernel (GPU path): block tables, sequence
lengths, query starts and, for set-structured prompts, the two-positions-per-token mask
encoding. Built once per step from per-sequence lists with tensor ops (on the model's device
when the runner's device context is active); no per-token Python."""

from __future__ import annotations

import torch

from engine.execution.attention_metadata import AttentionMetadata, VarlenMetadata

SPLIT_MIN_KEYS = 512
"""Keys per split-KV range: shorter contexts are not worth a second launch."""
SPLIT_MAX_PROGRAMS = 128
"""Split only while the (sequence, kv head) programs alone cannot fill the GPU."""


def set_encoding(layout, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(set_start, member_start) int32 of positions [start, end): key j is visible to position
    i iff j <= i and (j < set_start[i] or j >= member_start[i]); 0 and 0 outside sets. Members
    of a set are contiguous and in order, so earlier members are exactly [set_start,
    member_start): each is the last position where the set (or the member) changed."""
    n = min(end, len(layout.set_ids))
    sets = torch.tensor(layout.set_ids[:n])
    members = torch.tensor(layout.member_ids[:n])
    index = torch.arange(n)
    new_set = torch.ones(n, dtype=torch.bool)
    new_set[1:] = sets[1:] != sets[:-1]
    new_member = new_set.clone()
    new_member[1:] |= members[1:] != members[:-1]
    out = []
    for first in (new_set, new_member):
        since = torch.where(first, index, 0).cummax(0).values
        since = torch.where(sets >= 0, since, 0).to(torch.int32)
        # Positions past the layout (generated tokens) are outside every set.
        out.append(torch.cat([since[start:], torch.zeros(max(0, end - max(n, start)),
                                                         dtype=torch.int32)]))
    return out[0], out[1]


def num_splits(num_seqs: int, num_kv_heads: int, max_q_len: int, max_len: int) -> int:
    if max_q_len != 1 or num_seqs * num_kv_heads >= SPLIT_MAX_PROGRAMS:
        return 1
    splits = 1
    while splits < 16 and max_len > splits * 2 * SPLIT_MIN_KEYS:
        splits *= 2
    return splits


def prepare_varlen(items, block_size: int, num_kv_heads: int, add_to_batch
                   ) -> AttentionMetadata:
    """items: the step's ScheduledRequests in row order; add_to_batch(item) appends the item's
    tokens to the step's token batch and returns (first row, start token, end token).
    Per sequence it reads the scheduler's lists once; every per-token value (KV slots, set
    encoding) comes from tensor ops."""
    q_lens, lens, tables, sets = [], [], [], []
    for item in items:
        _, start, end = add_to_batch(item)
        q_lens.append(end - start)
        lens.append(end)
        tables.append(item.block_ids)
        req = item.request
        sets.append(set_encoding(req.layout, start, end)
                    if req.needs_structure_mask(start, end) else None)
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])
    q_lens_t, lens_t = torch.tensor(q_lens), torch.tensor(lens)
    q_starts = torch.zeros(len(items) + 1, dtype=torch.long)
    torch.cumsum(q_lens_t, 0, out=q_starts[1:])
    # Each new token's sequence row and position, then its cache slot through the table.
    row = torch.repeat_interleave(torch.arange(len(items)), q_lens_t)
    position = torch.arange(sum(q_lens)) - q_starts[row] + (lens_t - q_lens_t)[row]
    slots = block_tables[row, position // block_size] * block_size + position % block_size
    set_start = member_start = None
    if any(s is not None for s in sets):
        def part(which: int) -> torch.Tensor:
            return torch.cat([s[which] if s is not None else torch.zeros(n, dtype=torch.int32)
                              for s, n in zip(sets, q_lens)])
        set_start, member_start = part(0), part(1)
    max_q_len = max(q_lens)
    varlen = VarlenMetadata(
        q_starts=q_starts.to(torch.int32), seq_lens=lens_t.to(torch.int32),
        block_tables=block_tables.to(torch.int32), max_q_len=max_q_len,
        set_start=set_start, member_start=member_start,
        num_splits=num_splits(len(lens), num_kv_heads, max_q_len, max(lens)))
    return AttentionMetadata(slot_mapping=slots, num_decode_tokens=0, prefills=[],
                             varlen=varlen)
