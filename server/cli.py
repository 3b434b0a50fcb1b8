"""The `polydecode` command line: model-path, generate, serve, bench, datastore build, eval
perplexity (the last two live in `retrieval.commands`).

Strategies and transforms come from `decoding.registry`: `--strategy` offers every registered
strategy, `--strategy-params` / `--transform NAME=JSON` give any plug-in's params, and
`--plugin MODULE` imports a module first so that its `@register_*` decorators run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import runpy
import sys
from pathlib import Path

import msgspec

from decoding import registry
from decoding.base import InvalidArgument
from server.serve_command import add_serve_args, serve

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPT = "The three most useful things to know about paged attention are"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF-format model directory or embedded model name (default: SmolLM2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on a GPU or on a CPU with AMX / AVX512-BF16, "
                        "else float32")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when a GPU is present, else the CPU), cpu, cuda "
                        "or cuda:N; on CUDA the attention, lightning-attention and add+norm "
                        "kernels are Triton")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run decode steps eagerly instead of replaying the CUDA "
                        "graphs captured at start-up")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                   help="int8 / int4: weight-only int8 / int4 linear layers")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--norm-scheme", default=None, choices=["pre", "lns", "mix_ln"],
                   help="Llama norm placement: pre (standard), lns (LayerNorm-Scaling), "
                        "mix_ln (Post-LN first layers); default: the model directory's "
                        "config.json \"polydecode\" key, else pre")
    p.add_argument("--mix-ln-ratio", type=float, default=None, metavar="ALPHA",
                   help="mix_ln: the first floor(ALPHA * layers) layers are Post-LN "
                        "(default: the directory's value, else 0.25)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, help="return top-N logprobs")
    p.add_argument("--strategy", default=None, choices=registry.strategy_names(),
                   help="default: greedy when --temperature is 0, else sampling")
    p.add_argument("--strategy-params", default=None, metavar="JSON",
                   help="fields of the strategy's params, as a JSON object, over the values "
                        "its dedicated flags give")
    p.add_argument("--transform", action="append", default=[], metavar="NAME[=JSON]",
                   help="a plug-in transform and its params (repeatable); registered: "
                        f"{', '.join(registry.transform_names(plugins_only=True)) or 'none'}")
    p.add_argument("--penalty-alpha", type=float, default=0.6,
                   help="contrastive search degeneration penalty (its k is --top-k, default 4)")
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--num-return", type=int, default=1, help="beam search: sequences returned")
    r = p.add_argument_group("RankGen (--strategy rankgen)")
    r.add_argument("--beam-size", type=int, default=None, help="beams kept per round (2)")
    r.add_argument("--num-samples", type=int, default=None, help="samples per beam (10)")
    r.add_argument("--tokens-per-round", type=int, default=None, help="tokens per sample (20)")
    r.add_argument("--scorer", default=None,
                   help="minilm (default), or offline NAME=DIR / with --server a NAME the "
                        "server loaded (serve --scorer)")


def _add_knn_args(p: argparse.ArgumentParser) -> None:
    k = p.add_argument_group("kNN-LM (with any --strategy; see README, Decoding strategies)")
    k.add_argument("--datastore", default=None, metavar="[NAME=]DIR | NAME",
                   help="offline: the datastore directory (opened under NAME, default the "
                        "directory's name); with --server: the NAME of a datastore the server "
                        "loaded (serve --datastore)")
    k.add_argument("--knn-k", type=int, default=None, help="neighbours per step (1024)")
    k.add_argument("--knn-lambda", type=float, default=None,
                   help="weight of the kNN distribution, in [0, 1] (0.25)")
    k.add_argument("--knn-temperature", type=float, default=None,
                   help="softmax temperature over -distance (1.0)")
    k.add_argument("--knn-nprobe", type=int, default=None, help="IVF lists searched (32)")
    k.add_argument("--knn-no-recompute", action="store_true",
                   help="use FAISS's approximate (PQ) distances instead of exact ones")
    k.add_argument("--knn-entropy-threshold", type=float, default=None, metavar="NATS",
                   help="adaptive retrieval: no search at steps where the model's entropy is "
                        "below NATS (0: always search)")


def _add_constraint_args(p: argparse.ArgumentParser, serve: bool) -> None:
    c = p.add_argument_group("constrained generation and AWRS (see README, Constrained "
                             "generation)")
    if not serve:
        kind = c.add_mutually_exclusive_group()
        kind.add_argument("--regex", default=None, metavar="R",
                          help="the output must match this regex")
        kind.add_argument("--json-schema", default=None, metavar="FILE",
                          help="the output is compact JSON valid against this schema file")
        kind.add_argument("--grammar", default=None, metavar="FILE",
                          help="the output matches this Lark grammar file (rule start)")
        kind.add_argument("--choice", action="append", default=None, metavar="TEXT",
                          help="the output is one of these (repeatable)")
        c.add_argument("--num-particles", type=int, default=None, help="awrs: particles (1)")
        c.add_argument("--ess-threshold", type=float, default=None,
                       help="awrs: resample below this ESS fraction (0.5; 0 = never)")
        c.add_argument("--max-rejects", type=int, default=None,
                       help="awrs: rejections per token before a particle dies (0 = no limit)")
    c.add_argument("--constraint-backend", default=None, choices=["llguidance", "outlines"],
                   help="serve: the default backend (llguidance); generate: this request's")
    c.add_argument("--max-constraint-compile-s", type=float, default=10.0, metavar="S",
                   help="refuse a constraint that takes longer to compile (10)")
    c.add_argument("--predicate", action="append", default=[],
                   metavar="NAME=module:function" + ("" if serve else " | NAME"),
                   help="register a Python predicate on the decoded text for AWRS"
                        + (" (repeatable)" if serve else "; generate uses it with --strategy "
                           "awrs (with --server: the NAME the server registered)"))


def add_client_security_args(p: argparse.ArgumentParser) -> None:
    """How a client reaches a secured server (`generate --server`, bench/serve.py)."""
    s = p.add_argument_group("connecting to a secured server")
    s.add_argument("--tls", action="store_true",
                   help="connect over TLS, trusting the system's root certificates")
    s.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="connect over TLS, trusting this CA (e.g. a self-signed server cert)")
    s.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="client certificate, for mutual TLS")
    s.add_argument("--tls-key", default=None, metavar="PEM", help="client private key")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="sent as 'authorization: Bearer KEY' (default: $POLYDECODE_API_KEY)")


def _add_plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module first, registering its strategies and transforms "
                        "(repeatable)")


def import_plugins(argv: list[str]) -> None:
    """Imports the `--plugin` modules of `argv` (before the parser lists the strategies).

    Raises:
        InvalidArgument: a module cannot be imported (field "plugin").
    """
    pre = argparse.ArgumentParser(add_help=False)
    _add_plugin_arg(pre)
    for name in pre.parse_known_args(argv)[0].plugin:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise InvalidArgument("plugin", f"cannot import {name!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polydecode")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("model-path", help="print the local HF-format directory of a model")
    p.add_argument("--model", default=None)
    p = sub.add_parser("generate", help="generate offline (all prompts batched together)")
    _add_model_args(p)
    _add_sampling_args(p)
    _add_knn_args(p)
    _add_constraint_args(p, serve=False)
    _add_plugin_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one text prompt")
    src.add_argument("--prompts-file", help='JSONL file, one {"prompt": "..."} per line')
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--json", action="store_true", help="one JSON line per prompt")
    p.add_argument("--server", default=None, metavar="ADDR",
                   help="generate through a running server (host:port) instead of offline")
    add_client_security_args(p)
    p = sub.add_parser("serve", help="serve the model over gRPC")
    _add_model_args(p)
    add_serve_args(p)
    _add_constraint_args(p, serve=True)
    _add_plugin_arg(p)
    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("which", choices=["throughput", "serve", "quality"])
    p.add_argument("args", nargs=argparse.REMAINDER)
    from retrieval.commands import add_parsers  # argparse only; the work imports lazily
    add_parsers(sub, _add_model_args)
    from reranking.commands import add_parser as add_rerank_parser
    add_rerank_parser(sub, _add_model_args, add_client_security_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        import_plugins(argv)
    except InvalidArgument as exc:
        print(f"polydecode: invalid argument: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if args.command == "model-path":
        from engine.loader import resolve_model_dir
        print(resolve_model_dir(args.model))
        return 0
    if args.command == "bench":
        sys.argv = [f"bench/{args.which}.py", *args.args]
        runpy.run_path(str(REPO_ROOT / "bench" / f"{args.which}.py"), run_name="__main__")
        return 0
    if args.command == "serve":
        return serve(args)
    if args.command == "rerank":
        from reranking.commands import run as run_rerank
        return run_rerank(args, make_engine_config)
    if args.command in ("datastore", "eval"):
        from retrieval.commands import run
        return run(args, make_engine_config)
    if args.server:
        return _generate_remote(args)
    return _generate(args)


def _generate_remote(args) -> int:
    from server.client import generate_remote

    try:
        params, prompts = make_sampling_params(args), _read_prompts(args)
    except InvalidArgument as exc:
        print(f"polydecode: invalid argument: {exc}", file=sys.stderr)
        return 2
    return generate_remote(args, prompts, params)


def _read_prompts(args) -> list:
    """The prompts as `server.prompts.Prompt`s: `--prompt` text, or one JSON line per prompt in
    `--prompts-file`: `{"prompt": text or prompt object}` or `{"prompt_token_ids": [...]}`
    (prompt objects: see `server.prompts`). `--chat` makes a text prompt a user turn."""
    from server.prompts import from_json

    if args.prompts_file:
        prompts = []
        for line in Path(args.prompts_file).read_text().splitlines():
            if line.strip():
                obj = json.loads(line)
                prompts.append(obj["prompt"] if "prompt" in obj else obj["prompt_token_ids"])
    else:
        prompts = [args.prompt if args.prompt is not None else DEMO_PROMPT]
    return [from_json(p, chat=args.chat) for p in prompts]


def make_engine_config(args):
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    return EngineConfig(
        model=ModelConfig(model=args.model or ModelConfig().model, dtype=args.dtype,
                          device=args.device, cuda_graphs=args.cuda_graphs,
                          quantization=args.quantization, num_threads=args.threads,
                          norm_scheme=args.norm_scheme, mix_ln_ratio=args.mix_ln_ratio),
        cache=CacheConfig(num_blocks=args.num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs),
        constraint_backend=(getattr(args, "constraint_backend", None) if args.command == "serve"
                            else None) or "llguidance",
        max_constraint_compile_s=getattr(args, "max_constraint_compile_s", 10.0))


def _flag_fields(args) -> dict:
    """Strategy params the dedicated flags give; a strategy takes those its Struct has (unset
    ones, None, leave the Struct's defaults: `--top-k 0` is contrastive search's 4)."""
    given = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                 min_p=args.min_p, seed=args.seed, penalty_alpha=args.penalty_alpha,
                 num_beams=args.num_beams, length_penalty=args.length_penalty,
                 early_stopping=args.early_stopping, num_return=args.num_return,
                 num_particles=getattr(args, "num_particles", None),
                 ess_threshold=getattr(args, "ess_threshold", None),
                 max_rejects=getattr(args, "max_rejects", None),
                 predicate=predicate_name(getattr(args, "predicate", None)),
                 beam_size=getattr(args, "beam_size", None),
                 num_samples=getattr(args, "num_samples", None),
                 tokens_per_round=getattr(args, "tokens_per_round", None),
                 scorer=(args.scorer or "").partition("=")[0] or None
                 if hasattr(args, "scorer") and args.command == "generate" else None)
    if args.temperature == 0 and args.strategy not in (None, "greedy", "sampling"):
        del given["temperature"]  # the greedy default, not a temperature of this strategy
    return {field: value for field, value in given.items() if value is not None}


def finite_or_none(x: float) -> float | None:
    """JSON has no infinity: a dead particle's log-weight is null."""
    return x if math.isfinite(x) else None


def predicate_name(specs: list[str] | None) -> str | None:
    """The predicate `generate --predicate NAME[=module:function]` names (the last one)."""
    return specs[-1].partition("=")[0] if specs else None


def make_constraint(args) -> tuple:
    """The constraint transform's params of `--regex / --json-schema / --grammar / --choice`
    (or ())."""
    fields: dict = {}
    if getattr(args, "regex", None) is not None:
        fields["regex"] = args.regex
    for flag, field in (("json_schema", "json_schema"), ("grammar", "grammar")):
        path = getattr(args, flag, None)
        if path is not None:
            try:
                fields[field] = Path(path).read_text()
            except OSError as exc:
                raise InvalidArgument(flag.replace("_", "-"), str(exc)) from None
    if getattr(args, "choice", None):
        fields["choice"] = list(args.choice)
    if not fields:
        if getattr(args, "constraint_backend", None):
            raise InvalidArgument("constraint-backend", "needs --regex, --json-schema, "
                                                        "--grammar or --choice")
        return ()
    if args.constraint_backend:
        fields["backend"] = args.constraint_backend
    return (registry.parse_params("constraint", fields, "transform", "constraint"),)


def _json_object(text: str | None, field: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(field, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(field, "must be a JSON object")
    return value


def make_strategy(args):
    """The params Struct of `--strategy` (default: greedy when --temperature is 0, else
    sampling): its dedicated flags, then `--strategy-params` over them, validated."""
    name = args.strategy or ("greedy" if args.temperature == 0 else "sampling")
    struct_fields = registry.entry(name).params_type.__struct_fields__
    fields = {k: v for k, v in _flag_fields(args).items() if k in struct_fields}
    fields.update(_json_object(args.strategy_params, "strategy-params"))
    return registry.parse_params(name, fields, "strategy")


def make_transforms(args) -> tuple:
    """The params Structs of the `--transform NAME[=JSON]` flags."""
    names, out = registry.transform_names(plugins_only=True), []
    for spec in args.transform:
        name, _, params = spec.partition("=")
        if name not in names:
            raise InvalidArgument("transform", f"unknown transform {name!r}; "
                                           f"registered: {', '.join(names) or 'none'}")
        out.append(registry.parse_params(name, _json_object(params or None, name),
                                         "transform", name))
    return tuple(out)


def datastore_spec(args) -> tuple[str, str | None]:
    """(name, directory) of `generate --datastore`: offline `DIR` or `NAME=DIR`; with
    `--server` a name only (directory None)."""
    if args.server:
        return args.datastore, None
    name, sep, path = args.datastore.partition("=")
    return (name, path) if sep else (Path(args.datastore).resolve().name, args.datastore)


def make_knn_lm(args) -> tuple:
    """The kNN-LM transform's params of the `--datastore` / `--knn-*` flags (or ())."""
    given = dict(k=args.knn_k, lmbda=args.knn_lambda, temperature=args.knn_temperature,
                 nprobe=args.knn_nprobe, recompute=False if args.knn_no_recompute else None,
                 entropy_threshold=args.knn_entropy_threshold)
    fields = {key: value for key, value in given.items() if value is not None}
    if args.datastore is None:
        if fields:
            raise InvalidArgument("datastore", "the --knn-* flags need --datastore")
        return ()
    fields["datastore"] = datastore_spec(args)[0]
    return (registry.parse_params("knn_lm", fields, "transform", "knn_lm"),)


def load_scorer(spec: str) -> None:
    """Registers `NAME=DIR`, a RankGen-format T5 scorer directory; ValueError / OSError."""
    from decoding.scorers import register_scorer
    from decoding.scorers.rankgen_t5 import T5RankGenScorer

    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--scorer {spec!r}: expected NAME=DIR")
    register_scorer(name, T5RankGenScorer(path))


def register_cli_predicates(args) -> None:
    """Offline `generate --predicate NAME=module:function`: registers the predicates."""
    from constraints.predicates import load_predicate

    for spec in args.predicate:
        if "=" in spec:
            try:
                load_predicate(spec)
            except ValueError as exc:
                raise InvalidArgument("predicate", str(exc)) from None


def open_cli_datastore(args) -> None:
    """Offline `generate --datastore`: opens the store. Raises InvalidArgument ("datastore")
    for a directory that is not a datastore or one built with another model."""
    from engine.loader import model_fingerprint, resolve_model_dir
    from retrieval import stores

    name, path = datastore_spec(args)
    try:
        stores.open_datastore(name, path, model_fingerprint(resolve_model_dir(args.model)))
    except ValueError as exc:
        raise InvalidArgument("datastore", str(exc)) from None


def make_sampling_params(args):
    from engine.sampling_params import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, stop=tuple(args.stop),
        ignore_eos=args.ignore_eos, logprobs=args.logprobs, strategy=make_strategy(args),
        transforms=make_transforms(args) + make_knn_lm(args) + make_constraint(args))


def _generate(args) -> int:
    from engine.engine import Engine
    from server.prompts import to_engine

    try:
        params, prompts = make_sampling_params(args), _read_prompts(args)
        if args.datastore is not None:
            open_cli_datastore(args)
        register_cli_predicates(args)
        if args.scorer and "=" in args.scorer:
            load_scorer(args.scorer)
        engine = Engine(make_engine_config(args))
        prompts = [to_engine(p, engine.tokenizer, engine.vocab_size)[0] for p in prompts]
        results = engine.generate(prompts, params)
    except InvalidArgument as exc:
        print(f"polydecode: invalid argument: {exc}", file=sys.stderr)
        return 2
    for out in results:
        if args.json:
            line = {"index": out.index, "token_ids": out.token_ids, "text": out.text,
                    "finish_reason": out.finish_reason}
            weighted = registry.entry(params.selection).cls.checks_constraint
            if out.candidates is not None:
                line["candidates"] = [
                    {"token_ids": c.token_ids, "text": c.text, "score": finite_or_none(c.score)}
                    | ({"log_weight": finite_or_none(c.score)} if weighted else {})
                    for c in out.candidates]
            if out.constraint is not None:
                line["constraint"] = msgspec.to_builtins(out.constraint)
            print(json.dumps(line), flush=True)
        else:
            print(out.text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
