"""`polydecode serve`: its flags, the configs they make, and the command itself.

`serve_configs` is shared by the command and by `cluster.app.build`, the Ray Serve
application of the same server, whose config passes the same flags.
"""

from __future__ import annotations

import argparse
import sys

import msgspec


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of `polydecode serve` beyond the model flags (see `server.cli`)."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on this port")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="interface of the metrics endpoint (independent of --host)")
    s = p.add_argument_group("security (see README, Security)")
    s.add_argument("--tls-cert", default=None, metavar="PEM", help="server certificate chain")
    s.add_argument("--tls-key", default=None, metavar="PEM", help="server private key")
    s.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="mutual TLS: require client certificates signed by this CA")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept 'authorization: Bearer KEY' (repeatable); with any key, calls "
                        "without one get UNAUTHENTICATED")
    s.add_argument("--api-keys-file", action="append", default=[], metavar="PATH",
                   help="API keys, one 'PRINCIPAL KEY' (or 'KEY') per line")
    s.add_argument("--open-health", action="store_true",
                   help="health checks answer without an API key")
    s.add_argument("--no-reflection", action="store_true", help="turn server reflection off")
    s.add_argument("--tokenizer-threads", type=int, default=2,
                   help="threads that tokenize prompts, off the event loop")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="waiting-queue cap; beyond it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--max-queued-prompt-tokens", type=int, default=1 << 20,
                   help="waiting-queue cap in prompt tokens")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-prompt-bytes", type=int, default=None,
                   help="UTF-8 bytes of a prompt's text, checked before tokenizing (default: "
                        "prompt token limit x the longest vocabulary entry)")
    p.add_argument("--max-logit-bias", type=int, default=300,
                   help="entries a request's logit_bias may have")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20,
                   help="largest request message; bigger ones are refused unread "
                        "(RESOURCE_EXHAUSTED)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="largest stopping.max_new_tokens a request may ask for")
    p.add_argument("--max-stop-sequences", type=int, default=8)
    p.add_argument("--max-top-logprobs", type=int, default=20)
    p.add_argument("--scorer", action="append", default=[], metavar="NAME=DIR",
                   help="serve a RankGen-format T5 scorer directory under NAME (repeatable; "
                        "minilm is built in)")
    p.add_argument("--datastore", action="append", default=[], metavar="NAME=DIR",
                   help="serve a kNN-LM datastore under NAME (repeatable); it must have been "
                        "built with the served model")
    c = p.add_argument_group("engine replicas on Ray Serve (pip install polydecode[cluster])")
    c.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="run N engine replicas on Ray Serve behind this server (default 0: the "
                        "engine runs in this process and Ray is not used)")
    c.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="the Ray cluster to deploy on (default: start a local one)")
    c.add_argument("--routing", choices=("prefix", "load"), default="prefix",
                   help="prefix: prompts sharing their first KV blocks go to the replica that "
                        "served them last, the rest by load; load: by load only")
    c.add_argument("--affinity-blocks", type=int, default=8,
                   help="leading full KV blocks of a prompt that make its affinity key")


def load_extensions(args) -> None:
    """Registers the `--predicate` and `--scorer` flags in this process (ValueError /
    OSError name the one that failed)."""
    from constraints.predicates import load_predicate
    from server.cli import load_scorer

    for spec in args.predicate:
        load_predicate(spec)
    for spec in args.scorer:
        load_scorer(spec)


def serve_configs(args):
    """(EngineConfig, ServerConfig) of parsed `serve` flags; ValueError / OSError for a bad
    one. Loads nothing (see `load_extensions`)."""
    from server.auth import load_api_keys
    from server.cli import make_engine_config
    from server.config import Cluster, Limits, Security, ServerConfig

    engine_config = make_engine_config(args)
    scheduler = msgspec.structs.replace(
        engine_config.scheduler, max_waiting_requests=args.max_queued_requests,
        max_waiting_tokens=args.max_queued_prompt_tokens)
    security = Security(
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        api_keys=load_api_keys(args.api_key, args.api_keys_file),
        open_health=args.open_health, reflection=not args.no_reflection)
    config = ServerConfig(
        host=args.host, port=args.port, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host, drain_timeout_s=args.drain_timeout,
        tokenizer_threads=args.tokenizer_threads, max_message_bytes=args.max_message_bytes,
        security=security, limits=Limits(
            max_prompt_tokens=args.max_prompt_tokens,
            max_prompt_bytes=args.max_prompt_bytes, max_new_tokens=args.max_new_tokens,
            max_stop_sequences=args.max_stop_sequences,
            max_top_logprobs=args.max_top_logprobs, max_logit_bias=args.max_logit_bias),
        datastores=_datastore_flags(args.datastore),
        cluster=Cluster(
            replicas=args.replicas, ray_address=args.ray_address, routing=args.routing,
            affinity_blocks=args.affinity_blocks, scorers=args.scorer,
            predicates=args.predicate, plugins=args.plugin))
    return msgspec.structs.replace(engine_config, scheduler=scheduler), config


def serve(args) -> int:
    """The command: exit code 2 for a bad flag, else the server's (see `server.app.run`)."""
    from server.app import run

    try:
        load_extensions(args)
        engine_config, config = serve_configs(args)
    except (OSError, ValueError) as exc:
        print(f"polydecode: invalid argument: {exc}", file=sys.stderr)
        return 2
    return run(engine_config, config)


def _datastore_flags(specs: list[str]) -> dict[str, str]:
    """`serve --datastore NAME=DIR` flags as name -> directory."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in out:
            raise ValueError(f"--datastore {spec!r}: expected NAME=DIR, each NAME once")
        out[name] = path
    return out
