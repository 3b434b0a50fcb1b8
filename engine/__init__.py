"""polydecode's batching engine.

Public surface: `Engine`, `AsyncEngine`, `EngineConfig` (+ its sub-configs), `SamplingParams`,
`RequestOutput`, `CompletionOutput`. They are imported lazily so that the pure-Python modules
(block pool, KV cache manager, scheduler) can be used without loading torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "engine.engine",
    "AsyncEngine": "engine.async_engine",
    "EngineConfig": "engine.config",
    "ModelConfig": "engine.config",
    "CacheConfig": "engine.config",
    "SchedulerConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.messages",
    "CompletionOutput": "engine.messages",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
