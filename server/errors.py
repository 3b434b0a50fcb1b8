"""The one place where exceptions become gRPC statuses (see the table in generation.proto).

Engine exceptions name engine fields ("top_p"); clients see proto field paths
("decoding.sampling.top_p"), so INVALID_ARGUMENT messages are rewritten through FIELD_PATHS.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from engine.async_engine import EngineDeadError
from engine.errors import Cancelled, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger("polydecode.server")

FIELD_PATHS = {
    "prompt": "prompt",
    "max_new_tokens": "stopping.max_new_tokens",
    "min_new_tokens": "stopping.min_new_tokens",
    "stop": "stopping.stop_sequences",
    "stop_token_ids": "stopping.stop_token_ids",
    "temperature": "decoding.sampling.temperature",
    "top_k": "decoding.sampling.top_k",
    "top_p": "decoding.sampling.top_p",
    "min_p": "decoding.sampling.min_p",
    "seed": "decoding.sampling.seed",
    "repetition_penalty": "penalties.repetition",
    "frequency_penalty": "penalties.frequency",
    "presence_penalty": "penalties.presence",
    "logit_bias": "penalties.logit_bias",
    "logprobs": "response.top_logprobs",
    "strategy.predicate": "decoding.awrs.predicate",
    "strategy.scorer": "decoding.rankgen.scorer",
}
"""Engine field name -> proto field path."""

RETRY_AFTER_S = 1
"""Suggested client back-off for RESOURCE_EXHAUSTED (google.rpc.RetryInfo)."""


class Unimplemented(Exception):
    """The request asks for a strategy, constraint or field this server cannot run yet."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


class Unavailable(Exception):
    """The server is not ready yet or is draining."""


def proto_field(engine_field: str) -> str:
    return FIELD_PATHS.get(engine_field, engine_field)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a client gets for `exc`."""
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{proto_field(exc.field)}: {exc.reason}"
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, f"{proto_field(exc.field)}: {exc.reason}"
    if isinstance(exc, Unimplemented):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc)
    if isinstance(exc, ResourceExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, Cancelled):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.INTERNAL, f"engine failed: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Ends the RPC with the status of `exc` (raises, as `context.abort` does)."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request failed: %s", message, exc_info=exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=RETRY_AFTER_S))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
        status.details.add().Pack(retry)
        await context.abort_with_status(rpc_status.to_status(status))
    await context.abort(code, message)
