"""Where a decode step's time goes: the per-step split of the engine at batch 1 and 32, float32
and bfloat16, next to the GEMM floor of the same dtype.

Categories (exclusive wall time per decode step, measured by wrapping the engine's own objects:
forward hooks on modules, wrappers on methods; nothing in the engine changes):
- gemm: every linear layer (q/k/v/o, gate/up/down; packed, int8 or int4) and the LM head;
- attention: the paged-attention layer (KV store + the C++ decode kernel);
  inside the one-call decoder stack (`engine.kernels.decode_stack`), which module hooks cannot
  see into, the stack itself times its GEMMs and attention kernel (the KV store, with RoPE, is
  then in "other model ops");
- other model ops: what else the forward runs (embedding, norms, RoPE, SiLU-gate, residuals);
- input preparation: the model runner's step inputs and attention metadata;
- sampling: the decoding pipeline on the logits (transforms, sampler, strategy bookkeeping);
- output: detokenization, stop checks, deltas;
- scheduler: scheduling and its update after the step;
- engine glue: the rest of `Engine.step` and the model runner's step (Python between the parts).
The GEMM floor is the time of the same GEMMs alone at M = batch (`bench.throughput.linear_floor`,
timed in C++ for prepacked weights).

    python bench/profile.py [--batches 1,32] [--dtypes float32,bfloat16] [--steps 24]
        [--quantization none|int8|int4] [--out DIR]

Prints one JSON line and writes DIR/profile.json and DIR/profile.png (a stacked bar per setting).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import torch  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from bench.shapes import random_prompts  # noqa: E402
from bench.throughput import linear_floor  # noqa: E402
from engine.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.kernels import decode_stack  # noqa: E402
from engine.loader import resolve_model_dir  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.layers.quantize import QUANTIZATIONS  # noqa: E402

CATEGORIES = ("gemm", "attention", "other model ops", "input preparation", "sampling", "output",
              "scheduler", "engine glue")


class Clock:
    """Exclusive time per category: a region's time minus the regions nested in it."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(CATEGORIES, 0.0)
        self._stack: list[list] = []

    def enter(self, category: str) -> None:
        self._stack.append([category, time.perf_counter(), 0.0])

    def exit(self) -> None:
        category, start, nested = self._stack.pop()
        elapsed = time.perf_counter() - start
        self.totals[category] += elapsed - nested
        if self._stack:
            self._stack[-1][2] += elapsed

    def wrap(self, obj, name: str, category: str) -> None:
        method = getattr(obj, name)

        @functools.wraps(method)
        def timed(*args, **kwargs):
            self.enter(category)
            try:
                return method(*args, **kwargs)
            finally:
                self.exit()
        setattr(obj, name, timed)

    def hook(self, module: torch.nn.Module, category: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.enter(category))
        module.register_forward_hook(lambda *_: self.exit())

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)


def instrument(engine: Engine) -> Clock:
    clock = Clock()
    runner, model = engine.runner, engine.runner.model
    clock.wrap(engine, "step", "engine glue")
    for name in ("schedule", "update_from_output"):
        clock.wrap(engine.scheduler, name, "scheduler")
    clock.wrap(runner, "_prepare", "input preparation")
    clock.hook(model, "other model ops")
    clock.wrap(model, "compute_logits", "gemm")
    for module in model.modules():
        kind = type(module).__name__
        if kind in ("Linear", "PackedLinear", "Int8WeightOnlyLinear", "Int4WeightOnlyLinear"):
            clock.hook(module, "gemm")
        elif kind == "PagedAttention":
            clock.hook(module, "attention")
    for name in ("prepare", "step"):
        clock.wrap(engine.generations, name, "sampling")
    for name in ("check_stop", "emit", "finish"):
        clock.wrap(engine.outputs, name, "output")
    return clock


def profile(model_dir: Path, dtype: str, batch: int, steps: int,
            quantization: str = "none") -> dict:
    engine = Engine(EngineConfig(model=ModelConfig(model=str(model_dir), dtype=dtype,
                                                   quantization=quantization),
                                 cache=CacheConfig(enable_prefix_caching=False)))
    params = SamplingParams(max_new_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    engine.generate(random_prompts(4, 16, 64, seed=9), SamplingParams(max_new_tokens=4))
    clock = instrument(engine)
    for prompt in random_prompts(batch, 16, 256, seed=1):
        engine.add_request(engine.make_request(prompt, params))
    for _ in range(4):  # every prompt prefilled (one step each at most), then decode only
        engine.step()
    clock.reset()
    inside = decode_stack.timings = torch.zeros(2, dtype=torch.float64)
    try:
        for _ in range(steps):
            engine.step()
    finally:
        decode_stack.timings = None
    totals = dict(clock.totals)  # the steps that run the requests out are not counted
    gemm, attention = inside.tolist()  # the stack's calls ran under the model's hook
    totals["gemm"] += gemm
    totals["attention"] += attention
    totals["other model ops"] -= gemm + attention
    while engine.has_unfinished_requests():
        engine.step()
    per_step = {k: round(v / steps * 1e3, 3) for k, v in totals.items()}
    total = sum(per_step.values())
    floor_ms = batch / linear_floor(engine, batch) * 1e3
    return {"dtype": dtype, "quantization": quantization, "batch": batch,
            "decode_stack": gemm > 0, "step_ms": round(total, 2),
            "split_ms": per_step,
            "gemm_floor_ms": round(floor_ms, 2), "floor_fraction": round(floor_ms / total, 3)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['dtype']}" + (f" {r['quantization']}" if r["quantization"] != "none" else "")
              + f"\nbatch {r['batch']}" for r in rows]
    fig, axes = plt.subplots(1, len(rows), figsize=(3 * len(rows), 4.5), squeeze=False)
    for ax, row, label in zip(axes[0], rows, labels):
        bottom = 0.0
        for category in CATEGORIES:
            value = row["split_ms"][category]
            ax.bar(0, value, bottom=bottom, label=category)
            bottom += value
        ax.axhline(row["gemm_floor_ms"], color="black", linestyle="--", label="GEMM floor")
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_ylabel("ms per decode step")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quantization", default="none", choices=QUANTIZATIONS)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/profile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    rows = []
    for dtype in args.dtypes.split(","):
        for batch in map(int, args.batches.split(",")):
            rows.append(profile(model_dir, dtype, batch, args.steps, args.quantization))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"bench": "profile", "model": model_dir.name, "steps": args.steps, "rows": rows,
              "machine": machine()}
    (out / "profile.json").write_text(json.dumps(record, indent=1))
    plot(rows, out / "profile.png")
    emit(record)


if __name__ == "__main__":
    main()
