"""llama.cpp on the model's own GGUF file (SmolLM2-135M-Instruct Q4_1), through llama-cpp-python
in its own venv (`make bench-peers-llamacpp`): the batch-1 peer of `bench/quantization.py`.

Reads a JSON task file written by that benchmark:
{"gguf": path, "threads": n, "prompt": [ids], "max_new_tokens": n, "repeats": n,
 "windows": [{"tokens": [ids], "score_from": i, "targets": [ids]}, ...],
 "extra_bufts": true}
("extra_bufts": false loads the weights without llama.cpp's extra buffer types, the
repacked / AMX layouts, into its plain CPU buffers: the fallback where its AMX path faults.)
and prints one JSON line: the greedy decode rate with the prefill excluded ((N - 1) /
(t(N) - t(1)), best of `repeats`, the benchmark's own definition) and the perplexity of the
same windows at the same scored positions (mean NLL of `targets` from positions
score_from..end-1 of each window, computed from llama.cpp's logits).
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import llama_cpp.llama_cpp as bindings
from llama_cpp import Llama, __version__


def without_extra_buffer_types() -> None:
    """Makes every `Llama` load its weights with `use_extra_bufts` off (the high-level class
    does not expose the model parameter; it reads llama.cpp's defaults from the bindings)."""
    defaults = bindings.llama_model_default_params

    def plain():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = plain


def decode_time(llm: Llama, prompt: list[int], n: int) -> float:
    llm.reset()  # no prefix reuse from the previous call
    start = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
        if i == n:
            break
    return time.perf_counter() - start


def window_nll(llm: Llama, tokens: list[int], score_from: int, targets: list[int]
               ) -> tuple[float, int]:
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[score_from:len(tokens)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(logits).sum(axis=1))
    picked = logits[np.arange(len(targets)), targets]
    return float((logz - picked).sum()), len(targets)


def main() -> None:
    task = json.load(open(sys.argv[1]))
    prompt, n, threads = task["prompt"], task["max_new_tokens"], task["threads"]
    extra_bufts = task.get("extra_bufts", True)
    if not extra_bufts:
        without_extra_buffer_types()
    llm = Llama(task["gguf"], n_ctx=len(prompt) + n + 8, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    decode_time(llm, prompt, 4)  # warm-up
    best = min(decode_time(llm, prompt, n) - decode_time(llm, prompt, 1)
               for _ in range(task["repeats"]))
    del llm
    # Perplexity needs every position's logits (logits_all), which decoding does not.
    width = max(len(w["tokens"]) for w in task["windows"])
    llm = Llama(task["gguf"], n_ctx=width + 8, n_batch=width, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    total, count = 0.0, 0
    for w in task["windows"]:
        nll, k = window_nll(llm, w["tokens"], w["score_from"], w["targets"])
        total, count = total + nll, count + k
    print(json.dumps({"peer": "llama.cpp", "llama_cpp_python": __version__,
                      "batch1_tokens_per_s": round((n - 1) / best, 1),
                      "ppl": round(math.exp(total / count), 4), "scored_tokens": count,
                      "extra_bufts": extra_bufts}))


if __name__ == "__main__":
    main()
