"""Weight-only quantization at batch 1: decode speed and accuracy of each linear-weight format,
against llama.cpp on the model's own Q4_1 GGUF file.

For float32, bfloat16, int8 (float32 and bfloat16 activations) and int4 (bfloat16): the greedy
batch-1 decode rate with the prefill excluded (128 new tokens after a 128-token prompt, best of
`REPEATS` runs) and the perplexity of held-out real text (the King James books
kept out of the kNN-LM datastores, `kjv:heldout`, in disjoint windows of `--window` tokens,
`--tokens` scored positions). `--llamacpp` adds llama.cpp (llama-cpp-python from its own venv,
`make bench-peers-llamacpp`) on the GGUF file the default model is converted from, timed and
scored the same way on the same token ids.

    python bench/quantization.py [--tokens 8192] [--window 512] [--llamacpp] [--plot DIR]

Prints one JSON line; progress goes to stderr. `--plot` writes DIR/quantization.png (decode rate
against perplexity, one point per format) and DIR/quantization.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import torch  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from bench.shapes import THROUGHPUT, random_prompts  # noqa: E402
from bench.throughput import decode_rate, run_engine  # noqa: E402
from engine.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.loader import embedded_gguf, resolve_model_dir  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from retrieval.corpus import read_corpus, tokenize_corpora  # noqa: E402
from retrieval.perplexity import evaluate_perplexity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FORMATS = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"),
           ("bfloat16", "int8"), ("bfloat16", "int4")]
CORPUS = "kjv:heldout"
MAX_NEW = 128
REPEATS = 5
"""Decode rates are the best of this many timed runs, for the engine and llama.cpp alike (the
2-core machine this was written on varies by 20% and more from run to run)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(model_dir: Path, dtype: str, quantization: str, prompt: list[int], window: int,
            tokens: int) -> dict:
    engine = Engine(EngineConfig(model=ModelConfig(model=str(model_dir), dtype=dtype,
                                                   quantization=quantization),
                                 cache=CacheConfig(enable_prefix_caching=False)))
    run_engine(engine, [prompt], 8)  # warm-up
    rate = decode_rate(lambda n: run_engine(engine, [prompt], n)[0], MAX_NEW, REPEATS)
    result = evaluate_perplexity(engine, [CORPUS], window=window, stride=window,
                                 max_tokens=tokens, show_progress=False)[0]
    weight_bytes = sum(b.numel() * b.element_size()
                       for m in engine.runner.model.modules() if hasattr(m, "in_features")
                       for b in m.buffers(recurse=False) if b.dtype in (torch.int8, torch.uint8))
    return {"dtype": dtype, "quantization": quantization,
            "batch1_tokens_per_s": round(rate, 1), "ppl": round(result["ppl"], 4),
            "scored_tokens": result["tokens"],
            "quantized_weight_mb": round(weight_bytes / 2**20, 1) if weight_bytes else None}


def run_llamacpp(model_dir: Path, prompt: list[int], window: int, tokens: int,
                 threads: int) -> dict | None:
    python = REPO / ".venv-llamacpp" / "bin" / "python"
    if not python.exists():
        log("llama.cpp peer skipped: run `make bench-peers-llamacpp` first")
        return None
    corpus = tokenize_corpora([read_corpus(CORPUS)], Tokenizer(model_dir).encode, window, window,
                              tokens)
    windows = [{"tokens": corpus.prompt(w), "score_from": w.score_from - w.start,
                "targets": corpus.targets(w)} for w in corpus.windows]
    task = {"gguf": str(embedded_gguf()), "threads": threads, "prompt": prompt,
            "max_new_tokens": MAX_NEW, "repeats": REPEATS, "windows": windows}
    out = run_peer(python, task)
    if out.returncode < 0:
        # Killed by a signal: llama.cpp's AMX weight layout faults on some AMX VMs (a general
        # protection fault in ldtilecfg). Its plain CPU buffers are the fallback, said so in
        # the record ("extra_bufts": false).
        log(f"llama.cpp peer died by signal {-out.returncode}; again without its extra buffer "
            f"types (AMX / repacked layouts)")
        out = run_peer(python, {**task, "extra_bufts": False})
    if out.returncode != 0:
        log(f"llama.cpp peer failed ({out.returncode}): {out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_peer(python: Path, task: dict) -> subprocess.CompletedProcess:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(task, f)
        f.flush()
        return subprocess.run([str(python), str(REPO / "bench/peers/llamacpp_q4.py"), f.name],
                              capture_output=True, text=True)


def plot(rows: list[dict], peer: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for r in rows:
        label = r["dtype"] if r["quantization"] == "none" else \
            f"{r['quantization']} ({r['dtype']} activations)"
        ax.scatter(r["batch1_tokens_per_s"], r["ppl"], s=40)
        ax.annotate(label, (r["batch1_tokens_per_s"], r["ppl"]), fontsize=8,
                    textcoords="offset points", xytext=(5, 4))
    if peer:
        ax.scatter(peer["batch1_tokens_per_s"], peer["ppl"], marker="x", color="black", s=50)
        ax.annotate("llama.cpp Q4_1", (peer["batch1_tokens_per_s"], peer["ppl"]), fontsize=8,
                    textcoords="offset points", xytext=(5, -10))
    ax.set_xlabel("batch-1 decode tokens/s (higher is better)")
    ax.set_ylabel(f"perplexity, {CORPUS} (lower is better)")
    ax.set_title("Weight formats at batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192, help="scored positions of held-out text")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--llamacpp", action="store_true", help="also run llama.cpp on the GGUF")
    ap.add_argument("--plot", default=None, metavar="DIR")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    prompt = random_prompts(1, THROUGHPUT["batch1_prompt_len"], THROUGHPUT["batch1_prompt_len"],
                            seed=1)[0]
    rows = []
    for dtype, quantization in FORMATS:
        rows.append(measure(model_dir, dtype, quantization, prompt, args.window, args.tokens))
        log(json.dumps(rows[-1]))
    record = {"bench": "quantization", "model": model_dir.name, "corpus": CORPUS,
              "window": args.window, "rows": rows}
    if args.llamacpp and args.model is None:
        peer = record["llamacpp"] = run_llamacpp(model_dir, prompt, args.window, args.tokens,
                                                 args.threads)
        if peer:
            int4 = next(r for r in rows if r["quantization"] == "int4")
            record["int4_vs_llamacpp_q4_1"] = round(
                int4["batch1_tokens_per_s"] / peer["batch1_tokens_per_s"], 2)
    if args.plot:
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        plot(rows, record.get("llamacpp"), out / "quantization.png")
    record["machine"] = machine()
    if args.plot:
        (out / "quantization.json").write_text(json.dumps(record, indent=1))
    emit(record)


if __name__ == "__main__":
    main()
