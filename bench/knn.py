"""kNN-LM cost: datastore build throughput, and decode throughput with kNN-LM vs plain greedy.

    python bench/knn.py [--sizes 100k,1m] [--batches 1,32] [--new-tokens 32] [--k 1024]
                        [--nprobe 32] [--stores-dir bench/results/knn] [--plot] [--build-only]

Stores (built once into --stores-dir, reused after; a build is resumable; `--build-only`
builds them and exits):
- `100k`: the first 100,000 tokens of the KJV training books, flat index (exact search);
- `1m`: the KJV training books and CPython's documentation topics (`pydoc:topics`): ~1.07M
  SmolLM2 tokens, windows advancing by 896, the held-out books kept out), with IVFPQ (4096 lists, 64-byte codes), searched with --nprobe lists and exact distances
  recomputed from the keys.

Build throughput is measured every run on a fresh 16k-key store (BUILD_SAMPLE).

For each store and batch size, the same greedy requests (held-out KJV verses as prompts,
--new-tokens each, EOS ignored) run plain and with kNN-LM; reported: decode tokens/s of both,
their ratio, and the share of kNN-LM step time spent in `Datastore.search` (FAISS + recompute);
with --entropy-threshold also adaptive retrieval's rate and the share of rows it searched.
For the IVFPQ store: recall@k against exact search over all its keys (held-out queries) and the
milliseconds of one search by batch, nprobe and recompute (what a step pays per datastore).
The issue's target: at 1M keys, nprobe 32, batch 32, kNN-LM >= 0.6x plain greedy throughput.
Progress on stderr; one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import faiss  # noqa: E402
import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from decoding.knn import KnnLm  # noqa: E402
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.loader import model_fingerprint  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from retrieval import stores  # noqa: E402
from retrieval.build import build_datastore  # noqa: E402
from retrieval.corpus import (DEFAULT_STRIDE, DEFAULT_WINDOW, kjv_books, kjv_split,  # noqa: E402
                              read_corpus, tokenize_corpora)
from retrieval.prefill import KEY_CAPTURE, prefill_windows  # noqa: E402
from retrieval.datastore import Datastore, read_meta  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STORES = {"100k": (["kjv:train"], "flat", 100_000, DEFAULT_STRIDE),
          "1m": (["kjv:train", "pydoc:topics"], "ivfpq", None, 896)}
"""size -> (corpus specs, index kind, max tokens, stride). Windows are 1024 tokens; the 1m
store advances them by 896 (128 tokens of carried context, 1.14 forwards per key instead of
2): the decode measurement depends on the keys' number and distribution, not their context."""
BUILD_SAMPLE = (["kjv:Genesis"], 16_384)
"""What the build-throughput measurement computes, fresh, every run."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_store(engine: Engine, size: str, root: Path) -> tuple[Path, dict]:
    """The store of `size` under `root`, built (or its build resumed) when missing; returns
    its path and the build's measured throughput (None when it was already complete)."""
    specs, index, max_tokens, stride = STORES[size]
    path = root / size
    try:
        meta = read_meta(path)
    except ValueError:
        log(f"[knn] building {path} from {specs} ({index}, stride {stride})")
        meta = build_datastore(engine, specs, path, index=index, max_tokens=max_tokens,
                               window=DEFAULT_WINDOW, stride=stride)
    else:
        log(f"[knn] reusing {path} ({meta.count} keys, {meta.index.kind})")
        if [c.path for c in meta.corpus] != specs or meta.stride != stride:
            raise SystemExit(f"{path} was built from other arguments; delete it to rebuild")
    return path, {"keys": meta.count, "index": meta.index.kind, "corpus": specs,
                  "window": meta.window, "stride": meta.stride}


def build_rate(engine: Engine) -> dict:
    """Keys per second of a fresh build of BUILD_SAMPLE (default window and stride: every key
    after the first window costs two forwards), index included."""
    specs, max_tokens = BUILD_SAMPLE
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        meta = build_datastore(engine, specs, Path(tmp) / "store", max_tokens=max_tokens)
        seconds = time.perf_counter() - start
    log(f"[knn] build: {meta.count} keys in {seconds:.1f} s ({meta.count / seconds:.0f} keys/s)")
    return {"corpus": specs, "keys": meta.count, "seconds": round(seconds, 1),
            "keys_per_s": round(meta.count / seconds, 1)}


class SearchClock:
    """Accumulates the wall time of every `Datastore.search` call."""

    def __init__(self) -> None:
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        self._search = Datastore.search

    def __enter__(self) -> SearchClock:
        clock, search = self, self._search

        def timed(store, queries, *args, **kwargs):
            clock.rows += len(queries)
            start = time.perf_counter()
            try:
                return search(store, queries, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start
                clock.calls += 1

        Datastore.search = timed
        return self

    def __exit__(self, *exc) -> None:
        Datastore.search = self._search


def heldout_queries(engine: Engine, n: int, every: int = 8) -> np.ndarray:
    """`n` real kNN-LM queries: the keys of every `every`-th position of the held-out books
    (which no bench store holds), computed by the engine as a build computes keys."""
    tokens = tokenize_corpora([read_corpus("kjv:heldout")], engine.tokenizer.encode,
                              DEFAULT_WINDOW, DEFAULT_STRIDE, n * every)
    rows = [caps[KEY_CAPTURE.name] for batch in prefill_windows(
        engine, tokens, [KEY_CAPTURE], range(len(tokens.windows))) for _, caps in batch]
    return torch.cat(rows)[::every][:n].numpy()


def recall(store: Datastore, queries: np.ndarray, ks: list[int], nprobes: list[int]) -> list:
    """Mean recall@k of the IVFPQ index against exact search (FAISS IndexFlatL2 over every
    stored key, float32) for each (k, nprobe): the share of the true k nearest keys the
    approximate search returns. Recompute re-scores that same set, so it is the recall of
    `Datastore.search` with recompute."""
    exact = faiss.IndexFlatL2(store.meta.dim)
    for start in range(0, len(store), 1 << 18):
        exact.add(np.asarray(store.keys[start:start + (1 << 18)], dtype=np.float32))
    _, truth = exact.search(queries, max(ks))
    rows = []
    for nprobe in nprobes:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        _, found = store.index.search(queries, max(ks), params=params)
        for k in ks:
            hits = [len(np.intersect1d(t[:k], f[:k])) / k for t, f in zip(truth, found)]
            rows.append({"k": k, "nprobe": nprobe, "recall": round(float(np.mean(hits)), 3),
                         "queries": len(queries)})
            log(f"[knn] recall@{k} nprobe {nprobe}: {rows[-1]['recall']}")
    return rows


def search_cost(store: Datastore, queries: np.ndarray, k: int, batches: list[int],
                nprobes: list[int], repeats: int = 5) -> list:
    """Milliseconds of one `Datastore.search` (what one decode step pays per datastore) by
    batch size, nprobe and recompute: the best of `repeats`."""
    rows = []
    for batch in batches:
        q = queries[:batch]
        for nprobe in nprobes:
            for recompute in (True, False):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    store.search(q, k, nprobe=nprobe, recompute=recompute)
                    times.append(time.perf_counter() - start)
                rows.append({"batch": batch, "nprobe": nprobe, "recompute": recompute,
                             "k": k, "ms": round(1000 * min(times), 2)})
                log(f"[knn] search batch {batch} nprobe {nprobe} recompute {recompute}: "
                    f"{rows[-1]['ms']} ms")
    return rows


def heldout_prompts(n: int, words: int = 30) -> list[str]:
    """`n` prompts of `words` words from the held-out books, in order."""
    books = kjv_books()
    text = " ".join(books[name] for name in kjv_split("heldout")).split()
    return [" ".join(text[i * words:(i + 1) * words]) for i in range(n)]


def decode_rate(engine: Engine, prompts: list[str], params: SamplingParams) -> tuple[float, int]:
    """Generated tokens per second of one batch of `prompts` (prefill included: prompts are
    short) and the number of tokens."""
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return tokens / seconds, tokens


def measure(engine: Engine, name: str, batch: int, args, prompts: list[str]) -> dict:
    plain = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
    knn = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, temperature=0.0,
                         transforms=(
        KnnLm(datastore=name, k=args.k, lmbda=0.25, nprobe=args.nprobe),))
    group = prompts[:batch]
    engine.generate(group, SamplingParams(max_new_tokens=2))  # warm
    best_plain = max(decode_rate(engine, group, plain)[0] for _ in range(args.repeats))
    rates, share = [], []
    for _ in range(args.repeats):
        with SearchClock() as clock:
            start = time.perf_counter()
            rate, tokens = decode_rate(engine, group, knn)
            total = time.perf_counter() - start
        rates.append(rate)
        share.append(clock.seconds / total)
    best = max(rates)
    row = {"store": name, "batch": batch, "plain_tok_s": round(best_plain, 1),
           "knn_tok_s": round(best, 1), "knn_over_plain": round(best / best_plain, 3),
           "search_share": round(min(share), 3),
           "searches_per_step": round(clock.calls / args.new_tokens, 2)}
    log(f"[knn] {name} batch {batch}: plain {best_plain:.1f} tok/s, kNN-LM {best:.1f} tok/s "
        f"({row['knn_over_plain']}x), search {100 * row['search_share']:.0f}% of step time")
    if args.entropy_threshold > 0:  # adaptive retrieval: fewer rows searched per step
        adaptive = msgspec.structs.replace(knn, transforms=(msgspec.structs.replace(
            knn.transforms[0], entropy_threshold=args.entropy_threshold),))
        with SearchClock() as clock:
            rate, tokens = max(decode_rate(engine, group, adaptive) for _ in range(args.repeats))
        row.update(adaptive_tok_s=round(rate, 1),
                   adaptive_searched=round(clock.rows / (args.repeats * tokens), 3))
        log(f"[knn] {name} batch {batch}: adaptive (H < {args.entropy_threshold} skips) "
            f"{rate:.1f} tok/s, {100 * row['adaptive_searched']:.0f}% of rows searched")
    return row


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = record["decode"]
    labels = [f"{r['store']}\nbatch {r['batch']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["plain_tok_s"] for r in rows], 0.4, label="greedy")
    ax.bar([i + 0.2 for i in x], [r["knn_tok_s"] for r in rows], 0.4, label="greedy + kNN-LM")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"kNN-LM decode throughput (k={record['k']}, nprobe={record['nprobe']})")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    log(f"[plot] wrote {path}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--sizes", default="100k,1m")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--entropy-threshold", type=float, default=0.0,
                    help="also measure adaptive retrieval at this threshold (nats)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stores-dir", type=Path, default=REPO / "bench" / "results" / "knn")
    ap.add_argument("--plot", action="store_true", help="write bench/results/knn.png")
    ap.add_argument("--recall-queries", type=int, default=1024,
                    help="held-out queries for the IVFPQ store's recall@k (0: skip)")
    ap.add_argument("--build-only", action="store_true",
                    help="build the missing stores of --sizes and exit")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = EngineConfig(model=ModelConfig(model=args.model or ModelConfig().model,
                                            num_threads=args.threads),
                          cache=CacheConfig(),
                          scheduler=SchedulerConfig(max_num_seqs=max(64, max(batches))))
    engine = Engine(config)
    fingerprint = model_fingerprint(engine.loaded.model_dir)
    prompts = heldout_prompts(max(batches))
    record = {"bench": "knn", "k": args.k, "nprobe": args.nprobe,
              "new_tokens": args.new_tokens, "stores": {}, "decode": []}
    if args.build_only:
        for size in args.sizes.split(","):
            ensure_store(engine, size, args.stores_dir)
        return
    record["build"] = build_rate(engine)
    for size in args.sizes.split(","):
        path, built = ensure_store(engine, size, args.stores_dir)
        record["stores"][size] = built
        store = stores.open_datastore(size, path, fingerprint)
        if store.kind == "ivfpq" and args.recall_queries:
            queries = heldout_queries(engine, args.recall_queries)
            record["recall"] = recall(store, queries, [16, args.k], [8, args.nprobe, 128])
            record["search_ms"] = search_cost(store, queries, args.k, batches,
                                              [8, args.nprobe, 128])
        for batch in batches:
            record["decode"].append(measure(engine, size, batch, args, prompts))
    target = next((r for r in record["decode"] if r["store"] == "1m" and r["batch"] == 32), None)
    record["target_1m_b32_over_plain"] = target["knn_over_plain"] if target else None
    record["target_met"] = None if target is None else target["knn_over_plain"] >= 0.6
    record["machine"] = machine()
    emit(record)
    if args.plot:
        plot(record, REPO / "bench" / "results" / "knn.png")


if __name__ == "__main__":
    main()
