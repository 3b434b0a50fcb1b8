"""Health at start and on drain, queue overflow, engine failure, and `polydecode serve` under
SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.config import Limits
from server.pb import pb, pb_grpc
from server.servicer import SERVICE_NAME
from tests.server.conftest import start_server, text_request

SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)
ROOT = Path(__file__).resolve().parents[2]


def _wait_for_readiness(harness, status: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while harness.readiness() != status and time.monotonic() < deadline:
        time.sleep(0.01)
    return harness.readiness()


def _long_request(request_id: str, max_new_tokens: int = 400) -> pb.GenerateRequest:
    request = text_request("Write a long essay about rivers.", max_new_tokens,
                           request_id=request_id)
    request.stopping.ignore_eos = True
    return request


def test_health_start_and_drain(model_dir):
    harness = start_server(model_dir, wait_ready=False, drain_timeout_s=30.0)
    try:
        seen = set()
        while not harness.started.done():  # the port answers before the model is loaded
            try:
                seen.add(harness.readiness())
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        harness.started.result()
        assert NOT_SERVING in seen and harness.readiness() == SERVING
        call = harness.stub.GenerateStream(_long_request("in-flight", 40))
        events = iter(call)
        next(events)
        future = asyncio.run_coroutine_threadsafe(harness.server.drain(), harness.loop)
        assert _wait_for_readiness(harness, NOT_SERVING) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.Generate(text_request("new call", 4))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(events)  # the in-flight request finishes normally during the drain
        assert rest[-1].finished.reason == pb.FINISH_LENGTH
        assert rest[-1].finished.usage.completion_tokens == 40
        future.result(timeout=60)
        assert harness.server.stopped.is_set()
    finally:
        harness.close()


def test_drain_timeout_aborts_the_rest(model_dir):
    harness = start_server(model_dir, drain_timeout_s=0.5, limits=Limits(max_new_tokens=500))
    try:
        call = harness.stub.GenerateStream(_long_request("slow", 500))
        events = iter(call)
        next(events), next(events)
        harness.call(harness.server.drain())
        last = list(events)[-1]
        assert last.finished.reason == pb.FINISH_CANCELLED
        assert 0 < last.finished.usage.completion_tokens < 500
        assert harness.server.client.front is not None
        kv = harness.server.client.engine.kv_cache
        assert kv.num_free_blocks == kv.num_blocks
    finally:
        harness.close()


def test_queue_overflow_answers_resource_exhausted(model_dir):
    harness = start_server(model_dir, max_num_seqs=1, max_waiting_requests=2)
    try:
        calls = []
        for i in range(3):  # one by one: admissions run concurrently on the tokenizer pool
            calls.append(harness.stub.GenerateStream(_long_request(f"q{i}")))
            next(iter(calls[-1]))  # started: admitted
            deadline = time.monotonic() + 10
            while harness.load().running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # q0 runs; the others wait (1 running + 2 waiting)
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.Generate(text_request("one too many", 4))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting queue is full" in err.value.details()
        retry = dict(err.value.trailing_metadata() or ()).get("grpc-status-details-bin")
        assert retry, "RESOURCE_EXHAUSTED carries google.rpc.RetryInfo details"
        for call in calls:
            call.cancel()
        assert harness.wait_idle().kv_blocks_used == 0
        assert harness.stub.Generate(text_request("room again", 4)).token_ids
    finally:
        harness.close()


def test_engine_failure_answers_internal_and_turns_not_serving(model_dir):
    harness = start_server(model_dir)
    try:
        runner = harness.server.client.engine.runner

        def broken(*args, **kwargs):
            raise RuntimeError("simulated kernel failure")

        runner.execute = broken
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.Generate(text_request("doomed", 4))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert _wait_for_readiness(harness, NOT_SERVING) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            harness.stub.Generate(text_request("after", 4))
        assert err.value.code() == grpc.StatusCode.INTERNAL
    finally:
        harness.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra", [[], ["--replicas", "2"]], ids=["one-process", "replicas"])
def test_polydecode_serve_drains_and_exits_cleanly_on_sigterm(model_dir, tmp_path, extra):
    """A stream still running at the drain timeout ends CANCELLED, then the process exits 0
    (with replicas: they are deleted and the local Ray cluster stopped)."""
    port, log_path = _free_port(), tmp_path / "serve.log"
    with open(log_path, "w") as log_file:  # Ray logs plenty: a file, not a pipe to fill
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(port), "--model",
             str(model_dir), "--num-blocks", "128", "--drain-timeout", "5", *extra], cwd=ROOT,
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                timeout=1).status == SERVING:
                    break
            except grpc.RpcError:
                assert proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        stub = pb_grpc.GenerationStub(channel)
        assert len(stub.Generate(text_request("Hi", 4)).token_ids) > 0
        events = iter(stub.GenerateStream(_long_request("at-sigterm")))
        next(events), next(events)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert list(events)[-1].finished.reason == pb.FINISH_CANCELLED
        assert 4.5 < time.monotonic() - start < 15
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        assert "draining" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
