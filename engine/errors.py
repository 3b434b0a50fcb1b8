"""Typed exceptions raised at the engine's boundaries.

Internal invariants use `assert`; anything a client can cause raises one of these. The server
maps each class to exactly one gRPC status in `server/errors.py`, so the classes carry what that
mapping needs (the offending field for INVALID_ARGUMENT) and nothing else.
"""

from __future__ import annotations


# One type for every validation error, engine and decoding alike, and one for a request that
# names something not loaded: decoding/ defines them (it may not import the engine) and the
# engine re-exports them.
from decoding.base import InvalidArgument, NotFound  # noqa: E402

__all__ = ["Cancelled", "InvalidArgument", "NotFound", "ResourceExhausted"]


class ResourceExhausted(RuntimeError):
    """The engine cannot take the request now (queue full, prompt larger than the KV cache)."""


class Cancelled(RuntimeError):
    """The request was aborted by its client before it finished."""
