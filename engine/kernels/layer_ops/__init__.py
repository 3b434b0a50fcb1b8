"""The small per-layer ops of a Llama decode step, fused for the CPU (see `cpu.py`):
`add_rms_norm`, `rotary_store` (RoPE on q and k inside the qkv output + the KV-cache write) and
`silu_and_mul`, the KV-cache block copies `copy_blocks` and greedy's `row_argmax`. Each
validates its arguments and runs the C++ kernel on CPU tensors when it builds, else the torch
form (`reference.py`; for `copy_blocks`, indexed assignment; for `row_argmax`, torch.argmax)."""

from __future__ import annotations

import torch

from engine.kernels import backend
from engine.kernels.layer_ops.cpu import load_extension
from engine.kernels.layer_ops.reference import (add_rms_norm_reference,
                                                rotary_store_reference, silu_and_mul_reference)


def compiled():
    """The loaded C++ extension when the CPU kernels apply, else None."""
    if backend(torch.device("cpu")) != "cpu":
        return None
    return load_extension()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) * scale, h) with h = residual + x (x when residual is None); x, residual:
    [tokens, hidden] contiguous, weight [hidden], all one dtype."""
    _require(x.dim() == 2 and x.is_contiguous() and weight.shape == x.shape[1:]
             and weight.dtype == x.dtype and (residual is None or (
                 residual.shape == x.shape and residual.is_contiguous()
                 and residual.dtype == x.dtype)),
             f"add_rms_norm: expected contiguous x, residual [tokens, hidden] and weight "
             f"[hidden] of one dtype, got {tuple(x.shape)} {x.dtype}, weight "
             f"{tuple(weight.shape)} {weight.dtype}")
    ext = compiled() if x.device.type == "cpu" else None
    if ext is None:
        return add_rms_norm_reference(x, residual, weight, eps, scale)
    out, h = ext.add_rms_norm(x, residual, weight.contiguous(), eps, scale)
    return out, h


def rotary_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 num_heads: int, num_kv_heads: int) -> None:
    """In place: rotates the q and k heads of `qkv` [tokens, (heads + 2 kv_heads) * d] by
    (cos, sin) [tokens, 1, d] and stores its k, v rows at `slots` [tokens] (int64) of the
    caches [blocks, block_size, kv_heads, d]."""
    d = cos.shape[-1]
    _require(qkv.dim() == 2 and qkv.is_contiguous()
             and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * d and d % 2 == 0
             and cos.shape == sin.shape and cos.numel() == qkv.shape[0] * d
             and cos.is_contiguous() and sin.is_contiguous()
             and cos.dtype == qkv.dtype == k_cache.dtype == v_cache.dtype
             and k_cache.is_contiguous() and v_cache.is_contiguous()
             and k_cache.shape == v_cache.shape and k_cache.shape[-2:] == (num_kv_heads, d)
             and slots.dtype == torch.int64 and slots.shape == qkv.shape[:1],
             f"rotary_store: qkv {tuple(qkv.shape)} {qkv.dtype}, cos {tuple(cos.shape)} "
             f"{cos.dtype}, cache {tuple(k_cache.shape)} {k_cache.dtype}, slots "
             f"{tuple(slots.shape)} {slots.dtype} do not fit {num_heads} heads / "
             f"{num_kv_heads} kv heads")
    ext = compiled() if qkv.device.type == "cpu" else None
    if ext is None:
        rotary_store_reference(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
    else:
        ext.rotary_store(qkv, cos, sin, k_cache, v_cache, slots.contiguous(), num_heads,
                         num_kv_heads)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [tokens, 2 * n] contiguous -> silu(gate_up[:, :n]) * gate_up[:, n:]."""
    _require(gate_up.dim() == 2 and gate_up.is_contiguous() and gate_up.shape[1] % 2 == 0,
             f"silu_and_mul: expected contiguous [tokens, 2 * n], got {tuple(gate_up.shape)}")
    ext = compiled() if gate_up.device.type == "cpu" else None
    if ext is None:
        return silu_and_mul_reference(gate_up)
    return ext.silu_and_mul(gate_up)


def copy_blocks(caches: list[torch.Tensor], copies: list[tuple[int, ...]]) -> None:
    """In place: for every tensor of `caches` (all on one device), row dst (a block or state
    slot) becomes a copy of row src, for each (src, dst) or (src, dst, rows) of `copies`; with
    `rows` > 0 only the row's first `rows` entries along dim 1 need to be copied (the filled
    slots of a partial KV block: the C++ copy stops there, the torch fallback copies whole
    rows). No row may be both a source and a target."""
    sources, targets = [c[0] for c in copies], [c[1] for c in copies]
    _require(not set(sources) & set(targets),
             "copy_blocks: a block is both a source and a target")
    if not caches or not copies:
        return
    device = caches[0].device
    ext = compiled() if device.type == "cpu" and all(c.is_contiguous() for c in caches) \
        else None
    src = torch.tensor(sources, dtype=torch.int64, device=device)
    dst = torch.tensor(targets, dtype=torch.int64, device=device)
    if ext is None:
        for cache in caches:
            cache[dst] = cache[src]
    else:
        rows = torch.tensor([c[2] if len(c) > 2 else 0 for c in copies], dtype=torch.int64)
        ext.copy_blocks(caches, src, dst, rows)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a 2-D float32 tensor (the first maximum; a NaN counts as the
    maximum), int64. The C++ loop on CPU rows with unit stride: torch's argmax reduction reads
    a [32, 49152] logits matrix several times slower than memory allows."""
    ext = compiled() if x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.float32 \
        and x.shape[1] > 0 and x.stride(1) == 1 else None
    if ext is None:
        return x.argmax(dim=-1)
    return ext.row_argmax(x)
