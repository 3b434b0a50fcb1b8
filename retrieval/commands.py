"""`polydecode datastore build` and `polydecode eval perplexity` (wired into server/cli.py).

Only argparse at import time: the engine, torch and FAISS load when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from retrieval.corpus import DEFAULT_STRIDE, DEFAULT_WINDOW

CORPUS_HELP = ("text file (one document), JSONL with a \"text\" field (one document per line), "
               "kjv:train / kjv:heldout (King James Bible split by book), kjv:BOOK[,BOOK...] or "
               "pydoc:topics (CPython's documentation topics)")


def add_parsers(sub, add_model_args) -> None:
    """Adds the `datastore` and `eval` commands to the CLI's subparsers."""
    p = sub.add_parser("datastore", help="kNN-LM datastores")
    b = p.add_subparsers(dest="datastore_command", required=True).add_parser(
        "build", help="compute a datastore's keys with the engine and index them")
    add_model_args(b)
    b.add_argument("--corpus", nargs="+", required=True, metavar="SPEC", help=CORPUS_HELP)
    b.add_argument("--out", required=True, metavar="DIR")
    b.add_argument("--index", default="auto", choices=["auto", "flat", "ivfpq"],
                   help="auto: flat below 200k keys, else IVFPQ (4096 lists, 64-byte codes)")
    b.add_argument("--max-tokens", type=int, default=None, help="stop after N keys")
    _add_window_args(b, DEFAULT_WINDOW, DEFAULT_STRIDE)
    b.add_argument("--force", action="store_true", help="overwrite a complete datastore")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("eval", help="evaluations")
    e = p.add_subparsers(dest="eval_command", required=True).add_parser(
        "perplexity", help="perplexity of a text, with or without a kNN-LM datastore")
    add_model_args(e)
    e.add_argument("--text", nargs="+", required=True, metavar="SPEC", help=CORPUS_HELP)
    e.add_argument("--datastore", default=None, metavar="DIR")
    e.add_argument("--k", type=int, default=1024)
    e.add_argument("--lambda", dest="lambdas", default="0.25", metavar="L[,L...]",
                   help="interpolation weight; a comma list prints one line per value")
    e.add_argument("--knn-temperature", default="1", metavar="T[,T...]",
                   help="softmax temperature of the neighbours' -distances; a comma list "
                        "prints one line per (temperature, lambda)")
    e.add_argument("--entropy-threshold", default="0", metavar="H[,H...]",
                   help="adaptive retrieval: positions where the model's entropy (nats) is "
                        "below H are scored without the datastore; a comma list sweeps it "
                        "(each line reports the fraction of positions searched)")
    e.add_argument("--nprobe", type=int, default=32)
    e.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="exact distances from the stored keys (default) or FAISS's")
    e.add_argument("--max-tokens", type=int, default=None, help="score at most N tokens")
    _add_window_args(e, None, None)
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_window_args(p, window, stride) -> None:
    fallback = "the datastore's, else {}"
    p.add_argument("--window", type=int, default=window, help="tokens per window (default: "
                   f"{window or fallback.format(DEFAULT_WINDOW)})")
    p.add_argument("--stride", type=int, default=stride,
                   help="tokens a window advances; later windows score their last STRIDE "
                        f"(default: {stride or fallback.format(DEFAULT_STRIDE)})")


def run(args, make_engine_config) -> int:
    """Runs `datastore build` or `eval perplexity`; 2 on a bad argument or refused target."""
    from decoding.base import InvalidArgument

    try:
        if args.command == "datastore":
            return _build(args, make_engine_config)
        return _perplexity(args, make_engine_config)
    except (InvalidArgument, ValueError, OSError) as exc:
        print(f"polydecode: error: {exc}", file=sys.stderr)
        return 2


def _build(args, make_engine_config) -> int:
    from engine.engine import Engine
    from retrieval.build import build_datastore, check_target

    check_target(args.out, args.force)  # before the model loads
    engine = Engine(make_engine_config(args))
    try:
        meta = build_datastore(engine, args.corpus, args.out, index=args.index,
                               window=args.window, stride=args.stride,
                               max_tokens=args.max_tokens, force=args.force,
                               show_progress=not args.quiet)
    except KeyboardInterrupt:  # the finished windows are flushed: the same command resumes
        print(f"polydecode: interrupted; rerun the same command to resume {args.out}",
              file=sys.stderr)
        return 130
    print(json.dumps({"out": args.out, "keys": meta.count, "dim": meta.dim,
                      "index": meta.index.kind, "corpus": [c.path for c in meta.corpus]}))
    return 0


def _perplexity(args, make_engine_config) -> int:
    from engine.engine import Engine
    from retrieval.perplexity import KnnSettings, evaluate_perplexity, open_datastore_for

    knn = KnnSettings(k=args.k, lambdas=_numbers(args.lambdas, "--lambda"),
                      temperatures=_numbers(args.knn_temperature, "--knn-temperature"),
                      entropy_thresholds=_numbers(args.entropy_threshold,
                                                  "--entropy-threshold"),
                      nprobe=args.nprobe, recompute=args.recompute)
    engine = Engine(make_engine_config(args))
    store = open_datastore_for(engine, args.datastore) if args.datastore else None
    for line in evaluate_perplexity(engine, args.text, store, knn, window=args.window,
                                    stride=args.stride, max_tokens=args.max_tokens,
                                    show_progress=not args.quiet):
        print(json.dumps(line), flush=True)
    return 0


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a comma-separated list of numbers") \
            from None
