"""Compiled paged decode attention vs its float32 reference, on awkward shapes with every
unused cache slot poisoned with NaN (a wrong block-table read then fails loudly)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import paged_attention
from engine.kernels.paged_attention import paged_decode_attention
from engine.kernels.paged_attention.reference import paged_decode_attention_reference

BLOCK_SIZE = 16
CONTEXT_LENS = [1, 15, 16, 17, 63, 200]
# (num_heads, num_kv_heads): GQA 3, MHA, MQA 8 (the AVX-512 path's widest group), MQA 16 (past
# it: the portable path)
HEADS = [(9, 3), (4, 4), (8, 1), (16, 1)]
HEAD_DIMS = [64, 128, 40]  # 64 and 128 have an AVX-512 path, 40 only the portable one
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, atol: float) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    rms = ((out.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean()).sqrt().item()
    assert err <= atol, f"{name}: max abs err {err:.3g} (relative RMS {rms:.3g}) > {atol}"


def make_paged_context(lens: list[int], num_kv_heads: int, head_dim: int, dtype,
                       block_size: int = BLOCK_SIZE):
    """Random K/V for each sequence, scattered over shuffled blocks; every slot no sequence
    owns is NaN."""
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables = torch.zeros(len(lens), max(blocks_per_seq), dtype=torch.long)
    for b, n in enumerate(lens):
        for j in range(blocks_per_seq[b]):
            blk = order.pop()
            tables[b, j] = blk
            used = min(block_size, n - j * block_size)
            k_cache[blk, :used] = torch.randn(used, num_kv_heads, head_dim).to(dtype)
            v_cache[blk, :used] = torch.randn(used, num_kv_heads, head_dim).to(dtype)
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.long)


def test_kernel_builds_here():
    assert paged_attention.is_available()


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}-KV{h[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
def test_matches_reference(dtype, heads, head_dim):
    torch.manual_seed(0)
    num_heads, num_kv_heads = heads
    k_cache, v_cache, tables, lens = make_paged_context(CONTEXT_LENS, num_kv_heads, head_dim,
                                                        dtype)
    q = torch.randn(len(CONTEXT_LENS), num_heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert not out.isnan().any()
    assert_close(f"{dtype}-{heads}-{head_dim}", ref, out, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [5, 16, 24, 40])
@pytest.mark.parametrize("lens", [[37], CONTEXT_LENS], ids=["one-sequence", "six"])
def test_block_sizes_and_work_splits(dtype, block_size, lens):
    """Blocks that are not multiples of the kernel's 16-token chunks (partial chunks, odd V
    pairs inside a block), one sequence (a work item per kv head) and six (one per sequence,
    all its kv heads in one pass), with q rows strided as views of a wider qkv output."""
    torch.manual_seed(2)
    k_cache, v_cache, tables, context = make_paged_context(lens, 3, 64, dtype, block_size)
    q = torch.randn(len(lens), 9 * 64 + 2 * 3 * 64).to(dtype)[:, :9 * 64].view(len(lens), 9, 64)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, context, 0.125)
    out = paged_decode_attention(q, k_cache, v_cache, tables, context, 0.125)
    assert not out.isnan().any()
    assert_close(f"{dtype}-block{block_size}-{len(lens)}", ref, out, TOLERANCE[dtype])


@pytest.mark.parametrize("temperature", [0.0, 30.0], ids=["flat", "peaked"])
def test_flat_and_peaked_softmax(temperature):
    """All-equal scores (q = 0: the mean of V) and scores spread over hundreds of units, where
    most exp() terms underflow to zero and one key takes the whole weight."""
    torch.manual_seed(1)
    k_cache, v_cache, tables, lens = make_paged_context(CONTEXT_LENS, 3, 64, torch.float32)
    q = torch.randn(len(CONTEXT_LENS), 9, 64) * temperature
    ref = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.125)
    out = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.125)
    # |V| reaches ~4 here: 5e-6 absolute is about 1e-6 relative to the largest outputs.
    assert_close(f"softmax x{temperature}", ref, out, 5e-6)


def test_rejects_bad_shapes():
    k = torch.zeros(2, BLOCK_SIZE, 3, 64)
    tables, lens = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(torch.zeros(1, 8, 64), k, k, tables, lens, 1.0)
    with pytest.raises(ValueError, match="int64"):
        paged_decode_attention(torch.zeros(1, 9, 64), k, k, tables.int(), lens, 1.0)
    with pytest.raises(ValueError, match="dtype mismatch"):
        paged_decode_attention(torch.zeros(1, 9, 64).bfloat16(), k, k, tables, lens, 1.0)


def test_rejects_out_of_range_tables():
    k = torch.zeros(2, BLOCK_SIZE, 3, 64)
    q = torch.zeros(1, 9, 64)
    one_block = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="context_lens must be in"):
        paged_decode_attention(q, k, k, one_block, torch.tensor([BLOCK_SIZE + 1]), 1.0)
    with pytest.raises(ValueError, match="context_lens must be in"):
        paged_decode_attention(q, k, k, one_block, torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="block ids"):
        paged_decode_attention(q, k, k, one_block + 2, torch.tensor([1]), 1.0)
    with pytest.raises(ValueError, match="expected block_tables"):
        paged_decode_attention(q, k, k, torch.zeros(2, 1, dtype=torch.long),
                               torch.tensor([1, 1]), 1.0)
