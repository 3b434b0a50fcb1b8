"""Triton varlen paged attention: one launch for the flat token batch (decode rows have
q_len = 1, prefill chunks q_len > 1), grouped-query heads, set-structured masks, split-KV.

Grid: (sequence, query tile, kv head x split). A program holds BLOCK_M query tokens times the
GROUP query heads that share its KV head as the rows of one tile, so K/V blocks are loaded once
per group (GQA costs no K/V expansion), and walks the sequence's keys BLOCK_N at a time through
its block table with an online softmax in float32.

Masks. Key j is visible to the query token at position i iff `j <= i` and
`(j < set_start[i] or j >= member_start[i])`, where `set_start[i]` is the first position of the
parallel set holding i and `member_start[i]` the first position of i's own member (both equal
to 0 outside sets: plain causal). Two int32 per token, computed once per step on the host; they
survive chunk boundaries (positions are absolute) and need no [q_len, kv_len] mask tensor, which
SGLang's `custom_mask` + `mask_indptr` form would (Set-Based Prompting needs exactly this:
members contiguous, each blind to the others). A row whose every key is masked has l = 0 and
yields zeros, never NaN.

Split-KV: for long-context decode with few sequences, each (sequence, kv head) is split into
NUM_SPLITS key ranges written as partial (acc, max, sum) and merged by a second kernel.

Only plain pointer arithmetic (no block pointers): it compiles under Triton 3.6 and 3.9.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _varlen_paged_attention(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        block_tables_ptr, seq_lens_ptr, q_starts_ptr, set_start_ptr, member_start_ptr,
        scale, stride_table, num_heads, num_kv_heads,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_SETS: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(q_starts_ptr + seq)
    q_len = tl.load(q_starts_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    num_context = tl.load(seq_lens_ptr + seq) - q_len  # tokens cached before the first query

    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    local = tile * BLOCK_M + rows // GROUP_PAD
    g = rows % GROUP_PAD
    row_ok = (local < q_len) & (g < GROUP)
    token = (q_start + local).to(tl.int64)
    head = kv_head * GROUP + g
    position = num_context + local
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    row_offsets = (token * num_heads + head) * HEAD_DIM
    q = tl.load(q_ptr + row_offsets[:, None] + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_SETS:
        set_lo = tl.load(set_start_ptr + token, mask=row_ok, other=0)
        member_lo = tl.load(member_start_ptr + token, mask=row_ok, other=0)

    # Keys of this program: [0, last query position] cut into NUM_SPLITS BLOCK_N-aligned ranges.
    kv_end = num_context + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len)
    split_len = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_end)

    m_i = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, D_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        block = tl.load(block_tables_ptr + seq * stride_table + j // BLOCK_SIZE, mask=j_ok,
                        other=0).to(tl.int64)
        kv_offsets = ((block * BLOCK_SIZE + j % BLOCK_SIZE) * num_kv_heads + kv_head) * HEAD_DIM
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (j[None, :] <= position[:, None]) & j_ok[None, :]
        if HAS_SETS:
            visible = visible & ((j[None, :] < set_lo[:, None]) | (j[None, :] >= member_lo[:, None]))
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + row_offsets[:, None] + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * D_PAD + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _merge_splits(part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, HEAD_DIM: tl.constexpr,
                  D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """One (token, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D_PAD)
    m = tl.load(part_m_ptr + row * NUM_SPLITS + s)
    l_s = tl.load(part_l_ptr + row * NUM_SPLITS + s)
    acc = tl.load(part_acc_ptr + (row * NUM_SPLITS + s)[:, None] * D_PAD + d[None, :])
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_safe)
    total = tl.sum(l_s * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def varlen_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, q_starts, scale,
                           max_q_len, set_start, member_start, num_splits, upcast):
    """Launches the kernel(s); arguments validated by the package's `paged_attention`."""
    import torch

    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    # >= 16 rows for tl.dot; prefill tiles take ~64 rows of (token, head) pairs.
    rows = 64 if max_q_len > 1 else 16
    block_m = max(1, rows // group_pad, 16 // group_pad)
    block_n = 32 if max_q_len > 1 else 64
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if num_splits > 1:
        parts = num_tokens * num_heads * num_splits
        part_acc = torch.empty(parts, d_pad, dtype=torch.float32, device=q.device)
        part_m = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_l = torch.empty(parts, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_m = part_l = out  # unused
    has_sets = set_start is not None
    if not has_sets:
        set_start = member_start = seq_lens  # unused
    grid = (num_seqs, triton.cdiv(max_q_len, block_m), num_kv_heads * num_splits)
    precision = "ieee" if upcast or q.dtype == torch.float32 else "tf32"
    _varlen_paged_attention[grid](
        q, k_cache, v_cache, out, part_acc, part_m, part_l, block_tables, seq_lens, q_starts,
        set_start, member_start, scale, block_tables.stride(0), num_heads, num_kv_heads,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        HAS_SETS=has_sets, UPCAST=upcast, PRECISION=precision)
    if num_splits > 1:
        _merge_splits[(num_tokens * num_heads,)](part_acc, part_m, part_l, out,
                                                  HEAD_DIM=head_dim, D_PAD=d_pad,
                                                  NUM_SPLITS=num_splits)
    return out
