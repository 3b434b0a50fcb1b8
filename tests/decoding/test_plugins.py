"""Plug-ins registered outside the package are usable by name everywhere: the offline engine,
the command line (`--plugin`, `--strategy`, `--strategy-params`, `--transform`) and the gRPC
server (`DecodingStrategy.plugin`, `GenerateRequest.transforms`, `GetModelInfo`).

The toy plug-ins live in this file. They register only when it is imported as the plug-in
module `tests.decoding.test_plugins` (by `--plugin`, or by the `toy` fixture), not when pytest
collects it under its own name: registered at collection, they would show up in every other
test module's `GetModelInfo`. Each use unregisters them afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys

import grpc
import msgspec
import pytest
import torch
from google.protobuf import struct_pb2

from decoding import registry
from decoding.base import (InvalidArgument, SamplingBatch, SelectionStrategy, StepDecision,
                           StepView, Transform)
from engine.sampling_params import SamplingParams
from server.cli import main
from server.pb import pb
from tests.factories import make_engine
from tests.server.conftest import start_server, text_request

PLUGIN_MODULE = "tests.decoding.test_plugins"
PROMPT = "The capital of France is"
MAX_NEW = 6


# ---- the toy plug-ins -----------------------------------------------------------------------

class KthBestParams(msgspec.Struct, frozen=True, kw_only=True, tag="kth_best"):
    """Emit the k-th most likely token of the processed logits each step."""

    k: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 8:
            raise InvalidArgument("k", "must be in [1, 8]")


class BanTokensParams(msgspec.Struct, frozen=True, kw_only=True, tag="ban_tokens"):
    """Never produce these token ids."""

    token_ids: list[int] = []


def _plugin(decorator):
    return decorator if __name__ == PLUGIN_MODULE else (lambda cls: cls)


@_plugin(registry.register_strategy(KthBestParams))
class KthBest(SelectionStrategy):
    """Not batchable: decides in `step`, one token for its one branch."""

    def step(self, view: StepView) -> StepDecision:
        token = int(view.logits[0].topk(self.params.k).indices[-1])
        return StepDecision(appends=[(view.branch_ids[0], token)], emit=[token])


@_plugin(registry.register_transform(BanTokensParams))
class BanTokens(Transform):
    def is_active(self, batch: SamplingBatch) -> bool:
        return bool(batch.rows_using(BanTokensParams)[0])

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows, params = batch.rows_using(BanTokensParams)
        pairs = [(r, t) for r, p in zip(rows, params) for t in p.token_ids]
        if pairs:
            index = torch.tensor(pairs, dtype=torch.int64, device=logits.device)
            logits[index[:, 0], index[:, 1]] = float("-inf")
        return logits


# ---- fixtures and oracles -------------------------------------------------------------------

@contextlib.contextmanager
def _unregistered_afterwards():
    """Unregisters the toy plug-ins and forgets the plug-in module on exit."""
    try:
        yield
    finally:
        for name in ("kth_best", "ban_tokens"):
            if name in registry.strategy_names() + registry.transform_names():
                registry.unregister(name)
        sys.modules.pop(PLUGIN_MODULE, None)


@pytest.fixture(scope="module")
def toy():
    """The plug-in module, imported (so registered) for this module's engine and server."""
    with _unregistered_afterwards():
        yield importlib.import_module(PLUGIN_MODULE)


@pytest.fixture(scope="module")
def engine(toy, model_dir):
    return make_engine(model_dir, num_blocks=64)


@pytest.fixture(scope="module")
def server(toy, model_dir):
    harness = start_server(model_dir, num_blocks=64)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    return hf_tokenizer(PROMPT).input_ids


def hf_kth_best(hf_model, prompt_ids, k: int, banned=(), n: int = MAX_NEW) -> list[int]:
    """The toy strategy's tokens, from HF transformers' logits (full recompute each step)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].float()
            logits[list(banned)] = float("-inf")
            ids.append(int(logits.topk(k).indices[-1]))
    return ids[len(prompt_ids):]


def _tokens(engine, params) -> list[int]:
    return engine.generate([PROMPT], params)[0].token_ids


# ---- (b) the command line: --plugin first, before the `toy` fixture registers ---------------

def _cli(model_dir, *extra: str) -> list[str]:
    # float32: the CLI's default dtype is "auto" (bfloat16 on CPUs with AVX512-BF16), and these
    # tokens are compared exactly with float32 HF logits.
    return ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--num-blocks", "64",
            "--dtype", "float32",
            "--max-new-tokens", str(MAX_NEW), "--ignore-eos", "--json", *extra]


def test_cli_plugin_flag_registers_and_runs_by_name(model_dir, hf_model, prompt_ids, capsys):
    assert "kth_best" not in registry.strategy_names()
    banned = hf_kth_best(hf_model, prompt_ids, 2, n=1)
    with _unregistered_afterwards():
        assert main(_cli(model_dir, "--plugin", PLUGIN_MODULE, "--strategy", "kth_best",
                         "--strategy-params", '{"k": 2}',
                         "--transform", f'ban_tokens={{"token_ids": {banned}}}')) == 0
        assert "kth_best" in registry.strategy_names()
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["token_ids"] == hf_kth_best(hf_model, prompt_ids, 2, banned)


# ---- (a) the offline engine -----------------------------------------------------------------

def test_engine_runs_the_toy_strategy_by_its_registered_params(toy, engine, hf_model,
                                                               prompt_ids):
    out = _tokens(engine, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True,
                                         strategy=toy.KthBestParams(k=2)))
    assert out == hf_kth_best(hf_model, prompt_ids, 2)
    assert registry.entry("kth_best").cls is toy.KthBest


def test_engine_ban_transform_equals_greedy_with_a_banning_bias(toy, engine):
    greedy = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, temperature=0.0)
    banned = _tokens(engine, greedy)[:2]
    out = _tokens(engine, msgspec.structs.replace(
        greedy, transforms=(toy.BanTokensParams(token_ids=banned),)))
    assert not set(out) & set(banned)
    assert out == _tokens(engine, msgspec.structs.replace(
        greedy, logit_bias={t: -100.0 for t in banned}))


def test_engine_runs_strategy_and_transform_together(toy, engine, hf_model, prompt_ids):
    banned = hf_kth_best(hf_model, prompt_ids, 3, n=1)
    out = _tokens(engine, SamplingParams(
        max_new_tokens=MAX_NEW, ignore_eos=True, strategy=toy.KthBestParams(k=3),
        transforms=(toy.BanTokensParams(token_ids=banned),)))
    assert out == hf_kth_best(hf_model, prompt_ids, 3, banned)


# ---- (b) the command line: invalid values ------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--strategy", "kth_best", "--strategy-params", '{"k": 0}'], "k: must be in [1, 8]"),
    (["--strategy", "kth_best", "--strategy-params", '{"q": 1}'], "q: kth_best has no such"),
    (["--transform", "no_such"], "transform: unknown transform 'no_such'"),
    (["--transform", 'ban_tokens={"token_ids": "x"}'], "ban_tokens.token_ids: Expected array"),
])
def test_cli_invalid_plugin_values_exit_2(toy, model_dir, capsys, extra, message):
    assert main(_cli(model_dir, "--plugin", PLUGIN_MODULE, *extra)) == 2
    assert f"polydecode: invalid argument: {message}" in capsys.readouterr().err


def test_cli_unknown_plugin_module_exits_2(model_dir, capsys):
    assert main(_cli(model_dir, "--plugin", "no_such_plugin_module")) == 2
    assert "invalid argument: plugin: cannot import" in capsys.readouterr().err


# ---- (c) the gRPC server --------------------------------------------------------------------

def _struct(**fields) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


def _plugin_request(name: str, params: dict, transforms=()) -> pb.GenerateRequest:
    request = text_request(PROMPT, MAX_NEW, decoding=pb.DecodingStrategy(
        plugin=pb.Plugin(name=name, params=_struct(**params))), transforms=list(transforms))
    request.stopping.ignore_eos = True
    return request


def test_server_runs_plugins_by_name(server, hf_model, prompt_ids):
    banned = hf_kth_best(hf_model, prompt_ids, 2, n=1)
    request = _plugin_request("kth_best", {"k": 2}, [
        pb.Transform(name="ban_tokens", params=_struct(token_ids=banned))])
    assert list(server.stub.Generate(request).token_ids) == \
        hf_kth_best(hf_model, prompt_ids, 2, banned)
    streamed = [t for e in server.stub.GenerateStream(request)
                if e.WhichOneof("event") == "delta" for t in e.delta.token_ids]
    assert streamed == hf_kth_best(hf_model, prompt_ids, 2, banned)


def test_server_plugin_field_accepts_built_ins_too(server):
    greedy = server.stub.Generate(text_request(PROMPT, MAX_NEW)).token_ids
    assert server.stub.Generate(_plugin_request("greedy", {})).token_ids[:1] == greedy[:1]


@pytest.mark.parametrize("request_, field", [
    (lambda: _plugin_request("no_such", {}), "decoding.plugin.name"),
    (lambda: _plugin_request("kth_best", {"k": 9}), "decoding.plugin.params.k"),
    (lambda: _plugin_request("kth_best", {"q": 1}), "decoding.plugin.params.q"),
    (lambda: _plugin_request("greedy", {}, [pb.Transform(name="no_such")]),
     "transforms[0].name"),
    (lambda: _plugin_request("greedy", {}, [pb.Transform(name="logit_bias")]),
     "transforms[0].name"),
    (lambda: _plugin_request("greedy", {}, [pb.Transform(
        name="ban_tokens", params=_struct(token_ids="x"))]), "transforms[0].params.token_ids"),
])
def test_server_bad_plugin_requests_name_the_field(server, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Generate(request_())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_model_info_lists_registered_plugins(server):
    info = server.stub.GetModelInfo(pb.ModelInfoRequest())
    assert list(info.strategies) == ["greedy", "sampling", "contrastive", "beam", "awrs",
                                     "rankgen", "kth_best"]
    # chain order: kNN-LM and plug-ins at 50 (registration order), constraint masks at 55
    assert list(info.transforms) == ["knn_lm", "ban_tokens", "constraint"]


def test_cli_generate_through_the_server_sends_plugins(server, hf_model, prompt_ids,
                                                       model_dir, capsys):
    banned = hf_kth_best(hf_model, prompt_ids, 2, n=1)
    assert main(["generate", "--server", server.address, "--prompt", PROMPT,
                 "--max-new-tokens", str(MAX_NEW), "--ignore-eos", "--json",
                 "--plugin", PLUGIN_MODULE, "--strategy", "kth_best",
                 "--transform", f'ban_tokens={{"token_ids": {banned}}}']) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["token_ids"] == hf_kth_best(hf_model, prompt_ids, 2, banned)
