"""`polydecode generate --server ADDR`: the CLI's client of a running server.

Same flags and `--json` lines as the offline command; prompts run concurrently, each as one
GenerateStream. A single plain-text prompt streams its text to the terminal as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

from server.pb import pb, pb_grpc

FINISH_NAMES = {pb.FINISH_EOS: "stop", pb.FINISH_STOP_SEQUENCE: "stop",
                pb.FINISH_LENGTH: "length", pb.FINISH_CONTEXT_LIMIT: "length",
                pb.FINISH_TIME_LIMIT: "abort", pb.FINISH_CANCELLED: "abort"}
"""Proto finish reasons -> the offline engine's finish_reason strings."""


def _part(value) -> dict:
    return {"text": value} if isinstance(value, str) else {"tokens": pb.TokenIds(ids=value)}


def build_prompt(args, prompt: str | list[int] | dict) -> pb.Prompt:
    """Text, token ids, or a structured prompt object (`{"segments": [...]}`)."""
    if isinstance(prompt, dict):
        segments = [pb.Segment(parallel=pb.ParallelSet(
            members=[pb.TextOrTokens(**_part(m)) for m in seg["parallel"]]))
            if "parallel" in seg else pb.Segment(**_part(seg.get("text", seg.get("tokens"))))
            for seg in prompt["segments"]]
        return pb.Prompt(segments=segments)
    if args.chat and isinstance(prompt, str):
        return pb.Prompt(messages=[pb.ChatMessage(role="user", content=prompt)])
    return pb.Prompt(segments=[pb.Segment(**_part(prompt))])


def build_decoding(args) -> pb.DecodingStrategy:
    if args.strategy == "contrastive":
        return pb.DecodingStrategy(contrastive=pb.ContrastiveSearch(
            top_k=args.top_k or 4, penalty_alpha=args.penalty_alpha))
    if args.strategy == "beam":
        return pb.DecodingStrategy(beam=pb.BeamSearch(
            num_beams=args.num_beams, length_penalty=args.length_penalty,
            early_stopping=args.early_stopping, num_return=args.num_return))
    if args.strategy == "greedy" or args.temperature == 0:
        return pb.DecodingStrategy(greedy=pb.Greedy())
    sampling = pb.Sampling(temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, min_p=args.min_p)
    if args.seed is not None:
        sampling.seed = args.seed
    return pb.DecodingStrategy(sampling=sampling)


def build_request(args, prompt: str | list[int] | dict) -> pb.GenerateRequest:
    """The GenerateRequest for one prompt and the `generate` command's flags."""
    return pb.GenerateRequest(
        prompt=build_prompt(args, prompt), decoding=build_decoding(args),
        penalties=pb.Penalties(repetition=args.repetition_penalty,
                               frequency=args.frequency_penalty,
                               presence=args.presence_penalty),
        stopping=pb.Stopping(max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.min_new_tokens,
                             stop_sequences=args.stop, ignore_eos=args.ignore_eos),
        response=pb.ResponseOptions(logprobs=args.logprobs is not None,
                                    top_logprobs=args.logprobs or 0,
                                    candidate_scores=args.strategy == "beam"))


async def _one(stub, request: pb.GenerateRequest, echo: bool) -> dict:
    token_ids, text, reason = [], [], ""
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
    if echo:
        sys.stdout.write("\n")
    result = {"token_ids": token_ids, "text": "".join(text), "finish_reason": reason}
    if candidates:
        candidates.setdefault(0, {}).update(token_ids=token_ids, text=result["text"])
        result["candidates"] = [{"token_ids": c.get("token_ids", []), "text": c.get("text", ""),
                                 "score": c.get("score")} for _, c in sorted(candidates.items())]
    return result


async def _run(address: str, requests: list[pb.GenerateRequest], as_json: bool) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        echo = len(requests) == 1 and not as_json
        results = await asyncio.gather(*(_one(stub, r, echo) for r in requests))
    for index, result in enumerate(results):
        if as_json:
            print(json.dumps({"index": index, **result}), flush=True)
        elif not echo:
            print(result["text"], flush=True)


def generate_remote(args, prompts: list[str | list[int]]) -> int:
    """Runs `prompts` against the server at `args.server`; returns the exit status."""
    requests = [build_request(args, p) for p in prompts]
    try:
        asyncio.run(_run(args.server, requests, args.json))
    except grpc.aio.AioRpcError as exc:
        print(f"polydecode: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    return 0
