"""The Generation service: each RPC converts, submits to the engine client, and streams back.

Errors of every kind go through `server.errors.abort_with`; client cancellation and deadlines
surface as task cancellation, which closes the request's stream (abort, KV freed).

Nothing that grows with the request runs on the event loop: prompt sizes are checked in bytes
first, then tokenization and chat templating run on a small thread pool (at most
`max_pending_prompts` waiting for it), so a large prompt cannot stall health checks or other
streams. Requests belong to the caller's principal (`server.auth`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from contextlib import aclosing, asynccontextmanager

import grpc

from server import convert
from server.auth import Principals
from server.config import ServerConfig
from server.engine_client import EngineClient, Tracked
from reranking.listwise import score_hidden
from server.errors import Cancelled, ResourceExhausted, abort_with, status_of
from server.metrics import Metrics, RequestTimer
from server.pb import pb, pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


def add_generation_service(server: grpc.aio.Server, client: EngineClient, metrics: Metrics,
                           config: ServerConfig, principals: Principals) -> GenerationServicer:
    servicer = GenerationServicer(client, metrics, config, principals)
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    return servicer


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, client: EngineClient, metrics: Metrics, config: ServerConfig,
                 principals: Principals) -> None:
        self.client = client
        self.metrics = metrics
        self.limits = config.limits
        self.principals = principals
        self._ctx: convert.Context | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            config.tokenizer_threads, thread_name_prefix="polydecode-tokenize")
        self._max_pending = config.max_pending_prompts
        self._pending = 0

    def prepare(self) -> None:
        """Builds the conversion context once the engine is loaded (reads the vocabulary: call
        it off the event loop)."""
        card, tokenizer = self.client.card, self.client.tokenizer
        self._ctx = convert.Context(
            tokenizer=tokenizer, vocab_size=card.vocab_size,
            max_model_len=card.max_model_len, limits=self.limits,
            max_token_bytes=convert.longest_token_bytes(tokenizer))

    @property
    def ctx(self) -> convert.Context:
        if self._ctx is None:
            self.prepare()
        return self._ctx

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn, *args):
        """`fn(*args)` on the tokenizer pool; RESOURCE_EXHAUSTED when too many wait for it."""
        if self._pending >= self._max_pending:
            raise ResourceExhausted(f"{self._pending} prompts are waiting to be tokenized; "
                                    f"retry later")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    def _principal(self, context) -> str:
        # The ApiKeyAuth interceptor already refused calls without a known key.
        return self.principals.of(context.invocation_metadata())

    async def _admit(self, request: pb.GenerateRequest, context) -> Tracked:
        self.client.check_accepting()
        ctx = self.ctx
        convert.check_prompt_bytes(request.prompt, ctx)
        header_id = dict(context.invocation_metadata() or ()).get("x-request-id")
        sub = await self._off_loop(convert.to_submission, request, ctx, header_id)
        # A constraint compiles on the engine's worker, under its time limit; the loop (and
        # every other stream) goes on meanwhile.
        compiled = await self.client.compile_constraint(sub.params)
        return await self.client.submit(sub, self._principal(context),
                                        context.time_remaining(), compiled)

    async def _events(self, tracked: Tracked):
        """Started, then the Delta/Finished events of one admitted request."""
        yield pb.GenerateEvent(started=pb.Started(request_id=tracked.req_id,
                                                  prompt_tokens=tracked.num_prompt_tokens,
                                                  replica=tracked.replica))
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
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None \
                and remaining <= 0 else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001
            code = status_of(exc)[0]
            await abort_with(context, exc)
        finally:
            self.metrics.requests.labels(code.name).inc()

    async def GenerateStream(self, request, context):
        async with self._generation_rpc(context):
            async with aclosing(await self._admit(request, context)) as tracked:
                async for event in self._events(tracked):
                    yield event

    async def Generate(self, request, context):
        result = pb.GenerateResult()
        async with self._generation_rpc(context):
            async with aclosing(await self._admit(request, context)) as tracked:
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

    async def Rerank(self, request, context):
        async with self._generation_rpc(context):
            self.client.check_accepting()
            sub, labels = await self._off_loop(convert.rerank_submission, request, self.ctx)
            hidden, final = None, None
            tracked = await self.client.submit(sub, self._principal(context),
                                               context.time_remaining())
            async with aclosing(tracked):
                async for out in tracked:
                    if out.captures and "final_hidden" in out.captures:
                        hidden = out.captures["final_hidden"]
                    final = out
            if hidden is None:  # aborted (Abort, deadline, drain) before its prefill ran
                raise Cancelled(f"request {tracked.req_id!r} ended before it was scored")
            if self.client.remote:
                ranking = await self.client.score_remote(hidden, labels)
            else:
                ranking = await self._off_loop(score_hidden, self.client.engine, hidden, labels)
            return pb.RerankResponse(
                request_id=tracked.req_id, ranking=ranking.ranking, scores=ranking.scores,
                usage=pb.Usage(prompt_tokens=final.num_prompt_tokens,
                               completion_tokens=final.num_output_tokens,
                               cached_tokens=final.num_cached_tokens,
                               forward_tokens=final.num_forward_tokens))

    async def Abort(self, request, context):
        return pb.AbortResponse(aborted=self.client.abort(self._principal(context),
                                                          request.request_ids))

    async def Tokenize(self, request, context):
        try:
            self.client.check_accepting()
            ctx = self.ctx
            convert.check_text_bytes(request.text, "text", ctx)
            return await self._off_loop(convert.tokenize, request, ctx.tokenizer)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    async def GetModelInfo(self, request, context):
        try:
            self.client.check_accepting()
            return convert.model_info(self.client.card, self.ctx)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)

    async def GetLoad(self, request, context):
        try:
            load = await self.client.load()
            replicas = [pb.ReplicaLoad(**r) for r in load.pop("replicas", ())]
            return pb.Load(**load, draining=self.client.draining, replicas=replicas)
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc)
