"""Greedy decoding on the real default model is token-exact with Hugging Face transformers.

The oracle is `transformers` `generate(do_sample=False)` in float32 on the same weights, one
prompt at a time (no padding). The engine must match it alone, with all prompts batched, with
chunked prefill, under preemption, and with prefix-cache hits.
"""

from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

MAX_NEW_TOKENS = 24
LONG_CONTEXT = ("Paged attention stores the key and value vectors of every sequence in fixed-size "
                "blocks, so memory is allocated on demand and shared between sequences. ") * 12
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three colours of the rainbow:\n1.",
    "Translate to French: 'The cat sleeps on the warm windowsill.'\nFrench:",
    "In 1969, the first humans landed on the Moon. The mission was called",
    LONG_CONTEXT + "In one sentence, paged attention is",
    "Q: What is 17 + 25?\nA:",
    "Once upon a time, in a village at the edge of a dark forest, there lived a young girl "
    "who",
]
GREEDY = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def hf_greedy(hf_model, hf_tokenizer) -> list[list[int]]:
    outputs = []
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf_model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return make_engine(model_dir)


def _token_ids(engine: Engine, prompts: list[str]) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(prompts, GREEDY)]


def test_prompts_are_varied(hf_tokenizer):
    lengths = sorted(len(hf_tokenizer(p).input_ids) for p in PROMPTS)
    assert len(PROMPTS) >= 8 and lengths[0] <= 2 and lengths[-1] >= 200


def test_greedy_one_at_a_time_matches_hf(engine, hf_greedy):
    for prompt, expected in zip(PROMPTS, hf_greedy):
        assert _token_ids(engine, [prompt])[0] == expected, prompt


def test_greedy_batched_matches_hf(engine, hf_greedy):
    assert _token_ids(engine, PROMPTS) == hf_greedy
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_chunked_prefill_matches_hf(model_dir, hf_greedy):
    engine = make_engine(model_dir, max_num_batched_tokens=40)
    assert _token_ids(engine, PROMPTS) == hf_greedy


def test_preemption_matches_hf(model_dir, hf_greedy):
    # 26 blocks x 16 tokens: the longest request (356 + 24 tokens) fits alone, all do not.
    engine = make_engine(model_dir, num_blocks=26, enable_prefix_caching=False)
    assert _token_ids(engine, PROMPTS) == hf_greedy
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_prefix_cache_hits_match_hf(model_dir, hf_greedy):
    engine = make_engine(model_dir)
    long_index = next(i for i, p in enumerate(PROMPTS) if p.startswith(LONG_CONTEXT))
    first = engine.generate([PROMPTS[long_index]], GREEDY)[0]
    again = engine.generate(PROMPTS, GREEDY)
    assert first.num_cached_tokens == 0
    assert again[long_index].num_cached_tokens >= 160
    assert [o.token_ids for o in again] == hf_greedy


def test_torch_attention_backend_matches_hf(model_dir, hf_greedy):
    # The gather + SDPA path used when the compiled decode kernel is unavailable.
    engine = make_engine(model_dir, attention_backend="torch")
    assert not engine.runner.use_paged_kernel
    assert _token_ids(engine, PROMPTS) == hf_greedy
