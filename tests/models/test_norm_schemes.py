"""LayerNorm-Scaling and Mix-LN Llamas are token-exact with patched Hugging Face oracles.

Neither variant is declared by its checkpoint (both save `model_type: llama`), so the oracles
are small random HF Llamas whose modules this file patches to the papers' formulas:
- LNS: each layer's input_layernorm and post_attention_layernorm output times 1/sqrt(l), l the
  layer number from 1 (lmsdss/LayerNorm-Scaling, `norm_type == 'LNS'`).
- Mix-LN: the first floor(0.25 * L) layers run Post-LN, h = Norm_a(x + Attn(x)),
  y = Norm_f(h + FFN(h)), with `post_attention_layernorm` / `post_feedforward_layernorm` and no
  input norm, as the reference's `post_pre` layers save them.
All weights are random (norm weights too) and the tokenizer is the default model's, so the
prompts are real text and greedy outputs are varied.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import types
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.execution.attention_metadata import AttentionMetadata, PrefillChunk
from engine.config import ModelConfig
from engine.loader import iter_safetensors, load_hf_config
from engine.models.llama import LlamaConfig, LlamaForCausalLM
from engine.sampling_params import SamplingParams
from server.cli import build_parser, make_engine_config
from tests.factories import make_engine

NUM_LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 8, 64, 128, 4, 2, 49152
NUM_POST_LN = 2  # floor(0.25 * 8), Mix-LN's default ratio
MAX_NEW_TOKENS = 16
PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is 17 + 25?\nA:",
    "Paged attention stores the key and value vectors of every sequence in fixed-size blocks, "
    "so memory is allocated on demand and shared between sequences. In one sentence, it is",
]
GREEDY = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
WEIGHTS = "model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- oracles -------------------------------------------------------------------------------

def make_hf_llama(seed: int):
    """A random float32 HF Llama (GQA, untied head) with random norm weights. Weights 10x
    the usual init scale keep greedy outputs from collapsing onto one repeated token."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM as HFLlama

    torch.manual_seed(seed)
    cfg = HFLlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                        num_hidden_layers=NUM_LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                        rms_norm_eps=1e-6, initializer_range=0.2,
                        tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2, pad_token_id=2)
    model = HFLlama(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


class ScaledNorm(nn.Module):
    """LNS reference: `scale_factor * norm(x)`, scale_factor = 1/sqrt(layer_index + 1)."""

    def __init__(self, norm: nn.Module, layer_index: int) -> None:
        super().__init__()
        self.norm, self.scale = norm, 1 / math.sqrt(layer_index + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.norm(x)


def patch_lns(hf_model):
    lns = copy.deepcopy(hf_model)
    for i, layer in enumerate(lns.model.layers):
        layer.input_layernorm = ScaledNorm(layer.input_layernorm, i)
        layer.post_attention_layernorm = ScaledNorm(layer.post_attention_layernorm, i)
    return lns


def post_ln_forward(self, hidden_states, **kwargs):
    """Mix-LN Post-LN layer (reference `post_pre`, layer_index < POST_NUM)."""
    attn_out, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    hidden_states = self.post_attention_layernorm(hidden_states + attn_out)
    return self.post_feedforward_layernorm(hidden_states + self.mlp(hidden_states))


def make_hf_mix_ln(seed: int):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = make_hf_llama(seed)
    for layer in model.model.layers[:NUM_POST_LN]:
        layer.post_feedforward_layernorm = LlamaRMSNorm(HIDDEN, eps=1e-6)
        with torch.no_grad():
            layer.post_feedforward_layernorm.weight.uniform_(0.5, 1.5)
        del layer.input_layernorm  # a Post-LN layer has none, and its checkpoint saves none
        layer.forward = types.MethodType(post_ln_forward, layer)
    return model


def hf_greedy(hf_model, tokenizer) -> list[list[int]]:
    outputs = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf_model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs


# ---- model directories ---------------------------------------------------------------------

def save_model_dir(hf_model, path: Path, tokenizer_dir: Path) -> Path:
    hf_model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def variant_dir(src: Path, dst: Path, polydecode: dict | None = None, edit_weights=None) -> Path:
    """A copy of `src` with a "polydecode" config.json key and/or edited weights."""
    shutil.copytree(src, dst, copy_function=os.link)  # hard links: rewritten files replaced
    if polydecode is not None:
        config = json.loads((dst / "config.json").read_text()) | {"polydecode": polydecode}
        (dst / "config.json").unlink()
        (dst / "config.json").write_text(json.dumps(config))
    if edit_weights is not None:
        weights = load_file(dst / WEIGHTS)
        edit_weights(weights)
        (dst / WEIGHTS).unlink()
        save_file(weights, dst / WEIGHTS)
    return dst


@pytest.fixture(scope="module")
def hf_plain():
    return make_hf_llama(seed=0)


@pytest.fixture(scope="module")
def lns_dir(hf_plain, model_dir, tmp_path_factory) -> Path:
    # LNS checkpoints are plain Llama checkpoints: the saved weights are the unscaled gammas.
    return save_model_dir(hf_plain, tmp_path_factory.mktemp("lns"), model_dir)


@pytest.fixture(scope="module")
def hf_lns(hf_plain):
    return patch_lns(hf_plain)


@pytest.fixture(scope="module")
def lns_greedy(hf_lns, hf_tokenizer) -> list[list[int]]:
    return hf_greedy(hf_lns, hf_tokenizer)


@pytest.fixture(scope="module")
def plain_greedy(hf_plain, hf_tokenizer) -> list[list[int]]:
    return hf_greedy(hf_plain, hf_tokenizer)


@pytest.fixture(scope="module")
def hf_mix():
    return make_hf_mix_ln(seed=1)


@pytest.fixture(scope="module")
def mix_dir(hf_mix, model_dir, tmp_path_factory) -> Path:
    return save_model_dir(hf_mix, tmp_path_factory.mktemp("mix_ln"), model_dir)


@pytest.fixture(scope="module")
def mix_greedy(hf_mix, hf_tokenizer) -> list[list[int]]:
    return hf_greedy(hf_mix, hf_tokenizer)


def token_ids(engine, prompts: list[str]) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(prompts, GREEDY)]


def assert_varied(outputs: list[list[int]]) -> None:
    # A random model stuck on one token would make token-exactness prove little.
    assert all(len(out) == MAX_NEW_TOKENS for out in outputs)
    assert all(len(set(out)) >= MAX_NEW_TOKENS // 2 for out in outputs), outputs
    assert len({tuple(out) for out in outputs}) == len(outputs)


# ---- LayerNorm-Scaling ---------------------------------------------------------------------

def test_oracles_are_varied_and_distinct(lns_greedy, plain_greedy, mix_greedy):
    for outputs in (lns_greedy, plain_greedy, mix_greedy):
        assert_varied(outputs)
    # The 1/sqrt(l) scaling changes every greedy continuation of the same weights.
    assert all(a != b for a, b in zip(lns_greedy, plain_greedy))


def test_lns_matches_hf_alone_and_batched(lns_dir, lns_greedy):
    engine = make_engine(lns_dir, norm_scheme="lns")
    for prompt, expected in zip(PROMPTS, lns_greedy):
        assert token_ids(engine, [prompt])[0] == expected, prompt
    assert token_ids(engine, PROMPTS) == lns_greedy
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_lns_from_directory_key(lns_dir, lns_greedy, plain_greedy, tmp_path):
    keyed = variant_dir(lns_dir, tmp_path / "keyed", polydecode={"norm_scheme": "lns"})
    assert token_ids(make_engine(keyed), PROMPTS) == lns_greedy
    # The ModelConfig field wins over the directory's key.
    assert token_ids(make_engine(keyed, norm_scheme="pre"), PROMPTS) == plain_greedy


def test_without_the_flag_lns_weights_run_as_plain_llama(lns_dir, lns_greedy, plain_greedy):
    # Nothing in the checkpoint says LNS: without the flag it is (correctly) a plain Llama.
    outputs = token_ids(make_engine(lns_dir), PROMPTS)
    assert outputs == plain_greedy
    assert all(a != b for a, b in zip(outputs, lns_greedy))


def make_engine_model(model_dir: Path, cfg: LlamaConfig) -> LlamaForCausalLM:
    model = LlamaForCausalLM(cfg).eval()
    model.load_weights(iter_safetensors(model_dir))
    return model


@torch.inference_mode()
def prefill_logits(model: LlamaForCausalLM, input_ids: list[int]) -> torch.Tensor:
    """float32 logits [len, vocab] of one whole-prompt prefill (slots 0..len-1)."""
    cfg, num_tokens, block_size = model.config, len(input_ids), 16
    shape = (num_tokens // block_size + 2, block_size, cfg.num_key_value_heads, cfg.head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]
    meta = AttentionMetadata(slot_mapping=torch.arange(num_tokens), num_decode_tokens=0,
                             prefills=[PrefillChunk(q_start=0, q_len=num_tokens,
                                                    num_context_tokens=0)])
    hidden, _ = model(torch.tensor(input_ids), torch.arange(num_tokens), kv_caches, meta)
    return model.compute_logits(hidden)


def test_lns_folded_equals_unfolded_and_hf(lns_dir, hf_lns, hf_plain, hf_tokenizer):
    cfg = LlamaConfig.from_hf(load_hf_config(lns_dir), ModelConfig(norm_scheme="lns"))
    assert cfg.norm_scheme == "lns" and cfg.fold_lns
    folded = make_engine_model(lns_dir, cfg)
    unfolded = make_engine_model(lns_dir, msgspec.structs.replace(cfg, fold_lns=False))
    # Folding is gamma/sqrt(l) on both pre-norms only; unfolded keeps the checkpoint's gamma.
    hf_layers = hf_plain.model.layers
    for i in (0, NUM_LAYERS - 1):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            gamma = getattr(hf_layers[i], norm).weight
            torch.testing.assert_close(getattr(folded.layers[i], norm).weight,
                                       gamma / math.sqrt(i + 1), atol=0, rtol=1e-6)
            assert torch.equal(getattr(unfolded.layers[i], norm).weight, gamma)
    assert torch.equal(folded.norm.weight, hf_plain.model.norm.weight)
    ids = hf_tokenizer(PROMPTS[-1]).input_ids
    with torch.inference_mode():
        expected = hf_lns(torch.tensor([ids])).logits[0].float()
    logits_folded, logits_unfolded = prefill_logits(folded, ids), prefill_logits(unfolded, ids)
    torch.testing.assert_close(logits_folded, logits_unfolded, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_unfolded, expected, atol=1e-5, rtol=0)
    # ... and the scheme matters at the logit level, not just at the argmax.
    plain = make_engine_model(lns_dir, LlamaConfig.from_hf(load_hf_config(lns_dir)))
    assert (prefill_logits(plain, ids) - expected).abs().max() > 1e-2


# ---- Mix-LN ---------------------------------------------------------------------------------

def test_mix_ln_matches_hf_alone_batched_and_chunked(mix_dir, mix_greedy):
    engine = make_engine(mix_dir, norm_scheme="mix_ln")
    assert engine.runner.config.num_post_ln_layers == NUM_POST_LN
    for prompt, expected in zip(PROMPTS, mix_greedy):
        assert token_ids(engine, [prompt])[0] == expected, prompt
    assert token_ids(engine, PROMPTS) == mix_greedy
    # 24-token steps: the long prompt is prefilled in chunks over cached context.
    chunked = make_engine(mix_dir, norm_scheme="mix_ln", mix_ln_ratio=0.25,
                          max_num_batched_tokens=24)
    assert token_ids(chunked, PROMPTS) == mix_greedy


def test_mix_ln_from_directory_key(mix_dir, mix_greedy, tmp_path):
    keyed = variant_dir(mix_dir, tmp_path / "keyed",
                        polydecode={"norm_scheme": "mix_ln", "mix_ln_ratio": 0.25})
    assert token_ids(make_engine(keyed), PROMPTS) == mix_greedy


def test_mix_ln_ignores_an_unused_input_norm(mix_dir, mix_greedy, tmp_path):
    # Some exports save an input_layernorm for Post-LN layers too; it must not be applied.
    def add_nan_input_norms(weights):
        for i in range(NUM_POST_LN):
            weights[f"model.layers.{i}.input_layernorm.weight"] = torch.full((HIDDEN,), math.nan)

    extra = variant_dir(mix_dir, tmp_path / "extra", edit_weights=add_nan_input_norms)
    assert token_ids(make_engine(extra, norm_scheme="mix_ln"), PROMPTS[:2]) == mix_greedy[:2]


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_mix_ln_loader_places_post_attention_norm_by_layer(mix_dir):
    """Layer 0 (Post-LN) applies its `post_attention_layernorm` after the attention residual;
    the last layer (Pre-LN) applies its own before the FFN. Checked on the engine's layers
    with hooks, against the formulas evaluated with the checkpoint's tensors."""
    ckpt = load_file(mix_dir / WEIGHTS)
    engine = make_engine(mix_dir, norm_scheme="mix_ln")
    layers = engine.runner.model.layers
    seen: dict[str, tuple] = {}

    def record(key: str):
        def hook(module, args, out) -> None:  # returns None: the output is left as it is
            seen.setdefault(key, (args, out))
        return hook

    hooks = [module.register_forward_hook(record(f"{name}:{i}"))
             for i in (0, NUM_LAYERS - 1)
             for name, module in (("layer", layers[i]), ("attn", layers[i].self_attn),
                                  ("mlp", layers[i].mlp))]
    engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=1, temperature=0.0))
    for hook in hooks:
        hook.remove()

    def w(i, norm):
        return ckpt[f"model.layers.{i}.{norm}.weight"]

    close = dict(atol=1e-5, rtol=1e-5)
    assert layers[0].is_post_ln and not hasattr(layers[0], "input_layernorm")
    (_, x, *_), _ = seen["layer:0"]
    (_, attn_in, *_), attn_out = seen["attn:0"]
    (mlp_in,), mlp_out = seen["mlp:0"]
    torch.testing.assert_close(attn_in, x)  # no input norm
    torch.testing.assert_close(mlp_in, rms_norm(x + attn_out, w(0, "post_attention_layernorm")),
                               **close)
    torch.testing.assert_close(seen["layer:0"][1], rms_norm(
        mlp_in + mlp_out, w(0, "post_feedforward_layernorm")), **close)
    last = NUM_LAYERS - 1
    assert not layers[last].is_post_ln and not hasattr(layers[last], "post_feedforward_layernorm")
    (_, x, *_), y = seen[f"layer:{last}"]
    (_, attn_in, *_), attn_out = seen[f"attn:{last}"]
    (mlp_in,), mlp_out = seen[f"mlp:{last}"]
    torch.testing.assert_close(attn_in, rms_norm(x, w(last, "input_layernorm")), **close)
    torch.testing.assert_close(mlp_in, rms_norm(x + attn_out, w(last, "post_attention_layernorm")),
                               **close)
    torch.testing.assert_close(y, x + attn_out + mlp_out, **close)


def test_mix_ln_missing_post_feedforward_norm_is_an_error(mix_dir, tmp_path):
    missing = variant_dir(mix_dir, tmp_path / "missing", edit_weights=lambda weights: weights.pop(
        f"model.layers.{NUM_POST_LN - 1}.post_feedforward_layernorm.weight"))
    with pytest.raises(ValueError, match="layers.1.post_feedforward_layernorm"):
        make_engine(missing, norm_scheme="mix_ln")
    # A ratio naming more Post-LN layers than the checkpoint has is the same error.
    with pytest.raises(ValueError, match="post_feedforward_layernorm.*mix_ln_ratio"):
        make_engine(mix_dir, norm_scheme="mix_ln", mix_ln_ratio=0.5)


def test_mix_ln_checkpoint_is_never_guessed(mix_dir):
    with pytest.raises(ValueError, match="post_feedforward_layernorm.*needs norm_scheme='mix_ln'"):
        make_engine(mix_dir)
    with pytest.raises(ValueError, match="needs norm_scheme='mix_ln'"):
        make_engine(mix_dir, norm_scheme="lns")


# ---- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(norm_scheme="post"), "norm_scheme='post'"),
    (dict(norm_scheme="LNS"), "norm_scheme='LNS'"),
    (dict(norm_scheme="mix_ln", mix_ln_ratio=1.5), "mix_ln_ratio=1.5"),
    (dict(norm_scheme="mix_ln", mix_ln_ratio=-0.25), "mix_ln_ratio=-0.25"),
    (dict(norm_scheme="mix_ln", mix_ln_ratio=math.nan), "mix_ln_ratio=nan"),
    (dict(norm_scheme="lns", mix_ln_ratio=0.25), "mix_ln_ratio=0.25: only applies"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_model_config_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        ModelConfig(**kwargs)


def hf_dict(num_layers: int = NUM_LAYERS, **polydecode) -> dict:
    hf = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
          "num_hidden_layers": num_layers, "num_attention_heads": HEADS}
    return hf | ({"polydecode": polydecode} if polydecode else {})


@pytest.mark.parametrize("num_layers, ratio, num_post_ln", [
    (12, 0.25, 3), (24, 0.25, 6), (32, 0.25, 8),  # the Mix-LN scripts' POST_NUM
    (6, 0.25, 1), (30, 0.25, 7),  # floor, where round() would give 2 and 8
    (100, 0.29, 29), (8, 0.0, 0), (8, 1.0, 8),
])
def test_mix_ln_post_ln_layers_are_floor_alpha_l(num_layers, ratio, num_post_ln):
    cfg = LlamaConfig.from_hf(hf_dict(num_layers),
                              ModelConfig(norm_scheme="mix_ln", mix_ln_ratio=ratio))
    assert cfg.num_post_ln_layers == num_post_ln
    keyed = LlamaConfig.from_hf(hf_dict(num_layers, norm_scheme="mix_ln", mix_ln_ratio=ratio))
    assert keyed.num_post_ln_layers == num_post_ln


def test_scheme_resolution_order():
    assert LlamaConfig.from_hf(hf_dict()).norm_scheme == "pre"
    assert LlamaConfig.from_hf(hf_dict(norm_scheme="lns")).norm_scheme == "lns"
    assert LlamaConfig.from_hf(hf_dict(norm_scheme="lns"),
                               ModelConfig(norm_scheme="pre")).norm_scheme == "pre"
    default = LlamaConfig.from_hf(hf_dict(), ModelConfig(norm_scheme="mix_ln"))
    assert default.num_post_ln_layers == NUM_POST_LN
    # The directory's ratio applies when only the scheme comes from ModelConfig.
    assert LlamaConfig.from_hf(hf_dict(mix_ln_ratio=0.5), ModelConfig(
        norm_scheme="mix_ln")).num_post_ln_layers == 4
    assert LlamaConfig.from_hf(hf_dict(norm_scheme="mix_ln", mix_ln_ratio=0.5), ModelConfig(
        mix_ln_ratio=0.25)).num_post_ln_layers == 2
    assert LlamaConfig.from_hf(hf_dict(norm_scheme="lns"),
                               ModelConfig(norm_scheme="mix_ln")).num_post_ln_layers == 2


@pytest.mark.parametrize("hf, model_config, field", [
    (hf_dict(norm_scheme="sandwich"), None, "polydecode.norm_scheme='sandwich'"),
    (hf_dict(norm_scheme="mix_ln", mix_ln_ratio=2), None, "polydecode.mix_ln_ratio=2"),
    (hf_dict(norm_scheme="lns"), ModelConfig(mix_ln_ratio=0.5), "mix_ln_ratio=0.5"),
    (hf_dict(), ModelConfig(mix_ln_ratio=0.5), "mix_ln_ratio=0.5"),
])
def test_from_hf_rejects(hf, model_config, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_hf(hf, model_config)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_flags_reach_model_config(command):
    args = build_parser().parse_args([command, "--norm-scheme", "mix_ln", "--mix-ln-ratio",
                                      "0.5"])
    model = make_engine_config(args).model
    assert (model.norm_scheme, model.mix_ln_ratio) == ("mix_ln", 0.5)
    model = make_engine_config(build_parser().parse_args([command])).model
    assert (model.norm_scheme, model.mix_ln_ratio) == (None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--norm-scheme", "post"])
