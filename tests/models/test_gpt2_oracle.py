"""GPT-2 and LayerNorm-free GPT-2 are token-exact with Hugging Face transformers.

No real GPT-2 weights can be installed here, so the oracles run on small random GPT-2s built
with `transformers` and saved with `save_pretrained` (safetensors), sharing the default model's
tokenizer (vocab 49152). The oracle is `generate(do_sample=False)` in float32, one prompt at a
time. The LN-free model is saved exactly as `remove_layernorm_by_scaling` exports the released
checkpoints (eps 1e12, LN weights x 1e6/sigma_bar) and is also checked against an explicit
FixedLN reference `(x - mean) / sigma_bar * gamma + beta`, and in float16 / bfloat16, where the
raw checkpoint overflows.
"""

from __future__ import annotations

import copy
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from engine.execution.attention_metadata import AttentionMetadata, PrefillChunk
from engine.models.gpt2 import GPT2Config
from engine.sampling_params import SamplingParams
from tests.factories import make_engine

TINY = dict(vocab_size=49152, n_embd=64, n_layer=3, n_head=4, n_positions=256)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
MAX_NEW_TOKENS = 16
LONG_CONTEXT = ("Paged attention stores the key and value vectors of every sequence in "
                "fixed-size blocks, so memory is allocated on demand. ") * 7
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "List three colours of the rainbow:\n1.",
    "In 1969, the first humans landed on the Moon. The mission was called",
    LONG_CONTEXT + "In one sentence, paged attention is",
    "Q: What is 17 + 25?\nA:",
]
GREEDY = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
LN_FREE_EPS = 1e12


# ---- factories -------------------------------------------------------------------------------

def make_hf_gpt2(seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
    """A random GPT-2 whose greedy outputs are varied: small tied embeddings (so the current
    token does not dominate its own logits), non-trivial LayerNorm weights, small LN biases
    (a large ln_f bias is a constant logit offset that makes every step pick one token)."""
    torch.manual_seed(seed)
    # eos = the tokenizer's eos (2), so HF and the engine stop on the same token.
    config = transformers.GPT2Config(**{**TINY, **overrides}, bos_token_id=2, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                if name.endswith("weight"):
                    param.copy_(1 + 0.3 * torch.randn_like(param))
                else:
                    param.normal_(0, 0.05)
            else:
                param.normal_(0, 0.02 if "wte" in name else 0.3)
    return model


def save_model_dir(model: transformers.GPT2LMHeadModel, path, tokenizer_dir):
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def hf_greedy(model, tokenizer, prompts=PROMPTS) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


def token_ids(engine, prompts=PROMPTS) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(prompts, GREEDY)]


def engine_logits(engine, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of every prompt position from one prefill of the
    runner's loaded (and dtype-cast) model, on a copy of its (NaN-poisoned) cache so the
    engine's own cache stays untouched."""
    runner, n = engine.runner, len(ids)
    caches = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    with runner.device, torch.inference_mode():
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n), num_decode_tokens=0,
            prefills=[PrefillChunk(q_start=0, q_len=n, num_context_tokens=0)])
        input_ids, positions = torch.tensor(ids), torch.arange(n)
    with torch.inference_mode():
        hidden, _ = runner.model(input_ids, positions, caches, meta)
        return runner.model.compute_logits(hidden).cpu()


class FixedLN(nn.Module):
    """The LN-free paper's inference norm, written out: (x - mean) / sigma_bar * g + b.

    With `sigma=None` the first call calibrates sigma_bar as the paper does: the per-token
    std of this norm's input, averaged over positions, times `jitter` (so no module's scale is
    exactly its input's std)."""

    def __init__(self, ln: nn.LayerNorm, sigma: float | None = None, jitter: float = 1.0):
        super().__init__()
        self.sigma, self.jitter, self.weight, self.bias = sigma, jitter, ln.weight, ln.bias

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        if self.sigma is None:
            self.sigma = centred.pow(2).mean(-1).sqrt().mean().item() * self.jitter
        return centred / self.sigma * self.weight + self.bias


def ln_modules(model) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, FixedLN))}


def make_ln_free(model, calibration_ids: torch.Tensor, seed: int = 1):
    """(eps-hack model as released, FixedLN reference model, sigma_bar per LN module).

    sigma_bar is calibrated module by module in forward order through the LN-free model itself
    (a random model with made-up scales would blow its residual stream up), then scaled by a
    random factor in [0.5, 2]."""
    gen = torch.Generator().manual_seed(seed)
    reference = copy.deepcopy(model)
    for name in ln_modules(model):
        parent, attr = reference.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        jitter = 2.0 ** (2 * torch.rand((), generator=gen).item() - 1)
        setattr(parent, attr, FixedLN(getattr(parent, attr), jitter=jitter))
    with torch.inference_mode():
        reference(calibration_ids)
    sigmas = {name: m.sigma for name, m in ln_modules(reference).items()}
    hacked = copy.deepcopy(model)
    hacked.config.layer_norm_epsilon = LN_FREE_EPS
    with torch.no_grad():
        for name, ln in ln_modules(hacked).items():   # remove_layernorm_by_scaling
            ln.eps = LN_FREE_EPS
            ln.weight.mul_(1e6 / sigmas[name])
    return hacked, reference, sigmas


# ---- fixtures --------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, model_dir):
    return save_model_dir(make_hf_gpt2(), tmp_path_factory.mktemp("gpt2"), model_dir)


@pytest.fixture(scope="module")
def gpt2_greedy(gpt2_dir, tokenizer):
    model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    return hf_greedy(model, tokenizer)


@pytest.fixture(scope="module")
def gpt2_engine(gpt2_dir):
    return make_engine(gpt2_dir)


@pytest.fixture(scope="module")
def ln_free(tmp_path_factory, model_dir, tokenizer):
    """(directory in the released LN-free format, FixedLN reference model)."""
    calibration = tokenizer(PROMPTS[4] + PROMPTS[3], return_tensors="pt").input_ids
    hacked, reference, _ = make_ln_free(make_hf_gpt2(seed=3), calibration)
    path = save_model_dir(hacked, tmp_path_factory.mktemp("gpt2_ln_free"), model_dir)
    return path, reference.eval()


@pytest.fixture(scope="module")
def ln_free_hf(ln_free):
    return transformers.GPT2LMHeadModel.from_pretrained(ln_free[0], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ln_free_engine(ln_free):
    return make_engine(ln_free[0])


# ---- GPT-2 -----------------------------------------------------------------------------------

def test_oracle_outputs_are_varied(gpt2_greedy, tokenizer):
    lengths = sorted(len(tokenizer(p).input_ids) for p in PROMPTS)
    assert lengths[0] <= 2 and lengths[-1] >= 150
    assert all(len(out) == MAX_NEW_TOKENS for out in gpt2_greedy)
    assert all(len(set(out)) >= 6 for out in gpt2_greedy)        # not one repeated token
    assert len({tuple(out) for out in gpt2_greedy}) == len(PROMPTS)


def test_greedy_one_at_a_time_matches_hf(gpt2_engine, gpt2_greedy):
    assert isinstance(gpt2_engine.runner.config, GPT2Config)
    for prompt, expected in zip(PROMPTS, gpt2_greedy):
        assert token_ids(gpt2_engine, [prompt])[0] == expected, prompt


def test_greedy_batched_matches_hf(gpt2_engine, gpt2_greedy):
    assert token_ids(gpt2_engine) == gpt2_greedy
    assert gpt2_engine.kv_cache.num_free_blocks == gpt2_engine.kv_cache.num_blocks


def test_chunked_prefill_matches_hf(gpt2_dir, gpt2_greedy):
    engine = make_engine(gpt2_dir, max_num_batched_tokens=24)
    assert token_ids(engine) == gpt2_greedy


def test_preemption_matches_hf(gpt2_dir, gpt2_greedy):
    # 14 blocks x 16 tokens: the longest request (~175 tokens, 11 blocks) fits alone, not all.
    engine = make_engine(gpt2_dir, num_blocks=14, enable_prefix_caching=False)
    assert token_ids(engine) == gpt2_greedy
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_torch_attention_backend_matches_hf(gpt2_dir, gpt2_greedy):
    engine = make_engine(gpt2_dir, attention_backend="torch")
    assert not engine.runner.use_paged_kernel
    assert token_ids(engine) == gpt2_greedy


# Each variant changes the logits far beyond the 1e-5 tolerance below (gelu vs gelu_new alone
# moves them by ~2e-4), so an ignored field fails the logit check, not only by luck the tokens.
CONFIG_VARIANTS = {
    "gelu-inverse_layer_idx": dict(activation_function="gelu",
                                   scale_attn_by_inverse_layer_idx=True),
    "relu-unscaled_attn-n_inner": dict(activation_function="relu", scale_attn_weights=False,
                                       n_inner=96),
}


@pytest.mark.parametrize("overrides", CONFIG_VARIANTS.values(), ids=CONFIG_VARIANTS.keys())
def test_config_variants_match_hf(tmp_path, model_dir, tokenizer, overrides):
    model = make_hf_gpt2(seed=5, **overrides)
    engine = make_engine(save_model_dir(model, tmp_path, model_dir))
    ids = tokenizer(PROMPTS[5]).input_ids
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine_logits(engine, ids), want, atol=1e-5, rtol=1e-5)
    prompts = PROMPTS[1:3]
    assert token_ids(engine, prompts) == hf_greedy(model, tokenizer, prompts)


def test_unprefixed_checkpoint_with_mask_buffers_matches_hf(tmp_path, gpt2_dir, gpt2_greedy):
    # Older checkpoints (the original `gpt2` repo) have no "transformer." prefix and store the
    # causal-mask buffers attn.bias / attn.masked_bias next to the weights.
    tensors = {k.removeprefix("transformer."): v
               for k, v in load_file(gpt2_dir / "model.safetensors").items()}
    n = TINY["n_positions"]
    for i in range(TINY["n_layer"]):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    shutil.copytree(gpt2_dir, tmp_path, dirs_exist_ok=True)
    save_file(tensors, tmp_path / "model.safetensors")
    assert token_ids(make_engine(tmp_path), PROMPTS[:3]) == gpt2_greedy[:3]


def test_missing_weight_raises(tmp_path, gpt2_dir):
    tensors = load_file(gpt2_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    shutil.copytree(gpt2_dir, tmp_path, dirs_exist_ok=True)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.bias"):
        make_engine(tmp_path)


UNSUPPORTED = {
    "cross_attention": ({"add_cross_attention": True}, "add_cross_attention=True"),
    "activation": ({"activation_function": "tanh"}, "activation_function='tanh'"),
    "heads": ({"n_head": 5}, "n_embd=64"),
}


@pytest.mark.parametrize("overrides,message", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_config_is_refused(overrides, message):
    hf = {**TINY, "activation_function": "gelu_new", **overrides}
    with pytest.raises(ValueError, match=message):
        GPT2Config.from_hf(hf)


def test_llama_norm_scheme_is_refused():
    hf = {**TINY, "activation_function": "gelu_new"}
    assert GPT2Config.from_hf(hf, SimpleNamespace(norm_scheme="pre")).hidden_size == 64
    with pytest.raises(ValueError, match="norm_scheme='lns'"):
        GPT2Config.from_hf(hf, SimpleNamespace(norm_scheme="lns"))


def test_config_reads_hf_fields(gpt2_dir):
    hf = json.loads((gpt2_dir / "config.json").read_text())
    cfg = GPT2Config.from_hf({**hf, "reorder_and_upcast_attn": True})   # numerics only
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim,
            cfg.num_key_value_heads, cfg.intermediate_size, cfg.max_position_embeddings,
            cfg.tie_word_embeddings, cfg.layer_norm_free) == (64, 3, 4, 16, 4, 256, 256, True,
                                                              False)


def test_cli_generate(gpt2_dir, gpt2_greedy, capsys):
    from server.cli import main

    assert main(["generate", "--model", str(gpt2_dir), "--prompt", PROMPTS[1],
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--num-blocks", "64", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["token_ids"] == gpt2_greedy[1] and line["text"]


# ---- LayerNorm-free GPT-2 --------------------------------------------------------------------

def test_ln_free_checkpoint_is_in_released_format(ln_free, ln_free_engine):
    path, _ = ln_free
    hf = json.loads((path / "config.json").read_text())
    weight = load_file(path / "model.safetensors")["transformer.h.0.ln_1.weight"]
    assert hf["layer_norm_epsilon"] == LN_FREE_EPS and weight.abs().max() > 1e6
    assert ln_free_engine.runner.config.layer_norm_free


def test_ln_free_greedy_matches_hf(ln_free_hf, ln_free_engine, tokenizer):
    expected = hf_greedy(ln_free_hf, tokenizer)
    assert sum(len(set(out)) for out in expected) >= 3 * len(PROMPTS)   # varied outputs
    for prompt, want in zip(PROMPTS, expected):
        assert token_ids(ln_free_engine, [prompt])[0] == want, prompt
    assert token_ids(ln_free_engine) == expected


def test_ln_free_logits_match_fixed_ln_reference(ln_free, ln_free_engine, tokenizer):
    _, reference = ln_free
    ids = tokenizer(PROMPTS[5]).input_ids
    with torch.inference_mode():
        want = reference(torch.tensor([ids])).logits[0]
    got = engine_logits(ln_free_engine, ids)
    assert want.std() > 0.1                            # logits are not trivially near zero
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_hf_float16_overflows_on_ln_free_checkpoint(ln_free_hf, tokenizer):
    # The trap the engine avoids: the raw 1e6-scaled LN weights are inf in float16.
    model = copy.deepcopy(ln_free_hf).to(torch.float16)
    ids = torch.tensor([tokenizer(PROMPTS[1]).input_ids])
    with torch.inference_mode():
        logits = model(ids).logits
    assert not torch.isinf(ln_free_hf.transformer.h[0].ln_1.weight).any()
    assert torch.isinf(model.transformer.h[0].ln_1.weight).any()
    assert not torch.isfinite(logits).all()


# Relative RMS error of the logits against the float32 engine. Measured: ~0.5% (float16) and
# ~3% (bfloat16), while the FixedLN reference itself run in that dtype gives ~0.5% and ~4%.
LOW_PRECISION_TOLERANCE = {"float16": 0.01, "bfloat16": 0.05}


@pytest.mark.parametrize("dtype", LOW_PRECISION_TOLERANCE)
def test_ln_free_low_precision_is_finite_and_close(ln_free, ln_free_engine, tokenizer, dtype):
    engine = make_engine(ln_free[0], dtype=dtype)
    ids = tokenizer(PROMPTS[5]).input_ids
    want, got = engine_logits(ln_free_engine, ids), engine_logits(engine, ids)
    assert torch.isfinite(got).all()
    err = ((got - want).norm() / want.norm()).item()
    assert err < LOW_PRECISION_TOLERANCE[dtype], f"{dtype}: relative RMS error {err:.4f}"
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    # The whole engine path (decode kernel included) stays finite at this dtype.
    out = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, temperature=0.0,
                                                      logprobs=0))
    logprobs = [lp.logprob for o in out for lp in o.logprobs]
    assert len(logprobs) == 16 and all(torch.isfinite(torch.tensor(logprobs)))
