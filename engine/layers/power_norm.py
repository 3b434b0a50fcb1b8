"""PowerNorm (Shen et al., ICML 2020) in its inference form.

In eval mode fairseq's `MaskPowerNorm` (sIncerass/powernorm) computes, per token x of C
channels split into g groups (g = attention heads):

    x_hat[grp] = x[grp] / sqrt(mean_{c in grp} x[c]^2 + 1e-5)     # GroupScaling1D, no params
    y          = gamma * x_hat / sqrt(running_phi + 1e-5) + beta  # running_phi: [1, C, 1, 1]

`running_phi` is frozen at inference, so the second line is a per-channel affine map: PowerNorm
is a group RMSNorm with weight gamma / sqrt(running_phi + 1e-5) and bias beta, folded once by
`load_folded`. Nothing is batch-dependent at inference, so it works on a flat token stream.
"""

from __future__ import annotations

import torch
from torch import nn

POWER_NORM_EPS = 1e-5
"""The reference's eps, in both the group scaling and the running_phi denominator."""


class PowerNorm(nn.Module):
    """Group RMSNorm plus a per-channel affine: x [..., hidden_size] -> same shape and dtype.

    `weight` and `bias` hold the folded parameters (see `load_folded`); computed in float32
    and cast back, like `RMSNorm`.
    """

    def __init__(self, hidden_size: int, num_groups: int, eps: float = POWER_NORM_EPS) -> None:
        super().__init__()
        if num_groups <= 0 or hidden_size % num_groups:
            raise ValueError(f"num_groups={num_groups!r}: must be positive and divide "
                             f"hidden_size={hidden_size}")
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        groups = x.float().unflatten(-1, (self.num_groups, -1))  # [..., groups, hidden/groups]
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.flatten(-2).to(dtype) + self.bias  # [..., hidden]

    @torch.no_grad()
    def load_folded(self, gamma: torch.Tensor, beta: torch.Tensor, running_phi: torch.Tensor,
                    phi_eps: float = POWER_NORM_EPS) -> None:
        """Folds a trained PowerNorm's `weight` (gamma [C]), `bias` (beta [C]) and
        `running_phi` buffer (C elements, saved as [1, C, 1, 1]) into `weight` and `bias`."""
        phi = running_phi.float().reshape(-1)
        self.weight.copy_(gamma.float() / torch.sqrt(phi + phi_eps))
        self.bias.copy_(beta)
