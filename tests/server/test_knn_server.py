"""kNN-LM through the server and the command line: `serve --datastore NAME=DIR` opens a store
at start (refusing one another model built), `GetModelInfo` lists it, `GenerateRequest.knn_lm`
gives the offline engine's result, and bad requests name the field (NOT_FOUND for a store that
is not loaded, INVALID_ARGUMENT for a bad value)."""

from __future__ import annotations

import json

import grpc
import pytest

from decoding.knn import KnnLm
from engine.loader import model_fingerprint
from engine.sampling_params import SamplingParams
from retrieval import stores
from server.cli import main
from server.config import Limits, ServerConfig
from server.pb import pb
from tests.decoding.test_knn import make_kjv_store
from tests.factories import make_engine, make_engine_config
from tests.server.conftest import Harness, text_request

PROMPT = "And God said, Let there be"
MAX_NEW = 6
KNN = dict(k=16, temperature=10.0, lmbda=0.5)
"""KnnLm fields (the proto spells lmbda `lambda`)."""
PROTO_KNN = {"k": 16, "temperature": 10.0, "lambda": 0.5}


@pytest.fixture(scope="module")
def kjv_dir(tmp_path_factory, hf_model, hf_tokenizer, model_dir):
    return make_kjv_store(tmp_path_factory.mktemp("kjv") / "kjv", hf_model, hf_tokenizer,
                          fingerprint=model_fingerprint(model_dir))


def _harness(model_dir, datastores: dict, wait_ready: bool = True) -> Harness:
    config = ServerConfig(port=0, drain_timeout_s=1.0, datastores=datastores,
                          limits=Limits(max_new_tokens=64, max_top_logprobs=5))
    return Harness(make_engine_config(model_dir, num_blocks=64), config, wait_ready)


@pytest.fixture(scope="module")
def server(model_dir, kjv_dir):
    harness = _harness(model_dir, {"kjv": str(kjv_dir)})
    yield harness
    harness.close()
    assert stores.datastore_names() == []  # the server closed what it opened


def _request(**knn_fields) -> pb.GenerateRequest:
    request = text_request(PROMPT, MAX_NEW, knn_lm=pb.KnnLm(**knn_fields),
                           response=pb.ResponseOptions(top_logprobs=3))
    request.stopping.ignore_eos = True
    return request


def _offline(model_dir, **knn_fields):
    engine = make_engine(model_dir, num_blocks=64)
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True,
                            logprobs=3, transforms=(KnnLm(datastore="kjv", **knn_fields),))
    return engine.generate([PROMPT], params)[0]


def test_model_info_lists_datastores(server, kjv_dir):
    info = server.stub.GetModelInfo(pb.ModelInfoRequest())
    assert [(d.name, d.dim, d.index) for d in info.datastores] == [("kjv", 576, "flat")]
    assert info.datastores[0].keys == stores.get_datastore("kjv").meta.count
    assert "knn_lm" in info.transforms


def test_served_knn_lm_equals_the_offline_engine(server, model_dir):
    result = server.stub.Generate(_request(datastore="kjv", **PROTO_KNN))
    offline = _offline(model_dir, **KNN)
    assert list(result.token_ids) == offline.token_ids
    served = [lp.logprob for lp in result.logprobs]
    assert served == pytest.approx([lp.logprob for lp in offline.logprobs], abs=1e-5)
    plain = server.stub.Generate(text_request(PROMPT, MAX_NEW))
    assert list(plain.token_ids) != offline.token_ids  # the datastore changed the text


@pytest.mark.parametrize("fields, code, field", [
    (dict(datastore="nope"), grpc.StatusCode.NOT_FOUND, "knn_lm.datastore"),
    (dict(datastore=""), grpc.StatusCode.INVALID_ARGUMENT, "knn_lm.datastore"),
    (dict(datastore="kjv", k=5000), grpc.StatusCode.INVALID_ARGUMENT, "knn_lm.k"),
    (dict(datastore="kjv", **{"lambda": 1.5}), grpc.StatusCode.INVALID_ARGUMENT,
     "knn_lm.lambda"),
    (dict(datastore="kjv", temperature=0.0), grpc.StatusCode.INVALID_ARGUMENT,
     "knn_lm.temperature"),
    (dict(datastore="kjv", temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT,
     "knn_lm.temperature"),
    (dict(datastore="kjv", entropy_threshold=-1.0), grpc.StatusCode.INVALID_ARGUMENT,
     "knn_lm.entropy_threshold"),
], ids=["unknown", "empty", "k", "lambda", "temperature", "nan", "entropy"])
def test_bad_knn_requests_name_the_field(server, fields, code, field):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(_request(**fields))
    assert err.value.code() == code, err.value.details()
    assert err.value.details().startswith(f"{field}:"), err.value.details()
    if code == grpc.StatusCode.NOT_FOUND:
        assert err.value.details() == "knn_lm.datastore: unknown datastore 'nope'; loaded: kjv"


def test_knn_lm_as_a_generic_transform_and_not_twice(server):
    request = text_request(PROMPT, MAX_NEW, transforms=[pb.Transform(name="knn_lm")])
    request.transforms[0].params.update({"datastore": "kjv", "k": 0})
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(request)
    assert err.value.details().startswith("transforms[0].params.k:"), err.value.details()
    request.transforms[0].params.update({"k": 8})
    request.knn_lm.datastore = "kjv"
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(request)
    assert err.value.details().startswith("knn_lm: given twice"), err.value.details()


def test_cli_generate_remote_and_offline_agree(server, kjv_dir, model_dir, capsys):
    flags = ["--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW), "--ignore-eos", "--json",
             "--knn-k", "16", "--knn-temperature", "10", "--knn-lambda", "0.5"]
    assert main(["generate", "--server", server.address, "--datastore", "kjv", *flags]) == 0
    remote = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["generate", "--model", str(model_dir), "--num-blocks", "64",
                 "--datastore", f"kjv-cli={kjv_dir}", *flags]) == 0
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stores.close_datastore("kjv-cli")
    assert remote["token_ids"] == offline["token_ids"] == _offline(model_dir, **KNN).token_ids
    assert main(["generate", "--server", server.address, "--datastore", "nope", *flags]) == 2
    assert "NOT_FOUND: knn_lm.datastore: unknown datastore 'nope'" in capsys.readouterr().err


def test_a_datastore_of_another_model_is_refused_at_start(model_dir, tmp_path, hf_model,
                                                          hf_tokenizer):
    other = make_kjv_store(tmp_path / "other", hf_model, hf_tokenizer, fingerprint="0" * 64)
    harness = _harness(model_dir, {"other": str(other)}, wait_ready=False)
    try:
        with pytest.raises(ValueError, match="fingerprint") as err:
            harness.started.result(timeout=120)
        assert "'other'" in str(err.value) and "not the served model" in str(err.value)
        assert stores.get_datastore("other") is None
    finally:
        harness.close()
