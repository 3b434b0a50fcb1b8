"""Every decoding strategy on every non-default model family, against oracles written elsewhere.

Families: small random checkpoints in HF format sharing the default model's tokenizer (vocab
49152), built with the factories of `test_gpt2_oracle.py` and `test_norm_schemes.py`:
  gpt2          plain GPT-2 (learned position embeddings, LayerNorm, tied head);
  gpt2_ln_free  LayerNorm-free GPT-2 in the released eps-hack format (eps 1e12);
  lns           Llama with LayerNorm-Scaling (norm_scheme="lns");
  mix_ln        Llama with Mix-LN (norm_scheme="mix_ln", the first 2 of 8 layers Post-LN).
The oracles are HF transformers models on the same weights: `from_pretrained` on the saved
directory (GPT-2s; LNS then patched to the paper's 1/sqrt(l)), or the in-memory patched Mix-LN
model that wrote the directory (HF cannot load a Mix-LN checkpoint as a stock Llama).

Strategy oracles, none written against the engine:
  contrastive  `reference_contrastive` (test_contrastive.py): full recompute over HF forward;
  beam         HF `generate(num_beams=B, num_return_sequences=2, do_sample=False)`, scores too;
  set prompts  HF forward with an explicit bool [1, 1, T, T] mask and position_ids
               (test_set_prompting.py). transformers 5.24 GPT-2 takes both: `GPT2Model.forward`
               passes a 4D mask through `create_causal_mask` untouched and feeds `position_ids`
               to `wpe`. That the oracle obeys them is checked below (a single-member set equals
               plain HF greedy, member order does not matter, sequential order does);
  sampling     the paper definition, a categorical draw from HF softmax(logits / T): the
               engine's seeded tokens are replayed over HF logits with the engine's own Exp(1)
               noise (the exponential race argmax(p / E) is exactly such a draw), and the
               first-step frequencies of 1000 seeds pass a chi-square test against
               softmax(logits / T) while failing it against softmax(logits).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from decoding.params import Contrastive
from engine.engine import Engine
from engine.models.gpt2 import GPT2Config
from decoding.sampling import random_exponentials
from engine.sampling_params import SamplingParams
from tests.decoding.test_beam_search import _check as check_beam
from tests.decoding.test_beam_search import beam_params as beam_params_for
from tests.decoding.test_beam_search import hf_beam as hf_beam_oracle
from tests.decoding.test_contrastive import reference_contrastive
from tests.decoding.test_set_prompting import (MEMBERS, PARAMS as SET_PARAMS, QUESTION, SUFFIX,
                                               assert_top_close, oracle_greedy, oracle_layout,
                                               structured, top_n)
from tests.decoding.test_set_prompting import hf_greedy as hf_greedy_12
from tests.factories import make_engine
from tests.models.test_gpt2_oracle import make_hf_gpt2, make_ln_free, save_model_dir
from tests.models.test_norm_schemes import NUM_POST_LN, make_hf_llama, make_hf_mix_ln, patch_lns

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gpt2", "gpt2_ln_free", "lns", "mix_ln"]
MAX_NEW_TOKENS = 16
EOS = 2
PROMPTS = ["The capital of France is", "Once upon a time, there was a little robot who",
           "def add(a, b):\n"]
GREEDY = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
LOGIT_SCALE = 20.0
# (prompt index, top_k, alpha)
CONTRASTIVE_CASES = [(0, 4, 0.6), (1, 4, 0.6), (2, 6, 0.5)]
# name -> (num_beams, length_penalty, early_stopping, num_return)
BEAM_CONFIGS = {"b2_return2": (2, 1.0, False, 2), "b3_lp0.5_return2": (3, 0.5, False, 2)}
# (prompt index, seed, temperature): temperature only, so softmax(logits / T) is the law.
SAMPLED = [(0, 11, 0.7), (1, 22, 1.0), (2, 33, 0.7)]
NUM_DRAWS, DRAW_TEMPERATURE = 1000, 0.7


@dataclass
class Family:
    name: str
    path: Path
    hf: nn.Module
    """The HF oracle: float32, eval, same weights as the files under `path`."""
    engine: Engine


# ---- factories -------------------------------------------------------------------------------

def sharpen(model: transformers.GPT2LMHeadModel) -> transformers.GPT2LMHeadModel:
    """Scales ln_f's weight and bias by LOGIT_SCALE, so the (tied) logits scale by it: the same
    greedy tokens, but a head on the distribution. As built, the top token's probability is
    ~4e-5 (2x uniform over 49152), which would leave contrastive search's probability term and
    the sampling tests nothing to see; scaled, it is ~0.1."""
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(LOGIT_SCALE)
        model.transformer.ln_f.bias.mul_(LOGIT_SCALE)
    return model


def load_gpt2(path: Path) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


def make_family_dir(name: str, path: Path, tokenizer_dir: Path, tokenizer):
    """Writes family `name` to `path`; returns (HF oracle, the engine's norm_scheme)."""
    if name == "gpt2":
        save_model_dir(sharpen(make_hf_gpt2(seed=0)), path, tokenizer_dir)
        return load_gpt2(path), None
    if name == "gpt2_ln_free":
        calibration = tokenizer(PROMPTS[1] + " " + QUESTION, return_tensors="pt").input_ids
        hacked, _, _ = make_ln_free(make_hf_gpt2(seed=3), calibration)
        save_model_dir(sharpen(hacked), path, tokenizer_dir)
        return load_gpt2(path), None
    if name == "lns":  # saved as a plain Llama: nothing in the files says LNS
        save_model_dir(make_hf_llama(seed=0), path, tokenizer_dir)
        plain = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        return patch_lns(plain.eval()), "lns"
    mix = make_hf_mix_ln(seed=1)
    save_model_dir(mix, path, tokenizer_dir)
    return mix, "mix_ln"


def assert_engine_runs_variant(family: Family) -> None:
    config = family.engine.runner.config
    if family.name.startswith("gpt2"):
        assert isinstance(config, GPT2Config)
        assert config.layer_norm_free == (family.name == "gpt2_ln_free")
    else:
        assert config.norm_scheme == family.name
        assert config.num_post_ln_layers == (NUM_POST_LN if family.name == "mix_ln" else 0)


@torch.inference_mode()
def hf_greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                         pad_token_id=EOS, eos_token_id=EOS)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


def hf_beam(model, ids: list[int], config: str) -> list[tuple[list[int], float]]:
    return hf_beam_oracle(model, ids, config, BEAM_CONFIGS, MAX_NEW_TOKENS)


def beam_params(config: str) -> SamplingParams:
    return beam_params_for(config, BEAM_CONFIGS, MAX_NEW_TOKENS)


def contrastive_params(k: int, alpha: float) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW_TOKENS,
                          strategy=Contrastive(top_k=k, penalty_alpha=alpha))


def sampled_params(seed: int, temperature: float, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=temperature, seed=seed,
                          **kwargs)


@torch.inference_mode()
def replay_sampling(model, ids: list[int], seed: int, temperature: float
                    ) -> tuple[list[int], float]:
    """A seeded draw over HF logits: token_t = argmax(softmax(logits_t / T) / E_t), E_t the
    Exp(1) noise the engine keys on (seed, t). Returns (tokens, smallest relative margin of the
    winner over the runner-up, so float noise between HF and the engine cannot flip it)."""
    ids, tokens, margin = list(ids), [], float("inf")
    seeds = torch.tensor([seed])
    for step in range(MAX_NEW_TOKENS):
        probs = torch.softmax(hf_last_logits(model, ids) / temperature, dim=-1)
        race = probs / random_exponentials(seeds, torch.tensor([step]), probs.shape[0])[0]
        top2 = race.topk(2).values
        margin = min(margin, float(top2[0] / top2[1] - 1))
        tokens.append(int(race.argmax()))
        ids.append(tokens[-1])
        if tokens[-1] == EOS:
            break
    return tokens, margin


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of `counts [vocab]` against `probs [vocab]`: one bin per token expected
    >= 5 times, the rest pooled into one bin; p = Q(dof / 2, chi2 / 2)."""
    counts, expected = counts.double(), probs.double() * counts.sum()
    kept = expected >= 5
    observed = torch.cat([counts[kept], counts[~kept].sum().view(1)])
    expected = torch.cat([expected[kept], expected[~kept].sum().view(1)])
    chi2 = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, chi2 / 2))


# ---- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, model_dir, hf_tokenizer) -> Family:
    path = tmp_path_factory.mktemp(request.param)
    hf, norm_scheme = make_family_dir(request.param, path, model_dir, hf_tokenizer)
    return Family(request.param, path, hf, make_engine(path, norm_scheme=norm_scheme))


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer) -> list[list[int]]:
    return [hf_tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def greedy_refs(family, prompt_ids) -> list[list[int]]:
    return [hf_greedy(family.hf, ids) for ids in prompt_ids]


@pytest.fixture(scope="module")
def contrastive_refs(family, prompt_ids) -> dict[tuple, tuple[list[int], float]]:
    return {case: reference_contrastive(family.hf, prompt_ids[case[0]], case[1], case[2],
                                        MAX_NEW_TOKENS)
            for case in CONTRASTIVE_CASES}


@pytest.fixture(scope="module")
def beam_refs(family, prompt_ids) -> dict[str, list[list[tuple[list[int], float]]]]:
    return {config: [hf_beam(family.hf, ids, config) for ids in prompt_ids]
            for config in BEAM_CONFIGS}


def assert_all_blocks_free(engine: Engine) -> None:
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


# ---- the family and its oracle ---------------------------------------------------------------

def test_family_is_varied_and_greedy_matches_hf(family, prompt_ids, greedy_refs):
    # A random model stuck on one token, or with a flat distribution, would prove little.
    assert_engine_runs_variant(family)
    assert all(len(set(out)) >= MAX_NEW_TOKENS // 2 for out in greedy_refs), greedy_refs
    assert len({tuple(out) for out in greedy_refs}) == len(greedy_refs)
    top = torch.softmax(hf_last_logits(family.hf, prompt_ids[0]), dim=-1).max()
    assert 0.005 < top < 0.9, float(top)
    outs = family.engine.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == greedy_refs


# ---- contrastive search ----------------------------------------------------------------------

def test_contrastive_matches_reference(family, prompt_ids, greedy_refs, contrastive_refs):
    # The reference's h is HF's last hidden state, which must be the LM-head input (ln_f output).
    with torch.inference_mode():
        out = family.hf(torch.tensor([prompt_ids[0]]), output_hidden_states=True)
        relogits = family.hf.lm_head(out.hidden_states[-1])
    torch.testing.assert_close(relogits, out.logits, rtol=0, atol=1e-5)
    # The reference is decisive (float noise cannot flip a step) and not plain greedy.
    for case, (tokens, gap) in contrastive_refs.items():
        assert len(tokens) == MAX_NEW_TOKENS and gap > 1e-4, (case, gap)
    assert all(contrastive_refs[case][0] != greedy_refs[case[0]] for case in CONTRASTIVE_CASES)
    engine = family.engine
    for case in CONTRASTIVE_CASES:
        index, k, alpha = case
        out = engine.generate([prompt_ids[index]], contrastive_params(k, alpha))[0]
        assert out.token_ids == contrastive_refs[case][0], case
        assert out.finish_reason == "length", case
    # Batched, with greedy rows interleaved.
    prompts, params = [], []
    for index, k, alpha in CONTRASTIVE_CASES:
        prompts += [prompt_ids[index], prompt_ids[index]]
        params += [contrastive_params(k, alpha), GREEDY]
    outs = engine.generate(prompts, params)
    for j, case in enumerate(CONTRASTIVE_CASES):
        assert outs[2 * j].token_ids == contrastive_refs[case][0], case
        assert outs[2 * j + 1].token_ids == greedy_refs[case[0]], case
    assert_all_blocks_free(engine)


# ---- beam search -----------------------------------------------------------------------------

def test_beam_search_matches_hf(family, prompt_ids, greedy_refs, beam_refs):
    returned = [r for per_prompt in beam_refs.values() for r in per_prompt]
    assert all(len(r) == 2 and r[0][0] != r[1][0] for r in returned)
    assert any(beam_refs[c][i][0][0] != greedy_refs[i] for c in BEAM_CONFIGS
               for i in range(len(PROMPTS)))
    engine = family.engine
    for config in BEAM_CONFIGS:
        for i, ids in enumerate(prompt_ids):
            check_beam(engine.generate([ids], beam_params(config))[0], beam_refs[config][i],
                       (family.name, config, i))
    # Batched: both configs for every prompt plus a greedy row each.
    prompts, params, labels = [], [], []
    for i, ids in enumerate(prompt_ids):
        for config in [*BEAM_CONFIGS, "greedy"]:
            prompts.append(ids)
            params.append(GREEDY if config == "greedy" else beam_params(config))
            labels.append((config, i))
    for out, (config, i) in zip(engine.generate(prompts, params), labels):
        if config == "greedy":
            assert out.token_ids == greedy_refs[i], i
        else:
            check_beam(out, beam_refs[config][i], (family.name, config, i))
    assert_all_blocks_free(engine)


# ---- set-based prompting ---------------------------------------------------------------------

def test_set_oracle_obeys_mask_and_positions(family, hf_tokenizer):
    model = family.hf
    single = structured(QUESTION, MEMBERS[:1], SUFFIX).segments
    ids, positions, _ = oracle_layout(hf_tokenizer, single)
    assert positions == list(range(len(ids)))
    assert oracle_greedy(model, hf_tokenizer, single)[0] == hf_greedy_12(model, ids)
    forward, backward = [oracle_greedy(model, hf_tokenizer, structured(QUESTION, m, SUFFIX)
                                       .segments) for m in (MEMBERS[:3], MEMBERS[2::-1])]
    assert forward[0] == backward[0]
    assert (forward[1] - backward[1]).abs().max() < 1e-4
    sequential = [oracle_greedy(model, hf_tokenizer, [QUESTION + "".join(m) + SUFFIX], 1)[1]
                  for m in (MEMBERS[:3], MEMBERS[2::-1])]
    assert (sequential[0] - sequential[1]).abs().max() > 1e-2


def test_every_set_permutation_matches_hf_mask_oracle(family, hf_tokenizer):
    perms = list(itertools.permutations(MEMBERS[:3]))
    prompts = [structured(QUESTION, p, SUFFIX) for p in perms]
    expected, oracle_logprobs = oracle_greedy(family.hf, hf_tokenizer, prompts[0].segments)
    assert len(set(expected)) >= len(expected) // 2, expected
    outs = family.engine.generate(prompts, SET_PARAMS)
    reference_top = outs[0].logprobs[0].top
    assert_top_close(reference_top, top_n(oracle_logprobs))
    for perm, out in zip(perms, outs):
        assert out.token_ids == expected, perm
        assert_top_close(out.logprobs[0].top, reference_top)
    assert_all_blocks_free(family.engine)


# ---- seeded sampling -------------------------------------------------------------------------

def test_seeded_sampling_alone_batched_and_hf_replay(family, prompt_ids, greedy_refs):
    engine = family.engine
    prompts = [prompt_ids[i] for i, _, _ in SAMPLED] + [prompt_ids[0]]
    params = [sampled_params(seed, t) for _, seed, t in SAMPLED] + \
        [sampled_params(44, 0.8, top_k=50, top_p=0.9)]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    # Batched in reverse order between greedy rows and another seed of the same prompt.
    extra = [sampled_params(12, SAMPLED[0][2]), GREEDY]
    outs = engine.generate(prompts[::-1] + [prompt_ids[0]] * 2, params[::-1] + extra)
    assert [o.token_ids for o in outs[:len(alone)]] == alone[::-1]
    assert outs[-1].token_ids == greedy_refs[0]
    assert outs[-2].token_ids != alone[0]   # the seed matters
    for (index, seed, temperature), tokens in zip(SAMPLED, alone):
        assert tokens != greedy_refs[index]
        expected, margin = replay_sampling(family.hf, prompt_ids[index], seed, temperature)
        assert tokens == expected, (index, seed)
        assert margin > 2e-4, margin  # HF and engine logits differ by ~1e-5
    assert_all_blocks_free(engine)


def test_first_step_draws_follow_hf_softmax_over_temperature(family, prompt_ids):
    ids = prompt_ids[0]
    logits = hf_last_logits(family.hf, ids)
    params = [SamplingParams(max_new_tokens=1, temperature=DRAW_TEMPERATURE, seed=seed,
                             logprobs=20 if seed == 0 else None) for seed in range(NUM_DRAWS)]
    outs = family.engine.generate([ids] * NUM_DRAWS, params)
    # Logprobs are reported from the raw distribution: HF's log_softmax(logits).
    assert_top_close(outs[0].logprobs[0].top, top_n(torch.log_softmax(logits, dim=-1)))
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]),
                            minlength=logits.shape[0])
    assert chi_square_pvalue(counts, torch.softmax(logits / DRAW_TEMPERATURE, dim=-1)) > 1e-3
    # The test has power: the same draws reject the distribution with the temperature ignored.
    assert chi_square_pvalue(counts, torch.softmax(logits, dim=-1)) < 1e-6
    assert_all_blocks_free(family.engine)
