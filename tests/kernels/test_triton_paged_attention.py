"""The Triton varlen paged-attention kernel (under the interpreter on CPU) against the float64
reference: decode and prefill rows in one batch, GQA, block-boundary crossings, set masks with a
chunk boundary inside a set, fully masked rows, split-KV, every unused cache slot NaN; and the
C++ decode kernel agrees with it."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.paged_attention import paged_attention, paged_decode_attention
from engine.kernels.paged_attention.reference import paged_attention_reference
from tests.factories import TRITON_DEVICE as DEVICE

BLOCK_SIZE = 8
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
pytestmark = pytest.mark.usefixtures("triton_backend")


def paged_batch(lens, q_lens, num_heads, num_kv_heads, head_dim, dtype, seed=0):
    """Random K/V scattered over shuffled blocks (unowned slots NaN) and queries for the last
    q_lens[b] tokens of each sequence."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(blocks) + 2
    k = torch.full((num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"))
    v = k.clone()
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int64)
    used = 0
    for b, length in enumerate(lens):
        tables[b, :blocks[b]] = order[used:used + blocks[b]]
        used += blocks[b]
        for t in range(length):
            block, offset = tables[b, t // BLOCK_SIZE], t % BLOCK_SIZE
            k[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    q_starts = torch.tensor([0] + q_lens).cumsum(0)
    return tuple(t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), tables,
                                        torch.tensor(lens), q_starts))


def check(q, k, v, tables, lens, q_starts, sets=None, num_splits=1, scale=0.125):
    set_start, member_start = sets if sets is not None else (None, None)
    max_q_len = int((q_starts[1:] - q_starts[:-1]).max())
    out = paged_attention(q, k, v, tables, lens, q_starts, scale, max_q_len, set_start,
                          member_start, num_splits=num_splits)
    ref = paged_attention_reference(q, k, v, tables, lens, q_starts, scale, set_start,
                                    member_start)
    assert out.dtype == q.dtype and not out.isnan().any()
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= TOLERANCE[q.dtype], f"max abs err {err:.3g}"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 32), (4, 2, 64), (3, 1, 32)])
def test_triton_mixed_decode_and_prefill(dtype, num_heads, num_kv_heads, head_dim):
    # Two decode rows (one exactly one block, one crossing into a third block) and a prefill
    # chunk of 9 tokens that starts mid-block after 6 cached tokens.
    lens, q_lens = [8, 17, 15], [1, 1, 9]
    check(*paged_batch(lens, q_lens, num_heads, num_kv_heads, head_dim, dtype))


@pytest.mark.parametrize("num_splits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_split_kv_decode(num_splits, dtype):
    # Long-context decode cut into key ranges; one range of the short sequence is empty.
    batch = paged_batch([61, 3], [1, 1], 4, 2, 32, dtype, seed=1)
    split = check(*batch, num_splits=num_splits)
    whole = check(*batch, num_splits=1)
    torch.testing.assert_close(split, whole, atol=TOLERANCE[dtype], rtol=0)


def set_encoding(q_starts, lens, layout):
    """layout: per sequence, a list of (set_start, member_starts, set_end) in positions."""
    num_tokens = int(q_starts[-1])
    set_start = torch.zeros(num_tokens, dtype=torch.int32)
    member_start = torch.zeros(num_tokens, dtype=torch.int32)
    for b, sets in enumerate(layout):
        first, last = int(q_starts[b]), int(q_starts[b + 1])
        for row in range(first, last):
            position = int(lens[b]) - (last - first) + row - first
            for lo, members, hi in sets:
                if lo <= position < hi:
                    set_start[row] = lo
                    member_start[row] = max(m for m in members if m <= position)
    return set_start.to(DEVICE), member_start.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_set_masks_across_a_chunk_boundary(dtype):
    # Sequence 0: a 3-token prefix, a set of members [3, 7), [7, 10), [10, 12), then a suffix;
    # this chunk starts at position 8, inside the second member, with 8 tokens cached.
    # Sequence 1: a whole prompt with a two-member set, in one chunk.
    lens, q_lens = [16, 12], [8, 12]
    q, k, v, tables, seq_lens, q_starts = paged_batch(lens, q_lens, 4, 2, 32, dtype, seed=2)
    sets = set_encoding(q_starts, seq_lens, [[(3, [3, 7, 10], 12)], [(2, [2, 5], 9)]])
    masked = check(q, k, v, tables, seq_lens, q_starts, sets)
    causal = check(q, k, v, tables, seq_lens, q_starts)
    # Members blind to each other: the rows of later members differ from plain causal.
    assert (masked - causal).abs().amax(dim=(1, 2))[sets[0] != sets[1]].gt(1e-3).all()


def test_triton_fully_masked_rows_are_zero_not_nan():
    q, k, v, tables, lens, q_starts = paged_batch([10, 5], [4, 1], 2, 1, 32, torch.float32)
    # Row 1 may see no key at all: j < 0 or j >= position + 1.
    set_start = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    member_start = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    member_start[1] = 8
    out = check(q, k, v, tables, lens, q_starts, (set_start, member_start))
    assert out[1].abs().max() == 0


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 1)])
def test_triton_agrees_with_the_cpp_decode_kernel(num_heads, num_kv_heads):
    lens = [1, 8, 9, 23]
    q, k, v, tables, seq_lens, q_starts = paged_batch(lens, [1] * 4, num_heads, num_kv_heads,
                                                      32, torch.float32, seed=3)
    triton_out = paged_attention(q, k, v, tables, seq_lens, q_starts, 0.2, 1)
    cpp_out = paged_decode_attention(*(t.cpu() for t in (q, k, v, tables, seq_lens)), 0.2)
    torch.testing.assert_close(triton_out.cpu(), cpp_out, atol=1e-5, rtol=0)


def test_triton_rejects_bad_arguments():
    q, k, v, tables, lens, q_starts = paged_batch([5], [2], 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="num_heads"):
        paged_attention(q[:, :3].contiguous(), k, v, tables, lens, q_starts, 0.1, 2)
    with pytest.raises(ValueError, match="q_starts"):
        paged_attention(q, k, v, tables, lens, q_starts[:1], 0.1, 2)
    with pytest.raises(ValueError, match="block ids"):
        paged_attention(q, k, v, tables + 100, lens, q_starts, 0.1, 2)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(q, k, v, tables, lens, q_starts, 0.1, 2, num_splits=3)
