"""Scorers against independent implementations: the RankGen-format T5 scorer against
transformers' own T5EncoderModel loader on the same random weights, the MiniLM scorer against
sentence-transformers' `encode` of the same bundled model."""

from __future__ import annotations

from pathlib import Path

import torch

from decoding.scorers.minilm import MiniLmScorer, bundled_model_dir
from decoding.scorers.rankgen_t5 import T5RankGenScorer

PREFIXES = ["In the beginning God created the heaven and the earth.",
            "The quick brown fox", "Paged attention stores the KV cache in blocks."]
CONTINUATIONS = ["And the earth was without form, and void.", "jumps over the lazy dog",
                 "Each block holds sixteen tokens of keys and values."]


def _t5_dirs(root: Path) -> tuple[Path, Path, torch.Tensor]:
    """A random T5 encoder saved by transformers (the oracle's directory) and the same weights
    in the RankGen checkpoint format (t5_encoder.* + projection.weight)."""
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    words = sorted({w for text in PREFIXES + CONTINUATIONS + ["pre suffi"]
                    for w in text.replace(".", " .").replace(",", " ,").split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (piece, -float(i)) for i, piece in enumerate(
            ["\u2581" + w for w in words] + list("abcdefghijklmnopqrstuvwxyz.,"))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_ff=64, d_kv=8, num_heads=4,
                      num_layers=2, feed_forward_proj="gated-gelu")
    encoder = T5EncoderModel(config).eval()
    hf_dir, rankgen_dir = root / "hf", root / "rankgen"
    encoder.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    projection = torch.randn(32, 32)
    state = {f"t5_encoder.{k}": v.contiguous() for k, v in encoder.state_dict().items()
             if k != "encoder.embed_tokens.weight"}
    state["projection.weight"] = projection
    rankgen_dir.mkdir()
    save_file(state, rankgen_dir / "model.safetensors")
    config.save_pretrained(rankgen_dir)
    tokenizer.save_pretrained(rankgen_dir)
    return hf_dir, rankgen_dir, projection


def test_t5_scorer_equals_transformers_on_the_same_weights(tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    hf_dir, rankgen_dir, projection = _t5_dirs(tmp_path)
    oracle, tokenizer = T5EncoderModel.from_pretrained(hf_dir).eval(), \
        AutoTokenizer.from_pretrained(hf_dir)

    def vectors(texts, marker, limit):
        batch = tokenizer([marker + t for t in texts], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = oracle(input_ids=batch["input_ids"][:, :limit],
                            attention_mask=batch["attention_mask"][:, :limit]).last_hidden_state
        return hidden[:, 0] @ projection.T

    expected = (vectors(PREFIXES, "pre ", 512) * vectors(CONTINUATIONS, "suffi ", 128)).sum(-1)
    got = T5RankGenScorer(rankgen_dir).score(PREFIXES, CONTINUATIONS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_minilm_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    left = model.encode(PREFIXES, convert_to_tensor=True, normalize_embeddings=True)
    right = model.encode(CONTINUATIONS, convert_to_tensor=True, normalize_embeddings=True)
    got = MiniLmScorer().score(PREFIXES, CONTINUATIONS)
    torch.testing.assert_close(got, (left * right).sum(-1).float(), rtol=1e-4, atol=1e-5)
