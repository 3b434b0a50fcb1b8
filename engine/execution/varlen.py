"""The step's attention inputs for the Triton varlen kernel (GPU path): block tables, sequence
lengths, query starts and, for set-structured prompts, the two-positions-per-token mask
encoding. Built in Python lists and sent to the device once per step."""

from __future__ import annotations

import torch

from engine.execution.attention_metadata import AttentionMetadata, VarlenMetadata

SPLIT_MIN_KEYS = 512
"""Keys per split-KV range: shorter contexts are not worth a second launch."""
SPLIT_MAX_PROGRAMS = 128
"""Split only while the (sequence, kv head) programs alone cannot fill the GPU."""


def set_encoding(layout, start: int, end: int) -> tuple[list[int], list[int]]:
    """(set_start, member_start) of positions [start, end): key j is visible to position i iff
    j <= i and (j < set_start[i] or j >= member_start[i]); 0 and 0 outside sets. Members of a
    set are contiguous and in order, so earlier members are exactly [set_start, member_start)."""
    set_start, member_start = [0] * (end - start), [0] * (end - start)
    if layout is None:
        return set_start, member_start
    set_ids, member_ids = layout.set_ids, layout.member_ids
    for i in range(start, min(end, len(set_ids))):
        if set_ids[i] < 0:
            continue
        s = i
        while s > 0 and set_ids[s - 1] == set_ids[i]:
            s -= 1
        m = i
        while m > s and member_ids[m - 1] == member_ids[i]:
            m -= 1
        set_start[i - start], member_start[i - start] = s, m
    return set_start, member_start


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
    tokens to the step's token batch and returns (first row, start token, end token)."""
    slots: list[int] = []
    q_starts, lens, tables = [0], [], []
    set_start: list[int] = []
    member_start: list[int] = []
    structured = False
    for item in items:
        _, start, end = add_to_batch(item)
        table, req = item.block_ids, item.request
        slots += [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
        q_starts.append(q_starts[-1] + end - start)
        lens.append(end)
        tables.append(table)
        if req.needs_structure_mask(start, end):
            structured = True
            lo, member = set_encoding(req.layout, start, end)
        else:
            lo = member = [0] * (end - start)
        set_start += lo
        member_start += member
    max_blocks = max(len(t) for t in tables)
    max_q_len = max(b - a for a, b in zip(q_starts, q_starts[1:]))
    varlen = VarlenMetadata(
        q_starts=torch.tensor(q_starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables],
                                  dtype=torch.int32),
        max_q_len=max_q_len,
        set_start=torch.tensor(set_start, dtype=torch.int32) if structured else None,
        member_start=torch.tensor(member_start, dtype=torch.int32) if structured else None,
        num_splits=num_splits(len(lens), num_kv_heads, max_q_len, max(lens)))
    return AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long),
                             num_decode_tokens=0, prefills=[], varlen=varlen)
