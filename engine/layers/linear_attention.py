"""Decayed linear attention (TransNormerLLM / Lightning Attention) in three equivalent forms.

Per head, with a fixed decay rate `s > 0` (lambda = exp(-s)), a token at position t reads

    o_t = sum_{i <= t} lambda^(t - i) (q_t . k_i) v_i

with no 1/sqrt(d) scale, no softmax and no normaliser. Its recurrent form keeps one state
`S [d_k, d_v]` per head: `S_t = lambda * S_{t-1} + k_t^T v_t` (decay first, then add) and
`o_t = q_t S_t`. Everything is computed in float32; the state is float32 whatever the model
dtype, so a long prompt does not accumulate rounding in bf16.

- `chunked_prefill`: the Lightning Attention-2 block algorithm (intra-block masked product +
  inter-block read of the running state), linear in sequence length; prompt chunks.
- `recurrent_step`: one new token for each of a batch of sequences; decode.
- `masked_parallel`: the quadratic form over explicit position ids and an attention mask;
  used for structured prompts (Set-Based Prompting), where parallel members share positions
  and must not see each other, so no single left-to-right state exists inside a set.
"""

from __future__ import annotations

import math

import torch

CHUNK_SIZE = 64
"""Tokens per Lightning block: the intra-block product is quadratic in it, the number of
inter-block state reads is linear in 1/it; 64 balances the two on CPU GEMMs."""


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes 2^(-8(h+1)/H); for H not a power of two, the slopes of the closest
    power of two followed by every second slope of twice that (the ALiBi paper's rule)."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][:num_heads - closest]


def decay_rates(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """[H] float32 decay rates s of one layer: `slope_h * (1 - layer / (L - 1) + 1e-5)`.
    Deeper layers decay less; the last layer keeps only the 1e-5 floor."""
    depth = 1 - layer / (num_layers - 1) if num_layers > 1 else 1.0
    return torch.tensor(alibi_slopes(num_heads), dtype=torch.float32) * (depth + 1e-5)


def chunked_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                    state: torch.Tensor, chunk_size: int = CHUNK_SIZE
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive tokens of one sequence after `state`.

    Args:
        q, k: [H, n, d_k]; v: [H, n, d_v] (any float dtype; computed in float32).
        s: [H] decay rates.
        state: [H, d_k, d_v] float32, the state before the first token (zeros for a new
            sequence).

    Returns:
        (o [H, n, d_v] float32, final state [H, d_k, d_v] float32).
    """
    q, k, v = q.float(), k.float(), v.float()
    n = q.shape[1]
    s = s.float()[:, None]                                              # [H, 1]
    idx = torch.arange(chunk_size, dtype=torch.float32, device=q.device)
    # Within a block of m tokens, token a reads the incoming state decayed a + 1 times and
    # token b's k^T v reaches the outgoing state decayed m - 1 - b times.
    q_decay = torch.exp(-s * (idx + 1))                                 # [H, C]
    diff = idx[:, None] - idx[None, :]
    intra = torch.where(diff >= 0, torch.exp(-s[:, :, None] * diff.clamp(min=0)),
                        torch.zeros((), device=q.device))               # [H, C, C]
    out = torch.empty(q.shape[0], n, v.shape[-1], dtype=torch.float32, device=q.device)
    state = state.float()
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        m = hi - lo
        qi, ki, vi = q[:, lo:hi], k[:, lo:hi], v[:, lo:hi]
        scores = (qi @ ki.transpose(1, 2)) * intra[:, :m, :m]          # [H, m, m]
        out[:, lo:hi] = scores @ vi + (qi * q_decay[:, :m, None]) @ state
        k_decay = torch.exp(-s * (m - 1 - idx[:m]))                     # [H, m]
        state = torch.exp(-s * m)[:, :, None] * state + (ki * k_decay[:, :, None]
                                                         ).transpose(1, 2) @ vi
    return out, state


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                   states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token for each of B sequences.

    Args:
        q, k: [B, H, d_k]; v: [B, H, d_v].
        s: [H] decay rates.
        states: [B, H, d_k, d_v] float32 states before the token.

    Returns:
        (o [B, H, d_v] float32, new states [B, H, d_k, d_v] float32).
    """
    q, k, v = q.float(), k.float(), v.float()
    decay = torch.exp(-s.float())[None, :, None, None]
    states = decay * states + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ states).squeeze(-2), states


def masked_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor,
                    positions: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first tokens computed at once, with explicit position ids and mask.

    Args:
        q, k: [H, n, d_k]; v: [H, n, d_v].
        s: [H] decay rates.
        positions: [n] int position ids (parallel set members share theirs).
        mask: [n, n] bool, True where query a may read key b (key positions never exceed
            query positions where True).

    Returns:
        (o [H, n, d_v] float32, state [H, d_k, d_v] float32 as seen by the token at position
        `max(positions) + 1`: every key decayed to the last position; all of them are visible
        to what follows the prompt).
    """
    q, k, v = q.float(), k.float(), v.float()
    s = s.float()
    pos = positions.to(torch.float32)
    gap = (pos[:, None] - pos[None, :]).clamp(min=0)                     # [n, n]
    weights = torch.exp(-s[:, None, None] * gap) * mask                  # [H, n, n]
    out = ((q @ k.transpose(1, 2)) * weights) @ v
    to_last = torch.exp(-s[:, None] * (pos.max() - pos)[None, :])       # [H, n]
    state = (k * to_last[:, :, None]).transpose(1, 2) @ v
    return out, state
