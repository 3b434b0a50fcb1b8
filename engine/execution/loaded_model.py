"""A model ready to run, and the one function that builds it from a `ModelConfig`.

`load_model` resolves the directory, reads the HF config, picks the architecture, builds the
model on the meta device, loads the weights, moves it to its device and dtype, quantizes and
prepacks it. The engine, the runner and the server then read what they need (family, memory
kind, vocabulary, positions, layers) from the `LoadedModel` instead of from the runner.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from engine.core.cache_manager import MemoryKind
from engine.config import ModelConfig
from engine.layers.packed_linear import can_prepack, prepack_linears
from engine.layers.quantize import quantize_linears
from engine.loader import iter_safetensors, load_hf_config, resolve_model_dir
from engine.models import resolve_architecture

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded, eval-mode model and what the rest of the engine needs to know about it."""

    module: torch.nn.Module
    """The model (`forward(input_ids, positions, caches, meta, capture_layers)`,
    `compute_logits`), on `device` in `dtype`."""
    config: Any
    """The family's config Struct (`LlamaConfig`, `GPT2Config`, `TransnormerConfig`)."""
    model_dir: Path
    """The local HF-format directory (weights, config.json, tokenizer)."""
    family: str
    """e.g. "llama", "llama-lns", "gpt2", "transnormer" (GetModelInfo.family)."""
    memory: MemoryKind
    """"kv_blocks" (paged per-token K/V) or "state_slots" (linear attention: one fixed-size
    state per sequence)."""
    dtype: torch.dtype
    device: torch.device

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.config.max_position_embeddings

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers


def load_model(model_config: ModelConfig) -> LoadedModel:
    """Builds the model `model_config` names, with its weights, on its device and dtype."""
    model_dir = resolve_model_dir(model_config.model)
    hf_config = load_hf_config(model_dir)
    model_cls, config_cls = resolve_architecture(hf_config)
    config = config_cls.from_hf(hf_config, model_config)
    if not hasattr(config, "norm_scheme") and (
            model_config.norm_scheme not in (None, "pre") or model_config.mix_ln_ratio is not None):
        raise ValueError(f"norm_scheme={model_config.norm_scheme!r}: only Llama-family "
                         f"models take a norm scheme ({model_cls.__name__} does not)")
    dtype = _DTYPES[model_config.resolved_dtype]
    device = torch.device(model_config.resolved_device)
    with torch.device("meta"):
        model = model_cls(config)
    # Materialise on the CPU only after construction: no random init of 100M+ weights.
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.load_weights(iter_safetensors(model_dir))
    _reset_buffers(model)
    model = model.to(device=device, dtype=dtype).eval()
    quantize_linears(model, model_config.quantization)
    if model_config.prepack_weights and can_prepack(model):
        # Decode batches are what the packed layout is tuned for.
        prepack_linears(model, batch_hint=32)
    memory = "state_slots" if getattr(model_cls, "uses_state_slots", False) else "kv_blocks"
    return LoadedModel(module=model, config=config, model_dir=model_dir, family=config.family,
                       memory=memory, dtype=dtype, device=device)


def _reset_buffers(model: torch.nn.Module) -> None:
    # Non-persistent buffers (RoPE tables) were created on "meta"; rebuild them on the CPU.
    for module in model.modules():
        if hasattr(module, "rebuild"):
            module.rebuild()
