"""The float32 panel linear against the exact product (float64 sums of the same float32
inputs): the kernel sums in float32, so it must agree within the bound of a float32 sum of
`in_features` products, for every row count a register tile takes (1-12), balanced tiles,
more rows than one L2 block (120), the last row count it takes (256) and beyond it, where
torch's GEMM takes over; output counts that leave a panel partly empty; inputs that leave a
chunk short. Each row's result must not depend on the other rows of the batch."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import panel_linear
from engine.kernels.panel_linear.cpu import load_extension
from engine.layers.packed_linear import PackedLinear

ROWS = [1, 5, 12, 13, 32, 121, 256, 257]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_extension() is not None, "the panel linear kernel did not build on this machine"
    assert panel_linear.available(), "this machine's CPU has no AVX-512 for the panel kernel"


def check_exact(out, x, weight, bias=None):
    ref = x.double() @ weight.double().t()
    if bias is not None:
        ref = ref + bias.double()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # A float32 sum of in_features products (relative 2^-24 each), then the output rounding.
    sums = x.double().abs() @ weight.double().abs().t()
    bound = sums * x.shape[1] * 2.0 ** -24 + ref.abs() * 2.0 ** -23 + 1e-30
    assert ((out.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features,out_features", [(576, 960), (1536, 40), (200, 33)])
def test_panel_linear_is_the_exact_product_to_rounding(rows, in_features, out_features):
    torch.manual_seed(rows * 31 + in_features)
    x = torch.randn(rows, in_features)
    weight = torch.randn(out_features, in_features) * 0.05
    out = panel_linear.panel_linear(x, panel_linear.pack_panels(weight), weight)
    check_exact(out, x, weight)


def test_rows_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    x = torch.randn(256, 576)
    weight = torch.randn(1000, 576) * 0.05
    panels = panel_linear.pack_panels(weight)
    whole = panel_linear.panel_linear(x, panels, weight)
    for start, count in [(0, 1), (7, 1), (3, 12), (100, 40), (0, 121)]:
        part = panel_linear.panel_linear(x[start:start + count], panels, weight)
        assert torch.equal(part, whole[start:start + count]), (start, count)


def test_bias_strided_rows_and_bad_arguments():
    torch.manual_seed(2)
    x = torch.randn(6, 256)[:, :128]  # rows 256 apart
    weight = torch.randn(70, 128) * 0.05
    bias = torch.randn(70)
    panels = panel_linear.pack_panels(weight)
    check_exact(panel_linear.panel_linear(x, panels, weight, bias), x, weight, bias)
    check_exact(panel_linear.panel_linear(x.t().contiguous().t(), panels, weight), x, weight)
    with pytest.raises(ValueError, match="panel_linear: expected"):
        panel_linear.panel_linear(x.bfloat16(), panels, weight)
    with pytest.raises(ValueError, match="panels"):
        panel_linear.panel_linear(x, panels[:, :64], weight)


def test_packed_linear_uses_panels_in_float32_and_onednn_in_bfloat16():
    torch.manual_seed(3)
    linear = torch.nn.Linear(576, 100, bias=True)
    packed = PackedLinear(linear, batch_hint=32)
    assert packed.layout == "panels"
    x = torch.randn(9, 576)
    with torch.inference_mode():
        check_exact(packed(x), x, linear.weight.detach(), linear.bias.detach())
    assert PackedLinear(linear.to(torch.bfloat16), batch_hint=32).layout == "onednn"
