"""Engine configuration: one frozen msgspec Struct per component, validated at construction.

A component's constructor takes only the sub-config it uses.
"""

from __future__ import annotations

import functools
import re

import msgspec

from engine.loader import DEFAULT_MODEL

_DTYPES = ("auto", "float32", "bfloat16", "float16")
NORM_SCHEMES = ("pre", "lns", "mix_ln")
"""Where a Llama-family decoder layer puts its RMSNorms (see `ModelConfig.norm_scheme`)."""
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (/proc/cpuinfo) of bfloat16 matrix / dot-product instructions: AMX tiles on Intel
Sapphire Rapids and later, AVX512-BF16 on Cooper Lake and AMD Zen 4 and later."""


def _require(ok: bool, field: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r}: {rule}")


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    model: str = DEFAULT_MODEL
    """A local Hugging Face-format directory, or the name of an embedded model."""
    dtype: str = "float32"
    """Weights and activations dtype. float32 is the parity reference; bfloat16 is faster on
    CPUs with AMX/AVX512-BF16 and on GPUs; float16 is for GPUs (slow on most CPUs); "auto" is
    bfloat16 on a GPU and on a CPU with native bfloat16 arithmetic (`cpu_has_native_bf16`),
    else float32."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the model's max_position_embeddings."""
    num_threads: int | None = None
    """torch intra-op threads; None keeps torch's default (one per core)."""
    quantization: str = "none"
    """"none"; "int8": weight-only int8 linear layers (per-channel scales), a quarter of
    float32's weight bytes for memory-bound decode; "int4": weight-only int4 in groups of 32
    (llama.cpp's Q4_1 form), an eighth (CPU, bfloat16 only)."""
    prepack_weights: bool = True
    """Reorder float32 / bfloat16 CPU linear weights once into oneDNN's blocked GEMM layout
    (faster decode GEMMs; see engine/layers/packed_linear.py)."""
    attention_backend: str = "auto"
    """"auto" uses the compiled paged decode kernel when it builds on this machine; "torch"
    forces the gather + scaled_dot_product_attention reference path."""
    device: str = "auto"
    """"cpu", "cuda", "cuda:N", or "auto" (CUDA when available, else CPU)."""
    cuda_graphs: bool = True
    """On CUDA, capture all-decode steps of common batch sizes as CUDA graphs at start-up."""
    norm_scheme: str | None = None
    """Norm placement of a Llama-family model, which its checkpoint cannot declare (LNS and
    Mix-LN checkpoints are saved as plain `model_type: llama`): "pre" (standard Pre-LN),
    "lns" (LayerNorm-Scaling: both pre-norms of layer l scaled by 1/sqrt(l), l from 1) or
    "mix_ln" (Post-LN in the first layers, Pre-LN after). None takes the model directory's
    `config.json` key `"polydecode": {"norm_scheme": ...}`, else "pre"; it is never guessed
    from the weights."""
    mix_ln_ratio: float | None = None
    """Mix-LN's alpha: the first floor(alpha * num_layers) layers are Post-LN. None takes the
    directory's `"polydecode": {"mix_ln_ratio": ...}`, else 0.25. Only for "mix_ln"."""

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        if self.resolved_device.startswith("cuda") or cpu_has_native_bf16():
            return "bfloat16"
        return "float32"

    def __post_init__(self) -> None:
        _require(self.dtype in _DTYPES, "dtype", self.dtype, f"must be one of {_DTYPES}")
        _require(self.device == "auto" or self.device == "cpu" or
                 re.fullmatch(r"cuda(:\d+)?", self.device) is not None, "device", self.device,
                 "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        _require(self.quantization in ("none", "int8", "int4"), "quantization",
                 self.quantization, "must be 'none', 'int8' or 'int4'")
        _require(self.attention_backend in ("auto", "torch"), "attention_backend",
                 self.attention_backend, "must be 'auto' or 'torch'")
        _require(self.max_model_len is None or self.max_model_len > 0, "max_model_len",
                 self.max_model_len, "must be positive")
        _require(self.num_threads is None or self.num_threads > 0, "num_threads",
                 self.num_threads, "must be positive")
        _require(self.norm_scheme is None or self.norm_scheme in NORM_SCHEMES, "norm_scheme",
                 self.norm_scheme, f"must be one of {NORM_SCHEMES}")
        _require(self.mix_ln_ratio is None or 0.0 <= self.mix_ln_ratio <= 1.0, "mix_ln_ratio",
                 self.mix_ln_ratio, "must be in [0, 1]")
        _require(self.mix_ln_ratio is None or self.norm_scheme in (None, "mix_ln"),
                 "mix_ln_ratio", self.mix_ln_ratio,
                 f"only applies to norm_scheme='mix_ln' (got {self.norm_scheme!r})")


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True):
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks to preallocate; None derives it from `kv_cache_memory_mib`."""
    kv_cache_memory_mib: int = 1024
    """Memory for K and V of all layers when `num_blocks` is None."""
    enable_prefix_caching: bool = True
    """Reuse full blocks whose chained token hash matches an earlier sequence's."""

    def __post_init__(self) -> None:
        _require(self.block_size > 0, "block_size", self.block_size, "must be positive")
        _require(self.num_blocks is None or self.num_blocks > 0, "num_blocks",
                 self.num_blocks, "must be positive")
        _require(self.kv_cache_memory_mib > 0, "kv_cache_memory_mib",
                 self.kv_cache_memory_mib, "must be positive")


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks + decode tokens)."""
    max_num_seqs: int = 64
    """Most sequences running at once."""
    max_waiting_requests: int = 1024
    """Waiting-queue cap in requests; beyond it `add_request` raises ResourceExhausted."""
    max_waiting_tokens: int = 1 << 20
    """Waiting-queue cap in prompt tokens (a TTFT bound: roughly target TTFT x prefill rate)."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps; when False a prompt must fit one step's budget."""

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_waiting_requests",
                     "max_waiting_tokens"):
            value = getattr(self, name)
            _require(value > 0, name, value, "must be positive")


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    seed: int = 0
    """Seeds the draw of per-request sampling seeds for requests that give none."""
    constraint_backend: str = "llguidance"
    """Backend of constraints that name none: "llguidance" or "outlines"."""
    max_constraint_compile_s: float = 10.0
    """A constraint that takes longer to compile is refused (INVALID_ARGUMENT)."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (see NATIVE_BF16_FLAGS); without it
    oneDNN emulates bfloat16 and float32 is faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)
