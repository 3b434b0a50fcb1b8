"""Server interceptors: the API-key check, and malformed request bytes answered as
INVALID_ARGUMENT instead of an UNKNOWN status and a logged traceback per request.

Both rebuild the method handler gRPC found (`_rebuild`): same kind, same serializer, another
behaviour or deserializer. Request-streaming methods (reflection) keep their own deserializer.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc

from server.auth import Principals

log = logging.getLogger("polydecode.server")

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_BEHAVIOURS = {(False, False): "unary_unary", (False, True): "unary_stream",
               (True, False): "stream_unary", (True, True): "stream_stream"}


def _kind(handler: grpc.RpcMethodHandler) -> tuple[bool, bool]:
    return handler.request_streaming, handler.response_streaming


def _rebuild(handler: grpc.RpcMethodHandler, behaviour, deserializer) -> grpc.RpcMethodHandler:
    return _FACTORIES[_kind(handler)](behaviour, request_deserializer=deserializer,
                                      response_serializer=handler.response_serializer)


def _service(method: str) -> str:
    """"/pkg.Service/Method" -> "pkg.Service"."""
    return method.rsplit("/", 2)[-2] if method.count("/") >= 2 else ""


class ApiKeyAuth(grpc.aio.ServerInterceptor):
    """Calls without a known key get UNAUTHENTICATED before their request is even parsed."""

    def __init__(self, principals: Principals, open_services: tuple[str, ...] = ()) -> None:
        self.principals = principals
        self.open_services = open_services

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or not self.principals.required
                or _service(details.method) in self.open_services
                or self.principals.of(details.invocation_metadata) is not None):
            return handler

        async def deny(_request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "authorization: missing or unknown API key "
                                "(send 'authorization: Bearer <key>' metadata)")

        return _rebuild(handler, deny, None)


class Malformed:
    """What the tolerant deserializer yields for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class _RateLimitedLog:
    """At most one warning per `interval_s`, counting the ones it held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last = -float("inf")
        self._held = 0

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        log.warning("%s%s", message, f" (and {held} more since the last report)" if held else "")


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Request bytes that do not decode (garbage, invalid UTF-8 in a string field) end the call
    with INVALID_ARGUMENT; one warning line per `log_interval_s` at most."""

    def __init__(self, log_interval_s: float = 10.0) -> None:
        self._log = _RateLimitedLog(log_interval_s)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - any decode error is the client's
                return Malformed(exc)

        async def reject(request: Malformed, context) -> None:
            self._log.warn(f"{method}: malformed request ({type(request.error).__name__})")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "request: not a valid protobuf message of this method")

        behaviour = getattr(handler, _BEHAVIOURS[_kind(handler)])
        if inspect.isasyncgenfunction(behaviour):
            async def checked(request, context):
                if isinstance(request, Malformed):
                    await reject(request, context)
                async for item in behaviour(request, context):
                    yield item
        else:
            async def checked(request, context):
                if isinstance(request, Malformed):
                    return await reject(request, context)
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result
        return _rebuild(handler, checked, tolerant)
