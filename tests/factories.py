"""make_* factories shared by tests."""

from __future__ import annotations

import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the Triton kernel tests put their tensors (CPU: the interpreter, see conftest)."""


def make_engine_config(model_dir, num_blocks: int | None = 512, block_size: int = 16,
                       max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                       enable_prefix_caching: bool = True, quantization: str = "none",
                       dtype: str = "float32", attention_backend: str = "auto",
                       norm_scheme: str | None = None, mix_ln_ratio: float | None = None,
                       **scheduler) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(model_dir), quantization=quantization, dtype=dtype,
                          attention_backend=attention_backend, norm_scheme=norm_scheme,
                          mix_ln_ratio=mix_ln_ratio),
        cache=CacheConfig(num_blocks=num_blocks, block_size=block_size,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                  max_num_seqs=max_num_seqs, **scheduler))


def make_engine(model_dir, **kwargs):
    """An engine whose KV cache is NaN everywhere except the null block, so any read of a
    slot that no sequence wrote fails loudly instead of passing by luck."""
    from engine.engine import Engine

    engine = Engine(make_engine_config(model_dir, **kwargs))
    if engine.runner.uses_state_slots:  # a slot is zeroed or copied before its first read
        for pool in engine.runner.kv_caches:
            pool.fill_(float("nan"))
        return engine
    for k_cache, v_cache in engine.runner.kv_caches:
        k_cache[:-1].fill_(float("nan"))
        v_cache[:-1].fill_(float("nan"))
    return engine
