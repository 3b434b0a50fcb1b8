"""Tokenizer wrapper: the model directory's Hugging Face tokenizer plus the stop-token set."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast


def _has_remote_code(model_dir: Path) -> bool:
    config = model_dir / "config.json"
    return config.is_file() and "auto_map" in json.loads(config.read_text())


def load_hf_tokenizer(model_dir: Path):
    """`AutoTokenizer.from_pretrained(dir)`, except for checkpoints that ship their own Python
    code (`auto_map`, e.g. TransNormerLLM): that code is never run, their `tokenizer.json` is
    read directly."""
    model_dir = Path(model_dir)
    if not _has_remote_code(model_dir):
        return AutoTokenizer.from_pretrained(str(model_dir))
    if (model_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    raise FileNotFoundError(
        f"{model_dir}: the checkpoint's tokenizer is custom code (auto_map) and there is no "
        f"tokenizer.json; convert its tokenizer to tokenizer.json once (e.g. load it with "
        f"transformers and save_pretrained a fast tokenizer)")


class Tokenizer:
    """Encodes exactly as `AutoTokenizer.from_pretrained(dir)(text)` does."""

    def __init__(self, model_dir: Path) -> None:
        self.hf = load_hf_tokenizer(model_dir)
        self.eos_token_ids = self._eos_token_ids(Path(model_dir))

    def _eos_token_ids(self, model_dir: Path) -> tuple[int, ...]:
        # generation_config.json may list several end tokens (chat models); the tokenizer knows
        # one. Generation stops on any of them, as transformers' generate() does.
        ids: list[int] = []
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        return tuple(dict.fromkeys(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf(text, add_special_tokens=add_special_tokens).input_ids

    def apply_chat_template(self, text_or_messages: str | list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (`{"role", "content"}` dicts; a string is one user
        turn) in the model's chat template, with the assistant's generation prompt appended."""
        messages = text_or_messages if isinstance(text_or_messages, list) else \
            [{"role": "user", "content": text_or_messages}]
        out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)
        return list(out["input_ids"])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)
