"""Reranking cost and quality: RankGen vs nucleus sampling, single-token listwise reranking vs
generating the ranking as text, and retrieval accuracy with and without order invariance.

    python bench/rerank.py [--sizes 5,10,20] [--queries 20] [--rankgen-prompts 8] [--plot]

1. RankGen cost: the same prompts with nucleus sampling (top_p 0.9) and with rankgen (beam 2,
   4 samples, 8 tokens per round, MiniLM and self scorers), 32 new tokens: seconds per emitted
   token, in one run.
2. Rerank latency: for n = 5, 10, 20 passages (pydoc topics), the single-token listwise call
   (one prefill) against generating the ranking as text from the same prompt ("[B] > [A] > ..."
   greedily, 4 tokens per passage): seconds per query and passages/s, each query alone and all
   queries batched.
3. Retrieval: hand-written questions whose answer is one of CPython's documentation topics,
   each against 4 other topics' passages: top-1 accuracy plain and order-invariant, and how
   often the plain ranking's top-1 changes when the gold passage moves through the 5 positions.

Progress on stderr; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

from bench.common import emit, machine  # noqa: E402
from decoding.rankgen import RankGen  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from reranking.listwise import listwise_prompt, rerank  # noqa: E402

QUESTIONS = {
    "assert": "How do I stop a program with an error when a condition I expect is false?",
    "break": "How do I leave a loop early?",
    "continue": "How do I skip to the next iteration of a loop?",
    "class": "How do I define a new type of object with methods?",
    "del": "How do I remove a name binding or a list item?",
    "for": "How do I iterate over the elements of a sequence?",
    "global": "How do I assign to a module-level variable from inside a function?",
    "if": "How do I run code only when a condition holds?",
    "import": "How do I load code from another module?",
    "lambda": "How do I write a small anonymous function in an expression?",
    "pass": "What statement does nothing, for an empty block?",
    "raise": "How do I signal an exception myself?",
    "return": "How does a function hand back a value to its caller?",
    "try": "How do I handle exceptions raised by a block of code?",
    "while": "How do I repeat code as long as a condition is true?",
    "with": "How do I make sure a resource is cleaned up after a block?",
    "yield": "How do I write a generator that produces values lazily?",
    "nonlocal": "How do I rebind a variable of an enclosing function?",
    "slicings": "How do I take a part of a sequence between two indices?",
    "dict": "What is the mapping type that stores key-value pairs?",
}


def log(message: str) -> None:
    print(f"[rerank] {message}", file=sys.stderr, flush=True)


def topic_passages() -> dict[str, str]:
    """Topic -> its first paragraph after the title (about 300 characters)."""
    from pydoc_data import topics

    out = {}
    for name, text in topics.topics.items():
        body = [p for p in text.split("\n\n")[1:] if p.strip() and not p.startswith("   ")]
        if body:
            out[name] = " ".join(body[0].split())[:400]
    return out


def retrieval(engine: Engine, queries: int) -> dict:
    passages, rng = topic_passages(), random.Random(0)
    names = [n for n in QUESTIONS if n in passages][:queries]
    others = sorted(passages)
    plain = invariant = changed = 0
    for name in names:
        pool = [passages[name]] + [passages[o] for o in rng.sample(
            [o for o in others if o != name], 4)]
        tops = []
        for position in range(5):  # the gold passage at each position, plain order
            order = pool[1:position + 1] + [pool[0]] + pool[position + 1:]
            (result,) = rerank(engine, [(QUESTIONS[name], order, False)])
            tops.append(order[result.ranking[0]] == pool[0])
        plain += tops[0]
        changed += len(set(tops)) > 1
        (result,) = rerank(engine, [(QUESTIONS[name], pool, True)])
        invariant += result.ranking[0] == 0
        log(f"{name}: plain top-1 by gold position {tops}, invariant {result.ranking[0] == 0}")
    n = len(names)
    return {"queries": n, "plain_top1": round(plain / n, 3),
            "order_invariant_top1": round(invariant / n, 3),
            "plain_top1_changes_with_order": round(changed / n, 3)}


def latency(engine: Engine, sizes: list[int], queries: int) -> dict:
    passages = list(topic_passages().values())
    out = {}
    for size in sizes:
        requests = [(q, passages[i:i + size], False)
                    for i, q in enumerate(list(QUESTIONS.values())[:queries])]
        start = time.perf_counter()
        for request in requests:
            rerank(engine, [request])
        single_alone = (time.perf_counter() - start) / len(requests)
        start = time.perf_counter()
        rerank(engine, requests)
        single_batched = time.perf_counter() - start
        prompts = [listwise_prompt(engine.tokenizer, q, p, False)[0] for q, p, _ in requests]
        params = SamplingParams(max_new_tokens=4 * size, temperature=0.0)
        start = time.perf_counter()
        for prompt in prompts:
            engine.generate([prompt], params)
        text_alone = (time.perf_counter() - start) / len(prompts)
        start = time.perf_counter()
        engine.generate(prompts, params)
        text_batched = time.perf_counter() - start
        out[str(size)] = {
            "single_token_s": round(single_alone, 3), "generated_ranking_s": round(text_alone, 3),
            "speedup_alone": round(text_alone / single_alone, 2),
            "single_token_passages_per_s": round(size * len(requests) / single_batched, 1),
            "generated_ranking_passages_per_s": round(size * len(prompts) / text_batched, 1)}
        log(f"{size} passages: {out[str(size)]}")
    return out


def rankgen_cost(engine: Engine, prompts: int, new_tokens: int) -> dict:
    texts = [t[:200] for t in list(topic_passages().values())[:prompts]]
    runs = {"nucleus": SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=0.9,
                                      seed=1)}
    for scorer in ("minilm", "self"):
        runs[f"rankgen_{scorer}"] = SamplingParams(max_new_tokens=new_tokens, strategy=RankGen(
            beam_size=2, num_samples=4, tokens_per_round=8, scorer=scorer, seed=1))
    engine.generate(texts[:1], runs["rankgen_minilm"])  # loads the scorer
    out = {}
    for name, params in runs.items():
        start = time.perf_counter()
        results = engine.generate(texts, params)
        took = time.perf_counter() - start
        emitted = sum(len(r.token_ids) for r in results)
        out[name] = {"s_per_token": round(took / emitted, 4), "emitted": emitted}
        log(f"{name}: {took / emitted * 1000:.1f} ms per emitted token")
    out["rankgen_minilm_vs_nucleus"] = round(out["rankgen_minilm"]["s_per_token"]
                                             / out["nucleus"]["s_per_token"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5,10,20")
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--rankgen-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    engine = Engine()
    record = {"bench": "rerank", "machine": machine(),
              "rankgen": rankgen_cost(engine, args.rankgen_prompts, args.new_tokens),
              "latency": latency(engine, [int(s) for s in args.sizes.split(",")], args.queries),
              "retrieval": retrieval(engine, args.queries)}
    emit(record)


if __name__ == "__main__":
    main()
