"""The gRPC server: Generation service, grpc.health.v1, reflection, metrics, drain on SIGTERM.

Every call passes the API-key check and the malformed-request guard (`server.interceptors`);
the port speaks TLS when the config has a certificate, and binding a busy port fails (no
SO_REUSEPORT).

Health ("" and "polydecode.v1.Generation") reads NOT_SERVING until the model is loaded and
warmed up, and again from the moment a drain starts or the engine fails. kNN-LM datastores
(`ServerConfig.datastores`) are mapped before the model loads; one built with another model
fails the start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import Engine
from retrieval import stores
from server.auth import Principals, server_credentials
from server.config import ServerConfig
from server.engine_client import EngineClient
from server.interceptors import ApiKeyAuth, MalformedRequests
from server.metrics import Metrics
from server.servicer import SERVICE_NAME, add_generation_service

log = logging.getLogger("polydecode.server")

_MAX_REPLY_BYTES = 16 << 20


class GenerationServer:
    """One server process: `await start()` (binds, then loads), `await drain()`, `stop()`."""

    def __init__(self, engine_config: EngineConfig, config: ServerConfig | None = None,
                 engine_future=None, replica_handle=None) -> None:
        """`engine_future`, `replica_handle`: see `EngineClient` (None: the engine gets its
        own thread, or with replicas, they are deployed)."""
        self.config = config = config or ServerConfig()
        self.client = EngineClient(engine_config, on_engine_error=self._on_engine_error,
                                   engine_future=engine_future, cluster=config.cluster,
                                   datastores=config.datastores, replica_handle=replica_handle)
        self.metrics = Metrics(lambda: self.client.front.load() if self.client.front else None)
        self.health = health.aio.HealthServicer()
        security = config.security
        self.principals = Principals(security.api_keys)
        open_services = (health.SERVICE_NAME,) if security.open_health else ()
        self.server = grpc.aio.server(
            interceptors=[ApiKeyAuth(self.principals, open_services), MalformedRequests()],
            options=[("grpc.max_receive_message_length", config.max_message_bytes),
                     ("grpc.max_send_message_length", _MAX_REPLY_BYTES),
                     ("grpc.so_reuseport", 0)])
        self.servicer = add_generation_service(self.server, self.client, self.metrics, config,
                                               self.principals)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if security.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address, credentials = f"{config.host}:{config.port}", server_credentials(security)
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._datastores: list[str] = []
        """Names of the datastores this server opened (closed when it stops)."""
        self.stopped = asyncio.Event()

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Binds and answers health NOT_SERVING at once; SERVING after load and warmup."""
        self._loop = asyncio.get_running_loop()
        await self._set_health(False)
        await self.server.start()
        log.info("listening on %s:%d; loading %s", self.config.host, self.port,
                 self.client.config.model.model)
        if self.config.metrics_port is not None:
            self.metrics.serve_http(self.config.metrics_port, self.config.metrics_host)
        await asyncio.to_thread(self._open_datastores)
        await self.client.start(warmup=self.config.warmup)
        await asyncio.to_thread(self.servicer.prepare)
        prompt_bytes = self.servicer.ctx.max_prompt_bytes
        if prompt_bytes > self.config.max_message_bytes:
            log.warning("max prompt bytes %d > max message bytes %d: the transport refuses "
                        "prompts in between", prompt_bytes, self.config.max_message_bytes)
        await self._set_health(True)
        log.info("serving on %s:%d", self.config.host, self.port)

    def _open_datastores(self) -> None:
        """Maps the configured kNN-LM datastores (before the model loads: a store built with
        another model fails the start at once). Raises ValueError naming the store."""
        if not self.config.datastores:
            return
        from engine.loader import model_fingerprint, resolve_model_dir

        fingerprint = model_fingerprint(resolve_model_dir(self.client.config.model.model))
        for name, path in self.config.datastores.items():
            store = stores.open_datastore(name, path, fingerprint)
            self._datastores.append(name)
            log.info("datastore %s: %d keys, %s index (%s)", name, len(store), store.kind, path)

    def _on_engine_error(self, exc: BaseException) -> None:
        # Called on the engine thread: hop onto the server's loop.
        log.error("engine failed: %r; health -> NOT_SERVING", exc)
        if self._loop is not None and not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._set_health(False), self._loop)

    async def drain(self, timeout_s: float | None = None) -> None:
        """NOT_SERVING, refuse new requests, let in-flight ones finish up to the timeout,
        abort the rest, then stop the gRPC server and the engine."""
        await self._set_health(False)
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        await self.client.drain(timeout_s)
        await self.stop(grace=1.0)

    async def stop(self, grace: float | None = 0) -> None:
        await self.server.stop(grace)
        await asyncio.to_thread(self.client.shutdown)
        self.servicer.close()
        for name in self._datastores:
            stores.close_datastore(name)
        self.stopped.set()


async def serve(engine_config: EngineConfig, config: ServerConfig, engine_future,
                on_signal_ready) -> None:
    """Runs until a signal drains the server; a second signal aborts everything at once.

    `on_signal_ready(handler)` receives the thread-safe signal handler to install.
    """
    server = GenerationServer(engine_config, config, engine_future)
    loop = asyncio.get_running_loop()
    starting = loop.create_task(server.start())
    stopping: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        if not starting.done() or stopping:
            log.warning("signal %d: stopping now", signum)
            starting.cancel()
            if server.client.front is not None:
                server.client.front.abort_all()
            stopping.append(loop.create_task(server.stop(grace=0)))
            return
        log.info("signal %d: draining (up to %.0f s)", signum, config.drain_timeout_s)
        stopping.append(loop.create_task(server.drain()))

    on_signal_ready(lambda signum: loop.call_soon_threadsafe(on_signal, signum))
    try:
        await starting
    except asyncio.CancelledError:
        pass
    await server.stopped.wait()


def run(engine_config: EngineConfig, config: ServerConfig) -> int:
    """Blocking entry point: gRPC on a uvloop thread; the engine is built and stepped on the
    main thread (see `AsyncEngine`: torch CPU work must stay on one thread). With replicas,
    there is no engine here: gRPC runs on the main thread."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if config.cluster.replicas:
        return _run_front(engine_config, config)
    engine_future: concurrent.futures.Future = concurrent.futures.Future()
    handler: list = []
    failure: list[BaseException] = []

    def grpc_thread() -> None:
        try:
            uvloop.run(serve(engine_config, config, engine_future, handler.append))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failure.append(exc)
        if engine_future.done() and engine_future.exception() is None:
            engine_future.result().shutdown()  # the main thread's loop returns

    _route_signals(handler)
    thread = threading.Thread(target=grpc_thread, name="polydecode-grpc", daemon=True)
    thread.start()
    try:
        front = AsyncEngine(Engine(engine_config), start_thread=False)
    except Exception as exc:  # noqa: BLE001 - the gRPC thread reports it
        engine_future.set_exception(exc)
    else:
        engine_future.set_result(front)
        if thread.is_alive():
            front.run_forever()
    thread.join()
    if failure:
        log.error("server failed: %r", failure[0], exc_info=failure[0])
        return 1
    return 0


def _route_signals(handler: list) -> None:
    """SIGTERM / SIGINT go to the server's drain handler once `serve` has installed it."""

    def on_signal(signum, _frame) -> None:
        if not handler:
            raise SystemExit(128 + signum)
        handler[0](signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _run_front(engine_config: EngineConfig, config: ServerConfig) -> int:
    """`run` with engine replicas: the event loop on the main thread, signals drain it."""
    import uvloop

    handler: list = []
    _route_signals(handler)
    try:
        uvloop.run(serve(engine_config, config, None, handler.append))
    except Exception as exc:  # noqa: BLE001
        log.error("server failed: %r", exc, exc_info=exc)
        return 1
    return 0
