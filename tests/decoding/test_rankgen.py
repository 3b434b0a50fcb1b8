"""RankGen on the default model: beam_size 1 x num_samples 1 is seeded nucleus sampling token
for token; a real search keeps its best-scored beams (scores from the MiniLM scorer, checked
against a direct call) and equals its solo run when batched with other requests."""

from __future__ import annotations

import pytest

from decoding.rankgen import RankGen
from decoding.scorers import get_scorer
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

PROMPTS = ["The old lighthouse keeper climbed the stairs and", "In the beginning God created"]


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir, num_blocks=512)


def test_one_beam_one_sample_is_seeded_sampling(engine):
    for prompt in PROMPTS:
        plain = engine.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0.8,
                                                         top_p=0.9, seed=123))[0]
        ranked = engine.generate([prompt], SamplingParams(max_new_tokens=24, strategy=RankGen(
            beam_size=1, num_samples=1, tokens_per_round=5, top_p=0.9, temperature=0.8,
            seed=123)))[0]
        assert ranked.token_ids == plain.token_ids


def test_search_keeps_the_best_scored_beams_and_is_batch_invariant(engine):
    params = SamplingParams(max_new_tokens=12, strategy=RankGen(
        beam_size=2, num_samples=3, tokens_per_round=4, seed=7))
    solo = engine.generate([PROMPTS[0]], params)[0]
    batched = engine.generate(PROMPTS + [PROMPTS[0]], [
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=1),
        SamplingParams(max_new_tokens=12, temperature=0.0), params])[2]
    assert batched.token_ids == solo.token_ids
    assert [c.token_ids for c in batched.candidates] == [c.token_ids for c in solo.candidates]
    scores = [c.score for c in solo.candidates]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    prompt_text = engine.tokenizer.decode(engine.tokenizer.encode(PROMPTS[0]))
    direct = get_scorer("minilm").score([prompt_text] * 2, [c.text for c in solo.candidates])
    assert direct.tolist() == pytest.approx(scores, abs=1e-5)
    assert solo.token_ids == solo.candidates[0].token_ids


def test_grpc_request_equals_offline_with_candidate_scores(engine, model_dir):
    from server.pb import pb
    from tests.server.conftest import start_server, text_request

    params = RankGen(beam_size=2, num_samples=2, tokens_per_round=3, seed=5)
    offline = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=9, strategy=params))[0]
    served = start_server(model_dir)
    try:
        request = text_request(PROMPTS[1], 9)
        request.decoding.rankgen.CopyFrom(pb.RankGenRerank(beam_size=2, num_samples=2,
                                                           tokens_per_round=3, seed=5))
        request.response.candidate_scores = True
        result = served.stub.Generate(request)
        assert "minilm" in served.stub.GetModelInfo(pb.ModelInfoRequest()).scorers
        assert served.wait_idle().kv_blocks_used == 0
    finally:
        served.close()
    assert list(result.token_ids) == offline.token_ids
    assert [c.score for c in result.candidates] == pytest.approx(
        [c.score for c in offline.candidates], abs=1e-5)


def test_self_scorer_is_the_mean_token_logprob_of_hf(engine, hf_model):
    import torch

    params = SamplingParams(max_new_tokens=8, strategy=RankGen(
        beam_size=2, num_samples=2, tokens_per_round=4, scorer="self", seed=11))
    out = engine.generate([PROMPTS[0]], params)[0]
    prompt = engine.tokenizer.encode(PROMPTS[0])
    for cand in out.candidates:
        ids = prompt + cand.token_ids
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, len(prompt) - 1:-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(
            1, torch.tensor(cand.token_ids)[:, None])
        assert cand.score == pytest.approx(float(logprobs.mean()), abs=1e-4)
    assert [c.score for c in out.candidates] == sorted((c.score for c in out.candidates),
                                                       reverse=True)


def test_minilm_prefers_the_gold_continuation_on_kjv():
    """A verse against the next verse (gold) and the other verses of its chapter (negatives):
    how often the gold one scores higher, over 200 verses of Genesis."""
    import json

    from retrieval.corpus import kjv_path

    chapters: dict[tuple, list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if verse["book"] == "Genesis":
                chapters.setdefault(verse["chapter"], []).append(verse["text"].strip())
    scorer, wins, total = get_scorer("minilm"), 0, 0
    for verses in list(chapters.values())[:10]:
        for i in range(min(len(verses) - 1, 20)):
            negatives = [v for j, v in enumerate(verses) if j not in (i, i + 1)][:8]
            scores = scorer.score([verses[i]] * (1 + len(negatives)),
                                  [verses[i + 1]] + negatives)
            wins += int((scores[0] > scores[1:]).sum())
            total += len(negatives)
    rate = wins / total
    print(f"\ngold beats an in-chapter negative in {rate:.1%} of {total} pairs")
    assert rate > 0.5


def test_stream_reports_every_rounds_survivors(model_dir):
    from server.pb import pb
    from tests.server.conftest import start_server, text_request

    served = start_server(model_dir)
    try:
        request = text_request(PROMPTS[0], 8)
        request.decoding.rankgen.CopyFrom(pb.RankGenRerank(beam_size=2, num_samples=2,
                                                           tokens_per_round=4, seed=3))
        request.response.candidate_scores = True
        events = [e.candidate for e in served.stub.GenerateStream(request)
                  if e.WhichOneof("event") == "candidate"]
    finally:
        served.close()
    rounds = sorted({e.round for e in events})
    assert rounds == [0, 1, 2]
    for number in (1, 2):
        scores = [e.score for e in events if e.round == number]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    final = [e for e in events if e.round == 0]
    assert [e.score for e in final] == [e.score for e in events if e.round == 2]
