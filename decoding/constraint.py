"""Grammar-constrained decoding as a distribution transform: the output must match a regex, a
JSON schema, a Lark grammar or one of a list of choices, with any strategy.

A request's `Constraint` is compiled when the engine admits it (`constraints.compiler`, on a
worker thread under `--max-constraint-compile-s`). Every branch of the generation holds a
matcher (`ConstraintState`; a forked branch copies its parent's, so each beam hypothesis or
contrastive candidate follows its own text). Each step, this transform brings the matcher of
every constrained row up to date with the row's output tokens, fills one packed bitmask row per
row (llguidance rows in one parallel call that releases the GIL), unpacks the whole
`[rows, words]` bitmask with one shift-and-mask and applies it with one `masked_fill`: a token
whose bit is 0 gets -inf. EOS is allowed only where the grammar accepts; special tokens never.

Place in the chain (order 55): after kNN-LM (50), whose interpolation would otherwise put mass
back on masked tokens; before temperature and the top-k / top-p / min-p filters, which then act
on the allowed tokens only. Logprobs a client gets stay the model's own distribution.

A row that the request's own settings leave without any allowed token (min_new_tokens masking
EOS where the grammar allows only EOS, a -100 logit bias on every allowed token) keeps the
grammar's choice: its allowed tokens, uniformly. The constraint wins; nothing is emitted that
the grammar forbids.

AWRS (`decoding.awrs`) does not mask: it checks the tokens it draws against the same matchers,
so this transform skips the rows of strategies that set `checks_constraint`.
"""

from __future__ import annotations

import json
from typing import ClassVar

import msgspec
import numpy as np
import torch

from decoding.base import InvalidArgument, SamplingBatch, Transform
from decoding.registry import entry, register_transform

# `constraints` imports `decoding.base`, so its modules are imported where they are used.
KINDS = ("regex", "json_schema", "grammar", "choice")
BACKENDS = ("llguidance", "outlines")
MAX_CONSTRAINT_BYTES = 65536
MAX_CHOICES = 4096


class Constraint(msgspec.Struct, frozen=True, kw_only=True, tag="constraint"):
    """What the output must match: exactly one of `regex`, `json_schema`, `grammar`, `choice`."""

    regex: str | None = None
    """A regular expression the whole output must match (Rust `regex` syntax, anchored)."""
    json_schema: str | None = None
    """A JSON schema (as JSON text); the output is compact JSON that validates against it."""
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect; `start` is the start rule)."""
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    backend: str = ""
    """"llguidance" or "outlines"; empty: the server's default (`--constraint-backend`).
    outlines-core takes regexes, JSON schemas and choices, not grammars."""

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise InvalidArgument("constraint", "set exactly one of regex, json_schema, "
                                                f"grammar, choice (got {len(given)})")
        kind = given[0]
        if kind == "choice":
            _check(0 < len(self.choice) <= MAX_CHOICES, "choice",
                   f"needs 1 to {MAX_CHOICES} options")
            _check(all(isinstance(o, str) and o for o in self.choice), "choice",
                   "options must be non-empty strings")
            size = sum(len(o.encode()) for o in self.choice)
        else:
            text = getattr(self, kind)
            _check(bool(text), kind, "must not be empty")
            size = len(text.encode())
        _check(size <= MAX_CONSTRAINT_BYTES, kind, f"at most {MAX_CONSTRAINT_BYTES} bytes")
        if kind == "json_schema":
            try:
                schema = json.loads(self.json_schema)
            except ValueError as exc:
                raise InvalidArgument("json_schema", f"not valid JSON: {exc}") from None
            _check(isinstance(schema, (dict, bool)), "json_schema",
                   "must be a JSON object (a schema)")
        _check(self.backend in ("",) + BACKENDS, "backend",
               f"unknown backend {self.backend!r}; available: {', '.join(BACKENDS)}")
        _check(not (self.backend == "outlines" and kind == "grammar"), "backend",
               "outlines takes regex, json_schema and choice; use llguidance for grammars")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def to_grammar(self):
        """The backends' `constraints.backends.Grammar`."""
        from constraints.backends import Grammar

        kind = self.kind
        text = json.dumps(list(self.choice)) if kind == "choice" else getattr(self, kind)
        return Grammar(kind, text)


def _check(ok: bool, field: str, reason: str) -> None:
    if not ok:
        raise InvalidArgument(field, reason)


_SHIFTS = torch.arange(32, dtype=torch.int32)
_executor = None


def _llg_executor():
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor(num_threads=2)
    return _executor


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """[n, words] int32 packed bits (bit t of word t // 32 = token t) -> [n, width] bool;
    tokens past 32 * words are False."""
    bits = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(bitmask.shape[0], -1)
    if bits.shape[1] >= width:
        return bits[:, :width]
    return torch.nn.functional.pad(bits, (0, width - bits.shape[1]), value=False)


def constrained_rows(batch: SamplingBatch) -> list[int]:
    """Rows whose branch carries a constraint and whose strategy wants it masked."""
    return [i for i, row in enumerate(batch.rows) if row.constraint is not None
            and not entry(row.params.selection).cls.checks_constraint]


@register_transform(Constraint)
class ConstraintMask(Transform):
    order: ClassVar[int] = 55

    def is_active(self, batch: SamplingBatch) -> bool:
        return any(row.constraint is not None for row in batch.rows) \
            and bool(constrained_rows(batch))

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        from constraints.backends import mask_words
        from constraints.compiler import fill_masks

        rows = constrained_rows(batch)
        states = [batch.rows[i].constraint for i in rows]
        for i, state in zip(rows, states):
            state.sync(batch.rows[i].output_token_ids)
        # One tokenizer per engine: every state's vocabulary has the same size.
        packed = np.zeros((len(rows), mask_words(states[0].vocab_size)), dtype=np.int32)
        fill_masks(states, packed, batch.rows[rows[0]].eos_token_ids, _llg_executor())
        allowed = unpack_bitmask(torch.from_numpy(packed), logits.shape[1]).to(logits.device)
        index = torch.tensor(rows, device=logits.device)
        masked = logits[index].masked_fill(~allowed, float("-inf"))
        dead = ~torch.isfinite(masked).any(dim=-1)
        if bool(dead.any()):  # the request's own settings removed every allowed token
            masked[dead] = torch.zeros_like(masked[dead]).masked_fill(~allowed[dead],
                                                                      float("-inf"))
        logits[index] = masked
        counts = allowed.sum(dim=-1).tolist()
        width = logits.shape[1]
        for state, count in zip(states, counts):
            state.stats.masks += 1
            state.stats.masked_tokens += width - count
        return logits
