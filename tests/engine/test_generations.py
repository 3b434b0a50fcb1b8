"""Strategy generations in the engine: branches free every KV block on every exit path, survive
preemption, and cost what they should in forward tokens."""

from __future__ import annotations

import pytest

from decoding.params import BeamSearch, Contrastive
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

PROMPTS = ["The history of the Roman Empire", "Write a short poem about the sea:",
           "def quicksort(items):", "The three primary colors are"]
CONTRASTIVE = SamplingParams(max_new_tokens=12, strategy=Contrastive(top_k=4, penalty_alpha=0.6))
BEAM = SamplingParams(max_new_tokens=12, strategy=BeamSearch(num_beams=3, num_return=2))


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir, num_blocks=256)


def _idle(engine) -> bool:
    kv = engine.kv_cache
    return (kv.num_free_blocks == kv.num_blocks and not engine.scheduler.requests
            and not engine.generations.by_id)


@pytest.mark.parametrize("params", [CONTRASTIVE, BEAM], ids=["contrastive", "beam"])
def test_abort_midway_frees_every_branch(engine, params):
    req_id = engine.add_request(PROMPTS[0], params)
    for _ in range(4):
        engine.step()
    assert len(engine.generations.by_id[req_id].branches) > 1
    out = engine.abort(req_id)
    assert out.finished and out.finish_reason == "abort"
    assert _idle(engine)


def test_preemption_and_a_small_cache_do_not_change_outputs(engine, model_dir):
    params = [CONTRASTIVE, BEAM, SamplingParams(max_new_tokens=12, temperature=0.0)] * 2
    prompts = PROMPTS + PROMPTS[:2]
    want = engine.generate(prompts, params)
    small = make_engine(model_dir, num_blocks=12, max_num_batched_tokens=64)
    got = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):  # beams: same sequences; scores up to batching round-off
        assert (g.candidates is None) == (w.candidates is None)
        for gc, wc in zip(g.candidates or (), w.candidates or ()):
            assert gc.token_ids == wc.token_ids and gc.score == pytest.approx(wc.score, abs=1e-4)
    assert _idle(small) and _idle(engine)


def test_contrastive_costs_k_forward_tokens_per_emitted_token(engine):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True,
                            strategy=Contrastive(top_k=4, penalty_alpha=0.6))
    req_id = engine.add_request(PROMPTS[1], params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.req_id == req_id and out.finished else final
    prompt_len = final.num_prompt_tokens
    # the prompt once, then k candidate tokens per emitted token (the last step's candidates
    # are computed before the engine sees the length limit)
    assert final.num_output_tokens == 10
    assert final.num_forward_tokens == prompt_len + 4 * 10
    assert _idle(engine)


def test_strategy_params_reject_sampling_settings():
    from engine.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as err:
        SamplingParams(top_p=0.9, strategy=Contrastive())
    assert err.value.field == "top_p"
    with pytest.raises(InvalidArgument) as err:
        SamplingParams(stop=("x",), strategy=BeamSearch())
    assert err.value.field == "stop"
