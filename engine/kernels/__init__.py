"""Kernels under the engine: one package per op, each with `reference.py` (loop-clear, float64 or
float32), `cpu.py` (compiled C++ or torch), `triton.py` (GPU; runs on CPU tensors under
`TRITON_INTERPRET=1`) and an `__init__.py` that validates arguments and dispatches.

Dispatch: CUDA tensors with Triton importable -> Triton; CPU tensors -> the CPU kernels;
anything else -> the reference. `POLYDECODE_KERNEL_BACKEND=triton|cpu|reference` forces one
(the tests run the Triton kernels on CPU tensors that way, under the interpreter).
This package imports only torch and triton.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "cpu", "reference")


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (no GPU compiler involved)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend(device: torch.device) -> str:
    """The kernel family used for tensors on `device`."""
    forced = os.environ.get("POLYDECODE_KERNEL_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"POLYDECODE_KERNEL_BACKEND must be one of {BACKENDS}, got "
                             f"{forced!r}")
        return forced
    if device.type == "cuda" and triton_importable():
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return "reference"
