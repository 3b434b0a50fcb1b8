"""Offline throughput: polydecode vs Hugging Face transformers `generate` (same prompts, same run).

Workload (bench/shapes.py THROUGHPUT): 32 prompts of 16-256 random tokens, 128 new tokens each
with ignore-eos, greedy, float32 by default. Also batch-1 decode speed for both, and the floor
set by the model's linear layers alone (every GEMM of one decode step at M = batch size, timed
with the engine's own weights), which no engine running those GEMMs can beat.

    python bench/throughput.py [--dtype float32] [--threads 2] [--skip-hf] [--vllm]
                               [--repeats 3]

Every engine's batched rate is the best of `--repeats` timed calls (after one warm-up
call), so one slow call on a shared machine does not decide a ratio.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import torch  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from bench.shapes import THROUGHPUT, random_prompts  # noqa: E402
from engine.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.kernels import decode_stack  # noqa: E402
from engine.layers.packed_linear import PackedLinear  # noqa: E402
from engine.loader import resolve_model_dir  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_engine(engine: Engine, prompts: list[list[int]], max_new: int | list[int]
               ) -> tuple[float, int]:
    """Greedy, ignore-eos generation of `max_new` tokens (one count, or one per prompt)."""
    lengths = max_new if isinstance(max_new, list) else [max_new] * len(prompts)
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
              for n in lengths]
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.token_ids) for o in outs)


def run_hf(model, prompts: list[list[int]], max_new: int, pad_id: int) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    return elapsed, (out.shape[1] - width) * len(prompts)


def decode_rate(run, max_new: int, repeats: int = 2) -> float:
    """Batch-1 decode tokens/s with the prefill excluded: (N - 1) / (t(N) - t(1)), best of
    `repeats` (the definition the vLLM peer script uses too)."""
    best = min(run(max_new) - run(1) for _ in range(repeats))
    return (max_new - 1) / best


def linear_floor(engine: Engine, batch: int, repeats: int = 5) -> float:
    """Tokens/s if a decode step cost only its GEMMs (all layers + LM head) at M = batch,
    run with the engine's own weights: prepacked ones timed in C++ (no Python between the
    products, as in the engine's decode stack), others through their modules."""
    linears = [m for m in engine.runner.model.modules() if hasattr(m, "in_features")]
    xs = {m.in_features: torch.randn(batch, m.in_features, dtype=engine.runner.dtype)
          for m in linears}
    with torch.inference_mode():
        operands = [m.stack_operands() for m in linears if isinstance(m, PackedLinear)]
        kinds = {kind for kind, _ in operands}
        if len(operands) == len(linears) and len(kinds) == 1:
            seconds = decode_stack.linears_seconds(
                [xs[m.in_features] for m in linears], [w for _, (w, _) in operands],
                [aux for _, (_, aux) in operands], kinds.pop(), repeats)
            if seconds is not None:
                return batch / seconds
        for m in linears:
            m(xs[m.in_features])
        start = time.perf_counter()
        for _ in range(repeats):
            for m in linears:
                m(xs[m.in_features])
        per_step = (time.perf_counter() - start) / repeats
    return batch / per_step


def run_vllm(model_dir: Path, prompts: list[list[int]], max_new: int, dtype: str,
             repeats: int = 1) -> dict | None:
    python = REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p in prompts:
            f.write(json.dumps({"prompt_token_ids": p}) + "\n")
    cmd = [str(python), str(REPO / "bench" / "peers" / "vllm_cpu.py"), "--model", str(model_dir),
           "--prompts", f.name, "--max-new-tokens", str(max_new), "--dtype", dtype, "--batch-1",
           "--repeats", str(repeats)]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get(
        "VLLM_CPU_OMP_THREADS_BIND", "0-1"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=THROUGHPUT["num_prompts"])
    ap.add_argument("--max-new-tokens", type=int, default=THROUGHPUT["max_new_tokens"])
    ap.add_argument("--skip-hf", action="store_true", help="do not run the HF peer")
    ap.add_argument("--vllm", action="store_true", help="also run vLLM-CPU (make bench-peers)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed batched calls per engine (polydecode, HF, vLLM); best kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    prompts = random_prompts(args.num_prompts, THROUGHPUT["min_len"], THROUGHPUT["max_len"])
    batch1 = random_prompts(1, THROUGHPUT["batch1_prompt_len"], THROUGHPUT["batch1_prompt_len"],
                            seed=1)
    max_new = args.max_new_tokens
    engine = Engine(EngineConfig(model=ModelConfig(model=str(model_dir), dtype=args.dtype,
                                                   quantization=args.quantization),
                                 cache=CacheConfig(enable_prefix_caching=False)))
    run_engine(engine, prompts[:4], 8)  # warm-up: allocator, oneDNN kernel selection
    elapsed, n_out = min(run_engine(engine, prompts, max_new) for _ in range(args.repeats))
    b1_rate = decode_rate(lambda n: run_engine(engine, batch1, n)[0], max_new)
    record = {
        "bench": "throughput", "model": model_dir.name, "dtype": args.dtype,
        "quantization": args.quantization,
        "num_prompts": len(prompts), "max_new_tokens": max_new, "repeats": args.repeats,
        "engine_output_tokens_per_s": round(n_out / elapsed, 1),
        "engine_batch1_tokens_per_s": round(b1_rate, 1),
        "linear_floor_tokens_per_s": round(linear_floor(engine, len(prompts)), 1),
        "linear_floor_batch1_tokens_per_s": round(linear_floor(engine, 1), 1),
    }
    del engine
    if not args.skip_hf:
        record.update(_hf_record(model_dir, prompts, batch1, max_new, args.dtype, record,
                                 args.repeats))
    if args.vllm:
        record["vllm"] = run_vllm(model_dir, prompts, max_new, args.dtype, args.repeats)
        _add_ratio(record, "vs_vllm", record["vllm"] or {}, "output_tokens_per_s")
    record["machine"] = machine()
    emit(record)


def _hf_record(model_dir, prompts, batch1, max_new, dtype, record, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    run_hf(hf, prompts[:4], 8, pad)  # warm-up
    elapsed, n_out = min(run_hf(hf, prompts, max_new, pad) for _ in range(repeats))
    hf_tps = n_out / elapsed
    hf_b1 = decode_rate(lambda n: run_hf(hf, batch1, n, pad)[0], max_new)
    return {"hf_output_tokens_per_s": round(hf_tps, 1),
            "hf_batch1_tokens_per_s": round(hf_b1, 1),
            "ratio_vs_hf": round(record["engine_output_tokens_per_s"] / hf_tps, 2),
            "ratio_batch1_vs_hf": round(record["engine_batch1_tokens_per_s"] / hf_b1, 2)}


def _add_ratio(record: dict, key: str, peer: dict, field: str) -> None:
    if peer.get(field):
        record[key] = round(record["engine_output_tokens_per_s"] / peer[field], 2)


if __name__ == "__main__":
    main()
