"""Triton lightning attention (TransNormerLLM's decayed linear attention) on state slots.

- `_decode`: one token per sequence; grid (sequence, head, d_v tile). Reads the sequence's
  float32 state slot, applies `S = lambda S + k^T v`, writes it back in place and emits `q S`;
  a slot of -1 is a padding row (skipped; its output stays zero).
- `_chunked_prefill`: the Lightning Attention-2 block algorithm for a flat batch of prompt
  chunks; grid (sequence, head, d_v tile). Per block of CHUNK tokens: the intra-block masked
  product `((q k^T) * D) v` with `D[a, b] = lambda^(a - b)` for a >= b, plus the inter-block read
  `(q * lambda^(a + 1)) S` of the running state, then
  `S = lambda^m S + (k * lambda^(m - 1 - b))^T v`. Linear in the chunk length, float32 state.

Only plain pointer arithmetic (no block pointers): it compiles under Triton 3.6 and 3.9.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode(q_ptr, k_ptr, v_ptr, s_ptr, pool_ptr, slots_ptr, out_ptr, num_heads,
            D_K: tl.constexpr, D_V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    if slot < 0:
        return
    i = tl.arange(0, BK)
    j = tl.program_id(2) * BV + tl.arange(0, BV)
    i_ok = i < D_K
    j_ok = j < D_V
    row = b.to(tl.int64) * num_heads + h
    q = tl.load(q_ptr + row * D_K + i, mask=i_ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row * D_K + i, mask=i_ok, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * D_V + j, mask=j_ok, other=0.0).to(tl.float32)
    decay = tl.exp(-tl.load(s_ptr + h))
    state_ptrs = pool_ptr + ((slot * num_heads + h) * D_K + i[:, None]) * D_V + j[None, :]
    mask = i_ok[:, None] & j_ok[None, :]
    state = tl.load(state_ptrs, mask=mask, other=0.0)
    state = decay * state + k[:, None] * v[None, :]
    tl.store(state_ptrs, state, mask=mask)
    tl.store(out_ptr + row * D_V + j, tl.sum(q[:, None] * state, 0), mask=j_ok)


@triton.jit
def _chunked_prefill(q_ptr, k_ptr, v_ptr, s_ptr, pool_ptr, slots_ptr, q_starts_ptr, out_ptr,
                     num_heads, D_K: tl.constexpr, D_V: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    first = tl.load(q_starts_ptr + b)
    n = tl.load(q_starts_ptr + b + 1) - first
    slot = tl.load(slots_ptr + b).to(tl.int64)
    i = tl.arange(0, BK)
    j = tl.program_id(2) * BV + tl.arange(0, BV)
    i_ok = i < D_K
    j_ok = j < D_V
    s = tl.load(s_ptr + h)
    state_ptrs = pool_ptr + ((slot * num_heads + h) * D_K + i[:, None]) * D_V + j[None, :]
    state_mask = i_ok[:, None] & j_ok[None, :]
    state = tl.load(state_ptrs, mask=state_mask, other=0.0)
    a = tl.arange(0, CHUNK)
    gap = (a[:, None] - a[None, :]).to(tl.float32)
    intra = tl.where(gap >= 0, tl.exp(-s * tl.maximum(gap, 0.0)), 0.0)   # [CHUNK, CHUNK]
    q_decay = tl.exp(-s * (a + 1).to(tl.float32))
    for lo in range(0, n, CHUNK):
        m = tl.minimum(n - lo, CHUNK)
        a_ok = a < m
        token = (first + lo + a).to(tl.int64) * num_heads + h
        q = tl.load(q_ptr + token[:, None] * D_K + i[None, :],
                    mask=a_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + token[:, None] * D_K + i[None, :],
                    mask=a_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + token[:, None] * D_V + j[None, :],
                    mask=a_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * intra
        out = tl.dot(scores, v, input_precision=PRECISION)
        out += tl.dot(q * q_decay[:, None], state, input_precision=PRECISION)
        tl.store(out_ptr + token[:, None] * D_V + j[None, :], out,
                 mask=a_ok[:, None] & j_ok[None, :])
        k_decay = tl.where(a_ok, tl.exp(-s * (m - 1 - a).to(tl.float32)), 0.0)
        state = tl.exp(-s * m.to(tl.float32)) * state + tl.dot(
            tl.trans(k * k_decay[:, None]), v, input_precision=PRECISION)
    tl.store(state_ptrs, state, mask=state_mask)


def _tiles(d_k: int, d_v: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(d_k)), min(64, max(16, triton.next_power_of_2(d_v)))


def linear_decode(q, k, v, s, pool, slots):
    """Launches `_decode`; arguments validated by the package."""
    import torch

    num_seqs, num_heads, d_k = q.shape
    d_v = v.shape[2]
    bk, bv = _tiles(d_k, d_v)
    out = torch.zeros(num_seqs, num_heads, d_v, dtype=torch.float32, device=q.device)
    if num_seqs:
        _decode[(num_seqs, num_heads, triton.cdiv(d_v, bv))](
            q, k, v, s, pool, slots, out, num_heads, D_K=d_k, D_V=d_v, BK=bk, BV=bv)
    return out


def linear_prefill(q, k, v, s, pool, q_starts, slots, chunk: int = 64):
    """Launches `_chunked_prefill`; arguments validated by the package."""
    import torch

    num_tokens, num_heads, d_k = q.shape
    d_v = v.shape[2]
    bk, bv = _tiles(d_k, d_v)
    out = torch.zeros(num_tokens, num_heads, d_v, dtype=torch.float32, device=q.device)
    if slots.shape[0]:
        _chunked_prefill[(slots.shape[0], num_heads, triton.cdiv(d_v, bv))](
            q, k, v, s, pool, slots, q_starts, out, num_heads, D_K=d_k, D_V=d_v, BK=bk,
            BV=bv, CHUNK=chunk, PRECISION="ieee")
    return out
