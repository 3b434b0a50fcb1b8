"""End to end over a real loopback channel: streams equal the offline engine, nothing is lost
or duplicated under 64 concurrent streams, and every way out of a request frees its KV."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from engine.sampling_params import SamplingParams
from server.pb import pb, pb_grpc
from tests.factories import make_engine
from tests.server.conftest import text_request

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land",
           "List three primary colors:"]


@pytest.fixture(scope="module")
def offline(model_dir):
    return make_engine(model_dir, num_blocks=256)


def _collect(events) -> tuple[list[int], str, list]:
    token_ids, text, kinds = [], "", []
    for event in events:
        kind = event.WhichOneof("event")
        kinds.append((kind, event))
        if kind == "delta":
            token_ids += event.delta.token_ids
            text += event.delta.text
    return token_ids, text, kinds


@pytest.mark.parametrize("sampling", [None, pb.Sampling(temperature=0.8, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded-sampling"])
def test_stream_equals_offline_engine(served, offline, sampling):
    params = SamplingParams(max_new_tokens=24, temperature=0.0) if sampling is None else \
        SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    expected = offline.generate(PROMPTS, params)
    for prompt, want in zip(PROMPTS, expected):
        request = text_request(prompt, 24)
        if sampling is not None:
            request.decoding.sampling.CopyFrom(sampling)
        token_ids, text, kinds = _collect(served.stub.GenerateStream(request))
        assert token_ids == want.token_ids and text == want.text
        assert [k for k, _ in kinds][0] == "started" and [k for k, _ in kinds][-1] == "finished"
        finished = kinds[-1][1].finished
        assert finished.usage.completion_tokens == len(want.token_ids)
        assert finished.usage.prompt_tokens == len(want.prompt_token_ids)
        unary = served.stub.Generate(request)
        assert list(unary.token_ids) == want.token_ids and unary.text == want.text


def test_finish_reasons_stop_sequence_and_token_ids(served, offline):
    want = offline.generate(["The capital of France is"], SamplingParams(max_new_tokens=24,
                                                                         temperature=0.0))[0]
    stop = want.text[5:9]
    request = text_request("The capital of France is", 24)
    request.stopping.stop_sequences.append(stop)
    result = served.stub.Generate(request)
    assert result.finished.reason == pb.FINISH_STOP_SEQUENCE
    assert result.finished.stop_sequence == stop and stop not in result.text
    request = text_request("The capital of France is", 24)
    stop_id = want.token_ids[3]
    request.stopping.stop_token_ids.append(stop_id)
    result = served.stub.Generate(request)
    assert result.finished.reason == pb.FINISH_STOP_SEQUENCE
    assert result.finished.stop_token_id == stop_id
    assert list(result.token_ids) == want.token_ids[:want.token_ids.index(stop_id) + 1]
    result = served.stub.Generate(text_request("The capital of France is", 5))
    assert result.finished.reason == pb.FINISH_LENGTH and len(result.token_ids) == 5


def test_logprobs_match_offline(served, offline):
    want = offline.generate(["def fibonacci(n):"], SamplingParams(
        max_new_tokens=6, temperature=0.0, logprobs=3))[0]
    request = text_request("def fibonacci(n):", 6)
    request.response.top_logprobs = 3
    result = served.stub.Generate(request)
    assert [lp.id for lp in result.logprobs] == want.token_ids
    for got, exp in zip(result.logprobs, want.logprobs):
        assert got.logprob == pytest.approx(exp.logprob, abs=1e-5)
        assert [t.id for t in got.top] == [i for i, _ in exp.top]
        assert got.top[0].text == offline.tokenizer.decode([exp.top[0][0]],
                                                           skip_special_tokens=False)


def test_chat_messages_and_token_segments(served, offline):
    ids = offline.tokenizer.apply_chat_template("Name a fruit.")
    want = offline.generate([ids], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    chat = pb.GenerateRequest(prompt=pb.Prompt(messages=[pb.ChatMessage(
        role="user", content="Name a fruit.")]), stopping=pb.Stopping(max_new_tokens=12))
    assert list(served.stub.Generate(chat).token_ids) == want.token_ids
    head, tail = ids[:5], ids[5:]
    split = pb.GenerateRequest(prompt=pb.Prompt(segments=[
        pb.Segment(tokens=pb.TokenIds(ids=head)), pb.Segment(tokens=pb.TokenIds(ids=tail))]),
        stopping=pb.Stopping(max_new_tokens=12))
    assert list(served.stub.Generate(split).token_ids) == want.token_ids


def test_64_concurrent_streams_each_end_with_one_finished(served):
    async def one(stub, i):
        request = text_request(PROMPTS[i % len(PROMPTS)] + f" ({i})", 8 + i % 9)
        request.request_id = f"concurrent-{i}"
        kinds, n_tokens = [], 0
        async for event in stub.GenerateStream(request):
            kinds.append(event.WhichOneof("event"))
            n_tokens += len(event.delta.token_ids)
        return request.stopping.max_new_tokens, kinds, n_tokens

    async def main():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for max_new, kinds, n_tokens in results:
        assert kinds[0] == "started" and kinds.count("started") == 1
        assert kinds[-1] == "finished" and kinds.count("finished") == 1
        assert 1 <= n_tokens <= max_new
    assert served.wait_idle().kv_blocks_used == 0


def test_cancel_mid_stream_returns_kv_to_idle(served):
    idle = served.wait_idle()
    assert idle.kv_blocks_used == 0
    request = text_request("Write a very long story about a dragon.", 400)
    request.stopping.ignore_eos = True
    call = served.stub.GenerateStream(request)
    for i, _ in enumerate(call):
        if i == 6:
            assert served.load().kv_blocks_used > 0
            call.cancel()
            break
    load = served.wait_idle()
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)


def test_deadline_exceeded_frees_the_request(served):
    request = text_request("Count from one to a thousand:", 400)
    request.stopping.ignore_eos = True
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Generate(request, timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    load = served.wait_idle()
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)


def test_abort_rpc_and_time_limit_end_with_partial_output(served):
    request = text_request("Tell me everything about the ocean.", 400, request_id="to-abort")
    request.stopping.ignore_eos = True
    call = served.stub.GenerateStream(request)
    events = iter(call)
    next(events), next(events)  # started, first delta
    assert served.stub.Abort(pb.AbortRequest(request_ids=["to-abort", "unknown"])).aborted == 1
    last = list(events)[-1]
    assert last.finished.reason == pb.FINISH_CANCELLED
    assert 0 < last.finished.usage.completion_tokens < 400
    request = text_request("Tell me everything about the sky.", 400)
    request.stopping.ignore_eos, request.stopping.time_limit_ms = True, 300
    start = time.monotonic()
    result = served.stub.Generate(request)
    assert result.finished.reason == pb.FINISH_TIME_LIMIT and time.monotonic() - start < 5
    assert 0 < len(result.token_ids) < 400
    assert served.wait_idle().kv_blocks_used == 0


def test_tokenize_model_info_and_load(served, offline):
    text = "Hello, paged attention!"
    got = served.stub.Tokenize(pb.TokenizeRequest(text=text))
    assert list(got.token_ids) == offline.tokenizer.encode(text)
    assert len(got.tokens) == len(got.token_ids)
    info = served.stub.GetModelInfo(pb.ModelInfoRequest())
    assert info.vocab_size == offline.vocab_size and info.family == "llama"
    assert info.max_context == offline.max_model_len
    assert list(info.eos_token_ids) == list(offline.tokenizer.eos_token_ids)
    assert set(info.strategies) == {"greedy", "sampling", "contrastive", "beam", "awrs",
                                "rankgen"}
    assert list(info.transforms) == ["knn_lm", "constraint"] and not info.datastores
    load = served.load()
    assert load.kv_blocks_total == 256 and not load.draining
