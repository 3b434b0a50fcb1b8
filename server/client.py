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


def build_request(args, prompt: str | list[int]) -> pb.GenerateRequest:
    """The GenerateRequest for one prompt and the `generate` command's flags."""
    if args.chat and isinstance(prompt, str):
        p = pb.Prompt(messages=[pb.ChatMessage(role="user", content=prompt)])
    elif isinstance(prompt, str):
        p = pb.Prompt(segments=[pb.Segment(text=prompt)])
    else:
        p = pb.Prompt(segments=[pb.Segment(tokens=pb.TokenIds(ids=prompt))])
    if args.temperature == 0:
        decoding = pb.DecodingStrategy(greedy=pb.Greedy())
    else:
        sampling = pb.Sampling(temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, min_p=args.min_p)
        if args.seed is not None:
            sampling.seed = args.seed
        decoding = pb.DecodingStrategy(sampling=sampling)
    return pb.GenerateRequest(
        prompt=p, decoding=decoding,
        penalties=pb.Penalties(repetition=args.repetition_penalty,
                               frequency=args.frequency_penalty,
                               presence=args.presence_penalty),
        stopping=pb.Stopping(max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.min_new_tokens,
                             stop_sequences=args.stop, ignore_eos=args.ignore_eos),
        response=pb.ResponseOptions(logprobs=args.logprobs is not None,
                                    top_logprobs=args.logprobs or 0))


async def _one(stub, request: pb.GenerateRequest, echo: bool) -> dict:
    token_ids, text, reason = [], [], ""
    async for event in stub.GenerateStream(request):
        kind = event.WhichOneof("event")
        if kind == "delta":
            token_ids += event.delta.token_ids
            text.append(event.delta.text)
            if echo:
                sys.stdout.write(event.delta.text)
                sys.stdout.flush()
        elif kind == "finished":
            reason = FINISH_NAMES.get(event.finished.reason, "")
    if echo:
        sys.stdout.write("\n")
    return {"token_ids": token_ids, "text": "".join(text), "finish_reason": reason}


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
