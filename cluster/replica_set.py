"""The front's handle on the engine replicas: deploy, submit, abort, load, score, shut down.

It offers what the server's `EngineClient` uses of the in-process `AsyncEngine` (submit
returning a stream of `RequestOutput`s, abort by engine request id, load), so the request path
above it is the same in both modes. Failures of the remote side become the server's error
types: a request a replica refused at admission raises its error here (InvalidArgument,
NotFound, ResourceExhausted); a replica that dies or cannot be reached ends its streams with
`Unavailable` at once, never a hang (Ray reports a dead actor to every open call).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
from collections import deque

import msgspec
import psutil
import ray
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException
from ray.serve.config import RequestRouterConfig

from cluster.replica import Accepted, EngineReplica, Rejected, ReplicaSetup
from cluster import live_replica_ids
from cluster.router import PrefixAffinityRouter
from engine.async_engine import EngineDeadError
from engine.core.prefix_hash import hash_full_blocks
from engine.messages import RequestOutput
from server.config import Cluster
from server.errors import Unavailable
from server.model_card import ModelCard

log = logging.getLogger("polydecode.cluster")

_LOAD_FIELDS = ("running", "waiting", "kv_blocks_used", "kv_blocks_total", "num_preemptions")
_CALL_TIMEOUT_S = 10.0
"""Calls to a replica (load, score) that take longer than this count as a lost replica."""
_ACCEPT_TIMEOUT_S = 60.0
"""A request no replica has admitted by then (none alive, or all of them at
`max_ongoing_requests` all along) gets UNAVAILABLE instead of waiting on."""
_LOCAL_START_ATTEMPTS = 3
_LOAD_REFRESH_S = 2.0
_CALL_HEADROOM = 16
"""Ongoing calls a replica takes beyond its engine's caps: load and score calls."""


def _kill_started_since(before: set[int]) -> None:
    """Kills this process's descendants whose pids are not in `before`, and waits for them."""
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for proc in started:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(started, timeout=10)


def remote_error(exc: BaseException, replica: str | None) -> BaseException:
    """The server-side error for an exception out of a replica call: what our code on the
    replica raised, except a failed engine; UNAVAILABLE for a replica that is gone, stopping,
    failed or slow (Serve restarts it, other replicas take new requests)."""
    where = f"engine replica {replica}" if replica else "engine replicas"
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, Exception) \
            and not isinstance(exc.cause, RayError):
        if isinstance(exc.cause, EngineDeadError):
            return Unavailable(f"{where}: engine failed: {exc.cause}")
        return exc.cause  # raised by our code on the replica: InvalidArgument etc.
    if isinstance(exc, (RayError, RayServeException, asyncio.TimeoutError)):
        return Unavailable(f"{where} unavailable: {type(exc).__name__}")
    return exc


class RemoteStream:
    """The outputs of one request on one replica (the `RequestStream` surface).

    `abort` cancels the remote call (Ray delivers the cancellation to the replica actor
    directly, even while Serve is stopping that replica and routes nothing new to it); the
    replica's generator is closed, which aborts the request and frees its KV blocks. The
    stream then ends with a final output made here: finish_reason "abort" and the counts of
    the last output the replica sent.
    """

    def __init__(self, owner: ReplicaSet, response, accepted: Accepted) -> None:
        self.req_id = accepted.req_id
        self.num_prompt_tokens = accepted.num_prompt_tokens
        self.replica = accepted.replica
        self.finished = False
        self._owner = owner
        self._response = response
        self._ready: deque[RequestOutput] = deque()
        self._last: RequestOutput | None = None
        self._aborted = False

    def __aiter__(self) -> RemoteStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._ready:
            if self.finished:
                raise StopAsyncIteration
            if self._aborted:
                return self._abort_output()
            try:
                self._ready.extend(await self._response.__anext__())
            except StopAsyncIteration:
                self._end()
                raise Unavailable(f"engine replica {self.replica} ended request "
                                  f"{self.req_id} without a final output") from None
            except asyncio.CancelledError:
                if self._aborted and not _cancelling():
                    return self._abort_output()
                raise  # our caller is leaving: its aclose cancels the remote call
            except Exception as exc:  # noqa: BLE001 - mapped to the server's error types
                if self._aborted:
                    return self._abort_output()
                self._end()
                raise remote_error(exc, self.replica) from exc
        out = self._last = self._ready.popleft()
        if out.finished:
            self._end()
        return out

    def abort(self) -> bool:
        if self.finished or self._aborted:
            return False
        self._aborted = True
        self._response.cancel()
        return True

    def _abort_output(self) -> RequestOutput:
        last = self._last
        self._end()
        return RequestOutput(
            req_id=self.req_id, new_token_ids=[], new_text="", finished=True,
            finish_reason="abort", num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=last.num_output_tokens if last else 0,
            num_cached_tokens=last.num_cached_tokens if last else 0,
            num_forward_tokens=last.num_forward_tokens if last else 0,
            queue_time=last.queue_time if last else None)

    def _end(self) -> None:
        self.finished = True
        self._owner._streams.pop(self.req_id, None)

    async def aclose(self) -> None:
        """Cancels the remote call unless it finished: the replica aborts the request."""
        if not self.finished:
            self._end()
            if not self._aborted:
                self._response.cancel()


def _signal_handlers() -> dict:
    """This process's SIGTERM / SIGINT handlers, if it is on the main thread. `ray.init`
    replaces them with a native crash handler that aborts the process 3 s after a SIGTERM,
    cutting a drain short; the front puts its own back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)
            if callable(signal.getsignal(sig))}


def _cancelling() -> bool:
    """Whether the running task itself is being cancelled (not just the remote call)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def replica_cpus(setup: ReplicaSetup) -> float:
    return float(setup.engine.model.num_threads or 1)


def engine_deployment(setup: ReplicaSetup, cluster: Cluster, shutdown_timeout_s: float = 20.0):
    """The `EngineReplica` Serve deployment with the options `cluster` asks for. A replica
    Serve stops serves its requests for up to `shutdown_timeout_s` more."""
    gpus = 1.0 if setup.engine.model.device.startswith("cuda") else 0.0
    scheduler = setup.engine.scheduler
    return serve.deployment(EngineReplica).options(
        name="EngineReplica", num_replicas=cluster.replicas,
        max_ongoing_requests=cluster.max_ongoing_requests or (
            scheduler.max_num_seqs + scheduler.max_waiting_requests + _CALL_HEADROOM),
        ray_actor_options={"num_cpus": replica_cpus(setup), "num_gpus": gpus},
        health_check_period_s=2.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=shutdown_timeout_s,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
        request_router_config=RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"affinity": cluster.routing == "prefix",
                                   "imbalance": cluster.affinity_imbalance}))


class ReplicaSet:
    """N engine replicas deployed with Ray Serve; see the module docstring. Given `handle`
    (the deployment's, when the whole server is one Serve application: `cluster.app`), it
    uses those replicas and neither deploys nor deletes them."""

    def __init__(self, setup: ReplicaSetup, cluster: Cluster, handle=None) -> None:
        model = setup.engine.model
        if model.num_threads is None and cluster.ray_address is None and handle is None:
            # A local cluster shares this machine's cores: one slice per replica, not every
            # replica's torch spinning a thread per core.
            threads = max(1, (os.cpu_count() or 1) // cluster.replicas)
            engine = msgspec.structs.replace(
                setup.engine, model=msgspec.structs.replace(model, num_threads=threads))
            setup = msgspec.structs.replace(setup, engine=engine)
        self.setup = setup
        self.cluster = cluster
        self.card: ModelCard | None = None
        self._handle = handle
        self._attached = handle is not None
        self._streams: dict[str, RemoteStream] = {}
        self._last_load: dict = {}
        self._refresher: asyncio.Task | None = None
        self._admin = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="polydecode-ray")
        """Runs Ray's blocking calls (init, deploy, delete). One long-lived thread: a local
        cluster's processes die with the thread that started them (Ray sets PDEATHSIG)."""

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connects to (or starts) Ray, deploys the replicas and waits until all are up."""
        if not self._attached:
            kept = _signal_handlers()
            loop = asyncio.get_running_loop()
            self._handle = await loop.run_in_executor(self._admin, self._deploy)
            for sig, handler in kept.items():  # see `_signal_handlers`
                signal.signal(sig, handler)
        _, self.card = await self._handle.describe.remote()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_load())

    def _deploy(self):
        if not ray.is_initialized():
            if self.cluster.ray_address is None:
                self._start_local_ray()
            else:
                ray.init(address=self.cluster.ray_address, namespace="polydecode",
                         include_dashboard=False, logging_level=logging.WARNING)
        serve.start(proxy_location="Disabled")
        log.info("deploying %d engine replicas (%s routing)", self.cluster.replicas,
                 self.cluster.routing)
        return serve.run(engine_deployment(self.setup, self.cluster).bind(self.setup),
                         name=self.cluster.app_name, route_prefix=None)

    def _start_local_ray(self) -> None:
        """Starts a local Ray cluster. Ray gives its GCS and raylet fixed 30 s deadlines to
        come up, which a busy machine can miss: a start that times out is stopped and tried
        again."""
        num_cpus = max(os.cpu_count() or 1, replica_cpus(self.setup) * self.cluster.replicas)
        for attempt in range(1, _LOCAL_START_ATTEMPTS + 1):
            before = {p.pid for p in psutil.Process().children(recursive=True)}
            try:
                ray.init(namespace="polydecode", include_dashboard=False,
                         logging_level=logging.WARNING, num_cpus=num_cpus,
                         object_store_memory=256 << 20)
                return
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception on timeout
                ray.shutdown()
                _kill_started_since(before)  # the half-started GCS and raylet
                if attempt == _LOCAL_START_ATTEMPTS or "timed out" not in str(exc).lower():
                    raise
                log.warning("local Ray cluster did not start (%s); trying again", exc)

    def shutdown(self) -> None:
        """Deletes the deployment (each replica shuts its engine down); stops Ray too when
        this process started it."""
        if self._refresher is not None and not self._refresher.get_loop().is_closed():
            self._refresher.get_loop().call_soon_threadsafe(self._refresher.cancel)
        if not self._attached:
            self._admin.submit(self._undeploy).result()
        self._admin.shutdown()

    def _undeploy(self) -> None:
        try:
            if ray.is_initialized():
                serve.delete(self.cluster.app_name)
                if self.cluster.ray_address is None:
                    serve.shutdown()
                    ray.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.warning("replica shutdown: %r", exc)

    # ---- requests ----------------------------------------------------------------------------

    async def submit(self, prompt, params, captures=(), extra_key=None,
                     timeout_s: float | None = None) -> RemoteStream:
        """Admits a request on a replica chosen by the router; raises what the replica's
        admission raised, or Unavailable (also when no replica admitted it within
        `timeout_s`, at most `_ACCEPT_TIMEOUT_S`)."""
        wait_s = _ACCEPT_TIMEOUT_S if timeout_s is None else min(timeout_s, _ACCEPT_TIMEOUT_S)
        response = self._handle.options(stream=True).generate.remote(
            prompt, params, captures=tuple(captures), extra_key=extra_key,
            prefix_key=self.prefix_key(prompt, extra_key))
        try:
            accepted = await asyncio.wait_for(response.__anext__(), max(wait_s, 0.0))
        except asyncio.CancelledError:
            response.cancel()
            raise
        except asyncio.TimeoutError:
            response.cancel()
            raise Unavailable(f"no engine replica admitted the request in {wait_s:.1f} s") \
                from None
        except Exception as exc:  # noqa: BLE001
            raise remote_error(exc, None) from exc
        if isinstance(accepted, Rejected):
            raise accepted.error
        stream = RemoteStream(self, response, accepted)
        self._streams[stream.req_id] = stream
        return stream

    def prefix_key(self, prompt, extra_key) -> int | None:
        """The engine's chained hash of the prompt's first `affinity_blocks` full KV blocks
        (what its prefix cache would look up); None for a shorter prompt, a structured one
        (parallel sets) or a model without a block prefix cache."""
        blocks = self.cluster.affinity_blocks
        if not isinstance(prompt, list) or not self.card.prefix_caching \
                or len(prompt) < blocks * self.card.block_size:
            return None
        return hash_full_blocks(prompt, self.card.block_size, extra_key, num_blocks=blocks)[-1]

    def abort(self, req_id: str) -> bool:
        """Aborts a request (only from the front's event loop): see `RemoteStream`."""
        stream = self._streams.get(req_id)
        return stream is not None and stream.abort()

    def abort_all(self) -> int:
        req_ids = list(self._streams)
        return sum(self.abort(r) for r in req_ids)

    async def score(self, hidden, labels: list[int]):
        """Listwise rerank scores of a captured LM-head input (any replica has the head)."""
        return await self._call("score", None, hidden, list(labels))

    async def _call(self, method: str, replica: str | None, *args):
        try:
            return await asyncio.wait_for(
                getattr(self._handle, method).remote(*args, replica=replica), _CALL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            raise remote_error(exc, replica) from exc

    # ---- load --------------------------------------------------------------------------------

    async def load_now(self) -> dict:
        """Totals plus a `replicas` list, asked of every live replica now (a replica that does
        not answer in time is left out)."""
        replicas = live_replica_ids(self._handle.app_name)
        answers = await asyncio.gather(*(self._call("load", r) for r in replicas),
                                       return_exceptions=True)
        per_replica = {a["replica"]: a for a in answers if isinstance(a, dict)}
        load = {f: sum(a[f] for a in per_replica.values()) for f in _LOAD_FIELDS}
        load["replicas"] = [per_replica[r] for r in sorted(per_replica)]
        self._last_load = load
        return load

    async def _refresh_load(self) -> None:
        while True:
            await asyncio.sleep(_LOAD_REFRESH_S)
            await self.load_now()

    def load(self) -> dict:
        """The last `load_now` answer, at most `_LOAD_REFRESH_S` old (what the metrics
        endpoint reads without waiting)."""
        return {f: self._last_load.get(f, 0) for f in _LOAD_FIELDS}
