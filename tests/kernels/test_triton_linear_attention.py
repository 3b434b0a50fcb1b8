"""The Triton lightning-attention kernels (under the interpreter on CPU) against the float64
token-by-token recurrence: chunked prefill across chunk boundaries for several sequences at
once, decode in place on the state pool with padding slots, and agreement with the C++ decode
kernel. Unused slots are NaN and must stay NaN."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import linear_attention
from engine.kernels.linear_attention import linear_decode, linear_prefill
from engine.kernels.linear_attention.reference import (linear_decode_reference,
                                                       linear_prefill_reference)
from tests.factories import TRITON_DEVICE as DEVICE

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
pytestmark = pytest.mark.usefixtures("triton_backend")


def inputs(num_tokens, heads, d_k, d_v, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(num_tokens, heads, d_k, generator=gen) * 0.3).to(dtype)
    k = (torch.randn(num_tokens, heads, d_k, generator=gen) * 0.3).to(dtype)
    v = torch.randn(num_tokens, heads, d_v, generator=gen).to(dtype)
    s = torch.rand(heads, generator=gen) * 0.5 + 0.01
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), s.to(DEVICE)


def pool_with(slots, num_slots, heads, d_k, d_v, seed):
    pool = torch.full((num_slots, heads, d_k, d_v), float("nan"))
    live = slots[slots >= 0]
    pool[live] = torch.randn(len(live), heads, d_k, d_v,
                             generator=torch.Generator().manual_seed(seed))
    return pool.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,d_k,d_v", [(1, 16, 16), (2, 32, 48), (4, 64, 32)])
def test_triton_chunked_prefill(dtype, heads, d_k, d_v):
    # 70 tokens cross one 64-token chunk boundary; 64 fill one exactly; 5 fit in one.
    lens = [70, 5, 64]
    q, k, v, s = inputs(sum(lens), heads, d_k, d_v, dtype, seed=heads)
    q_starts = torch.tensor([0] + lens).cumsum(0).to(DEVICE)
    slots = torch.tensor([3, 0, 1]).to(DEVICE)
    pool = pool_with(slots, 5, heads, d_k, d_v, seed=1)
    expected_pool = pool.clone()
    out = linear_prefill(q, k, v, s, pool, q_starts, slots)
    expected = linear_prefill_reference(q, k, v, s, expected_pool, q_starts, slots)
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= TOLERANCE[dtype] * scale
    torch.testing.assert_close(pool, expected_pool, atol=TOLERANCE[dtype] * scale, rtol=0,
                               equal_nan=True)
    assert pool[[2, 4]].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_decode_in_place_with_padding_slots(dtype):
    heads, d_k, d_v = 2, 32, 80  # d_v spans two 64-wide tiles
    q, k, v, s = inputs(4, heads, d_k, d_v, dtype, seed=7)
    slots = torch.tensor([2, -1, 0, 5]).to(DEVICE)
    pool = pool_with(slots, 6, heads, d_k, d_v, seed=2)
    expected_pool = pool.clone()
    for step in range(2):  # the second step reads what the first wrote
        out = linear_decode(q, k, v, s, pool, slots)
        expected = linear_decode_reference(q, k, v, s, expected_pool, slots)
        torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype] * 10, rtol=1e-4)
        torch.testing.assert_close(pool, expected_pool, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert out[1].abs().max() == 0
    assert pool[[1, 3, 4]].isnan().all()


def test_triton_decode_agrees_with_the_cpp_kernel(monkeypatch):
    assert linear_attention.is_available()
    heads, d_k, d_v = 3, 32, 32
    q, k, v, s = inputs(3, heads, d_k, d_v, torch.float32, seed=9)
    slots = torch.tensor([1, -1, 4]).to(DEVICE)
    pool = pool_with(slots, 5, heads, d_k, d_v, seed=3)
    cpp_pool = pool.clone().cpu()
    out = linear_decode(q, k, v, s, pool, slots)
    monkeypatch.setenv("POLYDECODE_KERNEL_BACKEND", "cpu")
    cpp_out = linear_decode(q.cpu(), k.cpu(), v.cpu(), s.cpu(), cpp_pool, slots.cpu())
    torch.testing.assert_close(out.cpu(), cpp_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.cpu(), cpp_pool, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_triton_prefill_then_decode_continues_the_recurrence():
    heads, d_k, d_v = 2, 16, 16
    q, k, v, s = inputs(41, heads, d_k, d_v, torch.float32, seed=11)
    pool = torch.zeros(2, heads, d_k, d_v)
    pool = pool.to(DEVICE)
    one = torch.tensor([1], device=DEVICE)
    out = linear_prefill(q[:40], k[:40], v[:40], s, pool, torch.tensor([0, 40], device=DEVICE),
                         one)
    last = linear_decode(q[40:], k[40:], v[40:], s, pool, one)
    from engine.kernels.linear_attention.reference import linear_recurrence_reference

    expected, state = linear_recurrence_reference(q, k, v, s, torch.zeros(heads, d_k, d_v,
                                                                          device=DEVICE))
    torch.testing.assert_close(torch.cat([out, last]).double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pool[1].double(), state, atol=1e-5, rtol=0)


def test_triton_rejects_bad_shapes():
    q, k, v, s = inputs(2, 1, 16, 16, torch.float32, seed=0)
    pool = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="slots"):
        linear_decode(q, k, v, s, pool, torch.tensor([0]))
    with pytest.raises(ValueError, match="q_starts"):
        linear_prefill(q, k, v, s, pool, torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="float32"):
        linear_prefill(q, k, v, s, pool.half(), torch.tensor([0, 2]), torch.tensor([0]))
