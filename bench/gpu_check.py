"""GPU check of the Triton path: kernel parity at realistic shapes, the engine against HF
transformers, and timings against torch with the decode step's HBM roofline.

    python bench/gpu_check.py [--out DIR] [--small]

Sections (each prints one JSON line; all of them land in DIR/gpu_check.json):
- kernels: varlen paged attention (SmolLM2's 9/3 heads and GPT-2's 12/12, head dim 64; decode,
  prefill and split-KV; sequence lengths up to 2048 over tens of thousands of shuffled blocks)
  in float16 and bfloat16 against torch SDPA on the gathered context in float32; lightning
  prefill / decode against the torch chunked and recurrent forms; fused add + norm.
- engine: random-weight SmolLM2-shaped Llama and GPT-2 small vs HF `generate` on the same
  weights and device (float32, TF32 off: greedy token-exact) and in bfloat16 (first-token
  agreement); TransNormerLLM on the GPU vs the engine's CPU path (its oracle-tested reference).
- timings (`triton.testing.do_bench`): paged decode and prefill vs SDPA on pre-gathered K/V (the
  gather not counted), lightning prefill / decode vs torch, engine decode step at batch 64 vs the
  HBM roofline (weights + KV read once per step), engine throughput vs HF `generate`.

Without a GPU (or with --small) every section runs at toy sizes on the CPU (kernels under the
Triton interpreter, timings by wall clock): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
BLOCK_SIZE = 16


def bench_ms(fn, small: bool) -> float:
    if small:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def paged_case(lens, q_lens, hq, hkv, d, dtype, num_blocks, device, seed=0):
    """Shuffled block tables over a large cache, random K/V and queries."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).to(device, dtype)
    order = torch.randperm(num_blocks, generator=gen)
    blocks = [-(-n // BLOCK_SIZE) for n in lens]
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = order[used:used + n]
        used += n
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(device, dtype)
    q_starts = torch.tensor([0] + q_lens).cumsum(0).to(device, torch.int32)
    return q, k, v, tables.to(device), torch.tensor(lens, dtype=torch.int32).to(device), q_starts


def sdpa_reference(q, k, v, tables, lens, q_starts, scale):
    """float32 SDPA per sequence on its gathered context (causal at the sequence's end)."""
    import torch.nn.functional as F

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    hkv, d = k.shape[2], k.shape[3]
    for b in range(lens.shape[0]):
        first, last, n = int(q_starts[b]), int(q_starts[b + 1]), int(lens[b])
        keys = torch.arange(n, device=q.device)
        slots = tables[b].long()[keys // BLOCK_SIZE] * BLOCK_SIZE + keys % BLOCK_SIZE
        kb = k.view(-1, hkv, d)[slots].float().transpose(0, 1)[None]
        vb = v.view(-1, hkv, d)[slots].float().transpose(0, 1)[None]
        qb = q[first:last].float().transpose(0, 1)[None]
        mask = keys[None, :] <= (keys[n - (last - first):])[:, None]
        out[first:last] = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=True)[0].transpose(0, 1)
    return out


def check_kernels(device, small: bool) -> dict:
    from engine.kernels.paged_attention import paged_attention

    tolerance = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
    lens = [1, 9, 33] if small else [1, 17, 300, 1024, 2048, 2047, 513, 64]
    prefill = [1, 9, 20] if small else [1, 17, 300, 512, 64, 2048, 1, 64]
    num_blocks = 64 if small else 40000
    rows = []
    for hq, hkv in ((9, 3), (12, 12)):
        for dtype in (torch.float16, torch.bfloat16):
            for mode, q_lens, splits in (("decode", [1] * len(lens), 1), ("prefill", prefill, 1),
                                         ("decode_split", [1] * len(lens), 4)):
                case = paged_case(lens, q_lens, hq, hkv, 64, dtype, num_blocks, device)
                out = paged_attention(*case, 0.125, max(q_lens), num_splits=splits)
                err = (out.float() - sdpa_reference(*case, 0.125)).abs().max().item()
                rows.append({"op": "paged_attention", "mode": mode, "heads": [hq, hkv],
                             "dtype": str(dtype)[6:], "max_abs_err": err,
                             "ok": err <= tolerance[dtype]})
    rows += lightning_parity(device, small) + add_norm_parity(device, small)
    return {"all_ok": all(r["ok"] for r in rows), "cases": rows}


def lightning_parity(device, small: bool) -> list[dict]:
    from engine.kernels.linear_attention import linear_decode, linear_prefill
    from engine.layers import linear_attention as la

    rows = []
    heads, dim = (2, 32) if small else (8, 128)
    seq = [40, 70] if small else [1000, 2048, 5]
    for dtype in (torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(1)
        q, k = (torch.randn(sum(seq), heads, dim, generator=gen) * dim ** -0.5 for _ in "qk")
        v = torch.randn(sum(seq), heads, dim, generator=gen)
        q, k, v = (t.to(device, dtype) for t in (q, k, v))
        s = la.decay_rates(heads, 0, 4).to(device)
        pool = torch.zeros(len(seq), heads, dim, dim, device=device)
        q_starts = torch.tensor([0] + seq).cumsum(0).to(device)
        out = linear_prefill(q, k, v, s, pool, q_starts, torch.arange(len(seq), device=device))
        expected, states = [], []
        for b in range(len(seq)):
            rows_b = slice(int(q_starts[b]), int(q_starts[b + 1]))
            o, st = la.chunked_prefill(*(t[rows_b].transpose(0, 1) for t in (q, k, v)), s,
                                       torch.zeros(heads, dim, dim, device=device))
            expected.append(o.transpose(0, 1))
            states.append(st)
        scale = max(1.0, torch.cat(expected).abs().max().item())
        err = (out - torch.cat(expected)).abs().max().item() / scale
        step = linear_decode(q[:len(seq)], k[:len(seq)], v[:len(seq)], s, pool,
                             torch.arange(len(seq), device=device))
        ref_step, _ = la.recurrent_step(q[:len(seq)], k[:len(seq)], v[:len(seq)], s,
                                        torch.stack(states))
        err_step = (step - ref_step).abs().max().item() / scale
        rows.append({"op": "lightning", "dtype": str(dtype)[6:], "prefill_rel_err": err,
                     "decode_rel_err": err_step, "ok": max(err, err_step) <= 1e-3})
    return rows


def add_norm_parity(device, small: bool) -> list[dict]:
    from engine.kernels.fused_add_norm import fused_add_norm
    from engine.kernels.fused_add_norm.cpu import fused_add_norm_torch

    rows = []
    for hidden, kind in ((576, "rms"), (768, "layer")):
        x = torch.randn(8 if small else 4096, hidden, device=device, dtype=torch.bfloat16)
        res = torch.randn_like(x) * 4
        w = torch.rand(hidden, device=device, dtype=torch.bfloat16) + 0.5
        b = torch.randn(hidden, device=device, dtype=torch.bfloat16) * 0.1
        bias = b if kind == "layer" else None
        out, h = fused_add_norm(x, res, w, bias, 1e-5, kind, 0.5)
        ref, ref_h = fused_add_norm_torch(x, res, w, bias, 1e-5, kind, 0.5)
        err = max((out.float() - ref.float()).abs().max().item(),
                  (h.float() - ref_h.float()).abs().max().item())
        rows.append({"op": "fused_add_norm", "kind": kind, "hidden": hidden,
                     "max_abs_err": err, "ok": err <= 0.1})
    return rows


def llama_dir(path: Path, small: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.families import _copy_tokenizer

    torch.manual_seed(0)
    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2) if small else \
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)
    cfg = LlamaConfig(vocab_size=49152, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    LlamaForCausalLM(cfg).save_pretrained(path)
    _copy_tokenizer(path)
    return path


def make_engine(path: Path, device, dtype: str, **cache):
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from engine.engine import Engine

    return Engine(EngineConfig(model=ModelConfig(model=str(path), dtype=dtype, device=str(device)),
                               cache=CacheConfig(**cache),
                               scheduler=SchedulerConfig(max_num_seqs=64,
                                                         max_num_batched_tokens=8192)))


def greedy(engine, prompts, max_new: int):
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompts, params)]


def hf_greedy(model, prompts, max_new: int, device):
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, pad_token_id=2)
            outs.append(out[0, len(p):].tolist())
    return outs


def compare(name, engine_tokens, expected) -> dict:
    exact = sum(a == b for a, b in zip(engine_tokens, expected))
    first = sum(a[:1] == b[:1] for a, b in zip(engine_tokens, expected))
    return {"model": name, "prompts": len(expected), "token_exact": exact,
            "first_token_equal": first}


def check_engine(device, small: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from bench.families import write_gpt2, write_transnormer
    from bench.shapes import random_prompts

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prompts = random_prompts(4 if small else 8, 5, 40 if small else 300, seed=3)
    max_new = 8 if small else 32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llama = llama_dir(root / "llama", small)
        write_gpt2(root / "gpt2", ln_free=False)
        write_transnormer(root / "tnl")
        for name, path in (("smollm2-shaped", llama), ("gpt2", root / "gpt2")):
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
            expected = hf_greedy(hf, prompts, max_new, device)
            rows.append(compare(f"{name} float32", greedy(
                make_engine(path, device, "float32"), prompts, max_new), expected))
            hf = hf.to(torch.bfloat16)
            rows.append(compare(f"{name} bfloat16", greedy(
                make_engine(path, device, "bfloat16"), prompts, max_new),
                hf_greedy(hf, prompts, max_new, device)))
            del hf
        tnl = root / "tnl"
        rows.append(compare("transnormer float32 (vs the CPU path)", greedy(
            make_engine(tnl, device, "float32"), prompts[:4], max_new),
            greedy(make_engine(tnl, "cpu", "float32", num_blocks=8), prompts[:4], max_new)))
    return {"cases": rows}


def roofline(engine, batch: int, context: int, step_ms: float) -> dict:
    cfg = engine.runner.config
    elem = torch.finfo(engine.runner.dtype).bits // 8
    weights = sum(p.numel() for p in engine.runner.model.parameters()) * elem
    kv = 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * cfg.head_dim * elem
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    bandwidth = next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)
    floor_ms = (weights + kv) / bandwidth * 1e3 if bandwidth else None
    return {"batch": batch, "context": context, "weight_bytes": weights, "kv_bytes": kv,
            "step_ms": step_ms, "roofline_ms": floor_ms,
            "fraction_of_roofline": floor_ms / step_ms if floor_ms else None}


def decode_step_ms(engine, batch: int, context: int) -> float:
    """Mean engine step time once `batch` requests of `context` tokens are all decoding."""
    from bench.shapes import random_prompts
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=64, temperature=0.0, ignore_eos=True)
    for p in random_prompts(batch, context, context, seed=5):
        engine.add_request(engine.make_request(p, params))
    for _ in range(4):  # prefill, then a few decode steps of warm-up
        engine.step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start, steps = time.perf_counter(), 16
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = (time.perf_counter() - start) / steps * 1e3
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def check_timings(device, small: bool) -> dict:
    import torch.nn.functional as F

    from bench.shapes import random_prompts
    from engine.kernels.linear_attention import linear_decode, linear_prefill
    from engine.kernels.linear_attention.cpu import linear_decode_torch
    from engine.kernels.paged_attention import paged_attention
    from engine.layers import linear_attention as la

    dtype = torch.bfloat16
    out: dict = {}
    batch, context = (4, 64) if small else (64, 1024)
    q, k, v, tables, lens, q_starts = paged_case([context] * batch, [1] * batch, 9, 3, 64, dtype,
                                                 batch * context // BLOCK_SIZE + 8, device)
    gathered = [sdpa_inputs(k, v, tables, lens)]
    q4 = q[:, :, None, :]
    triton_ms = bench_ms(lambda: paged_attention(q, k, v, tables, lens, q_starts, 0.125, 1,
                                                 check_bounds=False), small)
    sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(
        q4, *gathered[0], scale=0.125, enable_gqa=True), small)
    out["paged_decode"] = {"batch": batch, "context": context, "triton_ms": triton_ms,
                           "sdpa_gathered_ms": sdpa_ms, "ratio": triton_ms / sdpa_ms}
    seqs, n = (2, 32) if small else (4, 512)
    q, k, v, tables, lens, q_starts = paged_case([n] * seqs, [n] * seqs, 9, 3, 64, dtype,
                                                 seqs * n // BLOCK_SIZE + 8, device)
    kb, vb = sdpa_inputs(k, v, tables, lens)
    qb = q.view(seqs, n, 9, 64).transpose(1, 2)
    triton_ms = bench_ms(lambda: paged_attention(q, k, v, tables, lens, q_starts, 0.125, n,
                                                 check_bounds=False), small)
    sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(
        qb, kb, vb, is_causal=True, scale=0.125, enable_gqa=True), small)
    out["paged_prefill"] = {"seqs": seqs, "tokens": n, "triton_ms": triton_ms,
                            "sdpa_gathered_ms": sdpa_ms, "ratio": triton_ms / sdpa_ms}
    heads, dim, seqs, n = (2, 32, 2, 64) if small else (8, 128, 4, 2048)
    q, k, v = (torch.randn(seqs * n, heads, dim, device=device, dtype=dtype) * 0.1 for _ in "qkv")
    s = la.decay_rates(heads, 0, 4).to(device)
    pool = torch.zeros(max(seqs, batch), heads, dim, dim, device=device)
    starts = torch.arange(seqs + 1, device=device) * n
    slots = torch.arange(seqs, device=device)
    per_seq = [t.view(seqs, n, heads, dim).transpose(1, 2) for t in (q, k, v)]
    triton_ms = bench_ms(lambda: linear_prefill(q, k, v, s, pool, starts, slots), small)
    torch_ms = bench_ms(lambda: [la.chunked_prefill(per_seq[0][b], per_seq[1][b], per_seq[2][b],
                                                    s, pool[b]) for b in range(seqs)], small)
    out["lightning_prefill"] = {"seqs": seqs, "tokens": n, "triton_ms": triton_ms,
                                "torch_ms": torch_ms, "speedup": torch_ms / triton_ms}
    qd, kd, vd = q[:batch], k[:batch], v[:batch]
    decode_slots = torch.arange(batch, device=device)
    triton_ms = bench_ms(lambda: linear_decode(qd, kd, vd, s, pool, decode_slots), small)
    torch_ms = bench_ms(lambda: linear_decode_torch(qd, kd, vd, s, pool, decode_slots), small)
    out["lightning_decode"] = {"batch": batch, "triton_ms": triton_ms, "torch_ms": torch_ms,
                               "speedup": torch_ms / triton_ms}
    out.update(engine_timings(device, small, random_prompts))
    return out


def sdpa_inputs(k, v, tables, lens):
    """Pre-gathered [B, kv_heads, L, d] K and V (equal lengths): SDPA's input, built once."""
    hkv, d = k.shape[2], k.shape[3]
    n = int(lens[0])
    keys = torch.arange(n, device=k.device)
    slots = tables.long()[:, keys // BLOCK_SIZE] * BLOCK_SIZE + keys % BLOCK_SIZE   # [B, L]
    return (k.view(-1, hkv, d)[slots].transpose(1, 2).contiguous(),
            v.view(-1, hkv, d)[slots].transpose(1, 2).contiguous())


def engine_timings(device, small: bool, random_prompts) -> dict:
    from transformers import AutoModelForCausalLM

    from bench.throughput import run_engine

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = llama_dir(Path(tmp) / "llama", small)
        engine = make_engine(path, device, "bfloat16")
        batch, context = (4, 32) if small else (64, 512)
        step_ms = decode_step_ms(engine, batch, context)
        out["engine_decode_step"] = roofline(engine, batch, context, step_ms)
        prompts = random_prompts(8 if small else 64, 16, 64 if small else 256, seed=7)
        max_new = 8 if small else 128
        run_engine(engine, prompts[:4], 4)  # warm-up
        elapsed, tokens = run_engine(engine, prompts, max_new)
        del engine
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        hf_elapsed, hf_tokens = run_hf_on(hf, prompts[:4], 4, device)
        hf_elapsed, hf_tokens = run_hf_on(hf, prompts, max_new, device)
        out["engine_throughput"] = {
            "prompts": len(prompts), "max_new_tokens": max_new,
            "engine_tokens_per_s": tokens / elapsed, "hf_generate_tokens_per_s":
                hf_tokens / hf_elapsed, "ratio": (tokens / elapsed) / (hf_tokens / hf_elapsed)}
    return out


def run_hf_on(model, prompts, max_new: int, device) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=2)
    sync()
    return time.perf_counter() - start, (gen.shape[1] - width) * len(prompts)


SECTIONS = {"kernels": check_kernels, "engine": check_engine, "timings": check_timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu"))
    parser.add_argument("--small", action="store_true", help="toy sizes (the CPU check)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    os.environ["POLYDECODE_KERNEL_BACKEND"] = "triton"
    import triton

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__, "small": small}
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            results[name] = SECTIONS[name](device, small)
        except Exception:  # noqa: BLE001 - one failing section must not lose the others
            results[name] = {"error": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: results[name]}, default=str), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [n for n in args.sections.split(",") if "error" in results[n] or
              not results[n].get("all_ok", True)]
    if failed:
        sys.exit(f"failed sections: {failed}")


if __name__ == "__main__":
    main()
