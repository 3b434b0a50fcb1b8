import math

import pytest
import torch
import transformers

from decoding.base import SamplingBatch, SamplingRow
from decoding.sampling import hash_uniform, random_exponentials
from decoding.transforms import apply_logits_processors, apply_min_p, apply_top_k_top_p
from engine.pipeline.sampler import Sampler
from engine.sampling_params import SamplingParams

from transformers import (  # noqa: E402
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

EOS = 2
VOCAB = 1000
GREEDY = SamplingParams(temperature=0.0)


def make_row(params: SamplingParams = SamplingParams(), prompt=(5, 6, 7), output=(), seed=0,
             eos=(EOS,)) -> SamplingRow:
    return SamplingRow(params=params, prompt_token_ids=list(prompt),
                       output_token_ids=list(output), seed=seed, eos_token_ids=eos)


def make_batch(rows: list[SamplingRow], vocab_size: int = VOCAB) -> SamplingBatch:
    return SamplingBatch.build(rows, vocab_size)


def make_logits(num_rows: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=generator) * 3


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return Sampler()(logits, make_batch(rows, logits.shape[1]))


def hf_processors(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                  repetition_penalty=1.0) -> LogitsProcessorList:
    """The processors `generate` would install, in its order."""
    return LogitsProcessorList([
        *([RepetitionPenaltyLogitsProcessor(repetition_penalty)]
          if repetition_penalty != 1 else []),
        *([TemperatureLogitsWarper(temperature)] if temperature != 1 else []),
        *([TopKLogitsWarper(top_k)] if top_k else []),
        *([TopPLogitsWarper(top_p)] if top_p < 1 else []),
        *([MinPLogitsWarper(min_p)] if min_p else []),
    ])


# --- greedy, determinism, fast paths -----------------------------------------------------------

def test_greedy_equals_argmax_with_lowest_index_ties():
    logits = make_logits(8)
    logits[3, 10] = logits[3, 500] = logits[3].max() + 1  # a tie: lowest id wins
    batch = make_batch([make_row(GREEDY) for _ in range(8)])
    assert batch.all_greedy and not batch.needs_penalties
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids[3] == 10
    assert out.logprobs is None and out.top_logprobs is None


def test_mixed_batch_greedy_rows_take_argmax_after_processors():
    logits = make_logits(5)
    rows = [make_row(SamplingParams(top_k=5), seed=1), make_row(GREEDY),
            make_row(SamplingParams(min_p=0.1), seed=2),
            make_row(SamplingParams(temperature=0.0, top_k=3, logit_bias={7: 100.0})),
            make_row(SamplingParams(top_k=0, top_p=1.0), seed=3)]
    batch = make_batch(rows)
    assert not batch.all_greedy and not batch.all_random and not batch.needs_penalties
    assert batch.top_k_top_p_rows.tolist() == [0]  # greedy and unfiltered rows skip the sort
    assert batch.needs_min_p and batch.min_tokens_mask is None
    out = Sampler()(logits, batch)
    assert out.token_ids[1] == logits[1].argmax() and out.token_ids[3] == 7


def test_sampler_never_writes_into_logits():
    logits = make_logits(4)
    before = logits.clone()
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.1, logit_bias={3: 2.0},
                            repetition_penalty=1.2, frequency_penalty=0.5, min_new_tokens=4)
    sample(logits, [make_row(params, output=[1, 1, 4], seed=i) for i in range(4)])
    assert torch.equal(logits, before)


def run_steps(logits_per_step: list[torch.Tensor], rows: list[SamplingRow], index: int,
              num_steps: int) -> list[int]:
    """Generate `num_steps` tokens for rows[index], every row seeing its own output grow."""
    outputs = [list(row.output_token_ids) for row in rows]
    for step in range(num_steps):
        step_rows = [SamplingRow(params=r.params, prompt_token_ids=r.prompt_token_ids,
                                 output_token_ids=out, seed=r.seed, eos_token_ids=r.eos_token_ids)
                     for r, out in zip(rows, outputs)]
        logits = logits_per_step[step][: len(rows)]
        token_ids = sample(logits, step_rows).token_ids.tolist()
        for out, token_id in zip(outputs, token_ids):
            out.append(token_id)
    return outputs[index]


def test_same_seed_same_tokens_whatever_the_batch():
    num_steps = 12
    params = SamplingParams(temperature=1.0, top_p=0.95)
    # Every row sees the same logits as row 0 of the 1-row batch, so only the seed matters.
    logits_per_step = [make_logits(1, seed=s).expand(16, -1) for s in range(num_steps)]
    alone = run_steps(logits_per_step, [make_row(params, seed=1234)], 0, num_steps)
    # Neighbours differ in params, seeds and number of tokens generated so far.
    neighbours = [make_row(SamplingParams(temperature=0.5 + 0.1 * i, top_k=i, min_p=0.01 * i,
                                          repetition_penalty=1.0 + 0.05 * i),
                           output=[3] * i, seed=99 + i)
                  if i % 3 else make_row(GREEDY) for i in range(16)]
    neighbours[7] = make_row(params, seed=1234)
    assert run_steps(logits_per_step, neighbours, 7, num_steps) == alone
    others = [run_steps(logits_per_step, [make_row(params, seed=s)], 0, num_steps)
              for s in (1235, 0, 2**63 - 1)]
    assert all(other != alone for other in others)


# --- processors against HF and the OpenAI formula ----------------------------------------------

def test_repetition_penalty_matches_hf():
    logits = make_logits(3)
    prompts = [[5, 6, 7, 7], [900], [1, 2, 3]]
    outputs = [[8, 5], [], [3, 3, 999]]
    penalties = [1.3, 0.7, 2.0]
    rows = [make_row(SamplingParams(repetition_penalty=p), prompt=pr, output=out)
            for p, pr, out in zip(penalties, prompts, outputs)]
    ours = apply_logits_processors(logits, make_batch(rows))
    for i, (p, pr, out) in enumerate(zip(penalties, prompts, outputs)):
        input_ids = torch.tensor([pr + out])
        expected = RepetitionPenaltyLogitsProcessor(p)(input_ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i], expected[0], rtol=0, atol=0)


def test_frequency_and_presence_penalties_follow_openai_formula():
    logits = make_logits(2)
    output = [4, 4, 4, 9, 11]
    rows = [make_row(SamplingParams(frequency_penalty=0.5, presence_penalty=1.5),
                     prompt=[4, 12], output=output),
            make_row(SamplingParams(frequency_penalty=-1.0), output=[])]
    ours = apply_logits_processors(logits, make_batch(rows))
    expected = logits.clone()
    for token_id in set(output):  # prompt tokens are not penalised
        expected[0, token_id] -= 0.5 * output.count(token_id) + 1.5
    torch.testing.assert_close(ours, expected)


def test_logit_bias_is_added():
    logits = make_logits(2)
    rows = [make_row(SamplingParams(logit_bias={3: 5.0, 8: -100.0})), make_row()]
    ours = apply_logits_processors(logits, make_batch(rows))
    expected = logits.clone()
    expected[0, 3] += 5.0
    expected[0, 8] -= 100.0
    torch.testing.assert_close(ours, expected)
    out = sample(make_logits(32), [make_row(SamplingParams(logit_bias={42: 100.0}), seed=s)
                                   for s in range(32)])
    assert (out.token_ids == 42).all()


def test_min_new_tokens_masks_eos_and_stop_tokens():
    logits = make_logits(3)
    logits[:, EOS] = logits[:, 17] = 50.0  # both would win without the mask
    params = SamplingParams(min_new_tokens=3, stop_token_ids=(17,), ignore_eos=True)
    rows = [make_row(params, output=[1, 1]), make_row(params, output=[1, 1, 1]),
            make_row(GREEDY, output=[])]
    masked = apply_logits_processors(logits, make_batch(rows))
    assert masked[0, EOS] == masked[0, 17] == float("-inf")
    assert masked[1, EOS] == masked[2, EOS] == 50.0
    token_ids = sample(logits[:2], [make_row(GREEDY, output=[]), make_row(
        SamplingParams(temperature=0.0, min_new_tokens=1), output=[])]).token_ids
    # Row 1 masks EOS only: 17 is not one of its stop tokens.
    assert token_ids.tolist() == [EOS, 17]


def test_logprobs_come_from_raw_logits():
    logits = make_logits(4)
    rows = [make_row(SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5), seed=1),
            make_row(SamplingParams(logprobs=0, logit_bias={9: 100.0}, temperature=0.0)),
            make_row(seed=3),
            make_row(SamplingParams(logprobs=5, top_k=2), seed=4)]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert out.token_ids[1] == 9
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_logprobs.shape == out.top_logprob_ids.shape == (4, 5)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    torch.testing.assert_close(out.top_logprobs, raw.topk(5).values)
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_logprob_ids))


TOP_K_TOP_P_CASES = [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (10, 0.8), (3, 0.99),
                     (VOCAB, 0.3), (50, 0.05)]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_top_p_mask_matches_hf(temperature):
    logits = make_logits(len(TOP_K_TOP_P_CASES), seed=7) / temperature
    top_k = torch.tensor([k or VOCAB for k, _ in TOP_K_TOP_P_CASES])
    top_p = torch.tensor([p for _, p in TOP_K_TOP_P_CASES])
    ours = apply_top_k_top_p(logits, top_k, top_p)
    for i, (k, p) in enumerate(TOP_K_TOP_P_CASES):
        expected = hf_processors(top_k=k, top_p=p)(None, logits[i : i + 1].clone())[0]
        assert torch.equal(ours[i].isinf(), expected.isinf()), (k, p)
        kept = ~expected.isinf()
        assert torch.equal(ours[i][kept], logits[i][kept])


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.2, 0.9, 1.0])
def test_min_p_mask_matches_hf(min_p):
    logits = make_logits(4, seed=3)
    ours = apply_min_p(logits.softmax(-1), torch.full((4,), min_p))
    expected = MinPLogitsWarper(min_p)(None, logits.clone()) if min_p else logits
    assert torch.equal(ours == 0, expected.isinf())


# --- the counter-based random numbers ----------------------------------------------------------

def _splitmix64_reference(seed: int, step: int, token_id: int) -> float:
    """Plain-integer model of `hash_uniform`, one element at a time."""
    mask = 2**64 - 1
    gamma = 0x9E3779B97F4A7C15

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    state = mix((mix((seed + gamma) & mask) + (step + 1) * gamma) & mask)
    bits = mix((state + (token_id + 1) * gamma) & mask)
    return ((bits >> 41) + 0.5) / 2**23


def test_hash_uniform_matches_integer_reference():
    keys = [(0, 0), (1, 0), (0, 1), (12345, 678), (2**63 - 1, 2**40)]
    u = hash_uniform(torch.tensor([k[0] for k in keys]), torch.tensor([k[1] for k in keys]), 5000)
    for row, (seed, step) in enumerate(keys):
        for token_id in (0, 1, 2, 4095, 4999):
            assert u[row, token_id].item() == _splitmix64_reference(seed, step, token_id)


def test_hash_uniform_is_uniform():
    num_rows, vocab_size = 64, 49152
    u = hash_uniform(torch.arange(num_rows) * 7919, torch.arange(num_rows) % 5,
                     vocab_size).double().flatten()
    n = u.numel()
    assert 0 < u.min() and u.max() < 1
    # Mean and variance of U(0, 1) are 1/2 and 1/12; allow 5 standard errors.
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # var of (u - 1/2)^2
    # Kolmogorov-Smirnov on a 1024-bin histogram: the empirical CDF at the bin edges stays
    # within 1.95 / sqrt(n) of the identity (the 0.1% critical value).
    cdf = torch.histc(u, bins=1024, min=0.0, max=1.0).cumsum(0) / n
    edges = torch.arange(1, 1025, dtype=torch.float64) / 1024
    assert (cdf - edges).abs().max().item() < 1.95 / math.sqrt(n)
    # The exponentials derived from them: Exp(1) has mean 1 and standard deviation 1.
    e = random_exponentials(torch.arange(16), torch.zeros(16, dtype=torch.int64), vocab_size)
    assert e.dtype == torch.float32 and (e > 0).all() and e.isfinite().all()
    assert abs(e.double().mean().item() - 1.0) < 5 / math.sqrt(e.numel())


@pytest.mark.parametrize("base_seed", [0, 2**62 + 17])
def test_hash_uniform_decorrelated_across_seeds_steps_and_tokens(base_seed):
    num_keys, vocab_size = 32, 49152
    seeds = base_seed + torch.arange(num_keys)
    steps = torch.zeros(num_keys, dtype=torch.int64)
    u = hash_uniform(seeds, steps, vocab_size)
    u_next_step = hash_uniform(seeds, steps + 1, vocab_size)
    bound = 5 / math.sqrt((num_keys - 1) * (vocab_size - 1))  # 5 standard errors of r
    pairs = {
        "adjacent seeds": (u[:-1], u[1:]),
        "adjacent steps": (u, u_next_step),
        # would catch a next step that replays this one's stream shifted by one token
        "step + 1 vs token + 1": (u[:, 1:], u_next_step[:, :-1]),
        "adjacent tokens": (u[:, :-1], u[:, 1:]),
    }
    for name, (a, b) in pairs.items():
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].item()
        assert abs(r) < bound, name
    assert not torch.equal(u[0], u[1])


# --- the sampled distribution against HF on the real model -------------------------------------

PROMPTS = {
    "capital": "The capital of France is",
    "code": "def fibonacci(n):\n   ",
    "story": "Once upon a time, in a small village,",
}


@pytest.fixture(scope="module")
def first_step_logits(hf_model, hf_tokenizer) -> dict[str, tuple[list[int], torch.Tensor]]:
    """prompt name -> (prompt token ids, `[vocab_size]` float32 logits of the next token)."""
    tokenizer, model = hf_tokenizer, hf_model
    result = {}
    with torch.no_grad():
        for name, prompt in PROMPTS.items():
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            result[name] = (input_ids[0].tolist(), model(input_ids).logits[0, -1].float())
    return result


# (prompt, settings) shared by our SamplingParams and the HF processors
DISTRIBUTION_CASES = [
    ("code", dict(temperature=0.7, top_p=0.9)),
    ("story", dict(temperature=1.0, top_k=20)),
    ("code", dict(temperature=1.3, min_p=0.05)),
    ("capital", dict(temperature=1.0, top_k=50, repetition_penalty=1.3)),
    ("code", dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02)),
]
NUM_SAMPLES = 20000
# The N samples all share one logits row, so their cost is N x vocab. The distribution tests
# keep the 4096 highest-logit tokens of the real model (both we and HF see the same truncated
# row, so the comparison stays exact); `test_full_vocab_samples_stay_in_hf_support` covers the
# full vocabulary at a smaller N.
VOCAB_SLICE = 4096


def _case_id(case) -> str:
    name, settings = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in settings.items())


def _sample_counts(logits: torch.Tensor, prompt_ids: list[int], settings: dict,
                   seeds: range, chunk: int = 5000) -> torch.Tensor:
    """Counts over `logits`' columns of one token sampled per seed, in batches of `chunk`."""
    params = SamplingParams(**settings)
    counts = torch.zeros(logits.shape[0], dtype=torch.int64)
    for start in range(0, len(seeds), chunk):
        rows = [make_row(params, prompt=prompt_ids, seed=s) for s in seeds[start:start + chunk]]
        token_ids = sample(logits.expand(len(rows), -1), rows).token_ids
        counts += torch.bincount(token_ids, minlength=logits.shape[0])
    return counts


def _tv_tolerance(reference: torch.Tensor, num_samples: int, delta: float = 1e-6) -> float:
    """Bound on the total-variation distance of an N-sample empirical distribution from p.

    E[TV] = 1/(2N) sum_i E|n_i - N p_i| <= 1/2 sum_i sqrt(p_i (1 - p_i) / N) (Jensen), and TV
    moves by at most 1/N when one sample changes, so by McDiarmid TV exceeds its mean by more
    than sqrt(ln(1/delta) / (2N)) with probability < delta. (Seeds are fixed, so the test is
    deterministic anyway; the bound says a correct sampler passes for all but ~delta of seed
    sets, while a sampler off by more than the tolerance fails.)
    """
    p = reference.double()
    mean_bound = 0.5 * torch.sqrt(p * (1 - p) / num_samples).sum().item()
    return mean_bound + math.sqrt(math.log(1 / delta) / (2 * num_samples))


@pytest.mark.parametrize("case", DISTRIBUTION_CASES, ids=[_case_id(c) for c in DISTRIBUTION_CASES])
def test_sampled_distribution_matches_hf(first_step_logits, case):
    name, settings = case
    prompt_ids, full_logits = first_step_logits[name]
    vocab_ids = full_logits.topk(VOCAB_SLICE).indices
    logits = full_logits[vocab_ids]
    # Prompt ids in the slice's own numbering; tokens outside it cannot be sampled anyway.
    position = {token_id: i for i, token_id in enumerate(vocab_ids.tolist())}
    prompt_ids = [position[t] for t in prompt_ids if t in position]

    reference = hf_processors(**settings)(torch.tensor([prompt_ids]), logits[None].clone())
    reference = reference.softmax(dim=-1)[0]
    counts = _sample_counts(logits, prompt_ids, settings, range(NUM_SAMPLES))
    empirical = counts.double() / NUM_SAMPLES

    outside_support = ((counts > 0) & (reference == 0)).nonzero().flatten().tolist()
    assert outside_support == []
    tolerance = _tv_tolerance(reference, NUM_SAMPLES)
    assert tolerance < 0.05  # keeps the test sharp enough to see 5% of misplaced mass
    tv = 0.5 * (empirical - reference.double()).abs().sum().item()
    print(f"{_case_id(case)}: support {int((reference > 0).sum())} TV {tv:.4f} < {tolerance:.4f}")
    assert tv < tolerance, f"TV {tv:.4f} >= {tolerance:.4f}"


@pytest.mark.parametrize("case", DISTRIBUTION_CASES[:2],
                         ids=[_case_id(c) for c in DISTRIBUTION_CASES[:2]])
def test_full_vocab_samples_stay_in_hf_support(first_step_logits, case):
    name, settings = case
    prompt_ids, logits = first_step_logits[name]
    reference = hf_processors(**settings)(torch.tensor([prompt_ids]), logits[None].clone())[0]
    counts = _sample_counts(logits, prompt_ids, settings, range(10**6, 10**6 + 512), chunk=256)
    assert ((counts > 0) & reference.isinf()).sum() == 0
    assert counts.sum() == 512
