"""PowerNorm's folded inference form equals the eval branch of the reference MaskPowerNorm
(sIncerass/powernorm, fairseq/modules/norms/mask_powernorm.py), re-implemented here step by
step in its own [T, B, C] layout."""

from __future__ import annotations

import pytest
import torch

from engine.layers.power_norm import PowerNorm

SHAPES = [(1, 1, 8, 1), (5, 3, 64, 4), (7, 2, 64, 64), (4, 2, 48, 3)]  # T, B, C, groups


def reference_eval(x, gamma, beta, running_phi, group_num, eps=1e-5):
    """MaskPowerNorm.forward with training=False; x: [T, B, C]."""
    num_tokens, batch, channels = x.shape
    cg = channels // group_num
    # GroupScaling1D: divide each group by its root mean square (no mean subtraction).
    gn_input = x.reshape(num_tokens, batch, group_num, cg)
    moment2 = torch.repeat_interleave(torch.mean(gn_input * gn_input, dim=3, keepdim=True),
                                      repeats=cg, dim=-1).reshape(num_tokens, batch, channels)
    x = x / torch.sqrt(moment2 + eps)
    # T x B x C -> B x C x T x 1, then the per-channel affine with the frozen running_phi.
    x = x.permute(1, 2, 0).unsqueeze(-1)
    out = x / (running_phi + eps).sqrt()
    out = gamma.reshape(1, channels, 1, 1) * out + beta.reshape(1, channels, 1, 1)
    return out.squeeze(-1).permute(2, 0, 1)  # [T, B, C]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-C{}-G{}".format(*s))
def test_folded_power_norm_matches_reference_eval(shape):
    num_tokens, batch, channels, groups = shape
    torch.manual_seed(0)
    # Channels of very different scales, so a wrong grouping changes the result.
    x = torch.randn(num_tokens, batch, channels) * torch.logspace(-1, 1, channels)
    gamma, beta = torch.randn(channels), torch.randn(channels)
    running_phi = torch.rand(1, channels, 1, 1) * 3 + 0.05
    norm = PowerNorm(channels, groups)
    norm.load_folded(gamma, beta, running_phi)
    expected = reference_eval(x, gamma, beta, running_phi, groups)
    # Flat token stream, as the engine runs it: [T * B, C].
    out = norm(x.reshape(-1, channels)).reshape(num_tokens, batch, channels)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_grouping_matters():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16) * torch.logspace(-1, 1, 16)
    gamma, beta, phi = torch.ones(16), torch.zeros(16), torch.ones(1, 16, 1, 1)
    norm = PowerNorm(16, 1)
    norm.load_folded(gamma, beta, phi)
    assert not torch.allclose(norm(x[:, 0]), reference_eval(x, gamma, beta, phi, 4)[:, 0],
                              atol=1e-3)


def test_bfloat16_input_keeps_dtype():
    norm = PowerNorm(32, 4).to(torch.bfloat16)
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16


@pytest.mark.parametrize("groups", [0, 5])
def test_groups_must_divide_hidden(groups):
    with pytest.raises(ValueError, match=f"num_groups={groups}"):
        PowerNorm(32, groups)
