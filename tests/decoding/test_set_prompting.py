"""Set-based prompting (McIlroy-Young et al., NeurIPS 2024) on the real default model.

The oracle here runs HF transformers with an explicit boolean [1, 1, T, T] attention mask
(True = attend; transformers 5.x `masking_utils` returns a user 4D mask as-is and SDPA takes
it directly) and explicit position ids, recomputing everything each greedy step:
  * positions: sequential segments continue; every member of a set starts at p0 (= positions
    before the set); what follows starts at p0 + longest member; generated tokens continue.
  * mask: causal, except a member token never sees a token of another member of the same set;
    suffix and generated tokens see everything before them.
Tokenization: first segment with the tokenizer's default special tokens, every other segment
and member alone with add_special_tokens=False; token-id lists are used as given.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.prompt import Parallel, StructuredPrompt
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

MAX_NEW_TOKENS = 12
EOS = 2
LOGPROB_TOL = 1e-4
PARAMS = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, logprobs=20)
QUESTION = "Question: which animal is the best pet for a small flat?\nOptions:"
MEMBERS = [" A small dog that sleeps all day.", " A lion.", " A great white shark.",
           " A cat that likes to sit on warm windowsills in the afternoon."]
SUFFIX = "\nAnswer: the best pet is"
LONG_PREFIX = ("You are a careful assistant. Read the options below, think about the space, "
               "the noise and the care each animal needs, then answer in a few words.\n")
LONG_MEMBERS = [" Option: a golden retriever, a friendly and energetic dog that needs long "
                "walks every day and a garden to play in.",
                " Option: a goldfish in a round glass bowl, which needs clean water, a little "
                "food and almost no space at all.",
                " Option: a grey parrot that talks, lives for decades and needs company, toys "
                "and a large cage near the window."]


def structured(prefix, members, suffix) -> StructuredPrompt:
    segments = [prefix, Parallel(members=list(members))]
    return StructuredPrompt(segments=segments + ([suffix] if suffix is not None else []))


def oracle_layout(tokenizer, segments) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """(token ids, position ids, (set index, member index) per token; (-1, -1) outside sets)."""
    def encode(part, first):
        return list(part) if not isinstance(part, str) else \
            tokenizer(part, add_special_tokens=first).input_ids

    ids, positions, groups, pos, num_sets = [], [], [], 0, 0
    for index, segment in enumerate(segments):
        if isinstance(segment, Parallel):
            parts = [encode(member, False) for member in segment.members]
            for m, tokens in enumerate(parts):
                ids += tokens
                positions += range(pos, pos + len(tokens))
                groups += [(num_sets, m)] * len(tokens)
            pos += max(len(tokens) for tokens in parts)
            num_sets += 1
        else:
            tokens = encode(segment, index == 0)
            ids += tokens
            positions += range(pos, pos + len(tokens))
            groups += [(-1, -1)] * len(tokens)
            pos += len(tokens)
    return ids, positions, groups


def set_mask(groups: list[tuple[int, int]]) -> torch.Tensor:
    sets = torch.tensor([g[0] for g in groups])
    members = torch.tensor([g[1] for g in groups])
    n = len(groups)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    other_member = (sets[:, None] == sets[None, :]) & (sets[:, None] >= 0) & \
        (members[:, None] != members[None, :])
    return (causal & ~other_member)[None, None]


@torch.inference_mode()
def oracle_greedy(model, tokenizer, segments, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy tokens and the first step's log-probs, full recompute with an explicit mask."""
    ids, positions, groups = oracle_layout(tokenizer, segments)
    generated, first_logprobs = [], None
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids]), attention_mask=set_mask(groups),
                       position_ids=torch.tensor([positions])).logits[0, -1].float()
        if first_logprobs is None:
            first_logprobs = torch.log_softmax(logits, dim=-1)
        token = int(torch.argmax(logits))
        generated.append(token)
        ids, positions = ids + [token], positions + [max(positions) + 1]
        groups = groups + [(-1, -1)]
        if token == EOS:
            break
    return generated, first_logprobs


def hf_greedy(model, ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


def top_n(logprobs: torch.Tensor, n: int = 20) -> list[tuple[int, float]]:
    values, ids = logprobs.topk(n)
    return list(zip(ids.tolist(), values.tolist()))


def assert_top_close(top_a, top_b, tol=LOGPROB_TOL) -> None:
    """Two top-n lists agree within tol; tokens may only differ where they tie at the cutoff."""
    a, b = dict(top_a), dict(top_b)
    assert len(a) == len(b)
    for token in a.keys() & b.keys():
        assert abs(a[token] - b[token]) <= tol, (token, a[token], b[token])
    cutoff = min(min(a.values()), min(b.values()))
    for token in a.keys() ^ b.keys():
        assert abs(a.get(token, b.get(token)) - cutoff) <= tol, token


@pytest.fixture(scope="module")
def engine(model_dir):
    return make_engine(model_dir)


# ---- the oracle itself ----------------------------------------------------------------------

def test_oracle_single_member_set_is_plain_greedy(hf_model, hf_tokenizer):
    segments = structured(QUESTION, MEMBERS[:1], SUFFIX).segments
    ids, positions, _ = oracle_layout(hf_tokenizer, segments)
    assert positions == list(range(len(ids)))
    assert oracle_greedy(hf_model, hf_tokenizer, segments)[0] == hf_greedy(hf_model, ids)


def test_oracle_is_order_invariant_and_sets_matter(hf_model, hf_tokenizer):
    results = [oracle_greedy(hf_model, hf_tokenizer, structured(QUESTION, m, SUFFIX).segments)
               for m in (MEMBERS[:3], MEMBERS[2::-1])]
    assert results[0][0] == results[1][0]
    assert (results[0][1] - results[1][1]).abs().max() < LOGPROB_TOL
    # The same members read sequentially do depend on their order.
    sequential = [oracle_greedy(hf_model, hf_tokenizer, [QUESTION + "".join(m) + SUFFIX], 1)[1]
                  for m in (MEMBERS[:3], MEMBERS[2::-1])]
    assert (sequential[0] - sequential[1]).abs().max() > 1e-2


# ---- the engine -----------------------------------------------------------------------------

def test_engine_single_member_set_is_sequential(engine, hf_model, hf_tokenizer):
    prompt = structured(QUESTION, MEMBERS[1:2], SUFFIX)
    ids, _, _ = oracle_layout(hf_tokenizer, prompt.segments)
    out = engine.generate([prompt], PARAMS)[0]
    assert out.prompt_token_ids == ids
    assert out.token_ids == hf_greedy(hf_model, ids)


@pytest.mark.parametrize("num_members", [3, 4])
def test_every_permutation_gives_the_same_output(engine, hf_model, hf_tokenizer, num_members):
    perms = list(itertools.permutations(MEMBERS[:num_members]))
    prompts = [structured(QUESTION, p, SUFFIX) for p in perms]
    expected, oracle_logprobs = oracle_greedy(hf_model, hf_tokenizer, prompts[0].segments)
    outs = engine.generate(prompts, PARAMS)
    reference_top = outs[0].logprobs[0].top
    assert len(reference_top) == 20
    assert_top_close(reference_top, top_n(oracle_logprobs))
    for perm, out in zip(perms, outs):
        assert out.token_ids == expected, perm
        assert_top_close(out.logprobs[0].top, reference_top)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_token_id_parts_several_sets_and_trailing_set(engine, hf_model, hf_tokenizer):
    enc = lambda s: hf_tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    prompts = [
        StructuredPrompt(segments=[enc(QUESTION), Parallel(members=[enc(m) for m in MEMBERS[:3]]),
                                   "\nAnd also:", Parallel(members=[" Red.", " Blue or green."]),
                                   SUFFIX]),
        structured(QUESTION, MEMBERS[1:4], None),
    ]
    outs = engine.generate(prompts, PARAMS)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == oracle_greedy(hf_model, hf_tokenizer, prompt.segments)[0]


@pytest.mark.parametrize("structured_first", [False, True], ids=["seq_first", "set_first"])
def test_prefix_cache_separates_structured_and_sequential(model_dir, hf_model, hf_tokenizer,
                                                          structured_first):
    prompt = structured(LONG_PREFIX, LONG_MEMBERS, SUFFIX)
    ids, _, _ = oracle_layout(hf_tokenizer, prompt.segments)
    assert len(ids) > 100
    expected = {"set": oracle_greedy(hf_model, hf_tokenizer, prompt.segments),
                "seq": oracle_greedy(hf_model, hf_tokenizer, [ids])}
    assert expected["seq"][0] == hf_greedy(hf_model, ids)
    # Same tokens, different attention: a mix-up would show in the first-step logprobs.
    assert (expected["set"][1] - expected["seq"][1]).abs().max() > 1e-2
    engine = make_engine(model_dir, enable_prefix_caching=True)
    order = [("set", prompt), ("seq", ids)] if structured_first else \
        [("seq", ids), ("set", prompt)]
    cached = {}
    for kind, p in order + order:  # twice: the second round runs on a warm prefix cache
        out = engine.generate([p], PARAMS)[0]
        assert out.token_ids == expected[kind][0], kind
        assert_top_close(out.logprobs[0].top, top_n(expected[kind][1]))
        cached[kind] = out.num_cached_tokens
    assert cached["seq"] >= 64  # the cache was live: the repeated sequential prompt hit it
    both = engine.generate([prompt, ids], PARAMS)
    assert [o.token_ids for o in both] == [expected["set"][0], expected["seq"][0]]
