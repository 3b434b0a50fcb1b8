"""The kNN-LM distribution and its interpolation with the model's (Khandelwal et al. 2020).

    p_kNN(y) = sum over neighbours i with value v_i = y of softmax_i(-d_i / T)
    log p(y) = logaddexp(log(1 - lambda) + log p_LM(y), log lambda + log p_kNN(y))

d_i are squared L2 distances (what FAISS returns and the reference code uses). Shared by the
decoding transform and the perplexity evaluation, so both score exactly alike.
"""

from __future__ import annotations

import torch


def knn_log_probs(dists: torch.Tensor, values: torch.Tensor, vocab_size: int,
                  temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
    """log p_kNN over the vocabulary: [rows, vocab_size] from [rows, k] distances (+inf for
    missing neighbours) and their int64 values. `temperature` is a float or a [rows] tensor.
    Tokens no neighbour votes for get -inf."""
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(dists.dtype).unsqueeze(-1)
    weights = torch.softmax(-dists / temperature, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a row without any neighbour: all zero
    probs = torch.zeros(dists.shape[0], vocab_size, dtype=dists.dtype, device=dists.device)
    probs.scatter_add_(1, values, weights)
    return probs.log()


def interpolate(lm_log_probs: torch.Tensor, knn_log_probs_: torch.Tensor,
                lmbda: torch.Tensor | float) -> torch.Tensor:
    """log((1 - lambda) p_LM + lambda p_kNN), computed in log space. `lmbda` is a float or a
    [rows] tensor; lambda = 0 returns `lm_log_probs` exactly, lambda = 1 the kNN distribution."""
    if not isinstance(lmbda, torch.Tensor):
        lmbda = torch.tensor([lmbda], dtype=lm_log_probs.dtype, device=lm_log_probs.device)
    lmbda = lmbda.to(lm_log_probs.dtype).unsqueeze(-1)
    mixed = torch.logaddexp(torch.log1p(-lmbda) + lm_log_probs, lmbda.log() + knn_log_probs_)
    # log(0) terms: lambda 0 -> exactly the LM, lambda 1 -> exactly kNN (no -inf + x NaNs).
    mixed = torch.where(lmbda == 0, lm_log_probs, mixed)
    return torch.where(lmbda == 1, knn_log_probs_, mixed)


def row_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per row ([rows] float32); -inf logits allowed."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p.nan_to_num(neginf=0.0)).sum(-1)


def mix(lm_log_probs: torch.Tensor, dists: torch.Tensor, values: torch.Tensor,
        temperature: torch.Tensor | float, lmbda: torch.Tensor | float) -> torch.Tensor:
    """The kNN-LM log-probabilities of rows whose neighbours are (`dists`, `values`); a row with
    no neighbour at all (every distance +inf) keeps the model's distribution."""
    rows = lm_log_probs.shape[0]
    lmbda = torch.as_tensor(lmbda, dtype=lm_log_probs.dtype, device=lm_log_probs.device)
    lmbda = torch.where(torch.isfinite(dists).any(-1), lmbda.expand(rows), 0.0)
    knn = knn_log_probs(dists, values, lm_log_probs.shape[-1], temperature)
    return interpolate(lm_log_probs, knn, lmbda)
