"""Prepacked linear layers for the CPU: float32 in 32-channel panels for the C++ panel kernel
(`engine.kernels.panel_linear`, on CPUs with AVX-512), bfloat16 (and float32 elsewhere) in
oneDNN's blocked layout.

The panel kernel streams the weights while it computes: on SmolLM2's decode shapes at batch 32
a step's float32 linears run 1.24x faster than oneDNN's prepacked product and 1.42x faster than
`F.linear` (`python bench/cpu_kernels.py`, two threads, AMX Xeon), and past 256 rows it hands
the product to torch's GEMM on the plain weight. oneDNN reorders a weight matrix once into the
blocked layout its GEMM kernels consume, instead of re-packing the weight panels on every call,
and runs the JIT AVX512-BF16 / AMX kernels it picks for the CPU at run time: in bfloat16 a
step's linears run 1.4x faster than `F.linear` (same benchmark). The result is not
bit-identical to `F.linear`: float32 sums in another order (relative differences ~1e-6), which
the HF-parity oracle tests cover. It is applied from outside the model code, after loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import panel_linear

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """Drop-in replacement of a float32 / bfloat16 `nn.Linear` on the CPU."""

    def __init__(self, linear: nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # kept: it may be tied (embeddings) and state dicts name it
        self.bias = linear.bias
        self.batch_hint = batch_hint
        weight = linear.weight.detach()
        self.layout = ("panels" if weight.dtype == torch.float32 and panel_linear.available()
                       else "onednn")
        packed = (panel_linear.pack_panels(weight) if self.layout == "panels"
                  else torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint))
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        if self.layout == "panels":
            return panel_linear.panel_linear(x, self.packed_weight, self.weight.detach(),
                                             self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [],
                                                  "")

    def stack_operands(self) -> tuple[str, list[torch.Tensor]]:
        """(kind, [weight, aux]) as the decode stack's C++ linear takes this layer: panels with
        the plain weight (for rows past the panel kernel's), or oneDNN's packed weight (aux
        unused)."""
        if self.layout == "panels":
            return "panels", [self.packed_weight, self.weight.detach()]
        return "packed", [self.packed_weight, self.packed_weight]


def can_prepack(model: nn.Module) -> bool:
    param = next(model.parameters())
    return (param.dtype in PACKABLE_DTYPES and param.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack_linears(model: nn.Module, batch_hint: int) -> int:
    """Replaces every float32 / bfloat16 `nn.Linear` of `model` by a `PackedLinear`; returns
    how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype in PACKABLE_DTYPES:
                setattr(module, name, PackedLinear(child, batch_hint))
                count += 1
    return count
