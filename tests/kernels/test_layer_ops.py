"""The C++ per-layer ops against the torch formulas of the Hugging Face Llama code they replace:
bit for bit, in float32, bfloat16 and float16, on awkward widths (not a multiple of the vector
length, long enough for ATen's cascaded sum) and extreme inputs."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import layer_ops
from engine.kernels.layer_ops.reference import (add_rms_norm_reference, rotary_store_reference,
                                                silu_and_mul_reference)
from engine.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def ext():
    ext = layer_ops.load_extension()
    assert ext is not None, "the layer-ops kernel did not build on this machine"
    return ext


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    differ = actual.view(-1) != expected.view(-1)
    assert not differ.any(), (f"{name}: {int(differ.sum())} of {differ.numel()} elements "
                              f"differ, max {(actual.float() - expected.float()).abs().max():.3g}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [576, 2048, 100])
@pytest.mark.parametrize("tokens", [1, 33])
def test_add_rms_norm_is_bitwise_torch(ext, dtype, hidden, tokens):
    torch.manual_seed(hidden + tokens)
    x = (torch.randn(tokens, hidden) * torch.rand(tokens, 1) * 20).to(dtype)
    residual = torch.randn(tokens, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    for res, scale in ((residual, 1.0), (None, 1.0), (residual, 0.5)):
        out, h = ext.add_rms_norm(x, res, weight, 1e-5, scale)
        ref_out, ref_h = add_rms_norm_reference(x, res, weight, 1e-5, scale)
        assert_same_bits(h, ref_h, "h")
        assert_same_bits(out, ref_out, f"norm residual={res is not None} scale={scale}")


def test_add_rms_norm_under_one_vector_is_close(ext):
    # Rows narrower than 8 floats take ATen's scalar path, whose order is not reproduced (no
    # model is that narrow): equal to float rounding only.
    x, weight = torch.randn(5, 7), torch.rand(7) + 0.5
    out, _ = ext.add_rms_norm(x, None, weight, 1e-5, 1.0)
    torch.testing.assert_close(out, add_rms_norm_reference(x, None, weight, 1e-5)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1536, 40, 9])
def test_silu_and_mul_is_bitwise_torch(ext, dtype, width):
    torch.manual_seed(width)
    gate_up = torch.cat([torch.randn(8, 2 * width) * s for s in (0.01, 1.0, 8.0, 60.0)])
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -88.0])  # exp underflow / overflow
    gate_up = gate_up.to(dtype)
    assert_same_bits(ext.silu_and_mul(gate_up), silu_and_mul_reference(gate_up), "silu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 128), (2, 1, 24)])
def test_rotary_store_is_bitwise_torch(ext, dtype, heads):
    num_heads, num_kv_heads, d = heads
    torch.manual_seed(d)
    tokens, num_blocks, block_size = 70, 12, 16
    qkv = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * d) * 3).to(dtype)
    cos, sin = RotaryEmbedding(d, 8192, 10000.0).lookup(torch.randint(0, 8192, (tokens,)),
                                                        dtype)
    caches = [torch.full((num_blocks, block_size, num_kv_heads, d), float("nan"), dtype=dtype)
              for _ in range(4)]
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    expected = qkv.clone()
    ext.rotary_store(qkv, cos, sin, caches[0], caches[1], slots, num_heads, num_kv_heads)
    rotary_store_reference(expected, cos, sin, caches[2], caches[3], slots, num_heads,
                           num_kv_heads)
    assert_same_bits(qkv, expected, "rotated qkv")
    for ours, theirs, name in ((caches[0], caches[2], "k"), (caches[1], caches[3], "v")):
        written = ours.view(-1, num_kv_heads, d)[slots]
        assert_same_bits(written, theirs.view(-1, num_kv_heads, d)[slots], f"{name} cache")
        untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
        untouched[slots] = False
        assert ours.view(-1, num_kv_heads, d)[untouched].isnan().all(), f"{name}: stray write"


def test_rotary_store_rejects_slots_outside_the_cache(ext):
    qkv = torch.randn(2, 5 * 8)
    cos, sin = RotaryEmbedding(8, 64, 10000.0).lookup(torch.tensor([0, 1]), torch.float32)
    cache = torch.zeros(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.rotary_store(qkv, cos, sin, cache, cache.clone(), torch.tensor([0, 4]), 3, 1)
    with pytest.raises(ValueError, match="rotary_store"):
        layer_ops.rotary_store(qkv, cos, sin, cache, cache.clone(), torch.tensor([0, 1]), 2, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_blocks_equals_indexed_copy(dtype):
    torch.manual_seed(3)
    caches = [torch.randn(9, 16, 3, 64).to(dtype) for _ in range(4)] + \
        [torch.randn(9, 2, 8, 8).to(dtype)]  # a state pool: one row per slot
    copies = [(0, 5), (2, 7), (0, 8), (3, 1)]
    expected = [c.clone() for c in caches]
    src, dst = (torch.tensor([c[i] for c in copies]) for i in (0, 1))
    for cache in expected:
        cache[dst] = cache[src]
    layer_ops.copy_blocks(caches, copies)
    for actual, want in zip(caches, expected):
        assert torch.equal(actual, want)
    with pytest.raises(ValueError, match="both a source and a target"):
        layer_ops.copy_blocks(caches, [(1, 2), (2, 3)])
    with pytest.raises(RuntimeError, match="outside the cache"):
        layer_ops.copy_blocks(caches, [(1, 9)])


def test_copy_blocks_of_partial_blocks_copy_their_filled_slots():
    # (src, dst, rows): a KV block's first `rows` token slots (a fork's partial block); rows 0
    # or the whole block: all of it. The slots past `rows` keep what they held.
    torch.manual_seed(4)
    caches = [torch.randn(9, 16, 3, 64) for _ in range(4)]
    copies = [(0, 5, 3), (2, 7, 0), (4, 8, 16), (3, 1, 15)]
    expected = [c.clone() for c in caches]
    for cache in expected:
        for src, dst, rows in copies:
            rows = rows or cache.shape[1]
            cache[dst, :rows] = cache[src, :rows]
    layer_ops.copy_blocks(caches, copies)
    for actual, want in zip(caches, expected):
        assert torch.equal(actual, want)
    assert not torch.equal(caches[0][5], caches[0][0])  # slots 3.. of block 5 were not copied


@pytest.mark.parametrize("width", [1, 15, 16, 17, 49152])
def test_row_argmax_is_torch_argmax(width):
    """Ties go to the first index, -inf rows to 0, a NaN wins (torch's argmax semantics)."""
    torch.manual_seed(0)
    x = torch.randn(9, width)
    x[1] = float("-inf")
    x[2] = 0.0  # all tied
    x[3, -1] = float("nan")
    x[4, width // 2] = x[4, -1] = 100.0  # a tie across lanes / the tail
    x[5, ::3] = 7.0
    x[6, width // 3] = float("nan")
    x[6, 0] = float("inf")
    rows = x[:, :width]  # unit-stride rows
    assert torch.equal(layer_ops.row_argmax(rows), rows.argmax(dim=-1))
    wide = torch.randn(4, width + 5)[:, :width]  # rows further apart than their width
    assert torch.equal(layer_ops.row_argmax(wide), wide.argmax(dim=-1))
    assert layer_ops.compiled() is not None
