#!/usr/bin/env python3
"""transformers 4.55's own contrastive search as a benchmark peer for `bench/decoding.py`.

transformers 4.55 is the last release with contrastive search built into `generate`
(`penalty_alpha`, `top_k`); later releases moved it to a Hub repository. Run with the
interpreter of its own venv (`make bench-peers-hf` builds .venv-hf455), never the project's:

    .venv-hf455/bin/python bench/peers/hf_contrastive.py --model DIR --job job.json

job.json: {"prompt_ids": [[token ids], ...] (tokenized by the engine, so both run the same
ids), "max_new_tokens": 64, "top_k": 4, "penalty_alpha": 0.6,
"threads": 2, "dtype": "float32"}. Each prompt runs alone, as `bench/decoding.py`'s "alone"
phases: one `generate` call per prompt, in the engine's dtype (float32 when the job names
none), `min_new_tokens` = `max_new_tokens` (ignore-eos), the
prefill included in the time; greedy, then contrastive search, after one warm-up call each.
Prints ONE JSON line: {"peer": "transformers-contrastive", "version", "greedy_alone":
{...}, "contrastive_alone": {...}, "contrastive_token_ids" and "greedy_token_ids": the first prompt's tokens}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def load_config(model_dir: str):
    """The model's config as transformers 4.55 needs it. The directory was written by
    transformers 5, which keeps RoPE in `rope_parameters`; 4.55 reads `rope_theta` and
    `rope_scaling` and would silently fall back to theta 10000 (another model)."""
    config = AutoConfig.from_pretrained(model_dir)
    rope = getattr(config, "rope_parameters", None)
    if rope:
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def run(model, prompts: list[list[int]], max_new: int, **strategy) -> tuple[dict, list]:
    elapsed, emitted, first = 0.0, 0, None
    for prompt in prompts:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                             min_new_tokens=max_new, do_sample=False,
                             pad_token_id=model.config.eos_token_id, **strategy)
        elapsed += time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        emitted += len(new)
        first = new if first is None else first
    return {"requests": len(prompts), "time_s": round(elapsed, 3), "emitted_tokens": emitted,
            "tokens_per_s": round(emitted / elapsed, 2),
            "latency_per_token_ms": round(1000 * elapsed / emitted, 2)}, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--job", required=True)
    args = ap.parse_args()
    job = json.loads(open(args.job).read())
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(args.model, config=load_config(args.model),
                                                 torch_dtype=getattr(torch, job.get(
                                                     "dtype", "float32"))).eval()
    contrastive = {"penalty_alpha": job["penalty_alpha"], "top_k": job["top_k"]}
    with torch.inference_mode():
        for strategy in ({}, contrastive):  # warm-up
            run(model, job["prompt_ids"][:1], 8, **strategy)
        greedy, greedy_tokens = run(model, job["prompt_ids"], job["max_new_tokens"])
        searched, tokens = run(model, job["prompt_ids"], job["max_new_tokens"], **contrastive)
    print(json.dumps({"peer": "transformers-contrastive", "version": transformers.__version__,
                      "torch": torch.__version__, "greedy_alone": greedy,
                      "contrastive_alone": searched, "contrastive_token_ids": tokens,
                      "greedy_token_ids": greedy_tokens}))


if __name__ == "__main__":
    main()
