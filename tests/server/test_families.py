"""Every model family behind the gRPC server: GetModelInfo names the family and its strategies,
streams equal the offline engine on the same directory (contrastive search and a set-based
prompt included), and a cancelled stream returns its KV blocks or state slots."""

from __future__ import annotations

import re

import pytest

from decoding.params import Contrastive
from engine.prompt import Parallel, StructuredPrompt
from engine.sampling_params import SamplingParams
from server.pb import pb
from tests.factories import make_engine
from tests.models.test_transnormer import write_checkpoint
from tests.server.conftest import start_server, text_request

pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = "Pick a pet:"
MEMBERS = [" a dog", " a very large cat", " a fish"]
SUFFIX = "\nBest:"


@pytest.fixture(scope="module", params=["transnormer", "gpt2"])
def family_dir(request, tmp_path_factory, model_dir):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "transnormer":
        write_checkpoint(path, model_dir, heads=4)
    else:
        from tests.models.test_gpt2_oracle import make_hf_gpt2, save_model_dir
        save_model_dir(make_hf_gpt2(seed=0), path, model_dir)
    return request.param, path


@pytest.fixture(scope="module")
def served_family(family_dir):
    harness = start_server(family_dir[1], num_blocks=16)
    yield harness
    harness.close()


def _stream_tokens(harness, request) -> list[int]:
    tokens = []
    for event in harness.stub.GenerateStream(request):
        if event.WhichOneof("event") == "delta":
            tokens += event.delta.token_ids
    return tokens


def test_model_info_names_the_family(served_family, family_dir):
    family, _ = family_dir
    info = served_family.stub.GetModelInfo(pb.ModelInfoRequest())
    assert info.family == family
    assert set(info.strategies) == {"greedy", "sampling", "contrastive", "beam", "awrs",
                                "rankgen"}
    assert (info.kv_block_size == 0) == (family == "transnormer")


def test_contrastive_and_set_prompt_streams_equal_offline(served_family, family_dir):
    offline = make_engine(family_dir[1], num_blocks=16)
    contrastive = text_request("The capital of France is", 10)
    contrastive.decoding.contrastive.top_k = 4
    contrastive.decoding.contrastive.penalty_alpha = 0.6
    contrastive.stopping.ignore_eos = True
    expected = offline.generate(["The capital of France is"], SamplingParams(
        max_new_tokens=10, ignore_eos=True,
        strategy=Contrastive(top_k=4, penalty_alpha=0.6)))[0].token_ids
    assert _stream_tokens(served_family, contrastive) == expected

    structured = pb.GenerateRequest(
        prompt=pb.Prompt(segments=[
            pb.Segment(text=PREFIX),
            pb.Segment(parallel=pb.ParallelSet(members=[pb.TextOrTokens(text=m)
                                                        for m in MEMBERS])),
            pb.Segment(text=SUFFIX)]),
        stopping=pb.Stopping(max_new_tokens=8, ignore_eos=True))
    prompt = StructuredPrompt(segments=[PREFIX, Parallel(members=MEMBERS), SUFFIX])
    expected = offline.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0,
                                                         ignore_eos=True))[0].token_ids
    assert _stream_tokens(served_family, structured) == expected
    assert served_family.wait_idle().kv_blocks_used == 0


def test_cancelled_stream_frees_blocks_or_slots(served_family):
    request = text_request("Write a long story about a dragon.", 200)
    request.stopping.ignore_eos = True
    call = served_family.stub.GenerateStream(request)
    for i, _ in enumerate(call):
        if i == 4:
            assert served_family.load().kv_blocks_used > 0
            call.cancel()
            break
    load = served_family.wait_idle()
    assert (load.running, load.waiting, load.kv_blocks_used) == (0, 0, 0)


def test_constraints_run_on_every_family(served_family):
    """The byte-level vocabulary comes from each family's own tokenizer: a constrained stream
    matches, under masking and under AWRS."""
    masked = text_request("The year was", 12)
    masked.constraint.regex = r" [0-9]{4}"
    weighted = text_request("The year was", 12)
    weighted.constraint.regex = r" [0-9]{4}"
    weighted.decoding.awrs.CopyFrom(pb.Awrs(num_particles=2, seed=1))
    for request in (masked, weighted):
        result = served_family.stub.Generate(request)
        assert re.fullmatch(r" [0-9]{4}", result.text), result.text
