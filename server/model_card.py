"""What the server needs to know of the model it serves, whether the engine runs in this
process or in replicas elsewhere (`cluster`): limits for validating requests, the facts
`GetModelInfo` reports, and the KV block size the front hashes prompts with."""

from __future__ import annotations

import msgspec

from engine.engine import Engine


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    family: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    dtype: str
    """The resolved dtype ("auto" already decided on the machine that runs the engine)."""
    block_size: int
    """Tokens per KV block (0 for families with per-request state slots instead of blocks)."""
    prefix_caching: bool
    default_constraint_backend: str
    max_queued_requests: int
    max_queued_prompt_tokens: int

    @classmethod
    def of(cls, engine: Engine) -> ModelCard:
        cfg = engine.config
        blocks = engine.loaded.memory != "state_slots"
        return cls(
            model=cfg.model.model, family=engine.loaded.family, vocab_size=engine.vocab_size,
            max_model_len=engine.max_model_len,
            eos_token_ids=list(engine.tokenizer.eos_token_ids),
            dtype=cfg.model.resolved_dtype, block_size=cfg.cache.block_size if blocks else 0,
            prefix_caching=blocks and cfg.cache.enable_prefix_caching,
            default_constraint_backend=engine.constraints.default_backend,
            max_queued_requests=cfg.scheduler.max_waiting_requests,
            max_queued_prompt_tokens=cfg.scheduler.max_waiting_tokens)
