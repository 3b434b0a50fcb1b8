"""Server settings: where to listen, how to drain, and the request validation limits."""

from __future__ import annotations

import msgspec


def _positive(struct: msgspec.Struct, *names: str) -> None:
    for name in names:
        value = getattr(struct, name)
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value!r}: must be positive")


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request validation limits; a request over any of them gets INVALID_ARGUMENT."""

    max_prompt_tokens: int | None = None
    """None: the model's context length minus one."""
    max_new_tokens: int | None = None
    """None: the model's context length."""
    max_stop_sequences: int = 8
    max_stop_bytes: int = 256
    """Longest stop sequence, in UTF-8 bytes."""
    max_top_logprobs: int = 20
    max_parallel_members: int = 16
    max_request_id_bytes: int = 256

    def __post_init__(self) -> None:
        _positive(self, "max_prompt_tokens", "max_new_tokens", "max_stop_sequences",
                  "max_stop_bytes", "max_parallel_members", "max_request_id_bytes")
        if not 0 <= self.max_top_logprobs <= 20:
            raise ValueError(f"max_top_logprobs={self.max_top_logprobs}: must be in [0, 20]")


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 50051
    """0 picks a free port (tests)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics over HTTP on this port; None: no metrics endpoint."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may run before they are aborted."""
    warmup: bool = True
    """Run one short generation before reporting SERVING."""
    limits: Limits = msgspec.field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port}: must be in [0, 65535]")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s}: must be >= 0")
