"""`polydecode generate --server ADDR`: the CLI's client of a running server.

Same flags and `--json` lines as the offline command; prompts run concurrently, each as one
GenerateStream. A single plain-text prompt streams its text to the terminal as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import msgspec
from google.protobuf import json_format

from decoding import registry
from server import prompts
from server.auth import client_channel
from server.cli import finite_or_none
from server.pb import pb, pb_grpc

FINISH_NAMES = {pb.FINISH_EOS: "stop", pb.FINISH_STOP_SEQUENCE: "stop",
                pb.FINISH_LENGTH: "length", pb.FINISH_CONTEXT_LIMIT: "length",
                pb.FINISH_TIME_LIMIT: "abort", pb.FINISH_CANCELLED: "abort"}
"""Proto finish reasons -> the offline engine's finish_reason strings."""
_ONEOF_FIELDS = {f.name for f in pb.DecodingStrategy.DESCRIPTOR.oneofs_by_name["strategy"].fields
                 if f.name != "plugin"}
"""Strategies with a field of their own in DecodingStrategy (the others go as `plugin`)."""


def _part(value: str | list[int]) -> dict:
    return {"text": value} if isinstance(value, str) else {"tokens": pb.TokenIds(ids=value)}


def build_prompt(prompt: prompts.Prompt) -> pb.Prompt:
    """The proto Prompt of the shared prompt form (`server.prompts`)."""
    segments = [pb.Segment(parallel=pb.ParallelSet(
        members=[pb.TextOrTokens(**_part(m)) for m in seg.parallel]))
        if seg.parallel is not None else pb.Segment(**_part(
            seg.text if seg.text is not None else seg.tokens))
        for seg in prompt.segments]
    out = pb.Prompt(segments=segments, messages=[
        pb.ChatMessage(role=m.role, content=m.content) for m in prompt.messages])
    if prompt.add_special_tokens is not None:
        out.add_special_tokens = prompt.add_special_tokens
    if prompt.allow_special_tokens is not None:
        out.allow_special_tokens = prompt.allow_special_tokens
    return out


def _params(params) -> dict:
    """A params Struct's fields as JSON-like values (None left out: the field is unset)."""
    fields = msgspec.to_builtins(params)
    return {k: v for k, v in fields.items() if k != "type" and v is not None}


def build_decoding(selection) -> pb.DecodingStrategy:
    """A strategy's params Struct as its DecodingStrategy oneof field when the proto has one
    of that name and shape, else as `plugin` (any registered strategy by name)."""
    name, fields = registry.entry(selection).name, _params(selection)
    decoding = pb.DecodingStrategy()
    if name in _ONEOF_FIELDS:
        try:
            getattr(decoding, name).SetInParent()
            json_format.ParseDict(fields, getattr(decoding, name))
            return decoding
        except json_format.ParseError:
            decoding = pb.DecodingStrategy()
    decoding.plugin.name = name
    decoding.plugin.params.update(fields)
    return decoding


def build_knn_lm(params) -> pb.KnnLm:
    """The kNN-LM transform's params as the request's own `knn_lm` field."""
    fields = _params(params)
    fields["lambda"] = fields.pop("lmbda")
    return json_format.ParseDict(fields, pb.KnnLm())


def build_transforms(transforms) -> list[pb.Transform]:
    """Plug-in transforms as `transforms[]` entries (kNN-LM has a field of its own)."""
    out = []
    for params in transforms:
        if registry.entry(params).name in ("knn_lm", "constraint"):
            continue
        t = pb.Transform(name=registry.entry(params).name)
        t.params.update(_params(params))
        out.append(t)
    return out


def build_constraint(params) -> pb.Constraint:
    """The constraint transform's params as the request's own `constraint` field."""
    fields = _params(params)
    if "choice" in fields:
        fields["choice"] = {"options": fields["choice"]}
    return json_format.ParseDict(fields, pb.Constraint())


def build_request(args, prompt: prompts.Prompt, params) -> pb.GenerateRequest:
    """The GenerateRequest for one prompt, the `generate` command's flags and the
    `SamplingParams` they make (strategy and transforms)."""
    selection = params.selection
    knn = [build_knn_lm(t) for t in params.transforms if registry.entry(t).name == "knn_lm"]
    constraint = params.constraint
    return pb.GenerateRequest(
        constraint=build_constraint(constraint) if constraint is not None else None,
        prompt=build_prompt(prompt), decoding=build_decoding(selection),
        transforms=build_transforms(params.transforms), knn_lm=knn[0] if knn else None,
        penalties=pb.Penalties(repetition=args.repetition_penalty,
                               frequency=args.frequency_penalty,
                               presence=args.presence_penalty),
        stopping=pb.Stopping(max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.min_new_tokens,
                             stop_sequences=args.stop, ignore_eos=args.ignore_eos),
        response=pb.ResponseOptions(
            logprobs=args.logprobs is not None, top_logprobs=args.logprobs or 0,
            candidate_scores=not registry.entry(selection).cls.streams_output))


async def _one(stub, request: pb.GenerateRequest, echo: bool, weighted: bool) -> dict:
    token_ids, text, reason, constraint = [], [], "", None
    candidates: dict[int, dict] = {}
    async for event in stub.GenerateStream(request):
        kind = event.WhichOneof("event")
        if kind == "candidate":
            c = candidates.setdefault(event.candidate.candidate, {})
            c["score"] = event.candidate.score
        elif kind == "delta" and event.delta.candidate > 0:
            c = candidates.setdefault(event.delta.candidate, {})
            c.update(token_ids=list(event.delta.token_ids), text=event.delta.text)
        elif kind == "delta":
            token_ids += event.delta.token_ids
            text.append(event.delta.text)
            if echo:
                sys.stdout.write(event.delta.text)
                sys.stdout.flush()
        elif kind == "finished":
            reason = FINISH_NAMES.get(event.finished.reason, "")
            if event.finished.HasField("constraint"):
                stats = event.finished.constraint
                constraint = {"masks": stats.masks, "masked_tokens": stats.masked_tokens,
                              "checks": stats.checks, "rejected_tokens": stats.rejected_tokens}
    if echo:
        sys.stdout.write("\n")
    result = {"token_ids": token_ids, "text": "".join(text), "finish_reason": reason}
    if candidates:
        candidates.setdefault(0, {}).update(token_ids=token_ids, text=result["text"])
        result["candidates"] = [
            {"token_ids": c.get("token_ids", []), "text": c.get("text", ""),
             "score": finite_or_none(c["score"]) if "score" in c else None}
            | ({"log_weight": finite_or_none(c["score"]) if "score" in c else None}
               if weighted else {})
            for _, c in sorted(candidates.items())]
    if constraint is not None:
        result["constraint"] = constraint
    return result


async def _run(args, requests: list[pb.GenerateRequest]) -> None:
    as_json = args.json
    async with client_channel(args.server, args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        echo = len(requests) == 1 and not as_json
        results = await asyncio.gather(*(
            _one(stub, r, echo, r.decoding.WhichOneof("strategy") == "awrs") for r in requests))
    for index, result in enumerate(results):
        if as_json:
            print(json.dumps({"index": index, **result}), flush=True)
        elif not echo:
            print(result["text"], flush=True)


def generate_remote(args, prompt_list: list[prompts.Prompt], params) -> int:
    """Runs the prompts with `params` (a SamplingParams) against the server at `args.server`;
    returns the exit status."""
    requests = [build_request(args, p, params) for p in prompt_list]
    try:
        asyncio.run(_run(args, requests))
    except grpc.aio.AioRpcError as exc:
        print(f"polydecode: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                   grpc.StatusCode.NOT_FOUND) else 1
    return 0


def rerank_remote(args, passages: list[str]):
    """`polydecode rerank --server ADDR`: the server's Ranking (None after printing the error
    status; InvalidArgument statuses raise ValueError for the usage exit)."""
    from reranking.listwise import Ranking

    async def call():
        async with client_channel(args.server, args) as channel:
            return await pb_grpc.GenerationStub(channel).Rerank(pb.RerankRequest(
                query=args.query, passages=passages, order_invariant=args.order_invariant))

    try:
        got = asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise ValueError(exc.details()) from None
        print(f"polydecode: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return None
    return Ranking(ranking=list(got.ranking), scores=list(got.scores))
