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
from collections.abc import AsyncIterator, Sequence

from engine.engine import Engine
from engine.errors import InvalidArgument, ResourceExhausted
from engine.messages import RequestOutput
from engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; in-flight and new requests cannot complete."""


class AsyncEngine:
    """Thread-safe streaming front of an `Engine`; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._num_pending_adds = 0
        self._lock = threading.Lock()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="polydecode-engine", daemon=True)
        self._thread.start()

    # ---- caller side -------------------------------------------------------------------------

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       req_id: str | None = None, captures: Sequence[str] = ()
                       ) -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas; the last one has `finished=True`.

        Raises InvalidArgument / ResourceExhausted before the first delta when the request is
        refused, EngineDeadError if the engine fails while it runs.
        """
        req = self.engine.make_request(prompt, params, req_id, captures)
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
        finished = False
        try:
            while not finished:
                item = out_q.get_nowait() if not out_q.empty() else await out_q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._send(("abort", req.req_id))

    def abort(self, req_id: str) -> None:
        self._send(("abort", req_id))

    def shutdown(self) -> None:
        """Stops the engine thread; streams still open end with EngineDeadError."""
        with self._lock:
            self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=30)
        self._fail_all(EngineDeadError("engine is shut down"), record=False)

    def load(self) -> dict[str, int]:
        """A snapshot of queue depths and KV usage (read without locking; may be a step old)."""
        sched, kv = self.engine.scheduler, self.engine.kv_cache
        return {"running": len(sched.running), "waiting": len(sched.waiting),
                "kv_blocks_used": kv.num_blocks - kv.num_free_blocks,
                "kv_blocks_total": kv.num_blocks}

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._run_once()
        except BaseException as exc:  # noqa: BLE001 - the loop must report, not die silently
            self._fail_all(exc)

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
