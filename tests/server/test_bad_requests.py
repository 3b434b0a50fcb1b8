"""Bad requests get the right status with the offending field named, and leave nothing behind."""

from __future__ import annotations

import grpc
import pytest

from server.pb import pb
from tests.server.conftest import text_request

INVALID, UNIMPLEMENTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED


def _req(**fields) -> pb.GenerateRequest:
    request = text_request("Hello there", 8)
    for path, value in fields.items():
        target, *rest = path.split("__")
        msg = request
        for name in [target, *rest][:-1]:
            msg = getattr(msg, name)
        leaf = [target, *rest][-1]
        if isinstance(value, list):
            getattr(msg, leaf).extend(value)
        elif isinstance(value, dict):
            getattr(msg, leaf).update(value)
        elif hasattr(value, "CopyFrom"):
            getattr(msg, leaf).CopyFrom(value)
        else:
            setattr(msg, leaf, value)
    return request


def _transform(name: str, **params) -> pb.Transform:
    t = pb.Transform(name=name)
    t.params.update(params)
    return t


def _prompt(*segments: pb.Segment, messages=()) -> pb.Prompt:
    return pb.Prompt(segments=list(segments), messages=list(messages))


VOCAB = 49152
CASES = [
    ("empty prompt", _req(prompt=_prompt()), INVALID, "prompt"),
    ("segments and messages", _req(prompt=_prompt(pb.Segment(text="a"), messages=[
        pb.ChatMessage(role="user", content="b")])), INVALID, "prompt"),
    ("empty segment", _req(prompt=_prompt(pb.Segment())), INVALID, "prompt.segments[0]"),
    ("empty token list", _req(prompt=_prompt(pb.Segment(text="a"), pb.Segment(
        tokens=pb.TokenIds()))), INVALID, "prompt.segments[1].tokens"),
    ("token id >= vocab", _req(prompt=_prompt(pb.Segment(tokens=pb.TokenIds(ids=[1, VOCAB])))),
     INVALID, "prompt.segments[0].tokens"),
    ("empty text", _req(prompt=_prompt(pb.Segment(text=""))), INVALID, "prompt.segments[0]"),
    ("bad chat role", _req(prompt=_prompt(messages=[pb.ChatMessage(role="robot", content="x")])),
     INVALID, "prompt.messages[0].role"),
    ("prompt too long", _req(prompt=_prompt(pb.Segment(tokens=pb.TokenIds(ids=[5] * 9000)))),
     INVALID, "prompt"),
    ("max_new_tokens over limit", _req(stopping__max_new_tokens=100000), INVALID,
     "stopping.max_new_tokens"),
    ("min > max new tokens", _req(stopping__min_new_tokens=20), INVALID,
     "stopping.min_new_tokens"),
    ("too many stop sequences", _req(stopping__stop_sequences=["a", "b", "c", "d", "e"]),
     INVALID, "stopping.stop_sequences"),
    ("stop sequence too long", _req(stopping__stop_sequences=["x" * 300]), INVALID,
     "stopping.stop_sequences"),
    ("empty stop sequence", _req(stopping__stop_sequences=[""]), INVALID,
     "stopping.stop_sequences"),
    ("stop token >= vocab", _req(stopping__stop_token_ids=[VOCAB + 1]), INVALID,
     "stopping.stop_token_ids"),
    ("negative temperature", _req(decoding__sampling=pb.Sampling(temperature=-1.0)), INVALID,
     "decoding.sampling.temperature"),
    ("nan temperature", _req(decoding__sampling=pb.Sampling(temperature=float("nan"))),
     INVALID, "decoding.sampling.temperature"),
    ("top_p zero", _req(decoding__sampling=pb.Sampling(top_p=0.0)), INVALID,
     "decoding.sampling.top_p"),
    ("top_p above one", _req(decoding__sampling=pb.Sampling(top_p=1.5)), INVALID,
     "decoding.sampling.top_p"),
    ("min_p above one", _req(decoding__sampling=pb.Sampling(min_p=2.0)), INVALID,
     "decoding.sampling.min_p"),
    ("seed too large", _req(decoding__sampling=pb.Sampling(seed=2**63)), INVALID,
     "decoding.sampling.seed"),
    ("negative repetition penalty", _req(penalties__repetition=-1.0), INVALID,
     "penalties.repetition"),
    ("frequency penalty out of range", _req(penalties__frequency=3.0), INVALID,
     "penalties.frequency"),
    ("presence penalty nan", _req(penalties__presence=float("nan")), INVALID,
     "penalties.presence"),
    ("logit bias too large", _req(penalties__logit_bias={5: 1000.0}), INVALID,
     "penalties.logit_bias"),
    ("logit bias token >= vocab", _req(penalties__logit_bias={VOCAB: 1.0}), INVALID,
     "penalties.logit_bias"),
    ("too many top logprobs", _req(response__top_logprobs=50), INVALID,
     "response.top_logprobs"),
    ("request id too long", _req(request_id="r" * 300), INVALID, "request_id"),
    ("parallel set of one", _req(prompt=_prompt(pb.Segment(parallel=pb.ParallelSet(
        members=[pb.TextOrTokens(text="a")])))), INVALID, "prompt.segments[0].parallel.members"),
    ("parallel set too big", _req(prompt=_prompt(pb.Segment(parallel=pb.ParallelSet(
        members=[pb.TextOrTokens(text="a")] * 5)))), INVALID,
     "prompt.segments[0].parallel.members"),
    ("parallel empty member", _req(prompt=_prompt(pb.Segment(parallel=pb.ParallelSet(
        members=[pb.TextOrTokens(text="a"), pb.TextOrTokens(text="")])))), INVALID,
     "prompt.segments[0].parallel.members[1]"),
    ("contrastive k too large", _req(decoding__contrastive=pb.ContrastiveSearch(top_k=65)),
     INVALID, "decoding.contrastive.top_k"),
    ("contrastive alpha above one", _req(decoding__contrastive=pb.ContrastiveSearch(
        top_k=4, penalty_alpha=1.5)), INVALID, "decoding.contrastive.penalty_alpha"),
    ("contrastive with logprobs", _req(decoding__contrastive=pb.ContrastiveSearch(top_k=4),
                                       response__top_logprobs=2), INVALID,
     "response.top_logprobs"),
    ("beam returns more than beams", _req(decoding__beam=pb.BeamSearch(
        num_beams=2, num_return=3)), INVALID, "decoding.beam.num_return"),
    ("beam with stop sequences", _req(decoding__beam=pb.BeamSearch(num_beams=2),
                                      stopping__stop_sequences=["x"]), INVALID,
     "stopping.stop_sequences"),
    ("beam length penalty nan", _req(decoding__beam=pb.BeamSearch(
        num_beams=2, length_penalty=float("nan"))), INVALID, "decoding.beam.length_penalty"),
    ("rankgen unknown scorer", _req(decoding__rankgen=pb.RankGenRerank(scorer="nope")),
     grpc.StatusCode.NOT_FOUND, "decoding.rankgen.scorer"),
    ("rankgen too many candidates", _req(decoding__rankgen=pb.RankGenRerank(
        beam_size=8, num_samples=32)), INVALID, "decoding.rankgen.num_samples"),
    ("rankgen top_p", _req(decoding__rankgen=pb.RankGenRerank(top_p=1.5)), INVALID,
     "decoding.rankgen.top_p"),
    ("knn-lm unknown datastore", _req(knn_lm=pb.KnnLm(datastore="no-such", k=8)),
     grpc.StatusCode.NOT_FOUND, "knn_lm.datastore"),
    ("knn-lm k too large", _req(knn_lm=pb.KnnLm(datastore="no-such", k=5000)), INVALID,
     "knn_lm.k"),
    ("invalid regex", _req(constraint__regex="([0-9]+"), INVALID, "constraint.regex"),
    ("invalid regex (outlines)", _req(constraint__regex="([0-9]+", constraint__backend="outlines"),
     INVALID, "constraint.regex"),
    ("schema not JSON", _req(constraint__json_schema="{type: object"), INVALID,
     "constraint.json_schema"),
    ("schema not an object", _req(constraint__json_schema="[1, 2]"), INVALID,
     "constraint.json_schema"),
    ("bad Lark grammar", _req(constraint__grammar='start: "a" undefined_rule'), INVALID,
     "constraint.grammar"),
    ("grammar on outlines", _req(constraint__grammar='start: "a"', constraint__backend="outlines"),
     INVALID, "constraint.backend"),
    ("unknown constraint backend", _req(constraint__regex="a", constraint__backend="xgrammar"),
     INVALID, "constraint.backend"),
    ("empty choice list", _req(constraint__choice=pb.Choices()), INVALID, "constraint.choice"),
    ("empty choice", _req(constraint__choice=pb.Choices(options=["a", ""])), INVALID,
     "constraint.choice"),
    ("backend without a constraint", _req(constraint__backend="llguidance"), INVALID,
     "constraint"),
    ("constraint twice", _req(constraint__regex="a", transforms=[_transform(
        "constraint", regex="b")]), INVALID, "constraint"),
    ("awrs without a condition", _req(decoding__awrs=pb.Awrs(num_particles=2)), INVALID,
     "decoding.awrs.predicate"),
    ("awrs unknown predicate", _req(decoding__awrs=pb.Awrs(predicate="nope"),
                                    constraint__regex="a"), grpc.StatusCode.NOT_FOUND,
     "decoding.awrs.predicate"),
    ("awrs too many particles", _req(decoding__awrs=pb.Awrs(num_particles=65),
                                     constraint__regex="a"), INVALID,
     "decoding.awrs.num_particles"),
    ("awrs one reject", _req(decoding__awrs=pb.Awrs(max_rejects=1), constraint__regex="a"),
     INVALID, "decoding.awrs.max_rejects"),
    ("awrs ess threshold", _req(decoding__awrs=pb.Awrs(ess_threshold=1.5),
                                constraint__regex="a"), INVALID, "decoding.awrs.ess_threshold"),
    ("awrs temperature nan", _req(decoding__awrs=pb.Awrs(temperature=float("nan")),
                                  constraint__regex="a"), INVALID, "decoding.awrs.temperature"),
    ("awrs with logprobs", _req(decoding__awrs=pb.Awrs(), constraint__regex="a",
                                response__top_logprobs=2), INVALID, "response.top_logprobs"),
    ("priority (not yet)", _req(priority=3), UNIMPLEMENTED, "priority"),
    ("prompt logprobs (not yet)", _req(response__prompt_logprobs=True), UNIMPLEMENTED,
     "response.prompt_logprobs"),
]


@pytest.mark.parametrize("request_, code, field", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request_names_the_field(served, request_, code, field):
    for rpc in (served.stub.Generate, lambda r: list(served.stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            rpc(request_)
        assert err.value.code() == code, err.value.details()
        assert err.value.details().startswith(f"{field}:"), err.value.details()


def test_bad_requests_leave_the_server_idle_and_serving(served):
    load = served.wait_idle()
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)
    assert served.stub.Generate(text_request("Still alive?", 4)).finished.usage.completion_tokens


def test_duplicate_running_request_id_is_refused(served):
    request = text_request("A long answer:", 200, request_id="dup")
    request.stopping.ignore_eos = True
    call = served.stub.GenerateStream(request)
    next(iter(call))
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Generate(text_request("Again", 4, request_id="dup"))
    assert err.value.code() == INVALID and err.value.details().startswith("request_id:")
    call.cancel()
    assert served.wait_idle().kv_blocks_used == 0
