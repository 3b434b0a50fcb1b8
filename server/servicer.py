"""The Generation service: each RPC converts, submits to the engine client, and streams back.

Errors of every kind go through `server.errors.abort_with`; client cancellation and deadlines
surface as task cancellation, which closes the request's stream (abort, KV freed).
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing, asynccontextmanager

import grpc

from server import convert
from server.engine_client import EngineClient, Tracked
from server.errors import Unavailable, abort_with, status_of
from server.metrics import Metrics, RequestTimer
from server.pb import pb, pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


def add_generation_service(server: grpc.aio.Server, client: EngineClient, metrics: Metrics,
                           limits) -> None:
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(client, metrics, limits), server)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, client: EngineClient, metrics: Metrics, limits) -> None:
        self.client = client
        self.metrics = metrics
        self.limits = limits
        self._ctx: convert.Context | None = None

    @property
    def ctx(self) -> convert.Context:
        if self._ctx is None:
            engine = self.client.engine
            self._ctx = convert.Context(tokenizer=engine.tokenizer, vocab_size=engine.vocab_size,
                                        max_model_len=engine.max_model_len, limits=self.limits)
        return self._ctx

    def _admit(self, request: pb.GenerateRequest, context) -> Tracked:
        self.client.check_accepting()
        header_id = dict(context.invocation_metadata() or ()).get("x-request-id")
        sub = convert.to_submission(request, self.ctx, header_id)
        return self.client.submit(sub, context.time_remaining())

    async def _events(self, tracked: Tracked):
        """Started, then the Delta/Finished events of one admitted request."""
        yield pb.GenerateEvent(started=pb.Started(request_id=tracked.req_id,
                                                  prompt_tokens=tracked.num_prompt_tokens))
        timer, tokenizer = RequestTimer(self.metrics), self.ctx.tokenizer
        async for out in tracked:
            if out.new_token_ids:
                timer.on_tokens(tracked.arrival)
            delta = convert.delta(out, tracked.sub, tokenizer)
            if delta is not None:
                yield pb.GenerateEvent(delta=delta)
            if out.finished:
                timer.on_finish(tracked.arrival, out.queue_time)
                for event in convert.candidate_events(out, tracked.sub):
                    yield event
                yield pb.GenerateEvent(finished=self._finished(tracked, out))

    def _finished(self, tracked: Tracked, out) -> pb.Finished:
        first = tracked.first_token_time
        timings = pb.Timings(queue_ms=(out.queue_time or 0.0) * 1000.0,
                             ttft_ms=tracked.elapsed_ms(first) if first else 0.0,
                             total_ms=tracked.elapsed_ms())
        return convert.finished(out, tracked.sub, self.ctx.max_model_len,
                                tracked.time_limited, timings)

    @asynccontextmanager
    async def _generation_rpc(self, context):
        """Every error becomes a status; the RPC is counted by its final code."""
        code = grpc.StatusCode.OK
        try:
            yield
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001
            code = status_of(exc)[0]
            await abort_with(context, exc)
        finally:
            self.metrics.requests.labels(code.name).inc()

    async def GenerateStream(self, request, context):
        async with self._generation_rpc(context):
            async with aclosing(self._admit(request, context)) as tracked:
                async for event in self._events(tracked):
                    yield event

    async def Generate(self, request, context):
        result = pb.GenerateResult()
        async with self._generation_rpc(context):
            async with aclosing(self._admit(request, context)) as tracked:
                result.request_id = tracked.req_id
                async for event in self._events(tracked):
                    kind = event.WhichOneof("event")
                    if kind == "delta" and event.delta.candidate == 0:
                        result.token_ids.extend(event.delta.token_ids)
                        result.text += event.delta.text
                        result.logprobs.extend(event.delta.logprobs)
                    elif kind == "finished":
                        result.finished.CopyFrom(event.finished)
                result.candidates.extend(convert.candidate_results(tracked.final))
            return result

    async def Abort(self, request, context):
        return pb.AbortResponse(aborted=self.client.abort(request.request_ids))

    async def Tokenize(self, request, context):
        try:
            self.client.check_accepting()
            special = request.add_special_tokens if request.HasField("add_special_tokens") \
                else True
            hf = self.ctx.tokenizer.hf
            ids = self.ctx.tokenizer.encode(request.text, add_special_tokens=special)
            return pb.TokenizeResponse(token_ids=ids, tokens=hf.convert_ids_to_tokens(ids))
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    async def GetModelInfo(self, request, context):
        try:
            self.client.check_accepting()
            return convert.model_info(self.client.engine, self.ctx)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    async def GetLoad(self, request, context):
        try:
            if self.client.front is None:
                raise Unavailable("model is loading")
            load = self.client.front.load()
            return pb.Load(**load, draining=self.client.draining)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
