"""`serve --replicas 2`: the gRPC front with two engine replicas of the default model on a local
Ray cluster (Ray Serve), against the single-process server (`served`) as the oracle.

The tests share one front and run in file order: the replica kill and the drain come last.
"""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import ray

import cluster
from engine.loader import model_fingerprint
from retrieval.corpus import kjv_path
from server.config import Cluster, Limits, ServerConfig
from server.pb import pb, pb_grpc
from tests.decoding.test_knn import make_kjv_store
from tests.factories import make_engine_config
from tests.server.conftest import Harness, text_request
from tests.server.test_knn_server import KNN, PROTO_KNN, _offline, _request

APP = "polydecode"
PREFIX_TOKENS = 512


@pytest.fixture(scope="module")
def front(model_dir, tmp_path_factory, hf_model, hf_tokenizer):
    """Two replicas, each opening the same kNN-LM datastore (read-only, memory-mapped)."""
    store = make_kjv_store(tmp_path_factory.mktemp("kjv") / "kjv", hf_model, hf_tokenizer,
                           fingerprint=model_fingerprint(model_dir))
    config = ServerConfig(port=0, drain_timeout_s=3.0, cluster=Cluster(replicas=2, app_name=APP),
                          datastores={"kjv": str(store)}, limits=Limits(max_new_tokens=512, max_stop_sequences=4,
                                        max_top_logprobs=5, max_parallel_members=4))
    harness = Harness(make_engine_config(model_dir, num_blocks=1024), config)
    yield harness
    harness.close()


def _events(harness, request) -> list[pb.GenerateEvent]:
    return list(harness.stub.GenerateStream(request))


def _long(request_id: str, text: str = "Write a long essay about rivers.") -> pb.GenerateRequest:
    request = text_request(text, 400, request_id=request_id)
    request.stopping.ignore_eos = True
    return request


def _streams_on_both(harness, name: str, text: str, at_least: int, at_most: int = 16):
    """Opens long streams one at a time, each past its `started` event, until there are
    `at_least` of them and both replicas hold one (the router balances by its cached queue
    lengths, which can lag just after a replica was replaced). Returns the calls, positioned
    after `started`, and the replica of each."""
    calls, on = [], []
    while len(calls) < at_least or len(set(on)) < 2:
        assert len(calls) < at_most, f"{at_most} streams, all on one replica: {set(on)}"
        call = harness.stub.GenerateStream(_long(f"{name}-{len(calls)}", text.format(len(calls))))
        on.append(next(call).started.replica)
        calls.append(call)
    return calls, on


def _mixed(i: int) -> pb.GenerateRequest:
    """Request i of the concurrent mix: greedy, seeded sampling, contrastive, beam, regex."""
    request = text_request(f"Write a short note about the number {i}.", 8 + i % 7,
                           request_id=f"mixed-{i}")
    kind = i % 5
    if kind == 1:
        request.decoding.sampling.CopyFrom(pb.Sampling(temperature=0.8, top_p=0.9, seed=i))
    elif kind == 2:
        request.decoding.contrastive.CopyFrom(pb.ContrastiveSearch(top_k=4, penalty_alpha=0.6))
    elif kind == 3:
        request.decoding.beam.CopyFrom(pb.BeamSearch(num_beams=3))
    elif kind == 4:
        request.constraint.regex = r" [0-9]{4}-[0-9]{2}-[0-9]{2}"
    return request


def test_32_mixed_streams_each_end_with_one_finished_on_both_replicas(front):
    async def one(stub, i):
        kinds, replica = [], None
        async for event in stub.GenerateStream(_mixed(i)):
            kind = event.WhichOneof("event")
            kinds.append(kind)
            if kind == "started":
                replica = event.started.replica
        return kinds, replica

    async def main():
        async with grpc.aio.insecure_channel(front.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(32)))

    results = asyncio.run(main())
    for kinds, replica in results:
        assert kinds[0] == "started" and kinds.count("started") == 1 and replica
        assert kinds[-1] == "finished" and kinds.count("finished") == 1
    assert len({replica for _, replica in results}) == 2
    load = front.wait_idle()
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)
    assert len(load.replicas) == 2
    assert load.kv_blocks_total == sum(r.kv_blocks_total for r in load.replicas) == 2 * 1024


@pytest.mark.parametrize("decoding", [
    pb.DecodingStrategy(greedy=pb.Greedy()),
    pb.DecodingStrategy(sampling=pb.Sampling(temperature=0.9, top_k=50, seed=1234)),
], ids=["greedy", "seeded-sampling"])
def test_outputs_equal_the_single_process_server(front, served, decoding):
    for prompt in ("The capital of France is", "List three colours:", "Once upon a time"):
        request = text_request(prompt, 24, decoding=decoding)
        want, got = served.stub.Generate(request), front.stub.Generate(request)
        assert list(got.token_ids) == list(want.token_ids) and got.text == want.text
        assert got.finished.reason == want.finished.reason


def test_rerank_equals_the_single_process_server(front, served):
    request = pb.RerankRequest(query="Which passage is about the sea?", passages=[
        "The ship sailed across the wide ocean.", "Bread is baked in an oven.",
        "Mountains rise above the clouds."], order_invariant=True)
    want, got = served.stub.Rerank(request), front.stub.Rerank(request)
    assert list(got.ranking) == list(want.ranking)
    assert got.scores == pytest.approx(want.scores, abs=1e-4)


def test_knn_lm_on_the_replicas_equals_the_offline_engine(front, model_dir):
    offline = _offline(model_dir, **KNN)
    for _ in range(2):  # two routing draws: most likely both replicas answer
        result = front.stub.Generate(_request(datastore="kjv", **PROTO_KNN))
        assert list(result.token_ids) == offline.token_ids
        assert [lp.logprob for lp in result.logprobs] == pytest.approx(
            [lp.logprob for lp in offline.logprobs], abs=1e-5)
    with pytest.raises(grpc.RpcError) as err:
        front.stub.Generate(_request(datastore="nope", **PROTO_KNN))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("knn_lm.datastore:")


def test_seeded_rankgen_equals_the_single_process_server(front, served):
    request = text_request("Write one sentence about the sea.", 16, decoding=pb.DecodingStrategy(
        rankgen=pb.RankGenRerank(beam_size=2, num_samples=4, tokens_per_round=8, seed=7)))
    want, got = served.stub.Generate(request), front.stub.Generate(request)
    assert list(got.token_ids) == list(want.token_ids)


def test_admission_errors_of_a_replica_name_the_field(front):
    request = text_request("Pick a date:", 8)
    request.constraint.regex = "([0-9"
    with pytest.raises(grpc.RpcError) as err:
        front.stub.Generate(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "constraint" in err.value.details()
    assert front.wait_idle().kv_blocks_used == 0


def test_abort_reaches_the_replica_that_holds_the_request(front):
    events = iter(front.stub.GenerateStream(_long("to-abort")))
    assert next(events).started.replica
    next(events)  # the first delta: it is running on its replica
    assert front.stub.Abort(pb.AbortRequest(request_ids=["to-abort", "nope"])).aborted == 1
    last = list(events)[-1]
    assert last.finished.reason == pb.FINISH_CANCELLED
    assert 0 < last.finished.usage.completion_tokens < 400
    assert front.wait_idle().kv_blocks_used == 0


def test_a_client_cancel_or_deadline_frees_the_request_on_its_replica(front):
    """400 tokens take ~20 s here: KV back to 0 within 10 s means the replica stopped."""
    call = front.stub.GenerateStream(_long("to-cancel"))
    events = iter(call)
    next(events), next(events)
    assert front.load().kv_blocks_used > 0
    call.cancel()
    load = front.wait_idle(timeout=10)
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)
    with pytest.raises(grpc.RpcError) as err:
        front.stub.Generate(_long("past-deadline"), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    load = front.wait_idle(timeout=10)
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)


def _kjv_prefixes(harness, count: int) -> list[list[int]]:
    """`count` disjoint runs of exactly PREFIX_TOKENS tokens of the King James Bible."""
    with open(kjv_path(), encoding="utf-8") as f:
        verses = [json.loads(line)["text"] for _, line in zip(range(3000), f)]
    ids = list(harness.stub.Tokenize(pb.TokenizeRequest(text=" ".join(verses))).token_ids)
    assert len(ids) >= count * PREFIX_TOKENS
    return [ids[i * PREFIX_TOKENS:(i + 1) * PREFIX_TOKENS] for i in range(count)]


def _hit_rate(harness, prefixes: list[list[int]]) -> float:
    """Sends every prefix twice (two rounds, pairs in flight together, one new token each) and
    returns the share of second visits that reused cached KV (`Usage.cached_tokens` > 0)."""
    async def one(stub, prefix, n):
        request = pb.GenerateRequest(prompt=pb.Prompt(segments=[
            pb.Segment(tokens=pb.TokenIds(ids=prefix)), pb.Segment(text=f" Visit {n}.")]),
            stopping=pb.Stopping(max_new_tokens=1))
        return (await stub.Generate(request)).finished.usage.cached_tokens

    async def main():
        async with grpc.aio.insecure_channel(harness.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            cached = []
            for n in range(2):
                for i in range(0, len(prefixes), 2):
                    cached.append(await asyncio.gather(
                        *(one(stub, p, n) for p in prefixes[i:i + 2])))
            return [c for pair in cached[len(cached) // 2:] for c in pair]

    second = asyncio.run(main())
    return sum(c > 0 for c in second) / len(second)


def test_prefix_affinity_reuses_cached_prefixes_far_more_often_than_load_routing(front):
    prefixes = _kjv_prefixes(front, 32)
    router = next(r for r in list(cluster.ROUTERS) if r.app_name == APP)
    affinity = _hit_rate(front, prefixes[:16])
    router.affinity = False
    try:
        load_only = _hit_rate(front, prefixes[16:])
    finally:
        router.affinity = True
    print(f"second-visit cached-prefix rate: affinity {affinity:.2f}, load only {load_only:.2f}")
    # Affinity sends every second visit to the replica that cached it; load routing picks
    # that replica about half of the time (P(>= 14 of 16) = 0.2% at one half).
    assert affinity == 1.0
    assert load_only <= 13 / 16
    assert front.wait_idle().kv_blocks_used == 0


def _actor_of(replica: str):
    return ray.get_actor(f"SERVE_REPLICA::{APP}#EngineReplica#{replica}", namespace="serve")


def test_a_killed_replica_ends_its_streams_unavailable_and_is_replaced(front):
    calls, on = _streams_on_both(front, "long", "Tell a long tale number {}.", at_least=6)
    streams = [iter(c) for c in calls]
    for s in streams:
        next(s)  # each is decoding on its replica
    victim = on[0]
    ray.kill(_actor_of(victim), no_restart=False)
    killed_at = time.monotonic()
    for stream, replica in zip(streams, on):
        if replica != victim:
            continue
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - killed_at < 10
    for stream, call, replica in zip(streams, calls, on):
        if replica != victim:  # the survivor's streams go on; cancelling frees their KV
            assert next(stream).WhichOneof("event") == "delta"
            call.cancel()
    deadline = time.monotonic() + 180
    while True:
        load = front.load()
        ids = {r.replica for r in load.replicas}
        if len(ids) == 2 and victim not in ids:
            break
        assert time.monotonic() < deadline, f"no replacement replica: {ids}"
        time.sleep(0.5)
    (replacement,) = ids - set(on)
    deadline, n = time.monotonic() + 60, 0
    while _events(front, text_request(f"Say hi {n}.", 2))[0].started.replica != replacement:
        assert time.monotonic() < deadline, "the replacement serves no request"
        n += 1
    load = front.wait_idle(timeout=30)
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)


def test_drain_aborts_the_streams_left_on_every_replica(front):
    """The engine side of SIGTERM (`GenerationServer.drain` runs this, then stops): streams
    still running at the drain timeout end CANCELLED on both replicas, their KV freed."""
    calls, _ = _streams_on_both(front, "drain", "Describe city {}.", at_least=4)
    drained = asyncio.run_coroutine_threadsafe(front.server.client.drain(1.0), front.loop)
    lasts = [list(c)[-1] for c in calls]
    assert drained.result(timeout=30) == len(calls)
    assert all(last.finished.reason == pb.FINISH_CANCELLED for last in lasts)
    with pytest.raises(grpc.RpcError) as err:
        front.stub.Generate(text_request("Too late.", 2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 10  # the replicas see the cancellations a moment later
    while True:
        load = front.call(front.server.client.load())
        busy = (load["running"], load["waiting"], load["kv_blocks_used"])
        if busy == (0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert busy == (0, 0, 0) and len(load["replicas"]) == 2
