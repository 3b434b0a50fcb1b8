"""`ReplicaSet` and `RemoteStream` against a stand-in deployment handle: the admission timeout,
refused requests, and the final output of an aborted stream (no Ray cluster needed)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import psutil
import pytest

from cluster import replica_set
from cluster.replica import Accepted, Rejected, ReplicaSetup
from cluster.replica_set import ReplicaSet
from engine.errors import InvalidArgument
from engine.messages import RequestOutput
from server.config import Cluster
from server.errors import Unavailable
from tests.factories import make_engine_config


class Response:
    """A streaming deployment response: yields `items`, then waits until cancelled."""

    def __init__(self, items) -> None:
        self.items = list(items)
        self.cancelled = asyncio.Event()

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        await self.cancelled.wait()
        raise RuntimeError("the call was cancelled")  # what Serve raises is its own type

    def cancel(self) -> None:
        self.cancelled.set()


class Handle:
    app_name = "test"

    def __init__(self, response: Response) -> None:
        self.response = response
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, *args, **kwargs):
        return self.response


def _replica_set(model_dir, response: Response) -> ReplicaSet:
    setup = ReplicaSetup(engine=make_engine_config(model_dir))
    return ReplicaSet(setup, Cluster(replicas=1), handle=Handle(response))


def _output(n: int, **kwargs) -> RequestOutput:
    return RequestOutput(req_id="r", new_token_ids=[n], new_text=str(n), num_output_tokens=n,
                         num_prompt_tokens=5, num_cached_tokens=4, num_forward_tokens=5 + n,
                         queue_time=0.01, **kwargs)


def test_a_request_no_replica_admits_gets_unavailable(model_dir, monkeypatch):
    monkeypatch.setattr(replica_set, "_ACCEPT_TIMEOUT_S", 0.2)
    response = Response([])
    with pytest.raises(Unavailable, match="no engine replica admitted"):
        asyncio.run(_replica_set(model_dir, response).submit("Hello", None))
    assert response.cancelled.is_set()


def test_a_refused_request_raises_the_replicas_error(model_dir):
    error = InvalidArgument("constraint.regex", "unclosed group")
    with pytest.raises(InvalidArgument, match="constraint.regex"):
        asyncio.run(_replica_set(model_dir, Response([Rejected(error)])).submit("Hi", None))


def test_an_aborted_stream_ends_with_the_counts_the_replica_sent(model_dir):
    async def main():
        response = Response([Accepted("r", 5, "replica-a"), [_output(1), _output(2)]])
        replicas = _replica_set(model_dir, response)
        stream = await replicas.submit("Hi", None)
        got = [await stream.__anext__(), await stream.__anext__()]
        pending = asyncio.ensure_future(stream.__anext__())  # waits on the replica
        await asyncio.sleep(0.05)
        assert replicas.abort("r") and not replicas.abort("r")
        got.append(await pending)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return got, response

    got, response = asyncio.run(main())
    assert response.cancelled.is_set()
    assert [o.num_output_tokens for o in got] == [1, 2, 2]
    final = got[-1]
    assert final.finished and final.finish_reason == "abort" and final.new_token_ids == []
    assert (final.num_prompt_tokens, final.num_cached_tokens, final.num_forward_tokens) == \
        (5, 4, 7)


class FlakyRayInit:
    """`ray.init` that, `failures` times, starts a process (a stand-in for a GCS whose raylet
    never registers) and raises what Ray raises on its 30 s startup timeout."""

    def __init__(self, failures: int, message: str) -> None:
        self.failures, self.message, self.calls, self.started = failures, message, 0, []

    def __call__(self, **kwargs) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            self.started.append(subprocess.Popen([sys.executable, "-c", "import time; "
                                                  "time.sleep(60)"]))
            raise Exception(self.message)  # Ray's own type for it


TIMEOUT = "The current node timed out during startup. This could happen because ..."


GCS_TIMEOUT = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0123"


@pytest.mark.parametrize("message", [TIMEOUT, GCS_TIMEOUT], ids=["raylet", "gcs"])
def test_a_local_ray_start_that_times_out_is_cleaned_up_and_tried_again(model_dir, monkeypatch,
                                                                        message):
    init = FlakyRayInit(failures=2, message=message)
    monkeypatch.setattr(replica_set.ray, "init", init)
    monkeypatch.setattr(replica_set.ray, "shutdown", lambda: None)
    _replica_set(model_dir, Response([]))._start_local_ray()
    assert init.calls == 3
    assert len(init.started) == 2
    assert not any(psutil.pid_exists(proc.pid) for proc in init.started)  # killed and reaped


@pytest.mark.parametrize("message", [TIMEOUT, "port 6379 is already in use"])
def test_a_local_ray_start_gives_up_after_three_timeouts_or_any_other_error(
        model_dir, monkeypatch, message):
    init = FlakyRayInit(failures=5, message=message)
    monkeypatch.setattr(replica_set.ray, "init", init)
    monkeypatch.setattr(replica_set.ray, "shutdown", lambda: None)
    with pytest.raises(Exception, match=message[:20]):
        _replica_set(model_dir, Response([]))._start_local_ray()
    assert init.calls == (3 if message == TIMEOUT else 1)
    assert not any(psutil.pid_exists(proc.pid) for proc in init.started)
