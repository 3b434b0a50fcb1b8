"""Typed exceptions raised at the engine's boundaries.

Internal invariants use `assert`; anything a client can cause raises one of these. The server
maps each class to exactly one gRPC status in `server/errors.py`, so the classes carry what that
mapping needs (the offending field for INVALID_ARGUMENT) and nothing else.
"""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A request field has a value the engine will not accept.

    Attributes:
        field: Name of the offending field, as spelled in the request (e.g. "top_p").
        reason: Human-readable rule that the value broke (e.g. "must be in (0, 1]").
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):
        # The default reduce replays `args` (the joined message) into `__init__`, which takes
        # two arguments; without this the error cannot cross a process boundary.
        return (type(self), (self.field, self.reason))


class ResourceExhausted(RuntimeError):
    """The engine cannot take the request now (queue full, prompt larger than the KV cache)."""


class Cancelled(RuntimeError):
    """The request was aborted by its client before it finished."""
