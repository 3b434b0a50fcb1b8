"""Model registry: Hugging Face architecture name -> (model class, config class)."""

from __future__ import annotations

from engine.models.gpt2 import GPT2Config, GPT2LMHeadModel
from engine.models.llama import LlamaConfig, LlamaForCausalLM
from engine.models.transnormer import TransnormerConfig, TransnormerForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": (LlamaForCausalLM, LlamaConfig),
    "TransnormerForCausalLM": (TransnormerForCausalLM, TransnormerConfig),
    "GPT2LMHeadModel": (GPT2LMHeadModel, GPT2Config),
}


def resolve_architecture(hf_config: dict):
    """Returns (model class, config class) for a HF config dict, or raises ValueError."""
    for arch in hf_config.get("architectures") or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"architectures={hf_config.get('architectures')!r}: unsupported "
                     f"(supported: {', '.join(MODEL_REGISTRY)})")
