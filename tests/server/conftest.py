"""Real loopback servers on the default model: each runs on its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import GenerationServer
from server.config import Limits, ServerConfig
from server.pb import pb, pb_grpc
from server.servicer import SERVICE_NAME
from tests.factories import make_engine_config


class Harness:
    """A GenerationServer on port 0 plus blocking helpers for tests."""

    def __init__(self, engine_config, config: ServerConfig, wait_ready: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = self.call(self._make(engine_config, config))
        self.address = f"127.0.0.1:{self.server.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.started = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop)
        if wait_ready:
            self.started.result(timeout=300)

    @staticmethod
    async def _make(engine_config, config):
        return GenerationServer(engine_config, config)

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def readiness(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status

    def load(self) -> pb.Load:
        return self.stub.GetLoad(pb.LoadRequest())

    def wait_idle(self, timeout: float = 10.0) -> pb.Load:
        """Polls GetLoad until no request runs or waits and no KV block is in use."""
        deadline = time.monotonic() + timeout
        while True:
            load = self.load()
            if (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0) \
                    or time.monotonic() > deadline:
                return load
            time.sleep(0.02)

    def close(self) -> None:
        if not self.server.stopped.is_set():
            self.call(self.server.stop(grace=0))
        self.channel.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def start_server(model_dir, wait_ready: bool = True, limits: Limits | None = None,
                 drain_timeout_s: float = 5.0, **engine_kwargs) -> Harness:
    engine_kwargs.setdefault("num_blocks", 256)
    config = ServerConfig(port=0, drain_timeout_s=drain_timeout_s, limits=limits or Limits(
        max_new_tokens=512, max_stop_sequences=4, max_top_logprobs=5, max_parallel_members=4))
    return Harness(make_engine_config(model_dir, **engine_kwargs), config, wait_ready)


@pytest.fixture(scope="session")
def served(model_dir):
    """The shared server of the read-mostly tests (do not drain it)."""
    harness = start_server(model_dir)
    yield harness
    harness.close()


def text_request(text: str, max_new_tokens: int = 16, **kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=pb.Prompt(segments=[pb.Segment(text=text)]),
                              stopping=pb.Stopping(max_new_tokens=max_new_tokens), **kwargs)
