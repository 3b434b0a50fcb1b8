"""Constraints and AWRS over gRPC: streamed constrained output with its Finished stats, AWRS
particles as candidates, a server-registered predicate, compilation off the event loop (other
streams go on while a hard schema compiles) and its time limit."""

from __future__ import annotations

import json
import re
import threading
import time

import grpc
import msgspec
import pytest

from constraints.predicates import load_predicate, unregister_predicate
from server.config import Limits, ServerConfig
from server.pb import pb
from tests.factories import make_engine_config
from tests.server.conftest import Harness, text_request


def _hard_schema(max_length: int) -> str:
    """Six free strings: outlines-core builds its index for seconds."""
    props = {f"f{i}": {"type": "string", "maxLength": max_length} for i in range(6)}
    return json.dumps({"type": "object", "properties": props, "required": list(props),
                       "additionalProperties": False})


@pytest.fixture(scope="module")
def outlines_served(model_dir):
    config = msgspec.structs.replace(make_engine_config(model_dir, num_blocks=256),
                                     constraint_backend="outlines",
                                     max_constraint_compile_s=1.0)
    harness = Harness(config, ServerConfig(port=0, drain_timeout_s=5.0, limits=Limits(
        max_new_tokens=512, max_stop_sequences=4, max_top_logprobs=5)))
    yield harness
    harness.close()


def test_constrained_stream_matches_and_reports_its_cost(served):
    request = text_request("The date today is", 24)
    request.constraint.regex = r" [0-9]{4}-[0-9]{2}-[0-9]{2}"
    events = list(served.stub.GenerateStream(request))
    text = "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")
    finished = events[-1].finished
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", text), text
    assert finished.reason == pb.FINISH_EOS
    assert finished.constraint.masks >= finished.usage.completion_tokens
    assert finished.constraint.masked_tokens > 40_000 * finished.constraint.masks
    info = served.stub.GetModelInfo(pb.ModelInfoRequest())
    assert list(info.constraints) == ["regex", "json_schema", "grammar", "choice"]
    assert list(info.constraint_backends) == ["llguidance", "outlines"]


def test_awrs_returns_weighted_particles(served):
    load_predicate("three_digits=constraints.predicates:digits_dash_word")
    try:
        request = text_request("Ticket number:", 16)
        request.decoding.awrs.CopyFrom(pb.Awrs(num_particles=4, seed=5,
                                               predicate="three_digits"))
        request.constraint.choice.options.extend(["123-abc", "456-xyz", "789-ok"])
        request.response.candidate_scores = True
        result = served.stub.Generate(request)
        assert result.text in ("123-abc", "456-xyz", "789-ok")
        assert len(result.candidates) == 4
        assert all(c.text in ("123-abc", "456-xyz", "789-ok") for c in result.candidates)
        assert result.candidates[0].text == result.text
        assert result.finished.constraint.checks >= result.finished.usage.completion_tokens
        info = served.stub.GetModelInfo(pb.ModelInfoRequest())
        assert "three_digits" in info.predicates and "awrs" in info.strategies
    finally:
        unregister_predicate("three_digits")
    assert served.wait_idle().kv_blocks_used == 0


def test_too_slow_to_compile_is_invalid_argument(outlines_served):
    request = text_request("JSON:", 8)
    request.constraint.json_schema = _hard_schema(41)
    with pytest.raises(grpc.RpcError) as err:
        outlines_served.stub.Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("constraint.json_schema: compiling took longer")


def test_other_requests_stream_while_a_schema_compiles(model_dir):
    config = msgspec.structs.replace(make_engine_config(model_dir, num_blocks=256),
                                     constraint_backend="outlines",
                                     max_constraint_compile_s=60.0)
    served = Harness(config, ServerConfig(port=0, drain_timeout_s=5.0))
    try:
        arrivals: list[float] = []
        stream = text_request("Once upon a time", 96)
        stream.stopping.ignore_eos = True

        def consume():
            for event in served.stub.GenerateStream(stream):
                if event.WhichOneof("event") == "delta":
                    arrivals.append(time.monotonic())

        reader = threading.Thread(target=consume)
        reader.start()
        while not arrivals:
            time.sleep(0.01)
        hard = text_request("JSON:", 4)
        hard.constraint.json_schema = _hard_schema(40)
        start = time.monotonic()
        list(served.stub.GenerateStream(hard))
        done = time.monotonic()
        reader.join()
        during = [t for t in arrivals if start < t < done]
        assert done - start > 1.0, "the schema compiled too fast to tell"
        assert len(during) >= 5, (len(during), done - start)
    finally:
        served.close()
