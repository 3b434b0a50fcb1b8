"""The C++ weight-only int8 linear against the exact product: float64 sums of the float32
activations times the int8 weights, times the scales. The kernel sums in float32 in a
different order and rounds once to the output dtype, so it must agree to that rounding, for
every row count the streaming kernel takes (passes of four rows, a partial last pass, its
upper bound) and beyond it, where torch's fused int8 GEMM takes over."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import quant_linear
from engine.kernels.quant_linear.cpu import load_extension

ROWS = [1, 3, 4, 5, 17, 64, 65, 130]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_extension() is not None, "the int8 linear kernel did not build on this machine"


def exact(x, weight, scales):
    return (x.double() @ weight.double().t()) * scales.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features,out_features", [(576, 96), (1536, 40), (48, 7)])
def test_int8_linear_is_the_exact_product_to_rounding(dtype, rows, in_features, out_features):
    torch.manual_seed(rows * 31 + in_features)
    x = torch.randn(rows, in_features).to(dtype)
    weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scales = (torch.rand(out_features) * 0.02 + 1e-3).to(dtype)
    out = quant_linear.int8_linear(x, weight, scales)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    ref = exact(x, weight, scales)
    # float32 sums of in_features products (relative 2^-24 each) plus the output rounding.
    rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -22
    sums = (x.double().abs() @ weight.double().abs().t()) * scales.double()
    bound = sums * in_features * 2.0 ** -24 + ref.abs() * rounding + 1e-30
    assert ((out.double() - ref).abs() <= bound).all()


def test_int8_linear_takes_strided_rows_and_names_bad_arguments():
    x = torch.randn(4, 128)[:, :64]  # rows 128 apart
    weight = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    scales = torch.rand(8)
    torch.testing.assert_close(quant_linear.int8_linear(x, weight, scales),
                               exact(x, weight, scales).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="int8_linear: expected"):
        quant_linear.int8_linear(x, weight.float(), scales)
    with pytest.raises(ValueError, match="scales"):
        quant_linear.int8_linear(x, weight, scales.bfloat16())


def test_int8_linear_beyond_the_kept_buffer_in_float32():
    # 8192 x 576 float32 weights (18 MB) are expanded into a fresh tensor, not the kept buffer.
    torch.manual_seed(3)
    x = torch.randn(70, 576)
    weight = torch.randint(-127, 128, (8192, 576), dtype=torch.int8)
    scales = torch.rand(8192) * 0.01
    out = quant_linear.int8_linear(x, weight, scales)
    torch.testing.assert_close(out, exact(x, weight, scales).float(), rtol=1e-5, atol=1e-4)
