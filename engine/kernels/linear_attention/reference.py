"""Loop-clear float64 references of decayed linear attention on a pool of state slots.

Per head with decay lambda = exp(-s): `S_t = lambda S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`.
"""

from __future__ import annotations

import torch


def linear_recurrence_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                s: torch.Tensor, state: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence token by token. q, k: [n, H, d_k]; v: [n, H, d_v]; state [H, d_k, d_v].
    Returns (o [n, H, d_v], final state [H, d_k, d_v]), float64."""
    decay = torch.exp(-s.double())[:, None, None]
    state = state.double().clone()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64, device=q.device)
    for t in range(q.shape[0]):
        state = decay * state + k[t].double()[:, :, None] * v[t].double()[:, None, :]
        out[t] = (q[t].double()[:, None, :] @ state).squeeze(1)
    return out, state


def linear_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                            pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One token per sequence on `pool[slots[b]]`, in place; slot -1 is padding (skipped, its
    output zero). Returns [B, H, d_v] float32."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32, device=q.device)
    for b, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        o, state = linear_recurrence_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], s,
                                               pool[slot])
        out[b] = o[0].float()
        pool[slot] = state.to(pool.dtype)
    return out


def linear_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             s: torch.Tensor, pool: torch.Tensor, q_starts: torch.Tensor,
                             slots: torch.Tensor) -> torch.Tensor:
    """Sequence b's tokens are rows [q_starts[b], q_starts[b+1]) of q, k: [T, H, d_k] and
    v: [T, H, d_v]; they continue the state in pool[slots[b]], which is updated in place.
    Returns [T, H, d_v] float32."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float32, device=q.device)
    starts = q_starts.tolist()
    for b, slot in enumerate(slots.tolist()):
        rows = slice(starts[b], starts[b + 1])
        o, state = linear_recurrence_reference(q[rows], k[rows], v[rows], s, pool[slot])
        out[rows] = o.float()
        pool[slot] = state.to(pool.dtype)
    return out
