"""Contrastive search (SimCTG; HF semantics) on the real default model is token-exact with a
plain reference written here.

The reference recomputes everything each step with HF forward passes (no KV cache):
    V_k      = top-k of softmax(logits)  (no penalties set, so processed == raw logits)
    h_v      = last-layer hidden state (final-norm output = LM-head input) when v is fed at t
    score(v) = (1 - alpha) * p(v) - alpha * max_{j < t} cos(h_v, h_j)   over ALL previous
               positions (prompt + generated)
    x_t      = first argmax of score in top-k order (torch.argmax semantics).
It imports nothing from engine/ or decoding/, and is itself checked against HF greedy
(alpha = 0) and against the LM head (h is the LM-head input).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoding.params import Contrastive
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

MAX_NEW_TOKENS = 16
EOS = 2
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little robot who",
    "def add(a, b):\n",
    "List three colours of the rainbow:\n1.",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "The best way to learn a new language is",
    "My favourite thing about autumn is",
    None,  # chat-template prompt, built from CHAT below (tends to end with EOS)
]
CHAT = [{"role": "user", "content": "Say hello in French, in one word."}]
# (prompt index, top_k, alpha): every (k, alpha) in {4, 6} x {0.5, 0.6} appears twice.
CASES = [(0, 4, 0.6), (1, 6, 0.6), (2, 4, 0.5), (3, 6, 0.5),
         (4, 4, 0.5), (5, 6, 0.6), (6, 6, 0.5), (7, 4, 0.6)]
GREEDY_PROMPTS = [0, 1, 4, 7]
GREEDY = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)


def contrastive_params(k: int, alpha: float) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW_TOKENS,
                          strategy=Contrastive(top_k=k, penalty_alpha=alpha))


@torch.inference_mode()
def reference_contrastive(model, prompt_ids: list[int], k: int, alpha: float,
                          max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[int], float]:
    """Returns (generated ids, smallest gap between the best and second-best score)."""
    ids = list(prompt_ids)
    out = model(torch.tensor([ids]), output_hidden_states=True)
    context = out.hidden_states[-1][0]          # [t, d]: every previous position
    logits = out.logits[0, -1]
    generated, min_gap = [], float("inf")
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float(), dim=-1)
        top_probs, top_ids = probs.topk(k)
        candidates = torch.tensor([ids + [int(v)] for v in top_ids])      # [k, t + 1]
        step = model(candidates, output_hidden_states=True)
        cand_hidden = step.hidden_states[-1][:, -1]                       # [k, d]
        cosine = F.normalize(cand_hidden, dim=-1) @ F.normalize(context, dim=-1).T
        scores = (1 - alpha) * top_probs - alpha * cosine.max(dim=-1).values
        best = int(torch.argmax(scores))
        if k > 1:
            top2 = scores.topk(2).values
            min_gap = min(min_gap, float(top2[0] - top2[1]))
        token = int(top_ids[best])
        ids.append(token)
        generated.append(token)
        context = torch.cat([context, cand_hidden[best:best + 1]])
        logits = step.logits[best, -1]
        if token == EOS:
            break
    return generated, min_gap


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer) -> list[list[int]]:
    ids = [hf_tokenizer(p).input_ids for p in PROMPTS[:-1]]
    chat = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return ids + [hf_tokenizer(chat).input_ids]


@pytest.fixture(scope="module")
def references(hf_model, prompt_ids) -> dict[tuple[int, int, float], tuple[list[int], float]]:
    return {case: reference_contrastive(hf_model, prompt_ids[case[0]], case[1], case[2])
            for case in CASES}


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompt_ids) -> list[list[int]]:
    outputs = []
    for ids in prompt_ids:
        with torch.inference_mode():
            out = hf_model.generate(torch.tensor([ids]), do_sample=False,
                                    max_new_tokens=MAX_NEW_TOKENS, pad_token_id=EOS)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir)


# ---- the oracle itself ----------------------------------------------------------------------

def test_reference_hidden_state_is_lm_head_input(hf_model, prompt_ids):
    with torch.inference_mode():
        out = hf_model(torch.tensor([prompt_ids[0]]), output_hidden_states=True)
        relogits = hf_model.lm_head(out.hidden_states[-1])
    torch.testing.assert_close(relogits, out.logits, rtol=0, atol=1e-5)


def test_reference_at_alpha_zero_is_hf_greedy(hf_model, prompt_ids, hf_greedy):
    for i in (0, 3, 7):
        assert reference_contrastive(hf_model, prompt_ids[i], 4, 0.0)[0] == hf_greedy[i], i


def test_reference_is_decisive_and_not_greedy(references, hf_greedy):
    # Every step's winner beats the runner-up clearly (so float noise in the engine cannot
    # flip it), and the degeneration penalty actually changes some outputs.
    for case, (tokens, gap) in references.items():
        assert tokens and gap > 1e-4, (case, gap)
    differs = [case for case, (tokens, _) in references.items()
               if tokens != hf_greedy[case[0]]]
    assert len(differs) >= 4, differs


# ---- the engine -----------------------------------------------------------------------------

def test_contrastive_one_at_a_time_matches_reference(engine, prompt_ids, references):
    for case in CASES:
        index, k, alpha = case
        out = engine.generate([prompt_ids[index]], contrastive_params(k, alpha))[0]
        assert out.token_ids == references[case][0], case
        expected_reason = "stop" if out.token_ids[-1] == EOS else "length"
        assert out.finish_reason == expected_reason, case
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_contrastive_batched_with_greedy_traffic(engine, prompt_ids, references, hf_greedy):
    prompts = [prompt_ids[i] for i, _, _ in CASES] + [prompt_ids[i] for i in GREEDY_PROMPTS]
    params = [contrastive_params(k, alpha) for _, k, alpha in CASES] + \
        [GREEDY] * len(GREEDY_PROMPTS)
    # Interleave so contrastive and greedy rows alternate in the batch.
    order = [0, 8, 1, 2, 9, 3, 4, 10, 5, 6, 11, 7]
    outs = engine.generate([prompts[i] for i in order], [params[i] for i in order])
    by_slot = {slot: out for slot, out in zip(order, outs)}
    for slot, case in enumerate(CASES):
        assert by_slot[slot].token_ids == references[case][0], case
    for j, index in enumerate(GREEDY_PROMPTS):
        assert by_slot[len(CASES) + j].token_ids == hf_greedy[index], index
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_contrastive_batched_twice_in_one_call(engine, prompt_ids, references):
    # The same contrastive request twice in one batch (shared prefix blocks): both exact.
    index, k, alpha = CASES[1]
    outs = engine.generate([prompt_ids[index]] * 2, contrastive_params(k, alpha))
    assert [o.token_ids for o in outs] == [references[CASES[1]][0]] * 2


@pytest.mark.parametrize("k,alpha", [(1, 0.6), (4, 0.0)], ids=["k1", "alpha0"])
def test_degenerate_contrastive_is_greedy(engine, prompt_ids, hf_greedy, k, alpha):
    indices = [0, 2, 5, 7]
    prompts = [prompt_ids[i] for i in indices]
    contrastive = engine.generate(prompts, contrastive_params(k, alpha))
    greedy = engine.generate(prompts, GREEDY)
    for i, c, g in zip(indices, contrastive, greedy):
        assert c.token_ids == g.token_ids == hf_greedy[i], i


def test_contrastive_under_small_cache_matches_reference(model_dir, prompt_ids, references):
    # Few KV blocks: the k candidate branches of 8 requests cannot all be resident, so the
    # engine must queue / preempt and recompute, never drop a request or change its tokens.
    engine = make_engine(model_dir, num_blocks=32)
    outs = engine.generate([prompt_ids[i] for i, _, _ in CASES],
                           [contrastive_params(k, alpha) for _, k, alpha in CASES])
    for case, out in zip(CASES, outs):
        assert out.finish_reason in ("stop", "length"), (case, out.finish_reason)
        assert out.token_ids == references[case][0], case
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_lm_head_runs_on_the_winner_only(engine, prompt_ids, references, monkeypatch):
    # Each step forwards k candidate rows per request, but the next-token distribution is
    # needed for the winner alone: one LM-head row per request per step (the prompt's step
    # included), N + 1 for N tokens.
    module = engine.loaded.module
    lm_head, rows = module.compute_logits, []

    def counted(hidden):
        rows.append(hidden.shape[0])
        return lm_head(hidden)

    monkeypatch.setattr(module, "compute_logits", counted, raising=False)
    outs = engine.generate([prompt_ids[i] for i, _, _ in CASES],
                           [contrastive_params(k, alpha) for _, k, alpha in CASES])
    for case, out in zip(CASES, outs):
        assert out.token_ids == references[case][0], case
    assert sum(rows) == sum(len(out.token_ids) + 1 for out in outs)
    assert max(rows) <= len(CASES)


def test_logits_of_every_branch_give_the_same_tokens(engine, prompt_ids, references,
                                                     monkeypatch):
    # With the LM head on every candidate row (the model runner defers none; the strategy
    # chooses from views that carry all rows' logits), the tokens are the same.
    from engine.core.request import Request

    monkeypatch.setattr(Request, "defers_logits", property(lambda self: False))
    cases = CASES[:4]
    outs = engine.generate([prompt_ids[i] for i, _, _ in cases],
                           [contrastive_params(k, alpha) for _, k, alpha in cases])
    for case, out in zip(cases, outs):
        assert out.token_ids == references[case][0], case


def test_candidates_of_all_requests_come_from_one_topk_per_k(engine, prompt_ids, references,
                                                            monkeypatch):
    # The step's softmax and top-k run once per distinct top_k for every contrastive
    # generation that steps (`prepare_steps`), and give each row what a call per row gives.
    from decoding.contrastive import ContrastiveSearch

    prepare, groups = ContrastiveSearch.prepare_steps.__func__, []

    def counted(cls, strategies, views):
        prepare(cls, strategies, views)
        groups.append(sorted(s.params.top_k for s in strategies))
        for view, strategy in zip(views, strategies):
            probs, tokens = view.logits[0].softmax(dim=-1).topk(strategy.params.top_k)
            assert view.prepared == (probs.tolist(), tokens.tolist())

    monkeypatch.setattr(ContrastiveSearch, "prepare_steps", classmethod(counted))
    outs = engine.generate([prompt_ids[i] for i, _, _ in CASES],
                           [contrastive_params(k, alpha) for _, k, alpha in CASES])
    for case, out in zip(CASES, outs):
        assert out.token_ids == references[case][0], case
    # A step per token plus the prompt's, for every generation; all 8 step together.
    assert sum(len(group) for group in groups) == sum(len(out.token_ids) + 1 for out in outs)
    assert groups[0] == sorted(k for _, k, _ in CASES)
