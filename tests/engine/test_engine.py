"""Engine behaviour on the real default model: seeds, abort, fork, captures, stops, logprobs,
and the async streaming front. HF transformers is the oracle where numbers are compared."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.errors import InvalidArgument
from engine.sampling_params import SamplingParams
from tests.factories import make_engine_config

PROMPT = "The history of the printing press begins"
SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234,
                         ignore_eos=True)


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine(make_engine_config(model_dir, num_blocks=256))


def _assert_all_blocks_free(engine: Engine) -> None:
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_same_seed_same_output_alone_and_in_mixed_batch(engine):
    alone = engine.generate([PROMPT], SAMPLED)[0].token_ids
    others = [SamplingParams(max_new_tokens=12, temperature=t, seed=s, ignore_eos=True)
              for t, s in [(0.0, None), (1.2, 7), (0.5, None), (1.0, 99)]]
    prompts = ["Hi", "A long time ago", PROMPT, "def f(x):", "Colours: red,"]
    mixed = engine.generate(prompts, [others[0], others[1], SAMPLED, others[2], others[3]])
    assert mixed[2].token_ids == alone
    reordered = engine.generate([PROMPT, "Hi"], [SAMPLED, others[1]])
    assert reordered[0].token_ids == alone
    different = engine.generate([PROMPT], SamplingParams(
        max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1235, ignore_eos=True))
    assert different[0].token_ids != alone
    _assert_all_blocks_free(engine)


def test_abort_running_and_waiting_requests_frees_every_block(model_dir):
    engine = Engine(make_engine_config(model_dir, num_blocks=64, max_num_seqs=2))
    ids = [engine.add_request(f"Request number {i} says", SamplingParams(
        max_new_tokens=50, temperature=0.0, ignore_eos=True)) for i in range(4)]
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 2
    final = engine.abort(ids[0])
    assert final.finished and final.finish_reason == "abort"
    engine.abort(ids[3])  # still waiting
    assert engine.abort("no-such-request") is None
    while engine.has_unfinished_requests():
        engine.step()
    _assert_all_blocks_free(engine)


def _start_greedy(engine: Engine, max_new_tokens: int, num_steps: int):
    """(greedy reference output, running req_id, tokens streamed so far per request)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    expected = engine.generate([PROMPT], params)[0].token_ids
    req_id = engine.add_request(PROMPT, params)
    outputs: dict[str, list[int]] = {req_id: []}
    _run(engine, outputs, num_steps)
    return expected, req_id, outputs


def _run(engine: Engine, outputs: dict[str, list[int]], num_steps: int | None = None) -> None:
    step = 0
    while engine.has_unfinished_requests() and (num_steps is None or step < num_steps):
        for out in engine.step():
            outputs[out.req_id] += out.new_token_ids
        step += 1


def test_fork_shares_blocks_and_both_branches_continue_exactly(engine):
    expected, req_id, outputs = _start_greedy(engine, max_new_tokens=20, num_steps=4)
    parent = engine.scheduler.requests[req_id]
    num_tokens = parent.num_computed_tokens
    assert num_tokens % engine.kv_cache.block_size != 0  # the partial block is copied
    child_id = engine.fork(req_id)
    outputs[child_id] = list(outputs[req_id])
    shared = engine.kv_cache.get_block_ids(child_id)[:-1]
    assert shared == engine.kv_cache.get_block_ids(req_id)[:len(shared)]
    assert all(engine.kv_cache.block_pool.blocks[b].ref_cnt == 2 for b in shared)
    _run(engine, outputs)
    assert outputs[req_id] == expected and outputs[child_id] == expected
    _assert_all_blocks_free(engine)


def test_fork_of_a_fork_in_one_step_copies_from_the_original(engine):
    expected, req_id, outputs = _start_greedy(engine, max_new_tokens=12, num_steps=3)
    child = engine.fork(req_id)
    grandchild = engine.fork(child)  # its copy source is a block the first copy fills
    with pytest.raises(InvalidArgument) as err:
        engine.fork(req_id, child_id=child)
    assert err.value.field == "child_id"
    for branch in (child, grandchild):
        outputs[branch] = list(outputs[req_id])
    _run(engine, outputs)
    assert all(tokens == expected for tokens in outputs.values())
    _assert_all_blocks_free(engine)


def test_offline_generate_takes_more_prompts_than_the_waiting_cap(model_dir):
    engine = Engine(make_engine_config(model_dir, num_blocks=64, max_waiting_requests=2))
    outs = engine.generate([f"Item {i}:" for i in range(5)],
                           SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [3] * 5
    _assert_all_blocks_free(engine)


def test_captures_match_hf_hidden_states(engine, hf_model, hf_tokenizer):
    ids = hf_tokenizer(PROMPT).input_ids
    req_id = engine.add_request(ids, SamplingParams(max_new_tokens=1, temperature=0.0),
                                captures=("final_hidden", "ffn_input:-1"))
    grabbed = {}
    layer = hf_model.model.layers[-1].post_attention_layernorm
    handle = layer.register_forward_hook(lambda m, i, o: grabbed.setdefault("ffn", o))
    try:
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        handle.remove()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    caps = next(o.captures for o in outs if o.req_id == req_id)
    torch.testing.assert_close(caps["final_hidden"], ref.hidden_states[-1][0, -1],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caps["ffn_input:-1"], grabbed["ffn"][0, -1], atol=1e-4, rtol=1e-4)


def test_logprobs_match_hf_first_step(engine, hf_model, hf_tokenizer):
    ids = hf_tokenizer(PROMPT).input_ids
    out = engine.generate([ids], SamplingParams(max_new_tokens=2, temperature=0.0,
                                                logprobs=5))[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0] == int(ref.argmax())
    assert abs(first.logprob - float(ref[first.token_id])) < 1e-4
    top_vals, top_ids = ref.topk(5)
    assert [t for t, _ in first.top] == top_ids.tolist()
    assert max(abs(v - r) for (_, v), r in zip(first.top, top_vals.tolist())) < 1e-4


def test_stop_criteria(engine, hf_tokenizer):
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    full = engine.generate([PROMPT], greedy)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    word = full.text.split()[3]
    cut = engine.generate([PROMPT], SamplingParams(max_new_tokens=30, temperature=0.0,
                                                   stop=(word,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(word)]
    stop_id = full.token_ids[5]
    by_id = engine.generate([PROMPT], SamplingParams(max_new_tokens=30, temperature=0.0,
                                                     stop_token_ids=(stop_id,)))[0]
    first = full.token_ids.index(stop_id)
    assert by_id.token_ids == full.token_ids[:first + 1] and by_id.finish_reason == "stop"
    _assert_all_blocks_free(engine)


def test_eos_stops_unless_ignored(engine):
    eos = engine.tokenizer.eos_token_ids[0]
    forced = SamplingParams(max_new_tokens=8, temperature=0.0, logit_bias={eos: 100.0})
    out = engine.generate([PROMPT], forced)[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    late = SamplingParams(max_new_tokens=8, min_new_tokens=3, temperature=0.0,
                          logit_bias={eos: 100.0})
    out = engine.generate([PROMPT], late)[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == eos


def test_admission_rejects_requests_that_can_never_run(engine):
    with pytest.raises(InvalidArgument) as err:
        engine.add_request([5] * 4000, SamplingParams(max_new_tokens=1000))
    assert err.value.field == "max_new_tokens"
    with pytest.raises(InvalidArgument) as err:
        engine.add_request([], SamplingParams())
    assert err.value.field == "prompt"
    with pytest.raises(InvalidArgument) as err:
        engine.add_request([engine.vocab_size], SamplingParams())
    assert err.value.field == "prompt"


def test_async_stream_matches_offline_and_cancel_frees_blocks(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    offline = engine.generate([PROMPT], params)[0]
    front = AsyncEngine(engine)

    async def stream_all():
        tokens, text, finals = [], "", 0
        async for out in front.generate(PROMPT, params):
            tokens += out.new_token_ids
            text += out.new_text
            finals += out.finished
        return tokens, text, finals

    async def cancel_midway():
        long = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
        async for out in front.generate(PROMPT, long):
            if out.num_output_tokens >= 3:
                break
        for _ in range(100):
            if front.load()["kv_blocks_used"] == 0 and front.load()["running"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    async def duplicate_id_is_refused():
        stream = front.generate(PROMPT, params, req_id="dup")
        first = await stream.__anext__()
        with pytest.raises(InvalidArgument):
            await front.generate(PROMPT, params, req_id="dup").__anext__()
        rest = [out async for out in stream]
        return first.new_token_ids + [t for out in rest for t in out.new_token_ids]

    async def abandon_after_first_delta():
        async for _ in front.generate(PROMPT, params):
            break  # asyncio.run then closes this loop while the engine still runs the request

    try:
        tokens, text, finals = asyncio.run(stream_all())
        assert (tokens, text, finals) == (offline.token_ids, offline.text, 1)
        assert asyncio.run(cancel_midway())
        assert asyncio.run(duplicate_id_is_refused()) == offline.token_ids
        asyncio.run(abandon_after_first_delta())
        assert asyncio.run(stream_all())[0] == offline.token_ids  # the engine thread lives on
        assert front.error is None
    finally:
        front.shutdown()
    _assert_all_blocks_free(engine)
