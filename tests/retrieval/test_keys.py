"""All-position captures: the engine's kNN-LM keys ("ffn_input:-1@all") equal HF
transformers' input of the last decoder layer's MLP at every prompt position, and its
"final_hidden@all" gives HF's logits, across chunked prefill, batching and preemption."""

from __future__ import annotations

import pytest
import torch

from decoding.base import Capture
from engine.sampling_params import SamplingParams
from retrieval.corpus import kjv_books
from tests.factories import make_engine

KEYS, HIDDEN = "ffn_input:-1@all", "final_hidden@all"
ONE_TOKEN = SamplingParams(max_new_tokens=1, temperature=0.0)
pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def make_prompts(hf_tokenizer) -> list[list[int]]:
    """A short, a medium and a long (several prefill chunks at a 64-token budget) prompt."""
    long_text = kjv_books()["Jude"][:1000]
    texts = ["The capital of France is", "In a hole in the ground there lived a hobbit. Not "
             "a nasty, dirty, wet hole, filled with the ends of worms.", long_text]
    return [hf_tokenizer(t).input_ids for t in texts]


def hf_reference(hf_model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the last layer's MLP [n, hidden], logits [n, vocab]) from HF transformers."""
    grabbed = []
    mlp = hf_model.model.layers[-1].mlp
    handle = mlp.register_forward_pre_hook(lambda module, args: grabbed.append(args[0]))
    try:
        with torch.inference_mode():
            logits = hf_model(torch.tensor([ids])).logits[0].float()
    finally:
        handle.remove()
    return grabbed[0][0].float(), logits


def run_all(engine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.req_id: o for o in engine.step() if o.finished})
    return finals


def assert_matches_hf(engine, hf_model, ids, captures) -> None:
    keys, logits = hf_reference(hf_model, ids)
    assert captures[KEYS].shape == (len(ids), keys.shape[-1])
    assert captures[KEYS].dtype == torch.float32
    torch.testing.assert_close(captures[KEYS], keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.compute_logits(captures[HIDDEN]), logits,
                               atol=1e-3, rtol=1e-4)


def test_capture_names_and_parsing():
    key = Capture("ffn_input", -1, all_positions=True)
    assert key.name == KEYS and Capture.parse(KEYS) == key
    assert Capture.parse(HIDDEN) == Capture("final_hidden", all_positions=True)
    assert Capture("ffn_input", -1).name == "ffn_input:-1"  # existing names unchanged
    assert Capture("final_hidden").name == "final_hidden"


@pytest.fixture(scope="module")
def small_step_engine(model_dir):
    """A 64-token step budget: long prompts are split over several steps."""
    return make_engine(model_dir, max_num_batched_tokens=64)


def test_all_position_keys_match_hf_chunked_and_batched(small_step_engine, hf_model,
                                                        hf_tokenizer):
    # The long prompt is prefilled over several steps, next to other requests (including
    # one that decodes while the others prefill).
    engine = small_step_engine
    prompts = make_prompts(hf_tokenizer)
    assert len(prompts[-1]) > 3 * 64
    plain = engine.add_request(prompts[0], SamplingParams(max_new_tokens=12, temperature=0.0,
                                                          ignore_eos=True))
    ids = [engine.add_request(p, ONE_TOKEN, captures=(KEYS, HIDDEN)) for p in prompts]
    finals = run_all(engine)
    assert finals[plain].captures is None  # requests that did not ask get nothing
    for req_id, prompt in zip(ids, prompts):
        assert_matches_hf(engine, hf_model, prompt, finals[req_id].captures)


def test_all_position_capture_bypasses_the_prefix_cache(small_step_engine, hf_model,
                                                        hf_tokenizer):
    engine = small_step_engine
    prompt = make_prompts(hf_tokenizer)[1]
    engine.generate([prompt], ONE_TOKEN)  # its full blocks are now in the prefix cache
    req_id = engine.add_request(prompt, ONE_TOKEN, captures=(KEYS, HIDDEN))
    final = run_all(engine)[req_id]
    assert final.num_cached_tokens == 0
    assert_matches_hf(engine, hf_model, prompt, final.captures)


def test_all_position_captures_survive_preemption(model_dir, hf_model, hf_tokenizer):
    # 8 blocks of 16 tokens cannot hold all four sequences as they grow: the scheduler
    # preempts and recomputes, and the captures still cover each prompt exactly once.
    engine = make_engine(model_dir, num_blocks=8, max_num_batched_tokens=64)
    prompts = make_prompts(hf_tokenizer)[:2] * 2
    grow = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, grow, captures=(KEYS, HIDDEN)) for p in prompts]
    finals = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for req_id, prompt in zip(ids, prompts):
        assert finals[req_id].captures[KEYS].shape[0] == len(prompt)
        assert_matches_hf(engine, hf_model, prompt, finals[req_id].captures)


@pytest.mark.parametrize("restart", [False, True], ids=["in-order", "restart-at-0"])
def test_generation_collects_prompt_chunks_in_order(restart):
    from engine.pipeline.generation import Generation

    gen = Generation("g", list(range(5)), SamplingParams(), 0, (),
                     captures=frozenset({Capture.parse(KEYS)}))
    rows = torch.arange(5.0)[:, None]
    gen.add_prompt_chunk(0, {KEYS: rows[:2]})
    if restart:  # preempted mid-prefill: the recompute starts at position 0 again
        gen.add_prompt_chunk(0, {KEYS: rows[:3] + 0})
        gen.add_prompt_chunk(3, {KEYS: rows[3:]})
    else:
        gen.add_prompt_chunk(2, {KEYS: rows[2:]})
    gen.add_prompt_chunk(0, {KEYS: rows * 0})  # a recompute after completion is ignored
    assert torch.equal(gen.final_captures()[KEYS], rows)
