"""Model registry: Hugging Face architecture name -> (model class, config class)."""

from __future__ import annotations

from engine.models.llama import LlamaConfig, LlamaForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": (LlamaForCausalLM, LlamaConfig),
}


def resolve_architecture(hf_config: dict):
    """Returns (model class, config class) for a HF config dict, or raises ValueError."""
    for arch in hf_config.get("architectures") or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"architectures={hf_config.get('architectures')!r}: unsupported "
                     f"(supported: {', '.join(MODEL_REGISTRY)})")
