"""`polydecode rerank`: rank passages for a query with one prefill, offline or through a server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec


def add_parser(sub, add_model_args, add_client_security_args) -> None:
    p = sub.add_parser("rerank", help="rank passages for a query with one prefill (listwise, "
                                      "first-token label scores)")
    add_model_args(p)
    p.add_argument("--query", required=True)
    p.add_argument("--passages-file", required=True,
                   help='JSONL, one {"text": ...} per passage (at most 20)')
    p.add_argument("--order-invariant", action="store_true",
                   help="passages as a parallel set: the ranking cannot depend on their order")
    p.add_argument("--json", action="store_true",
                   help='print {"ranking": [indices, best first], "scores": [input order]}')
    p.add_argument("--server", default=None, metavar="ADDR",
                   help="rank through a running server (host:port) instead of offline")
    add_client_security_args(p)


def run(args, make_engine_config) -> int:
    """Prints the ranking; 2 on a bad argument, 1 when the server refuses otherwise."""
    try:
        lines = Path(args.passages_file).read_text().splitlines()
        passages = [json.loads(line)["text"] for line in lines if line.strip()]
        if args.server:
            from server.client import rerank_remote

            result = rerank_remote(args, passages)
        else:
            from engine.engine import Engine
            from reranking.listwise import rerank

            engine = Engine(make_engine_config(args))
            (result,) = rerank(engine, [(args.query, passages, args.order_invariant)])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"polydecode: invalid argument: {exc}", file=sys.stderr)
        return 2
    if result is None:
        return 1
    if args.json:
        print(json.dumps(msgspec.to_builtins(result)), flush=True)
    else:
        for place, i in enumerate(result.ranking, 1):
            print(f"{place}. [{result.scores[i]:.3f}] {passages[i]}", flush=True)
    return 0
