"""Async front of the engine: a background thread steps the engine; callers stream deltas.

The engine is single-threaded. Callers never touch it directly: `generate` validates and
tokenizes in the caller's thread (pure work), then hands an "add" command to the engine thread
through a queue; deltas come back through the caller's asyncio loop with `call_soon_threadsafe`.
A consumer that stops iterating (client cancel, deadline) sends an "abort", which frees the
request's KV blocks on the engine thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from engine.engine import Engine
from engine.errors import InvalidArgument, ResourceExhausted
from engine.messages import RequestOutput
from engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; in-flight and new requests cannot complete."""


class AsyncEngine:
    """Thread-safe streaming front of an `Engine`; see the module docstring."""

    def __init__(self, engine: Engine,
                 on_error: Callable[[BaseException], None] | None = None,
                 start_thread: bool = True) -> None:
        """`on_error` is called once, on the engine thread, if the engine loop fails.

        With `start_thread=False` no thread is started: the owner calls `run_forever()` on a
        thread of its choice. Torch CPU work should stay on one thread for the life of the
        process: once a second thread launches OpenMP parallel regions, each region costs ~3x
        more (measured: 50 vs 170 us for three small ops, 41 vs 56 ms per token at batch 1),
        so a server builds the engine and runs this loop on the same (main) thread.
        """
        self.engine = engine
        self.on_error = on_error
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._num_pending_adds = 0
        self._lock = threading.Lock()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self.run_forever, name="polydecode-engine",
                                            daemon=True)
            self._thread.start()

    # ---- caller side -------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               req_id: str | None = None, captures: Sequence[str] = (),
               extra_key=None, compiled=None) -> RequestStream:
        """Admits a request now and returns its stream of deltas (call from an event loop).

        Raises InvalidArgument / ResourceExhausted / EngineDeadError when the request is
        refused. The caller must exhaust or `aclose()` the stream; closing it early aborts
        the request and frees its KV blocks.
        """
        req = self.engine.make_request(prompt, params, req_id, captures, extra_key, compiled)
        loop, out_q = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if self.error is not None or self._stopped:
                raise EngineDeadError(str(self.error or "engine is shut down"))
            if req.req_id in self._streams:
                raise InvalidArgument("request_id", f"{req.req_id!r} is already running")
            error = self.engine.scheduler.admission_error(req.num_tokens,
                                                          self._num_pending_adds)
            if error is not None:
                raise ResourceExhausted(error)
            self._streams[req.req_id] = (loop, out_q)
            self._num_pending_adds += 1
        self._send(("add", req))
        return RequestStream(self, req.req_id, req.num_prompt_tokens, out_q)

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       req_id: str | None = None, captures: Sequence[str] = (),
                       extra_key=None) -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas; the last one has `finished=True`.

        Raises InvalidArgument / ResourceExhausted before the first delta when the request is
        refused, EngineDeadError if the engine fails while it runs.
        """
        stream = self.submit(prompt, params, req_id, captures, extra_key)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    def abort(self, req_id: str) -> bool:
        """Aborts a streaming request; its stream ends with finish_reason "abort".

        Returns whether `req_id` was streaming (thread-safe; the abort itself runs on the
        engine thread before its next step).
        """
        with self._lock:
            known = req_id in self._streams
        if known:
            self._send(("abort", req_id))
        return known

    def abort_all(self) -> int:
        """Aborts every streaming request; returns how many."""
        with self._lock:
            req_ids = list(self._streams)
        for req_id in req_ids:
            self._send(("abort", req_id))
        return len(req_ids)

    def shutdown(self) -> None:
        """Stops the engine thread; streams still open end with EngineDeadError."""
        with self._lock:
            self._stopped = True
        self._wakeup.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._fail_all(EngineDeadError("engine is shut down"), record=False)

    def load(self) -> dict[str, int]:
        """A snapshot of queue depths and KV usage (read without locking; may be a step old)."""
        sched, kv = self.engine.scheduler, self.engine.kv_cache
        return {"running": len(sched.running), "waiting": len(sched.waiting),
                "kv_blocks_used": kv.num_blocks - kv.num_free_blocks,
                "kv_blocks_total": kv.num_blocks, "num_preemptions": sched.num_preemptions}

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ---- engine thread -----------------------------------------------------------------------

    def run_forever(self) -> None:
        """The engine loop; returns after `shutdown()` or an engine failure."""
        try:
            while not self._stopped:
                self._run_once()
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not die silently
            self._fail_all(exc)
            if self.on_error is not None:
                self.on_error(exc)

    def _run_once(self) -> None:
        self._apply_commands()
        if not self.engine.has_unfinished_requests():
            self._wakeup.wait(timeout=0.5)
            self._wakeup.clear()
            return
        for out in self.engine.step():
            self._deliver(out.req_id, out, final=out.finished)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._num_pending_adds -= 1
                try:
                    self.engine.add_request(arg)
                except Exception as exc:  # refused at admission: tell the caller
                    self._deliver(arg.req_id, exc, final=True)
            else:
                out = self.engine.abort(arg)
                if out is not None:
                    self._deliver(arg, out, final=True)

    def _deliver(self, req_id: str, item, final: bool) -> None:
        with self._lock:
            target = self._streams.pop(req_id, None) if final else self._streams.get(req_id)
        if target is None:
            return
        loop, out_q = target
        try:
            loop.call_soon_threadsafe(out_q.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            if not final:
                with self._lock:
                    self._streams.pop(req_id, None)
                self._send(("abort", req_id))

    def _fail_all(self, exc: BaseException, record: bool = True) -> None:
        with self._lock:
            if record:
                self.error = exc
            streams, self._streams = self._streams, {}
        for loop, out_q in streams.values():
            try:
                loop.call_soon_threadsafe(out_q.put_nowait, EngineDeadError(repr(exc)))
            except RuntimeError:
                pass


class RequestStream:
    """The deltas of one admitted request; the last one has `finished=True`.

    An async iterator rather than an async generator so that closing it aborts the request
    even when it was never iterated (a generator's `finally` would not run then).
    """

    def __init__(self, front: AsyncEngine, req_id: str, num_prompt_tokens: int,
                 out_q: asyncio.Queue) -> None:
        self.req_id = req_id
        self.num_prompt_tokens = num_prompt_tokens
        self.finished = False
        self._front = front
        self._out_q = out_q

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out_q = self._out_q
        item = out_q.get_nowait() if not out_q.empty() else await out_q.get()
        if isinstance(item, BaseException):
            self.finished = True  # the engine already forgot the request
            raise item
        self.finished = item.finished
        return item

    def has_ready(self) -> bool:
        """Whether `__anext__` would return without waiting (an output is already queued)."""
        return not self.finished and not self._out_q.empty()

    async def aclose(self) -> None:
        """Aborts the request unless it finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self._front._send(("abort", self.req_id))
