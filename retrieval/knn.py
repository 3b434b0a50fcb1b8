"""The kNN-LM distribution and its interpolation with the model's (Khandelwal et al. 2020).

    p_kNN(y) = sum over neighbours i with value v_i = y of softmax_i(-d_i / T)
    log p(y) = logaddexp(log(1 - lambda) + log p_LM(y), log lambda + log p_kNN(y))

d_i are squared L2 distances (what FAISS returns and the reference code uses). Shared by the
decoding transform and the perplexity evaluation, so both score exactly alike.
"""

from __future__ import annotations

import torch


def row_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row ([rows] float32); -inf logits allowed."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


def mix(lm_log_probs: torch.Tensor, dists: torch.Tensor, values: torch.Tensor,
        temperature: torch.Tensor | float, lmbda: torch.Tensor | float) -> torch.Tensor:
    """The kNN-LM log-probabilities [rows, vocab] of rows whose model log-probabilities are
    `lm_log_probs` and whose k neighbours are (`dists` [rows, k] squared L2, +inf where
    missing; `values` [rows, k] int64). `temperature` and `lmbda` are floats or [rows]
    tensors. lambda = 0 returns the model's row exactly, lambda = 1 the kNN distribution
    alone, and a row with no neighbour at all keeps the model's distribution.

    Sparse in the vocabulary: p_kNN is non-zero on at most k tokens, so the dense work is one
    add (every token's (1 - lambda) p_LM) and the interpolation runs at the neighbours'
    values only (duplicates scatter the same number).
    """
    rows = lm_log_probs.shape[0]
    dtype, device = lm_log_probs.dtype, lm_log_probs.device
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(dists.dtype).unsqueeze(-1)
    lmbda = torch.as_tensor(lmbda, dtype=dtype, device=device).expand(rows)
    lmbda = torch.where(torch.isfinite(dists).any(-1), lmbda, 0.0)[:, None]
    weights = torch.softmax(-dists / temperature, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a row without any neighbour: all zero
    p_knn = torch.zeros(rows, lm_log_probs.shape[-1], dtype=dists.dtype, device=device)
    p_knn = p_knn.scatter_add_(1, values, weights).gather(1, values)  # at each value
    keep = torch.log1p(-lmbda)  # -inf at lambda 1: only the neighbours' tokens remain
    out = lm_log_probs + keep
    voted = torch.logaddexp(lm_log_probs.gather(1, values) + keep,
                            lmbda.log() + p_knn.log().to(dtype))
    out.scatter_(1, values, voted)
    if bool((lmbda == 0).any()):  # exactly the model (no rounding through log1p(0))
        out = torch.where(lmbda == 0, lm_log_probs, out)
    return out
