"""The compiled linear-attention decode step equals its torch reference, in place on the pool,
and touches no slot it was not given (untouched slots are NaN and must stay NaN)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import linear_attention as kernel
from engine.kernels.linear_attention.reference import linear_decode_reference
from engine.layers.linear_attention import decay_rates



def test_kernel_builds():
    # The model falls back to the reference silently; the build itself must not.
    assert kernel.is_available()


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("d_k,d_v", [(16, 16), (32, 16), (24, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(heads, d_k, d_v, dtype):
    torch.manual_seed(heads * 100 + d_k)
    num_slots, batch = 9, 5
    q, k = (torch.randn(batch, heads, d_k).to(dtype) for _ in range(2))
    v = torch.randn(batch, heads, d_v).to(dtype)
    s = decay_rates(heads, 1, 4)
    slots = torch.randperm(num_slots)[:batch]
    pool = torch.full((num_slots, heads, d_k, d_v), float("nan"))
    pool[slots] = torch.randn(batch, heads, d_k, d_v)
    expected_pool = pool.clone()
    expected = linear_decode_reference(q, k, v, s, expected_pool, slots)
    for _ in range(2):  # twice: the second step reads what the first wrote
        out = kernel.linear_decode(q, k, v, s, pool, slots)
        if _ == 0:
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pool, expected_pool, atol=1e-5, rtol=1e-5,
                                       equal_nan=True)
        else:
            expected = linear_decode_reference(q, k, v, s, expected_pool, slots)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert torch.isnan(pool[untouched]).all() and not torch.isnan(pool[slots]).any()


def test_bad_shapes_are_rejected():
    q = torch.randn(2, 2, 8)
    pool = torch.zeros(4, 2, 8, 8)
    with pytest.raises(ValueError):
        kernel.linear_decode(q, q, torch.randn(2, 2, 4), torch.ones(2), pool,
                             torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        kernel.linear_decode(q, q, q, torch.ones(2), pool.double(), torch.tensor([0, 1]))
    with pytest.raises(ValueError):  # one slot per sequence
        kernel.linear_decode(q, q, q, torch.ones(2), pool, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.linear_decode(q, q, q, torch.ones(2), pool, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.linear_decode(q, q, q, torch.ones(2), pool, torch.tensor([-2, 1]))
