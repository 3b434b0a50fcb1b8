"""The server's handle on the engine: readiness, draining, admission, time limits, cancel.

Every accepted request is a `Tracked` stream. Leaving it early (client cancel, gRPC deadline,
an error while writing) closes it, which aborts the request on the engine thread and frees its
KV blocks. A soft `time_limit_s` and the call's deadline are enforced by timers on the event
loop that abort the request; the stream then ends with the engine's final "abort" output.

Requests belong to the principal that submitted them. The id a client sees (its own, or one
drawn for it) names the request within its principal only: the engine runs it under a fresh
unguessable id, so no caller can abort, or learn of, another principal's request.

The engine runs in this process (`AsyncEngine`), or, with `Cluster.replicas`, as engine
replicas on Ray Serve (`cluster.replica_set.ReplicaSet`, the same submit / abort / load
surface); then this process loads the tokenizer, not the model (the server still maps the
datastores and loads the scorers it names, for GetModelInfo and validation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
import uuid
from collections.abc import Callable

from engine.async_engine import AsyncEngine, RequestStream
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import resolve_model_dir
from engine.messages import RequestOutput
from engine.sampling_params import SamplingParams
from engine.errors import InvalidArgument
from engine.tokenizer import Tokenizer
from server.config import Cluster
from server.convert import Submission
from server.errors import Unavailable
from server.model_card import ModelCard

log = logging.getLogger("polydecode.server")

WARMUP_PROMPT = "Hello"


class Tracked:
    """One admitted request: its engine stream plus the server-side clock."""

    def __init__(self, client: EngineClient, sub: Submission, stream: RequestStream,
                 owner: tuple[str, str]) -> None:
        self.sub = sub
        self.owner = owner
        """(principal, the request id its client sees)."""
        self.req_id = owner[1]
        self.engine_id = stream.req_id
        self.replica: str = getattr(stream, "replica", "")
        """The engine replica that runs it ("" when the engine is in this process)."""
        self.num_prompt_tokens = stream.num_prompt_tokens
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.time_limited = False
        self.final: RequestOutput | None = None
        self._client = client
        self._stream = stream
        self._timers: list[asyncio.TimerHandle] = []
        self._closed = False

    def arm(self, deadline_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        if self.sub.time_limit_s is not None:
            self._timers.append(loop.call_later(self.sub.time_limit_s, self._time_limit))
        if deadline_s is not None:  # the client stops listening then: free the KV at once
            self._timers.append(loop.call_later(max(deadline_s, 0.0), self._deadline))

    def _time_limit(self) -> None:
        if not self._stream.finished:
            self.time_limited = True
            self._client.front.abort(self.engine_id)

    def _deadline(self) -> None:
        if not self._stream.finished:
            self._client.front.abort(self.engine_id)

    def __aiter__(self) -> Tracked:
        return self

    async def __anext__(self) -> RequestOutput:
        out = await self._stream.__anext__()
        if out.finished:
            self.final = out
        if out.new_token_ids and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        await self._stream.aclose()
        self._client._release(self)

    def elapsed_ms(self, since: float | None = None) -> float:
        end = since if since is not None else time.monotonic()
        return (end - self.arrival) * 1000.0


class EngineClient:
    """Owns the AsyncEngine; see the module docstring."""

    def __init__(self, config: EngineConfig,
                 on_engine_error: Callable[[BaseException], None] | None = None,
                 engine_future: concurrent.futures.Future | None = None,
                 cluster: Cluster | None = None,
                 datastores: dict[str, str] | None = None, replica_handle=None) -> None:
        """`engine_future`, if given, is resolved by another thread with an AsyncEngine whose
        loop that thread runs (the process's main thread, see `AsyncEngine`); otherwise the
        engine is built on a worker thread and the AsyncEngine starts its own loop thread.
        With `cluster.replicas`, replicas are deployed instead (each opens `datastores`), or
        with `replica_handle`, those of that Serve deployment handle are used."""
        self.config = config
        self.cluster = cluster or Cluster()
        self._datastores = dict(datastores or {})
        self._engine_future = engine_future
        self._replica_handle = replica_handle
        self.front = None
        """The AsyncEngine, or the ReplicaSet with `cluster.replicas`."""
        self.card: ModelCard | None = None
        self.tokenizer: Tokenizer | None = None
        self.ready = False
        self.draining = False
        self._on_engine_error = on_engine_error
        self._owned: dict[tuple[str, str], Tracked] = {}
        """(principal, client-visible id) -> its open request."""
        self._idle: asyncio.Event | None = None
        self._admitting = 0
        """Requests waiting for a replica to admit them (with replicas)."""

    @property
    def remote(self) -> bool:
        return self.cluster.replicas > 0

    @property
    def engine(self) -> Engine:
        """The in-process engine (not with replicas: use `card` and `tokenizer`)."""
        assert self.front is not None and not self.remote, "no engine in this process"
        return self.front.engine

    async def start(self, warmup: bool = True) -> None:
        """Loads the model (off the event loop), then runs one short generation; with
        replicas, deploys them (each warms itself up) and loads the tokenizer."""
        self._idle = asyncio.Event()
        self._idle.set()
        if self.remote:
            await self._start_replicas()
            self.ready = True
            return
        if self._engine_future is not None:
            self.front = await asyncio.wrap_future(self._engine_future)
            self.front.on_error = self._on_engine_error
        else:
            engine = await asyncio.to_thread(Engine, self.config)
            self.front = AsyncEngine(engine, on_error=self._on_engine_error)
        if warmup:
            params = SamplingParams(max_new_tokens=2, temperature=0.0)
            async for _ in self.front.generate(WARMUP_PROMPT, params, f"warmup-{uuid.uuid4()}"):
                pass
        self.card, self.tokenizer = ModelCard.of(self.engine), self.engine.tokenizer
        self.ready = True

    async def _start_replicas(self) -> None:
        from cluster.replica import ReplicaSetup
        from cluster.replica_set import ReplicaSet

        setup = ReplicaSetup.of(self.config, self._datastores, self.cluster)
        self.front = ReplicaSet(setup, self.cluster, handle=self._replica_handle)
        self.tokenizer = await asyncio.to_thread(
            Tokenizer, resolve_model_dir(self.config.model.model))
        await self.front.start()
        self.card = self.front.card

    def check_accepting(self) -> None:
        if self.draining:
            raise Unavailable("server is draining")
        if not self.ready:
            raise Unavailable("model is loading")

    async def compile_constraint(self, params: SamplingParams):
        """The compiled constraint of `params` (None without one); raises InvalidArgument
        for an invalid constraint or one that compiles past the time limit."""
        if params.constraint is None or self.remote:  # a replica compiles its own
            return None
        return await self.engine.constraints.compile_async(params.constraint)

    async def submit(self, sub: Submission, principal: str,
                     deadline_s: float | None = None, compiled=None) -> Tracked:
        """Admits a converted request of `principal` (raises InvalidArgument: its id is
        already running for that principal, ResourceExhausted, Unavailable); the caller must
        exhaust or close the returned stream."""
        self.check_accepting()
        owner = (principal, sub.request_id or secrets.token_hex(16))
        if owner in self._owned:
            raise InvalidArgument("request_id", f"{owner[1]!r} is already running")
        if self.remote:
            self._admitting += 1  # a drain waits for it too
            self._idle.clear()
            asked = time.monotonic()
            try:
                stream = await self.front.submit(sub.prompt, sub.params, captures=sub.captures,
                                                 extra_key=sub.extra_key, timeout_s=deadline_s)
            except BaseException:
                self._admitting -= 1
                self._release(None)
                raise
            self._admitting -= 1  # no await until it is owned: a drain never sees it idle
            if deadline_s is not None:
                deadline_s -= time.monotonic() - asked
            if owner in self._owned:  # the same id was admitted while this one waited
                await stream.aclose()
                self._release(None)
                raise InvalidArgument("request_id", f"{owner[1]!r} is already running")
        else:
            stream = self.front.submit(sub.prompt, sub.params, secrets.token_hex(16),
                                       captures=sub.captures, extra_key=sub.extra_key,
                                       compiled=compiled)
        tracked = Tracked(self, sub, stream, owner)
        self._owned[owner] = tracked
        self._idle.clear()
        tracked.arm(deadline_s)
        return tracked

    async def load(self) -> dict:
        """Queue depths and KV usage; with replicas, asked of each now, with a `replicas`
        list beside the totals."""
        if self.front is None:
            raise Unavailable("model is loading")
        return await self.front.load_now() if self.remote else self.front.load()

    async def score_remote(self, hidden, labels):
        """Listwise rerank scores of a request's captured LM-head input, computed by an
        engine replica (this process has no LM head)."""
        return await self.front.score(hidden, labels)

    def _release(self, tracked: Tracked | None) -> None:
        if tracked is not None and self._owned.get(tracked.owner) is tracked:
            del self._owned[tracked.owner]
        if not self._owned and not self._admitting:
            self._idle.set()

    def abort(self, principal: str, req_ids) -> int:
        """Aborts `principal`'s running or waiting requests among `req_ids`; returns how many
        distinct ones were found (other principals' ids are unknown here)."""
        if self.front is None:
            return 0
        found = [self._owned.get((principal, r)) for r in dict.fromkeys(req_ids)]
        return sum(self.front.abort(t.engine_id) for t in found if t is not None)

    async def drain(self, timeout_s: float) -> int:
        """Refuses new requests, waits up to `timeout_s` for in-flight ones, aborts the rest.

        Returns how many requests were aborted.
        """
        self.draining = True
        if self._idle is None or self.front is None:
            return 0
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return 0
        except asyncio.TimeoutError:
            aborted = self.front.abort_all()
            log.warning("drain timeout: aborting %d requests", aborted)
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except asyncio.TimeoutError:
                log.error("%d requests still open after abort", len(self._owned))
            return aborted

    def shutdown(self) -> None:
        if self.front is not None:
            self.front.shutdown()
