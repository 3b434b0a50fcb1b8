"""The Triton residual-add + norm kernel (under the interpreter on CPU) against the float64
reference and the torch path, for RMSNorm, LayerNorm and the LayerNorm-free centred form, with
and without a LayerNorm-Scaling factor; and the engine's own norm layers agree with the
reference (the op computes what the models compute)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.fused_add_norm import fused_add_norm
from engine.kernels.fused_add_norm.reference import fused_add_norm_reference
from engine.layers.norms import CenteredNorm, LayerNorm, RMSNorm
from tests.factories import TRITON_DEVICE as DEVICE

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
pytestmark = pytest.mark.usefixtures("triton_backend")


def inputs(kind, hidden, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    residual = (torch.randn(5, hidden, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    bias = None if kind == "rms" else (0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    return tuple(None if t is None else t.to(DEVICE) for t in (x, residual, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rms", "layer", "centered"])
@pytest.mark.parametrize("hidden,scale", [(64, 1.0), (96, 0.5)])
def test_triton_add_norm_matches_the_reference(dtype, kind, hidden, scale):
    x, residual, weight, bias = inputs(kind, hidden, dtype)
    out, h = fused_add_norm(x, residual, weight, bias, 1e-5, kind, scale)
    ref_out, ref_h = fused_add_norm_reference(x, residual, weight, bias, 1e-5, kind, scale)
    assert out.dtype == weight.dtype and h.dtype == residual.dtype
    tol = TOLERANCE[dtype] * max(1.0, ref_out.abs().max().item())
    assert (out.double() - ref_out).abs().max().item() <= tol
    assert (h.double() - ref_h).abs().max().item() <= TOLERANCE[dtype] * 8


@pytest.mark.parametrize("kind", ["rms", "layer", "centered"])
def test_triton_add_norm_agrees_with_the_torch_path(kind, monkeypatch):
    x, residual, weight, bias = inputs(kind, 80, torch.float32, seed=1)
    triton_out = fused_add_norm(x, residual, weight, bias, 1e-6, kind, 0.7)
    monkeypatch.setenv("POLYDECODE_KERNEL_BACKEND", "cpu")
    torch_out = fused_add_norm(x.cpu(), residual.cpu(), weight.cpu(),
                               None if bias is None else bias.cpu(), 1e-6, kind, 0.7)
    for a, b in zip(triton_out, torch_out):
        torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,layer", [("rms", RMSNorm(48, 1e-6)), ("layer", LayerNorm(48, 1e-5)),
                                        ("centered", CenteredNorm(48))])
def test_triton_add_norm_equals_the_model_norm_layers(kind, layer):
    x, residual, _, _ = inputs(kind, 48, torch.float32, seed=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    eps = getattr(layer, "eps", 0.0)
    bias = getattr(layer, "bias", None)
    layer = layer.to(DEVICE)
    out, h = fused_add_norm(x, residual, layer.weight.data, None if bias is None else
                            layer.bias.data, eps, kind)
    torch.testing.assert_close(h, x + residual)
    torch.testing.assert_close(out, layer(x + residual).detach(), atol=1e-5, rtol=1e-5)


def test_triton_add_norm_rejects_bad_arguments():
    x, residual, weight, _ = inputs("rms", 32, torch.float32)
    with pytest.raises(ValueError, match="kind"):
        fused_add_norm(x, residual, weight, None, 1e-6, "batch")
    with pytest.raises(ValueError, match="bias"):
        fused_add_norm(x, residual, weight, None, 1e-6, "layer")
    with pytest.raises(ValueError, match="expected"):
        fused_add_norm(x, residual[:2], weight, None, 1e-6, "rms")
