"""The CPU kernels against the torch code they replace, on SmolLM2-135M's decode shapes.

Per decode step of the 30-layer model at batch `--batch` (32), float32 and bfloat16, 2 threads:
- attention: the C++ paged decode kernel vs the torch path it replaced (gather the context
  with index_select, then scaled_dot_product_attention with a padding mask), 32 sequences of
  16-384 tokens over shuffled blocks;
- prefill attention: the prompts of one step (`--batch` prompts of 16-256 tokens, ~4300
  tokens), each token a row of the same paged kernel over its own prefix, vs torch's SDPA
  (causal, grouped-query) per prompt, 30 layers;
- layer ops: the three C++ per-layer ops (RMSNorm + residual twice, RoPE + cache write,
  SiLU-gate) vs their torch formulas (`engine/kernels/layer_ops/reference.py`);
- linears: the engine's prepacked linear layers (`PackedLinear`: float32 panels for the C++
  panel kernel where the CPU has AVX-512, oneDNN's layout otherwise) vs `F.linear` on the same
  weights (the 7 GEMMs of a layer x 30, plus the LM head), weights cycled through memory as in
  a real step;
- linears vs oneDNN: the same `PackedLinear`s vs oneDNN's prepacked product on the same weights
  (in bfloat16 both are oneDNN's: a ratio of about 1).

    python bench/cpu_kernels.py [--batch 32] [--repeats 20]

Prints one JSON line: ms per step for each pair and the speedup ratio (torch / ours).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from engine.kernels import layer_ops  # noqa: E402
from engine.kernels.layer_ops.reference import (add_rms_norm_reference,  # noqa: E402
                                                rotary_store_reference, silu_and_mul_reference)
from engine.kernels.paged_attention import paged_decode_attention  # noqa: E402
from engine.layers.packed_linear import PackedLinear  # noqa: E402
from engine.layers.rotary import RotaryEmbedding  # noqa: E402

LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, D, VOCAB, BLOCK = 30, 576, 1536, 9, 3, 64, 49152, 16


def per_step(fn, repeats: int) -> float:
    """ms of one call of `fn` (which runs one whole step), best of `repeats`."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def attention_pair(batch: int, dtype, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(16, 385, (batch,), generator=g)
    max_blocks = int((lens.max() + BLOCK - 1) // BLOCK)
    num_blocks = batch * max_blocks + 1
    caches = [(torch.randn(num_blocks, BLOCK, KV_HEADS, D, generator=g).to(dtype),
               torch.randn(num_blocks, BLOCK, KV_HEADS, D, generator=g).to(dtype))
              for _ in range(LAYERS)]
    tables = torch.randperm(num_blocks - 1, generator=g)[:batch * max_blocks].view(batch, -1)
    q = torch.randn(batch, HEADS, D, generator=g).to(dtype)
    width = max_blocks * BLOCK
    pos = torch.arange(width)
    slots = (tables[:, pos // BLOCK] * BLOCK + pos % BLOCK).flatten()
    mask = (pos[None, :] < lens[:, None])[:, None, None, :]

    def ours():
        for k, v in caches:
            paged_decode_attention(q, k, v, tables, lens, D ** -0.5, check_bounds=False)

    def torch_path():
        qg = q.view(batch, KV_HEADS, HEADS // KV_HEADS, D)
        for k, v in caches:
            shape = (batch, width, KV_HEADS, D)
            kk = k.view(-1, KV_HEADS, D).index_select(0, slots).view(shape).transpose(1, 2)
            vv = v.view(-1, KV_HEADS, D).index_select(0, slots).view(shape).transpose(1, 2)
            F.scaled_dot_product_attention(qg, kk, vv, attn_mask=mask, scale=D ** -0.5)
    return per_step(ours, repeats), per_step(torch_path, repeats)


def prefill_attention_pair(batch: int, dtype, repeats: int) -> tuple[float, float]:
    """The prompts of a step (`batch` prompts of 16-256 tokens, one layer's cache each of 30
    layers): every token a row of the paged kernel over its prefix vs torch SDPA (causal,
    GQA) per prompt, as the engine ran prompts before."""
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 257, (batch,), generator=g).tolist()
    blocks = [(n + BLOCK - 1) // BLOCK for n in lens]
    num_blocks = sum(blocks) + 1
    caches = [(torch.randn(num_blocks, BLOCK, KV_HEADS, D, generator=g).to(dtype),
               torch.randn(num_blocks, BLOCK, KV_HEADS, D, generator=g).to(dtype))
              for _ in range(LAYERS)]
    order = torch.randperm(num_blocks - 1, generator=g).tolist()
    tables, at = [], 0
    for n in blocks:
        tables.append(order[at:at + n])
        at += n
    width = max(blocks)
    rows = torch.tensor([t + [0] * (width - len(t)) for t, n in zip(tables, lens)
                         for _ in range(n)])
    context = torch.cat([torch.arange(1, n + 1) for n in lens])
    q = torch.randn(sum(lens), HEADS, D, generator=g).to(dtype)
    slots = [torch.tensor(t)[:, None] * BLOCK + torch.arange(BLOCK) for t in tables]
    slots = [s.flatten()[:n] for s, n in zip(slots, lens)]
    starts = [0] + torch.tensor(lens).cumsum(0).tolist()

    def ours():
        for k, v in caches:
            paged_decode_attention(q, k, v, rows, context, D ** -0.5, check_bounds=False)

    def torch_path():
        for k, v in caches:
            flat_k, flat_v = k.view(-1, KV_HEADS, D), v.view(-1, KV_HEADS, D)
            for i, s in enumerate(slots):
                qq = q[starts[i]:starts[i + 1]].transpose(0, 1).unsqueeze(0)
                kk = flat_k.index_select(0, s).transpose(0, 1).unsqueeze(0)
                vv = flat_v.index_select(0, s).transpose(0, 1).unsqueeze(0)
                F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=D ** -0.5,
                                               enable_gqa=True)
    return per_step(ours, repeats), per_step(torch_path, repeats)


def layer_ops_pair(batch: int, dtype, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(1)
    x, res = (torch.randn(batch, HIDDEN, generator=g).to(dtype) for _ in range(2))
    w = torch.rand(HIDDEN, generator=g).to(dtype) + 0.5
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * D, generator=g).to(dtype)
    cos, sin = RotaryEmbedding(D, 2048, 10000.0).lookup(torch.randint(0, 2048, (batch,)), dtype)
    k_cache, v_cache = (torch.zeros(batch, BLOCK, KV_HEADS, D, dtype=dtype) for _ in range(2))
    slots = torch.arange(batch) * BLOCK
    gate_up = torch.randn(batch, 2 * INTER, generator=g).to(dtype)
    ext = layer_ops.load_extension()

    def ours():
        for _ in range(LAYERS):
            ext.add_rms_norm(x, res, w, 1e-5, 1.0)
            ext.add_rms_norm(x, res, w, 1e-5, 1.0)
            ext.rotary_store(qkv, cos, sin, k_cache, v_cache, slots, HEADS, KV_HEADS)
            ext.silu_and_mul(gate_up)

    def torch_path():
        for _ in range(LAYERS):
            add_rms_norm_reference(x, res, w, 1e-5)
            add_rms_norm_reference(x, res, w, 1e-5)
            rotary_store_reference(qkv, cos, sin, k_cache, v_cache, slots, HEADS, KV_HEADS)
            silu_and_mul_reference(gate_up)
    return per_step(ours, repeats), per_step(torch_path, repeats)


def step_linears(batch: int, dtype):
    """A step's linears (7 GEMMs of a layer x 30, plus the LM head), each with its own weights:
    (plain linears, their `PackedLinear`s, inputs by in_features)."""
    shapes = [(HIDDEN, (HEADS + 2 * KV_HEADS) * D), (HEADS * D, HIDDEN), (HIDDEN, 2 * INTER),
              (INTER, HIDDEN)] * LAYERS + [(HIDDEN, VOCAB)]
    linears = [torch.nn.Linear(i, o, bias=False).to(dtype) for i, o in shapes]
    packed = [PackedLinear(lin, batch_hint=32) for lin in linears]
    return linears, packed, {i: torch.randn(batch, i).to(dtype) for i, _ in shapes}


def linear_pair(batch: int, dtype, repeats: int) -> tuple[float, float]:
    linears, packed, inputs = step_linears(batch, dtype)
    with torch.inference_mode():
        ours = per_step(lambda: [p(inputs[p.in_features]) for p in packed], repeats)
        plain = per_step(lambda: [F.linear(inputs[lin.in_features], lin.weight)
                                  for lin in linears], repeats)
    return ours, plain


def onednn_linear_pair(batch: int, dtype, repeats: int) -> tuple[float, float]:
    linears, packed, inputs = step_linears(batch, dtype)
    onednn = [torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), 32)
              for lin in linears]
    with torch.inference_mode():
        ours = per_step(lambda: [p(inputs[p.in_features]) for p in packed], repeats)
        theirs = per_step(lambda: [
            torch.ops.mkldnn._linear_pointwise(inputs[lin.in_features], w, None, "none", [], "")
            for lin, w in zip(linears, onednn)], repeats)
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, pair in (("attention", attention_pair),
                           ("prefill attention", prefill_attention_pair),
                           ("layer ops", layer_ops_pair), ("linears", linear_pair),
                           ("linears vs oneDNN", onednn_linear_pair)):
            ours, theirs = pair(args.batch, dtype, args.repeats)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "kernel": name,
                         "ours_ms_per_step": round(ours, 2), "torch_ms_per_step": round(theirs, 2),
                         "speedup": round(theirs / ours, 2)})
            print(f"{rows[-1]['dtype']:>9} {name:>17}: {ours:7.2f} ms vs torch {theirs:7.2f} ms"
                  f"  ({theirs / ours:.2f}x)", file=sys.stderr)
    emit({"bench": "cpu_kernels", "batch": args.batch, "rows": rows, "machine": machine()})


if __name__ == "__main__":
    main()
