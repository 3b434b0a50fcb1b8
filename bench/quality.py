"""Which strategy should I use? Generation quality against cost, for every strategy, in one run.

    polydecode bench quality [--strategies greedy,nucleus,contrastive,beam,...] [--prompts N]
        [--max-new-tokens 128] [--prefix-tokens 32] [--corpus kjv:heldout ...]
        [--datastore DIR] [--features minilm|model] [--out DIR] [--seed 0]
        [--model ...] [--dtype ...] [--threads N] [--max-num-seqs 64]

(`python bench/quality.py ...` is the same.) `--prompts` held-out prefixes of real text (evenly
spaced segments of `--corpus`, default the KJV's held-out books; see `quality.samples`) are
continued by every strategy (`quality.strategies`: the presets and their papers' settings;
`knn` joins with `--datastore`, a store built with the served model) through one engine,
each strategy's requests batched together, under one progress bar; then every continuation
and the human one are scored (`quality.run`):

- rep-2/3/4 and diversity (SimCTG), on whitespace words;
- MAUVE (`mauve-text`, its defaults) of generations against the human continuations, on the
  bundled MiniLM's sentence embeddings (`--features model`: the served model's mean-pooled
  final hidden states), with its spread over five k-means seeds;
- coherence: cosine of MiniLM embeddings of prefix and continuation;
- perplexity of the continuation given the prefix under the served model;
- cost: ms per emitted token (the strategy's batched wall time / its tokens) and forward
  tokens per emitted token past the prompt.

Writes quality.json, quality.md (the table) and quality.png (MAUVE and diversity against ms
per token) to `--out` (default bench/results/quality), prints one JSON line on stdout
({"bench": "quality", ...}) and the table on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

from bench.common import emit, machine  # noqa: E402
from server.cli import _add_model_args, make_engine_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from quality.strategies import DEFAULT_STRATEGIES, PRESET_NAMES

    p = argparse.ArgumentParser(prog="polydecode bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default=None,
                   help=f"comma-separated, of {', '.join(PRESET_NAMES)} (default: "
                        f"{','.join(DEFAULT_STRATEGIES)}, and knn with --datastore)")
    p.add_argument("--prompts", type=int, default=100, help="held-out prefixes")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prefix-tokens", type=int, default=32)
    p.add_argument("--corpus", nargs="+", default=["kjv:heldout"],
                   help="corpus specs the prefixes come from (retrieval.corpus)")
    p.add_argument("--datastore", default=None, metavar="DIR",
                   help="a kNN-LM datastore of the served model: adds the knn strategy")
    p.add_argument("--features", default="minilm", choices=["minilm", "model"],
                   help="MAUVE's features: the bundled MiniLM encoder or the served model's "
                        "mean-pooled hidden states")
    p.add_argument("--seed", type=int, default=0, help="seed of every sampling strategy")
    p.add_argument("--out", default="bench/results/quality", type=Path)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--from-json", default=None, type=Path, metavar="FILE",
                   help="only redraw the table and figure of an earlier run's quality.json "
                        "into --out")
    _add_model_args(p)
    args = p.parse_args(argv)
    args.command = "bench"
    return args


def strategy_params(args, datastore_name: str | None) -> dict:
    from quality.strategies import DEFAULT_STRATEGIES, preset

    names = (args.strategies.split(",") if args.strategies else
             [*DEFAULT_STRATEGIES, *(["knn"] if datastore_name else [])])
    return {name: preset(name.strip(), args.max_new_tokens, args.seed, datastore_name)
            for name in names}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        from quality import report

        paths = report.write(args.out, json.loads(args.from_json.read_text()))
        print(report.markdown_table(json.loads(paths["json"].read_text())["rows"]),
              file=sys.stderr)
        return 0
    from engine.engine import Engine
    from quality import report
    from quality.run import generate_all, measure
    from quality.samples import held_out_samples

    engine = Engine(make_engine_config(args))
    store = None
    if args.datastore:
        from retrieval.stores import open_datastore
        from engine.loader import model_fingerprint

        store = Path(args.datastore).resolve().name
        open_datastore(store, args.datastore, model_fingerprint(engine.loaded.model_dir))
    try:
        strategies = strategy_params(args, store)
        samples = held_out_samples(args.corpus, engine.tokenizer.encode,
                                   engine.tokenizer.decode, args.prompts, args.prefix_tokens,
                                   args.max_new_tokens)
    except ValueError as exc:
        print(f"polydecode bench quality: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    runs = generate_all(engine, samples, strategies, show_progress=not args.quiet)
    rows = measure(engine, samples, runs, args.features, show_progress=not args.quiet)
    dtype = str(engine.loaded.dtype).removeprefix("torch.")
    config = {"model": engine.loaded.model_dir.name, "dtype": dtype,
              "prompts": len(samples), "corpus": " ".join(args.corpus),
              "prefix_tokens": args.prefix_tokens, "max_new_tokens": args.max_new_tokens,
              "features": args.features, "seed": args.seed, "datastore": args.datastore,
              "max_num_seqs": args.max_num_seqs, "threads": args.threads}
    result = {"config": config, "rows": rows, "total_s": round(time.perf_counter() - start, 1),
              "machine": machine(),
              "samples": [{"source": s.source, "prefix": s.prefix, "reference": s.reference,
                           **{r.name: r.texts[i] for r in runs}}
                          for i, s in enumerate(samples)]}
    paths = report.write(args.out, result)
    print(report.markdown_table(rows), file=sys.stderr)
    emit({"bench": "quality", **{k: v for k, v in result.items() if k != "samples"},
          "files": {k: str(v) for k, v in paths.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
