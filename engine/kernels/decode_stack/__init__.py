"""A Llama decode step's decoder stack in one C++ call (see `cpu.py`): the CPU equivalent of
replaying a captured graph. The model calls `run` when the step allows it and its own
module-by-module forward otherwise; both give the same bits.

It applies to an all-decode step on the CPU backend (one new token per sequence, block tables
for the paged kernel, no activation captures) of a Pre-LN Llama whose linears are all
prepacked (`PackedLinear`: float32 panels, or oneDNN's layout) or all weight-only int8 or int4,
and whose KV cache has the model's dtype.
`POLYDECODE_DECODE_STACK=0` turns it off (the eager forward then runs every step).
"""

from __future__ import annotations

import os

import torch

from engine.kernels import backend
from engine.kernels.decode_stack.cpu import load_extension


timings: torch.Tensor | None = None
"""When a profiler sets a float64 [2] tensor here, every stack call adds its GEMM and attention
seconds to it (what the model's own hooks cannot see inside the call)."""


def enabled() -> bool:
    return (os.environ.get("POLYDECODE_DECODE_STACK", "1") != "0"
            and backend(torch.device("cpu")) == "cpu")


def applies(weights, x: torch.Tensor, kv_caches, meta, capture_layers) -> bool:
    """True when this step can run as one stack call."""
    return (weights is not None and not capture_layers and x.device.type == "cpu"
            and meta.varlen is None and not meta.prefills
            and meta.decode_block_tables is not None and meta.num_decode_tokens == x.shape[0]
            and x.dtype == weights[0].dtype and kv_caches[0][0].dtype == x.dtype
            and meta.slot_mapping.dtype == torch.int64 and enabled()
            and load_extension() is not None)


LINEAR_KINDS = {"packed": 0, "int8": 1, "int4": 2, "panels": 3}
"""The stack's linear kinds: oneDNN-prepacked float weights, weight-only int8, weight-only int4,
float32 panels (`engine.kernels.panel_linear`)."""


def run(weights: list[torch.Tensor], x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
        kv_caches, final_norm: torch.Tensor, meta, num_heads: int, num_kv_heads: int,
        eps: float, scale: float, linear_kind: str = "packed", group: int = 0) -> torch.Tensor:
    """The final-normed hidden states [tokens, hidden] of the decode step (KV written)."""
    caches = [t for pair in kv_caches for t in pair]
    cos, sin = rope
    return load_extension().llama_decode_stack(
        x.contiguous(), cos.contiguous(), sin.contiguous(), weights, caches,
        final_norm.detach(), meta.slot_mapping, meta.decode_block_tables.contiguous(),
        meta.decode_context_lens.contiguous(), num_heads, num_kv_heads, eps, scale,
        LINEAR_KINDS[linear_kind], group, timings)


def linears_seconds(inputs: list[torch.Tensor], weights: list[torch.Tensor],
                    auxes: list[torch.Tensor], linear_kind: str, repeats: int) -> float | None:
    """Seconds per pass of `inputs[i]` times the linear of (`weights[i]`, `auxes[i]`) of one
    kind for every i, as the stack calls them, timed in C++ (best of `repeats`); None when the
    extension does not build."""
    ext = load_extension()
    return None if ext is None else ext.linears_seconds(inputs, weights, auxes,
                                                        LINEAR_KINDS[linear_kind], repeats)
