"""RankGen-format scorers (Krishna et al. 2022): a T5 encoder and a bias-free projection of the
first token's last hidden state; prefixes go in as "pre " + text (at most 512 tokens),
continuations as "suffi " + text (at most 128), and the score is the dot product of the two
unnormalised vectors.

The directory is the format of the released checkpoints (`T5EncoderWithProjection`): a T5
`config.json`, weights under `t5_encoder.*` plus `projection.weight` (safetensors or a torch
pickle; `t5_encoder.encoder.embed_tokens.weight` may stand in for the tied `shared`), and a T5
tokenizer (the released ones ship none: copy google/t5-v1_1's in). Inputs are tokenized in full
and then cut to the length limit, as the reference encoder does (a cut input loses its `</s>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from decoding.scorers.base import Scorer

PREFIX_MAX_TOKENS = 512
SUFFIX_MAX_TOKENS = 128


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    file = path / "model.safetensors"
    if file.exists():
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)


class T5RankGenScorer(Scorer):
    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, T5Config, T5EncoderModel

        path = Path(model_dir)
        config = T5Config.from_pretrained(path)
        state = _state_dict(path)
        encoder = {k.removeprefix("t5_encoder."): v for k, v in state.items()
                   if k.startswith("t5_encoder.")}
        if "shared.weight" not in encoder:
            encoder["shared.weight"] = encoder["encoder.embed_tokens.weight"]
        encoder.setdefault("encoder.embed_tokens.weight", encoder["shared.weight"])
        self.encoder = T5EncoderModel(config)
        missing, unexpected = self.encoder.load_state_dict(encoder, strict=False)
        missing = [k for k in missing if k != "encoder.embed_tokens.weight"]
        if missing or unexpected:
            raise ValueError(f"{path}: not a RankGen T5 checkpoint (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        if "projection.weight" not in state:
            raise ValueError(f"{path}: no projection.weight")
        self.projection = state["projection.weight"].float().to(device)  # [d, d], y = P x
        self.encoder = self.encoder.float().to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], marker: str, max_tokens: int) -> torch.Tensor:
        """[n, d] vectors of `marker + text`."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer([marker + t for t in texts[start:start + self.batch_size]],
                                   padding=True, return_tensors="pt")
            ids = batch["input_ids"][:, :max_tokens].to(self.device)
            mask = batch["attention_mask"][:, :max_tokens].to(self.device)
            first = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            out.append(first @ self.projection.T)
        return torch.cat(out) if out else torch.empty(0, self.projection.shape[0])

    def score(self, prefixes: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prefixes))
        found = dict(zip(unique, self.embed(unique, "pre ", PREFIX_MAX_TOKENS)))
        left = torch.stack([found[p] for p in prefixes]) if prefixes else torch.empty(0)
        right = self.embed(continuations, "suffi ", SUFFIX_MAX_TOKENS)
        return (left * right).sum(dim=-1).float()
