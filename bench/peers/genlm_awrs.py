#!/usr/bin/env python3
"""genlm-control 0.4.1's AWRS + SMC, the peer of `bench/constraints.py`.

Runs only under the genlm venv (`make -f bench/peers/peers.mk bench-peers-genlm` builds
.venv-genlm), never the project's own:

    .venv-genlm/bin/python bench/peers/genlm_awrs.py --model DIR --prompts FILE \\
        --regex '[0-9]{3}-[a-z]{2,8}' --particles 4 --max-tokens 16 --seed 0

Per prompt: `AWRS(llm, condition, seed).smc(n_particles, ess_threshold, max_tokens)` with
`llm = PromptedLLM.from_name(DIR, backend="hf", temperature=1.0)` (transformers on CPU, float32)
and the condition `BoolFSA.from_regex(R).coerce(llm, f=b"".join)` and / or a Python predicate on
the decoded text (`--predicate module:function`, called as polydecode calls it: `fn(text)` on
prefixes, `fn(text, complete=True)` at EOS when it takes `complete`; invalid or incomplete UTF-8
shows as U+FFFD).

One JSON line on stdout: tokens = the non-EOS tokens of every returned particle; seconds = the
`smc` calls only; checks = condition evaluations (prefix and complete, batched ones counted per
context).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from genlm.control import AWRS, EOS, BoolFSA, Potential, PromptedLLM

NEG_INF = float("-inf")


class Counting(Potential):
    """A Boolean condition that counts its evaluations."""

    def __init__(self, inner: Potential) -> None:
        self.inner, self.checks = inner, 0
        super().__init__(inner.vocab, tables=inner.tables)

    async def prefix(self, context):
        self.checks += 1
        return await self.inner.prefix(context)

    async def complete(self, context):
        self.checks += 1
        return await self.inner.complete(context)

    async def batch_prefix(self, contexts):
        self.checks += len(contexts)
        return await self.inner.batch_prefix(contexts)

    async def batch_complete(self, contexts):
        self.checks += len(contexts)
        return await self.inner.batch_complete(contexts)

    async def logw_eos(self, context):  # the forced EOS at max_tokens: two checks, not |V|
        return float(await self.complete(context) - await self.prefix(context))

    async def logw_next(self, context):
        return await self.inner.logw_next(context)


class PredicateCondition(Potential):
    """0 where `fn` accepts the decoded text, else -inf."""

    def __init__(self, llm, fn) -> None:
        self.fn, self.llm = fn, llm
        self.takes_complete = "complete" in inspect.signature(fn).parameters
        super().__init__(llm.vocab, tables=llm.tables)

    def _weight(self, context, complete: bool) -> float:
        text = b"".join(context).decode("utf-8", errors="replace")
        ok = self.fn(text, complete=True) if complete and self.takes_complete else self.fn(text)
        return 0.0 if ok else NEG_INF

    async def prefix(self, context):
        return self._weight(context, False)

    async def complete(self, context):
        return self._weight(context, True)

    async def logw_eos(self, context):
        return float(await self.complete(context) - await self.prefix(context))

    def spawn(self):
        return PredicateCondition(self.llm, self.fn)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--prompts", required=True, help='JSONL, one {"prompt": text} per line')
    p.add_argument("--regex", default=None)
    p.add_argument("--predicate", default=None, metavar="MODULE:FUNCTION")
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--ess-threshold", type=float, default=0.5)
    p.add_argument("--max-tokens", type=int, default=16, help="EOS included (genlm's rule)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.regex and not args.predicate:
        p.error("give --regex and / or --predicate")
    return args


def make_condition(llm, args) -> Counting:
    parts = []
    if args.regex:
        parts.append(BoolFSA.from_regex(args.regex).coerce(llm, f=b"".join))
    if args.predicate:
        module, _, name = args.predicate.partition(":")
        parts.append(PredicateCondition(llm, getattr(importlib.import_module(module), name)))
    return Counting(parts[0] if len(parts) == 1 else parts[0] * parts[1])


async def run(args) -> dict:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # SMC resamples with the global numpy generator
    llm = PromptedLLM.from_name(args.model, backend="hf", temperature=1.0, hf_opts={
        "device_map": None, "torch_dtype": None, "dtype": torch.float32})
    condition = make_condition(llm, args)
    prompts = [json.loads(line)["prompt"] for line in open(args.prompts) if line.strip()]
    tokens, seconds, samples = 0, 0.0, []
    for i, prompt in enumerate(prompts):
        sampler = AWRS(llm.spawn(prompt_ids=llm.model.tokenizer.encode(prompt)),
                               condition, seed=args.seed + i)
        start = time.perf_counter()
        seqs = await sampler.smc(n_particles=args.particles, ess_threshold=args.ess_threshold,
                                 max_tokens=args.max_tokens)
        seconds += time.perf_counter() - start
        tokens += sum(sum(t is not EOS for t in c) for c in seqs.contexts)
        llm.model.clear_cache()
        weights = np.asarray(seqs.log_weights, dtype=float)
        best = seqs.contexts[int(np.argmax(weights))] if np.isfinite(weights).any() else None
        samples.append(None if best is None else b"".join(
            t for t in best if t is not EOS).decode("utf-8", errors="replace"))
        print(f"prompt {i + 1}/{len(prompts)}: {samples[-1]!r}",
              file=sys.stderr, flush=True)
    return {"peer": "genlm-control", "version": version("genlm-control"),
            "prompts": len(prompts), "particles": args.particles, "tokens": tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 3),
            "checks": condition.checks,
            "checks_per_token": round(condition.checks / max(tokens, 1), 2),
            "samples": samples, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the one JSON line
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
