"""TransNormerLLM: three forms of decayed linear attention agree, and the engine's greedy,
batched, preempted, forked and set-prompted generation equals a parallel-form oracle.

No hub weights can be downloaded here, so the checkpoints are tiny random ones written in the
2024 Hugging Face format (config keys and tensor names of OpenNLPLab's
`modeling_transnormer.py`). The oracle is the quadratic masked form written below from the
paper's definition, in float64, recomputing the whole sequence at every step:

    o_t = sum_{i visible to t} exp(-s_h (pos_t - pos_i)) (q_t . k_i) v_i

with s_h = slope_h (1 - l/(L-1) + 1e-5), LRPE on layer 0, SRMSNorm without weight, ungated u,
SGLU without activation, embedding x sqrt(d).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from decoding.params import Contrastive
from engine.layers import linear_attention as la
from engine.prompt import Parallel, StructuredPrompt
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 49152  # the default model's tokenizer is reused
MAX_NEW = 12
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
PROMPTS = ["Hello", "The capital of France is", "Linear attention keeps a state " * 12,
           "def add(a, b):\n    return", "Once upon a time, in a village", "Q: 17 + 25?\nA:"]


# ---- the three forms of the attention ------------------------------------------------------

def parallel_reference(q, k, v, s, positions=None, mask=None):
    """float64 quadratic form over [H, n, d] inputs."""
    q, k, v, s = q.double(), k.double(), v.double(), s.double()
    n = q.shape[1]
    pos = torch.arange(n) if positions is None else positions
    mask = torch.ones(n, n, dtype=torch.bool).tril() if mask is None else mask
    gap = (pos[:, None] - pos[None, :]).double()
    weights = torch.where(mask, torch.exp(-s[:, None, None] * gap.clamp(min=0)), 0.0)
    return ((q @ k.transpose(1, 2)) * weights) @ v


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 5, 16, 37, 64, 100])
def test_chunked_and_recurrent_forms_match_parallel(heads, n):
    torch.manual_seed(heads * 1000 + n)
    dk, dv = 8, 6
    q, k, v = (torch.randn(heads, n, d) * 0.5 for d in (dk, dk, dv))
    s = la.decay_rates(heads, 0, 4)
    expected = parallel_reference(q, k, v, s)
    for chunk_size in (16, la.CHUNK_SIZE):
        out, state = la.chunked_prefill(q, k, v, s, torch.zeros(heads, dk, dv), chunk_size)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # Token by token from an empty state, and "prefill part, then decode the rest".
    states = torch.zeros(1, heads, dk, dv)
    steps = []
    for t in range(n):
        o, states = la.recurrent_step(q[None, :, t], k[None, :, t], v[None, :, t], s, states)
        steps.append(o[0])
    torch.testing.assert_close(torch.stack(steps, 1).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[0], state, atol=1e-5, rtol=1e-5)
    split = n // 2
    _, head_state = la.chunked_prefill(q[:, :split], k[:, :split], v[:, :split], s,
                                       torch.zeros(heads, dk, dv), 16)
    tail, _ = la.chunked_prefill(q[:, split:], k[:, split:], v[:, split:], s, head_state, 16)
    torch.testing.assert_close(tail.double(), expected[:, split:], atol=1e-5, rtol=1e-5)


def test_masked_parallel_state_continues_a_structured_prompt():
    """The state masked_parallel returns, decayed one step, gives the next token the same
    output as the quadratic form over the whole (prompt + token) sequence."""
    torch.manual_seed(0)
    heads, dk, dv = 2, 4, 4
    positions = torch.tensor([0, 1, 2, 3, 2, 3, 4, 2, 5, 6])        # a 3-member set at 2
    members = torch.tensor([-1, -1, 0, 0, 1, 1, 1, 2, -1, -1])
    n = len(positions)
    other = (members[:, None] >= 0) & (members[None, :] >= 0) & \
        (members[:, None] != members[None, :])
    mask = torch.ones(n, n, dtype=torch.bool).tril() & ~other
    q, k, v = (torch.randn(heads, n + 1, d) for d in (dk, dk, dv))
    s = la.decay_rates(heads, 1, 3)
    out, state = la.masked_parallel(q[:, :n], k[:, :n], v[:, :n], s, positions, mask)
    full_pos = torch.cat([positions, torch.tensor([7])])
    full_mask = torch.ones(n + 1, n + 1, dtype=torch.bool).tril()
    full_mask[:n, :n] = mask
    expected = parallel_reference(q, k, v, s, full_pos, full_mask)
    torch.testing.assert_close(out.double(), expected[:, :n], atol=1e-5, rtol=1e-5)
    nxt, _ = la.recurrent_step(q[None, :, n], k[None, :, n], v[None, :, n], s, state[None])
    torch.testing.assert_close(nxt[0].double(), expected[:, n], atol=1e-5, rtol=1e-5)


def test_decay_schedule_is_the_papers():
    # H = 8, layer 0 of 16: lambda = exp(-2^(-8(h+1)/8) (1 + 1e-5)).
    rates = la.decay_rates(8, 0, 16)
    expected = [2 ** -(h + 1) * (1 + 1e-5) for h in range(8)]
    assert rates.tolist() == pytest.approx(expected, rel=1e-6)
    assert la.decay_rates(8, 15, 16).tolist() == pytest.approx([r * 1e-5 for r in
                                                                expected[:8]], rel=1e-4)
    # Not a power of two: 4 slopes of H=4, then every second slope of H=8.
    assert la.alibi_slopes(6) == pytest.approx(la.alibi_slopes(4)
                                               + la.alibi_slopes(8)[0::2][:2])


# ---- tiny checkpoints and the parallel-form oracle model ------------------------------------

def write_checkpoint(path, tokenizer_dir, heads: int, layers: int = 3, dim: int = 32,
                     glu: int = 48, tied: bool = True, seed: int = 0) -> dict:
    """A random TransNormerLLM directory in the HF format; returns its float32 state dict."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    d = dim // heads
    sd = {"model.embed_tokens.weight": rand(VOCAB, dim, std=0.05)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "token_mixer.qkvu_proj.weight"] = rand(4 * dim, dim, std=dim ** -0.5)
        sd[p + "token_mixer.out_proj.weight"] = rand(dim, dim, std=dim ** -0.5)
        for name, shape in (("l1", (glu, dim)), ("l2", (glu, dim)), ("l3", (dim, glu))):
            sd[p + f"channel_mixer.{name}.weight"] = rand(*shape, std=shape[1] ** -0.5)
    # LRPE angles as initialised upstream, then perturbed as if trained: loaded, not rebuilt.
    theta = 10000 ** (-2 / dim * torch.arange(dim, dtype=torch.float32))
    sd["model.layers.0.token_mixer.lrpe.theta"] = (theta * (1 + rand(dim, std=0.1))
                                                   ).reshape(heads, 1, d)
    if not tied:
        sd["lm_head.weight"] = rand(VOCAB, dim, std=dim ** -0.5)
    config = {
        "architectures": ["TransnormerForCausalLM"], "model_type": "transnormer",
        "auto_map": {"AutoConfig": "configuration_transnormer.TransnormerConfig",
                     "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM"},
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": VOCAB,
        "decoder_embed_dim": dim, "decoder_layers": layers, "decoder_attention_heads": heads,
        "hidden_dim": dim, "glu_dim": glu, "no_scale_embedding": False,
        "add_bos_token": False, "norm_type": "simplermsnorm", "linear_act_fun": "swish",
        "bias": False, "linear_use_lrpe_list": [1] + [0] * (layers - 1),
        "torch_dtype": "float32", "init_std": 0.02}
    if not tied:
        config["tie_word_embeddings"] = False
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    sd["lm_head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return sd


class ParallelOracle:
    """The whole model in float64 with the quadratic masked attention, from the state dict."""

    def __init__(self, sd: dict, heads: int, layers: int):
        self.sd = {k: v.double() for k, v in sd.items()}
        self.heads, self.layers = heads, layers

    @staticmethod
    def srms(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    @torch.inference_mode()
    def hidden(self, ids, positions=None, mask=None):
        """[n] ids -> final-norm hidden [n, dim]."""
        sd, H = self.sd, self.heads
        n = len(ids)
        x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
        x = x * math.sqrt(x.shape[-1])
        pos = torch.arange(n) if positions is None else torch.tensor(positions)
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            q, k, v, u = (self.srms(x) @ sd[p + "token_mixer.qkvu_proj.weight"].T).chunk(4, -1)
            q, k, v = (t.reshape(n, H, -1).transpose(0, 1) for t in (F.silu(q), F.silu(k), v))
            if layer == 0:
                angle = sd[p + "token_mixer.lrpe.theta"] * pos.double()[None, :, None]
                q = torch.cat([q * torch.cos(angle), q * torch.sin(angle)], -1)
                k = torch.cat([k * torch.cos(angle), k * torch.sin(angle)], -1)
            s = la.decay_rates(H, layer, self.layers)
            o = parallel_reference(q, k, v, s, pos, mask).transpose(0, 1).reshape(n, -1)
            x = x + (self.srms(o) * u) @ sd[p + "token_mixer.out_proj.weight"].T
            z = self.srms(x)
            glu = (z @ sd[p + "channel_mixer.l1.weight"].T) * (z @ sd[p + "channel_mixer.l2.weight"].T)
            x = x + glu @ sd[p + "channel_mixer.l3.weight"].T
        return self.srms(x)

    def logits(self, hidden):
        return hidden @ self.sd["lm_head.weight"].T

    def greedy(self, ids, max_new=MAX_NEW, positions=None, mask=None, next_position=None):
        """Greedy tokens, recomputing everything each step. A structured prompt gives its
        positions, mask and the position of the token after it; generated tokens see all."""
        ids, out = list(ids), []
        if positions is not None:
            positions = list(positions)
        for _ in range(max_new):
            token = int(self.logits(self.hidden(ids, positions, mask)[-1]).argmax())
            out.append(token)
            ids.append(token)
            if positions is not None:
                positions.append(next_position + len(out) - 1)
                n = len(ids)
                grown = torch.ones(n, n, dtype=torch.bool).tril()
                grown[:n - 1, :n - 1] = mask
                mask = grown
        return out


@pytest.fixture(scope="module")
def tnl(tmp_path_factory, model_dir):
    """(directory, oracle) of a 4-head, 3-layer model."""
    path = tmp_path_factory.mktemp("tnl4")
    sd = write_checkpoint(path, model_dir, heads=4)
    return path, ParallelOracle(sd, heads=4, layers=3)


@pytest.fixture(scope="module")
def prompt_ids(tnl):
    from engine.tokenizer import Tokenizer
    tok = Tokenizer(tnl[0])
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def oracle_greedy(tnl, prompt_ids):
    return [tnl[1].greedy(ids) for ids in prompt_ids]


def _generate(engine, prompts, params=GREEDY):
    return [out.token_ids for out in engine.generate(prompts, params)]


def test_oracle_outputs_are_varied(oracle_greedy):
    tokens = [t for out in oracle_greedy for t in out]
    assert len(set(tokens)) > len(tokens) // 3


@pytest.mark.parametrize("heads,tied", [(1, True), (2, False), (4, True)])
def test_greedy_one_at_a_time_matches_parallel_oracle(tmp_path, model_dir, heads, tied):
    sd = write_checkpoint(tmp_path, model_dir, heads=heads, tied=tied, seed=heads)
    oracle = ParallelOracle(sd, heads=heads, layers=3)
    engine = make_engine(tmp_path, num_blocks=4)
    from engine.tokenizer import Tokenizer
    tok = Tokenizer(tmp_path)
    for prompt in PROMPTS[:4]:
        ids = tok.encode(prompt)
        assert _generate(engine, [ids])[0] == oracle.greedy(ids), prompt


def test_batched_chunked_preempted_and_forked_match_oracle(tnl, prompt_ids, oracle_greedy):
    path, _ = tnl
    assert _generate(make_engine(path, num_blocks=16), prompt_ids) == oracle_greedy
    # Chunks of 7 tokens: prompts cross chunk boundaries mid-prefill and share steps.
    chunked = make_engine(path, num_blocks=16, max_num_batched_tokens=7)
    assert _generate(chunked, prompt_ids) == oracle_greedy
    # Two state slots for six requests: requests wait, and run again after preemption.
    small = make_engine(path, num_blocks=2, max_num_batched_tokens=16)
    assert _generate(small, prompt_ids) == oracle_greedy
    assert small.kv_cache.num_free_blocks == small.kv_cache.num_blocks
    # Contrastive search with alpha = 0 is greedy, through k forked branches per token: each
    # fork copies the parent's state slot.
    forked = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True,
                            strategy=Contrastive(top_k=4, penalty_alpha=0.0))
    engine = make_engine(path, num_blocks=12)
    assert _generate(engine, prompt_ids, forked) == oracle_greedy
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_batched_logprobs_equal_unbatched(tnl, prompt_ids):
    params = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)
    engine = make_engine(tnl[0], num_blocks=16)
    alone = [engine.generate([ids], params)[0] for ids in prompt_ids]
    together = engine.generate(prompt_ids, params)
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        for la_, lb in zip(a.logprobs, b.logprobs):
            assert la_.logprob == pytest.approx(lb.logprob, abs=1e-4)


def test_prefill_logits_match_oracle(tnl, prompt_ids):
    """First-token log-probabilities of a long prompt (several Lightning blocks)."""
    path, oracle = tnl
    ids = prompt_ids[2] * 3
    engine = make_engine(path, num_blocks=4)
    out = engine.generate([ids], SamplingParams(max_new_tokens=1, temperature=0.0,
                                                logprobs=5))[0]
    expected = torch.log_softmax(oracle.logits(oracle.hidden(ids)[-1]), -1)
    assert len(out.logprobs[0].top) == 5
    for token_id, logprob in out.logprobs[0].top:
        assert logprob == pytest.approx(float(expected[token_id]), abs=1e-4)


def test_forks_preempt_other_generations_and_still_match(tnl, prompt_ids, oracle_greedy):
    """Five slots for four contrastive requests of three branches each: forks preempt other
    generations' branches (their states are recomputed from scratch)."""
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True,
                            strategy=Contrastive(top_k=3, penalty_alpha=0.0))
    engine = make_engine(tnl[0], num_blocks=5)
    assert _generate(engine, prompt_ids[:4], params) == oracle_greedy[:4]
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


# ---- Set-Based Prompting on linear attention ------------------------------------------------
#
# Members of a set share their start position, so each member's contribution to what follows
# decays by the same rule as in the quadratic form: exp(-s (pos_t - pos_i)), with pos_i the
# member token's own position. The engine computes the sets with the masked quadratic form
# and hands the suffix a state in which every member token is decayed to the last position;
# nothing about the result depends on the members' order.

PREFIX = "Options for a pet in a small flat:"
MEMBERS = [" a sleepy old dog", " a lion", " a great white shark in a tank",
           " a cat on a windowsill"]
SUFFIX = "\nThe best pet is"


def oracle_layout(tok, prefix, members, suffix):
    """(ids, positions, mask, next position), built independently of engine.prompt."""
    ids = tok.encode(prefix)
    positions = list(range(len(ids)))
    owner = [-1] * len(ids)
    start, longest = len(ids), 0
    for m, member in enumerate(members):
        tokens = tok.encode(member, add_special_tokens=False)
        ids += tokens
        positions += range(start, start + len(tokens))
        owner += [m] * len(tokens)
        longest = max(longest, len(tokens))
    nxt = start + longest
    if suffix is not None:
        tokens = tok.encode(suffix, add_special_tokens=False)
        ids += tokens
        positions += range(nxt, nxt + len(tokens))
        owner += [-1] * len(tokens)
        nxt += len(tokens)
    o = torch.tensor(owner)
    other = (o[:, None] >= 0) & (o[None, :] >= 0) & (o[:, None] != o[None, :])
    mask = torch.ones(len(ids), len(ids), dtype=torch.bool).tril() & ~other
    return ids, positions, mask, nxt


def test_set_prompting_is_order_invariant_and_matches_masked_oracle(tnl):
    from engine.tokenizer import Tokenizer
    path, oracle = tnl
    tok = Tokenizer(path)
    members = MEMBERS[:3]
    ids, positions, mask, nxt = oracle_layout(tok, PREFIX, members, SUFFIX)
    expected = oracle.greedy(ids, positions=positions, mask=mask, next_position=nxt)
    assert expected != oracle.greedy(ids)  # the structure changes the result
    prompts = [StructuredPrompt(segments=[PREFIX, Parallel(members=list(order)), SUFFIX])
               for order in itertools.permutations(members)]
    # Budget 24: the sets fit the first chunk, the suffix is chunked after them.
    engine = make_engine(path, num_blocks=8, max_num_batched_tokens=24)
    assert len(ids) > 24 > len(tok.encode(PREFIX)) + sum(
        len(tok.encode(m, add_special_tokens=False)) for m in members)
    outputs = _generate(engine, prompts)
    assert all(out == expected for out in outputs), (outputs, expected)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_trailing_set_matches_masked_oracle(tnl):
    """A prompt that ends with a set: the first token is read from the last member (not
    order-invariant, as with softmax attention); generated tokens continue at the set's start
    + its longest member and see every member."""
    from engine.tokenizer import Tokenizer
    path, oracle = tnl
    tok = Tokenizer(path)
    members = [MEMBERS[2], MEMBERS[1]]  # the last member is not the longest
    ids, positions, mask, nxt = oracle_layout(tok, PREFIX, members, None)
    expected = oracle.greedy(ids, positions=positions, mask=mask, next_position=nxt)
    engine = make_engine(path, num_blocks=4)
    prompt = StructuredPrompt(segments=[PREFIX, Parallel(members=members)])
    assert _generate(engine, [prompt]) == [expected]


def test_set_prompt_must_fit_one_step_on_state_models(tnl):
    from engine.errors import InvalidArgument
    engine = make_engine(tnl[0], num_blocks=4, max_num_batched_tokens=8)
    prompt = StructuredPrompt(segments=[PREFIX, Parallel(members=MEMBERS), SUFFIX])
    with pytest.raises(InvalidArgument) as err:
        engine.generate([prompt], GREEDY)
    assert err.value.field == "prompt"


# ---- every strategy on the state-slot model --------------------------------------------------

@torch.inference_mode()
def reference_contrastive(oracle, ids, k, alpha, max_new=MAX_NEW):
    """Su et al. 2022 over the oracle's final-norm hidden states, full recompute per
    candidate: argmax (1 - alpha) p(v) - alpha max_j cos(h_v, h_j)."""
    ids = list(ids)
    context = oracle.hidden(ids)
    logits = oracle.logits(context[-1])
    out = []
    for _ in range(max_new):
        probs, tokens = torch.softmax(logits, -1).topk(k)
        hidden = [oracle.hidden(ids + [int(t)]) for t in tokens]
        last = torch.stack([h[-1] for h in hidden])
        cosine = F.normalize(last, dim=-1) @ F.normalize(context, dim=-1).T
        best = int(((1 - alpha) * probs - alpha * cosine.max(-1).values).argmax())
        ids.append(int(tokens[best]))
        out.append(int(tokens[best]))
        context = torch.cat([context, last[best:best + 1]])
        logits = oracle.logits(last[best])
    return out


@torch.inference_mode()
def reference_beams(oracle, ids, num_beams, max_new):
    """Beam search without any EOS (asserted): the num_beams best continuations by summed
    log-probability, each step expanding every beam by its 2 * num_beams best tokens."""
    beams = [(0.0, [])]
    for _ in range(max_new):
        candidates = []
        for score, tokens in beams:
            logprobs = torch.log_softmax(oracle.logits(oracle.hidden(ids + tokens)[-1]), -1)
            values, best = logprobs.topk(2 * num_beams)
            candidates += [(score + float(v), tokens + [int(t)]) for v, t in zip(values, best)]
        beams = sorted(candidates, key=lambda c: -c[0])[:num_beams]
        assert all(tokens[-1] != 2 for _, tokens in beams)  # no EOS: the simple rule holds
    return beams


def test_contrastive_search_matches_reference(tnl, prompt_ids):
    path, oracle = tnl
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True,
                            strategy=Contrastive(top_k=4, penalty_alpha=0.6))
    engine = make_engine(path, num_blocks=16)
    expected = [reference_contrastive(oracle, ids, 4, 0.6) for ids in prompt_ids[:3]]
    assert _generate(engine, prompt_ids[:3], params) == expected
    assert expected != [tnl[1].greedy(ids) for ids in prompt_ids[:3]]


def test_beam_search_matches_reference(tnl, prompt_ids):
    from decoding.params import BeamSearch
    path, oracle = tnl
    max_new = 6
    params = SamplingParams(max_new_tokens=max_new,
                            strategy=BeamSearch(num_beams=3, num_return=2))
    engine = make_engine(path, num_blocks=16)
    outs = engine.generate(prompt_ids[:3], params)
    for ids, out in zip(prompt_ids[:3], outs):
        expected = reference_beams(oracle, ids, 3, max_new)[:2]
        assert [c.token_ids for c in out.candidates] == [tokens for _, tokens in expected]
        for cand, (score, _) in zip(out.candidates, expected):
            assert cand.score == pytest.approx(score / max_new, abs=1e-4)
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_seeded_sampling_alone_equals_batched(tnl, prompt_ids):
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.8, top_p=0.95, seed=7,
                            ignore_eos=True)
    engine = make_engine(tnl[0], num_blocks=16)
    alone = [_generate(engine, [ids], params)[0] for ids in prompt_ids]
    assert _generate(engine, prompt_ids, params) == alone
    assert alone != _generate(engine, prompt_ids, GREEDY)


def test_cli_generate_contrastive(tnl, prompt_ids, capsys):
    from server.cli import main

    path, oracle = tnl
    assert main(["generate", "--model", str(path), "--prompt", PROMPTS[1], "--strategy",
                 "contrastive", "--top-k", "4", "--penalty-alpha", "0.6", "--ignore-eos",
                 "--max-new-tokens", str(MAX_NEW), "--num-blocks", "8", "--json",
                 "--dtype", "float32"]) == 0  # the oracle's dtype; auto may be bfloat16
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["token_ids"] == reference_contrastive(oracle, prompt_ids[1], 4, 0.6)


def test_bfloat16_keeps_lrpe_angles_and_states_in_float32(tnl, prompt_ids):
    """bfloat16 weights, float32 LRPE angles and states. theta rounded to bfloat16 would put
    the angle theta * 300 off by up to ~1 radian; the float32 copy keeps LRPE exact up to the
    output's own bfloat16 rounding."""
    path, oracle = tnl
    half = make_engine(path, num_blocks=2, dtype="bfloat16")
    lrpe = half.runner.model.layers[0].token_mixer.lrpe
    assert lrpe.theta.dtype == torch.bfloat16 and half.runner.kv_caches[0].dtype == torch.float32
    theta = oracle.sd["model.layers.0.token_mixer.lrpe.theta"][:, 0]          # float64 [H, d]
    x = torch.ones(4, theta.shape[0], theta.shape[1], dtype=torch.bfloat16)
    positions = torch.arange(300, 304)
    angle = theta * positions.double()[:, None, None]
    exact = torch.cat([torch.cos(angle), torch.sin(angle)], -1)
    error = (lrpe(x, positions).double() - exact).abs().max()
    rounded = theta.to(torch.bfloat16).double() * positions.double()[:, None, None]
    rounded_error = (torch.cat([torch.cos(rounded), torch.sin(rounded)], -1) - exact).abs().max()
    assert error < 1e-2 < 0.1 < rounded_error
    params = SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=1)
    out = half.generate([(prompt_ids[2] * 6)[:300]], params)[0]
    assert all(math.isfinite(entry.logprob) for entry in out.logprobs)


@pytest.mark.parametrize("damage", ["drop_l2", "misshapen_qkvu"])
def test_incomplete_or_misshapen_checkpoint_is_refused(tmp_path, model_dir, damage):
    from safetensors.torch import load_file
    from engine.models.transnormer import TransnormerConfig, TransnormerForCausalLM

    write_checkpoint(tmp_path, model_dir, heads=2, tied=True)
    sd = load_file(tmp_path / "model.safetensors")
    if damage == "drop_l2":
        del sd["model.layers.1.channel_mixer.l2.weight"]
    else:
        name = "model.layers.0.token_mixer.qkvu_proj.weight"
        sd[name] = sd[name].reshape(sd[name].shape[1], -1)
    cfg = TransnormerConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    model = TransnormerForCausalLM(cfg)
    with pytest.raises(ValueError, match="missing|shape"):
        model.load_weights(sd.items())
