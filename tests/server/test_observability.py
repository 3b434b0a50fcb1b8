"""Server reflection (what generic gRPC tools use) and the Prometheus endpoint."""

from __future__ import annotations

import socket
import urllib.request

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf.descriptor_pool import DescriptorPool

from server.config import ServerConfig
from tests.factories import make_engine_config
from tests.server.conftest import Harness, text_request


def test_reflection_describes_the_generation_service(served):
    database = ProtoReflectionDescriptorDatabase(served.channel)
    services = set(database.get_services())
    assert {"polydecode.v1.Generation", "grpc.health.v1.Health"} <= services
    service = DescriptorPool(database).FindServiceByName("polydecode.v1.Generation")
    assert {m.name for m in service.methods} == {
        "GenerateStream", "Generate", "Abort", "Tokenize", "GetModelInfo", "GetLoad", "Rerank"}
    request = service.methods_by_name["Generate"].input_type
    assert request.oneofs_by_name.get("strategy") is None  # the oneof lives in DecodingStrategy
    assert "decoding" in request.fields_by_name and "constraint" in request.fields_by_name


def test_prometheus_metrics_count_requests_and_latencies(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    harness = Harness(make_engine_config(model_dir, num_blocks=128),
                      ServerConfig(port=0, metrics_port=port))
    try:
        for _ in range(2):
            harness.stub.Generate(text_request("Metrics, please:", 4))
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        assert 'polydecode_requests_total{code="OK"} 2.0' in text
        assert "polydecode_time_to_first_token_seconds_count 2.0" in text
        assert "polydecode_e2e_request_latency_seconds_count 2.0" in text
        assert "polydecode_inter_token_latency_seconds_count 6.0" in text
        assert "polydecode_kv_blocks_total 128.0" in text
    finally:
        harness.close()
