"""Server settings: where to listen, who may call, how to drain, and the request limits."""

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
    max_prompt_bytes: int | None = None
    """UTF-8 bytes of all the text of a prompt (segments, set members, chat messages) or of a
    Tokenize request, checked before anything is tokenized. None: the prompt token limit times
    the longest vocabulary entry in bytes, so no prompt within the token limit is refused."""
    max_new_tokens: int | None = None
    """None: the model's context length."""
    max_stop_sequences: int = 8
    max_stop_bytes: int = 256
    """Longest stop sequence, in UTF-8 bytes."""
    max_top_logprobs: int = 20
    max_parallel_members: int = 16
    max_request_id_bytes: int = 256
    max_logit_bias: int = 300
    """Entries in `penalties.logit_bias` (OpenAI's limit)."""
    max_stop_token_ids: int = 64
    max_transforms: int = 8

    def __post_init__(self) -> None:
        _positive(self, "max_prompt_tokens", "max_prompt_bytes", "max_new_tokens",
                  "max_stop_sequences", "max_stop_bytes", "max_parallel_members",
                  "max_request_id_bytes")
        for name in ("max_logit_bias", "max_stop_token_ids", "max_transforms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if not 0 <= self.max_top_logprobs <= 20:
            raise ValueError(f"max_top_logprobs={self.max_top_logprobs}: must be in [0, 20]")


class Security(msgspec.Struct, frozen=True, kw_only=True):
    """Who may call: TLS material (PEM files) and API keys. See README "Security"."""

    tls_cert: str | None = None
    """Server certificate chain; with `tls_key`, the port speaks TLS only."""
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """Mutual TLS: clients must present a certificate signed by this CA."""
    api_keys: dict[str, str] = {}
    """API key -> principal name. Non-empty: every call needs `authorization: Bearer <key>`
    metadata (UNAUTHENTICATED otherwise); requests belong to the key's principal."""
    open_health: bool = False
    """grpc.health.v1 answers without a key (load-balancer probes rarely send metadata)."""
    reflection: bool = True

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        if any(not key for key in self.api_keys):
            raise ValueError("api_keys: a key must not be empty")


ROUTING_POLICIES = ("prefix", "load")


class Cluster(msgspec.Struct, frozen=True, kw_only=True):
    """Engine replicas on Ray Serve behind this server (`serve --replicas N`, see `cluster`)."""

    replicas: int = 0
    """0: the engine runs in this process (Ray is never imported)."""
    ray_address: str | None = None
    """"auto" or HOST:PORT of a running Ray cluster; None starts a local one."""
    routing: str = "prefix"
    """"prefix": prompts sharing their first `affinity_blocks` KV blocks go to the replica that
    served that prefix last, unless it is `affinity_imbalance` requests busier than another;
    other requests by load. "load": by load only (power of two choices)."""
    affinity_blocks: int = 8
    """Full KV blocks at the start of a prompt that make its affinity key (shorter prompts
    have none and are routed by load)."""
    affinity_imbalance: int = 4
    max_ongoing_requests: int | None = None
    """Calls Serve lets one replica hold at once. None: its engine's running and waiting caps
    plus room for load calls, so a full replica refuses with RESOURCE_EXHAUSTED as one
    process does instead of calls queueing in front of it."""
    app_name: str = "polydecode"
    scorers: list[str] = []
    """What every replica loads at start, as the flags spell them: `--scorer NAME=DIR`..."""
    predicates: list[str] = []
    """... `--predicate NAME=module:function`..."""
    plugins: list[str] = []
    """... and `--plugin MODULE`."""

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"replicas={self.replicas!r}: must be >= 0")
        if self.routing not in ROUTING_POLICIES:
            raise ValueError(f"routing={self.routing!r}: must be one of {ROUTING_POLICIES}")
        _positive(self, "affinity_blocks", "affinity_imbalance", "max_ongoing_requests")


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 50051
    """0 picks a free port (tests)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics over HTTP on this port; None: no metrics endpoint."""
    metrics_host: str = "127.0.0.1"
    """The metrics endpoint's interface, independent of `host`."""
    tokenizer_threads: int = 2
    """Worker threads that tokenize and template prompts, off the event loop."""
    max_pending_prompts: int = 64
    """Requests waiting for a tokenizer thread; beyond it RESOURCE_EXHAUSTED."""
    max_message_bytes: int = 4 << 20
    """Largest request message: gRPC refuses bigger ones (RESOURCE_EXHAUSTED) from their length
    prefix, before they are read, decrypted or parsed. Keep it above `max_prompt_bytes`."""
    security: Security = msgspec.field(default_factory=Security)
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may run before they are aborted."""
    warmup: bool = True
    """Run one short generation before reporting SERVING."""
    limits: Limits = msgspec.field(default_factory=Limits)
    datastores: dict[str, str] = {}
    """kNN-LM datastores: name (what requests send in `knn_lm.datastore`) -> directory. Opened
    read-only at start, shared by all requests; a store built with another model is refused."""
    cluster: Cluster = msgspec.field(default_factory=Cluster)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port={self.port}: must be in [0, 65535]")
        if min(self.tokenizer_threads, self.max_pending_prompts, self.max_message_bytes) < 1:
            raise ValueError("tokenizer_threads, max_pending_prompts and max_message_bytes "
                             "must be >= 1")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s}: must be >= 0")
