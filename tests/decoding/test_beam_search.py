"""Beam search on the real default model is token-exact with HF transformers
`generate(num_beams=B, do_sample=False, ...)` (float32, one prompt at a time, explicit
length_penalty / early_stopping / pad_token_id so the oracle does not depend on defaults).

HF semantics (transformers 5.24 `generation/utils.py::_beam_search` and helpers), P = prompt
length, B = num_beams, one EOS id:
1. Init: B running beams = the prompt; running score 0 for beam 0 and -1e9 for the others (step
   1 only expands beam 0). B finished slots with score -1e9.
2. Each step: logp = log_softmax(logits.float()) (logits processors, if any, act on logp after
   the log_softmax); cand = logp + running_score; topk over the flattened [B * V] with
   K = 2B (torch.topk, sorted). A candidate "hits" if its token is EOS or if P + generated
   reaches max_length = P + max_new_tokens (then all K hit).
3. Next running beams: the best B of the K that did not hit (EOS never continues). Running
   scores are raw cumulative log-prob sums.
4. Finished update: only hitting candidates ranked < B among the K are eligible (an EOS at rank
   >= B is dropped); score = cum_logprob / gen_len ** length_penalty with gen_len = number of
   generated tokens INCLUDING the EOS. Not added when all B slots are full and
   early_stopping is True, or when the early-stop heuristic was satisfied. Finished slots :=
   top B (sorted) of old slots + eligible candidates.
5. Early-stop heuristic after each step (sticky), L = tokens generated so far:
   denom = max_new_tokens ** lp if (early_stopping == "never" and lp > 0) else L ** lp;
   continue while some slot is still empty or best_running_score / denom > min finished score
   (strict). The loop ends when the heuristic is satisfied, when early_stopping is True and all
   B slots are finished, or at max length (where the top-B candidates, with or without EOS,
   are all finalised with gen_len = max_new_tokens). Unfinalised running beams are discarded.
6. Output: the finished slots best first, first num_return_sequences of them; sequences_scores
   = the length-normalised score above; EOS kept, right padding with pad_token_id.
   With output_scores=True, `beam_indices != -1` counts each sequence's generated length.
"""

from __future__ import annotations

import pytest
import torch

from decoding.params import BeamSearch
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

MAX_NEW_TOKENS = 20
EOS = 2
SCORE_TOL = 2e-3
RAW_PROMPTS = ["The capital of France is", "Q: What is 17 + 25?\nA:"]
CHAT_PROMPTS = ["Is the sky blue? Answer yes or no.", "What is 2+2?",
                "What is the capital of Italy? One word.", "Say OK."]
# (num_beams, length_penalty, early_stopping, num_return)
CONFIGS = {
    "b2": (2, 1.0, False, 1),
    "b2_lp2": (2, 2.0, False, 1),  # the early-stop heuristic decides some of these
    "b4_return2": (4, 1.0, False, 2),
    "b4_lp0.5_early_return2": (4, 0.5, True, 2),
}


def beam_params(config: str, configs: dict = CONFIGS,
                max_new_tokens: int = MAX_NEW_TOKENS) -> SamplingParams:
    num_beams, length_penalty, early_stopping, num_return = configs[config]
    return SamplingParams(max_new_tokens=max_new_tokens, strategy=BeamSearch(
        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
        num_return=num_return))


@torch.inference_mode()
def hf_beam(model, ids: list[int], config: str, configs: dict = CONFIGS,
            max_new_tokens: int = MAX_NEW_TOKENS) -> list[tuple[list[int], float]]:
    """HF's returned sequences (generated part, EOS included, no padding) and their scores."""
    num_beams, length_penalty, early_stopping, num_return = configs[config]
    out = model.generate(torch.tensor([ids]), num_beams=num_beams, do_sample=False,
                         max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                         early_stopping=early_stopping, num_return_sequences=num_return,
                         pad_token_id=EOS, eos_token_id=EOS, return_dict_in_generate=True,
                         output_scores=True)
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    return [(out.sequences[i, len(ids):len(ids) + n].tolist(), float(out.sequences_scores[i]))
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer) -> list[list[int]]:
    chats = [hf_tokenizer.apply_chat_template([{"role": "user", "content": c}],
                                              add_generation_prompt=True, tokenize=False)
             for c in CHAT_PROMPTS]
    return [hf_tokenizer(p).input_ids for p in RAW_PROMPTS + chats]


@pytest.fixture(scope="module")
def references(hf_model, prompt_ids) -> dict[str, list[list[tuple[list[int], float]]]]:
    return {config: [hf_beam(hf_model, ids, config) for ids in prompt_ids]
            for config in CONFIGS}


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir)


def _check(out, expected: list[tuple[list[int], float]], label) -> None:
    assert out.token_ids == expected[0][0], label
    assert len(out.candidates) == len(expected), label
    assert [c.token_ids for c in out.candidates] == [e[0] for e in expected], label
    for cand, (_, score) in zip(out.candidates, expected):
        assert abs(cand.score - score) <= SCORE_TOL, (label, cand.score, score)
    assert out.text == out.candidates[0].text, label
    assert out.finish_reason == ("stop" if out.token_ids[-1] == EOS else "length"), label


# ---- the oracle itself ----------------------------------------------------------------------

def test_oracle_generation_config_has_no_hidden_processors(hf_model):
    # Nothing in the model's generation_config may alter the beam scores behind our back.
    gen = hf_model.generation_config
    assert gen.eos_token_id == EOS and gen.pad_token_id == EOS
    for name in ("repetition_penalty", "no_repeat_ngram_size", "min_length", "min_new_tokens",
                 "bad_words_ids", "forced_eos_token_id", "diversity_penalty"):
        assert getattr(gen, name, None) in (None, 0, 1.0), name


def test_oracle_scores_are_normalised_sum_of_logprobs(hf_model, prompt_ids, references):
    # sequences_scores == sum of the generated tokens' log-probs / gen_len ** length_penalty,
    # with gen_len counting the EOS: checks how the oracle's lengths and scores are read.
    for config, per_prompt in references.items():
        length_penalty = CONFIGS[config][1]
        for ids, returned in zip(prompt_ids, per_prompt):
            for tokens, score in returned:
                with torch.inference_mode():
                    logits = hf_model(torch.tensor([ids + tokens])).logits[0].float()
                logp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
                total = float(logp.gather(1, torch.tensor(tokens)[:, None]).sum())
                assert abs(total / len(tokens) ** length_penalty - score) < 1e-3, config


def test_oracle_covers_finished_hypotheses(references):
    # Some returned hypotheses end with EOS before max length, some run to max length, and
    # early stopping / length penalty changes at least one winner.
    ends = [tokens[-1] == EOS for per in references.values() for ret in per for tokens, _ in ret]
    assert any(ends) and not all(ends)
    short = [len(t) < MAX_NEW_TOKENS for per in references.values() for ret in per for t, _ in ret]
    assert any(short)
    assert references["b4_lp0.5_early_return2"] != references["b4_return2"]
    assert [r[0][0] for r in references["b2"]] != [r[0][0] for r in references["b4_return2"]]


def test_oracle_early_stop_heuristic_matters(hf_model, prompt_ids, references, monkeypatch):
    # Without HF's early-stop heuristic (search on to max length) some "b2_lp2" winners change,
    # so an engine that ignores or mis-implements the heuristic fails the tests below.
    from transformers.generation.utils import GenerationMixin

    monkeypatch.setattr(GenerationMixin, "_check_early_stop_heuristic", staticmethod(
        lambda **kw: kw["is_early_stop_heuristic_unsatisfied"]))
    changed = [i for i, ids in enumerate(prompt_ids)
               if hf_beam(hf_model, ids, "b2_lp2") != references["b2_lp2"][i]]
    assert changed


# ---- the engine -----------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
def test_beam_search_one_at_a_time_matches_hf(engine, prompt_ids, references, config):
    for i, ids in enumerate(prompt_ids):
        out = engine.generate([ids], beam_params(config))[0]
        _check(out, references[config][i], (config, i))
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_beam_search_batched_with_greedy_traffic(engine, prompt_ids, references, hf_model):
    greedy = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    configs = ["b2_lp2", "b4_return2", "b4_lp0.5_early_return2"]
    prompts, params, labels = [], [], []
    for i, ids in enumerate(prompt_ids):
        for config in configs:
            prompts.append(ids)
            params.append(beam_params(config))
            labels.append((config, i))
        prompts.append(ids)
        params.append(greedy)
        labels.append(("greedy", i))
    outs = engine.generate(prompts, params)
    for out, ids, (config, i) in zip(outs, prompts, labels):
        if config != "greedy":
            _check(out, references[config][i], (config, i))
            continue
        with torch.inference_mode():
            expected = hf_model.generate(torch.tensor([ids]), do_sample=False,
                                         max_new_tokens=MAX_NEW_TOKENS, pad_token_id=EOS)
        assert out.token_ids == expected[0, len(ids):].tolist(), i
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_beam_search_under_small_cache_matches_hf(model_dir, prompt_ids, references):
    # Few KV blocks: beams must share the prompt's blocks and survive preemption / recompute.
    engine = make_engine(model_dir, num_blocks=32, block_size=16)
    prompts = prompt_ids * 2
    outs = engine.generate(prompts, [beam_params("b4_return2")] * len(prompts))
    for i, out in enumerate(outs):
        _check(out, references["b4_return2"][i % len(prompt_ids)], ("b4_return2", i))
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
