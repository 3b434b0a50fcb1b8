"""`cluster.app:build`, the server as one Ray Serve application (what a KubeRay RayService
deploys from `deploy/rayservice.yaml`), run on a local Ray cluster."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve

from cluster.app import build
from server.pb import pb, pb_grpc
from server.servicer import SERVICE_NAME
from tests.server.conftest import text_request

APP = "polydecode-app"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_port(model_dir):
    port = _free_port()
    argv = ["--replicas", "1", "--threads", "1", "--model", str(model_dir), "--dtype", "float32",
            "--num-blocks", "256", "--port", str(port), "--drain-timeout", "2"]
    ray.init(num_cpus=3, include_dashboard=False, namespace="polydecode-app-test",
             object_store_memory=256 << 20, logging_level="WARNING")
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build({"argv": argv}), name=APP, route_prefix=None)
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_application_serves_grpc_from_its_front_replica(app_port, served):
    with grpc.insecure_channel(f"127.0.0.1:{app_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GenerationStub(channel)
        request = text_request("The capital of France is", 16)
        got, want = stub.Generate(request), served.stub.Generate(request)
        assert list(got.token_ids) == list(want.token_ids)
        load = stub.GetLoad(pb.LoadRequest())
        assert len(load.replicas) == 1 and load.kv_blocks_total == 256


def test_deleting_the_application_drains_the_front(app_port):
    with grpc.insecure_channel(f"127.0.0.1:{app_port}") as channel:
        request = text_request("Write a long essay about rivers.", 400)
        request.stopping.ignore_eos = True
        events = iter(pb_grpc.GenerationStub(channel).GenerateStream(request))
        assert next(events).started.replica
        next(events)
        deleting = threading.Thread(target=serve.delete, args=(APP,))
        start = time.monotonic()
        deleting.start()
        last = list(events)[-1]
        assert last.finished.reason == pb.FINISH_CANCELLED  # after the 2 s drain timeout
        assert 1.5 < time.monotonic() - start < 20
        deleting.join(timeout=60)
        assert not deleting.is_alive()


def test_the_kuberay_manifest_deploys_this_application_with_valid_flags():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.cli import build_parser

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "cluster.app:build"
    args = build_parser().parse_args(["serve", *app.args["argv"]])
    assert args.replicas > 0 and args.host == "0.0.0.0"
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"containerPort": args.port, "name": "grpc"} in head["containers"][0]["ports"]
