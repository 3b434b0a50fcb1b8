"""Grammar-constrained decoding as a distribution transform: the output must match a regex, a
JSON schema, a Lark grammar or one of a list of choices, with any strategy.

A request's `Constraint` is compiled when the engine admits it (`constraints.compiler`, on a
worker thread under `--max-constraint-compile-s`). Every branch of the generation holds a
matcher (`ConstraintState`; a forked branch copies its parent's, so each beam hypothesis or
contrastive candidate follows its own text). Each step, this transform brings the matcher of
every constrained row up to date with the row's output tokens, fills one packed bitmask row per
row (llguidance rows in one parallel call that releases the GIL) and turns the packed
`[rows, words]` bitmask into an additive mask (0 or -inf, built as float bit patterns), on a
worker thread while the forward runs (`prepare`); `apply` adds it to all constrained rows in one
op. EOS is allowed only where the grammar accepts; special tokens never.

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


_executor = None


def _llg_executor():
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor(num_threads=2)
    return _executor


def unpack_bitmask(bitmask: np.ndarray, width: int) -> torch.Tensor:
    """[n, words] int32 packed bits (bit t of word t // 32 = token t) -> [n, width] bool;
    tokens past 32 * words are False."""
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")
    if bits.shape[1] >= width:
        bits = bits[:, :width]
    else:
        bits = np.pad(bits, ((0, 0), (0, width - bits.shape[1])))
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool)


_BYTE_MASKS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 0.0,
                       -np.inf).astype(np.float32)
"""Byte value -> the additive mask of its 8 bits (bit k = token 8 * byte + k)."""


def additive_mask(bitmask: np.ndarray, width: int) -> np.ndarray:
    """[n, words] packed bits -> [n, width] float32: 0 where allowed, -inf elsewhere, by one
    table lookup per byte (0.6 ms for 32 rows of 49,152; a bool `masked_fill` over the logits
    costs 7 ms)."""
    n = bitmask.shape[0]
    out = np.take(_BYTE_MASKS, bitmask.view(np.uint8), axis=0).reshape(n, -1)
    if out.shape[1] >= width:
        return out[:, :width]
    return np.pad(out, ((0, 0), (0, width - out.shape[1])), constant_values=-np.inf)


def _fill(states, packed: np.ndarray, eos: tuple[int, ...]) -> np.ndarray:
    """Fills `packed` and returns the additive mask (a worker runs this during the forward)."""
    from constraints.compiler import fill_masks

    fill_masks(states, packed, eos, _llg_executor())
    return additive_mask(packed, states[0].vocab_size)


def constrained_rows(batch: SamplingBatch) -> list[int]:
    """Rows whose branch carries a constraint and whose strategy wants it masked."""
    return [i for i, row in enumerate(batch.rows) if _masked_here(row.constraint, row.params)]


def _masked_here(state, params) -> bool:
    return state is not None and not entry(params.selection).cls.checks_constraint


@register_transform(Constraint)
class ConstraintMask(Transform):
    order: ClassVar[int] = 55

    def __init__(self) -> None:
        self._pool = None
        self._pending = None
        """(future, {id(state): (row, consumed)}, packed) of the masks `prepare` started."""

    def prepare(self, sequences) -> None:
        """Fills the masks of the scheduled constrained sequences on a worker thread while the
        forward runs (llguidance releases the GIL); `apply` picks them up."""
        states = [s.constraint_state for s in sequences
                  if _masked_here(s.constraint_state, s.generation.params)]
        if not states:
            self._pending = None
            return
        from constraints.backends import mask_words

        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(1, "polydecode-masks")
        for s in sequences:
            if s.constraint_state is not None:
                s.constraint_state.sync(s.output_token_ids)
        packed = np.zeros((len(states), mask_words(states[0].vocab_size)), dtype=np.int32)
        eos = sequences[0].generation.eos_token_ids
        future = self._pool.submit(_fill, states, packed, eos)
        self._pending = (future, {id(s): (i, s.consumed) for i, s in enumerate(states)}, packed)

    def _prepared(self, states) -> tuple[np.ndarray, np.ndarray] | None:
        """(packed, additive) masks `prepare` made for exactly these states at their current
        positions."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        future, where, packed = pending
        additive = future.result()
        found = [where.get(id(s)) for s in states]
        if any(f is None or f[1] != s.consumed for f, s in zip(found, states)):
            return None
        index = [f[0] for f in found]
        if index == list(range(len(packed))):
            return packed, additive
        return packed[index], additive[index]

    def is_active(self, batch: SamplingBatch) -> bool:
        return any(row.constraint is not None for row in batch.rows) \
            and bool(constrained_rows(batch))

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        from constraints.backends import mask_words

        rows = constrained_rows(batch)
        states = [batch.rows[i].constraint for i in rows]
        for i, state in zip(rows, states):
            state.sync(batch.rows[i].output_token_ids)
        prepared = self._prepared(states)
        if prepared is None:  # not prepared (a strategy's own step): fill now
            # One tokenizer per engine: every state's vocabulary has the same size.
            packed = np.zeros((len(rows), mask_words(states[0].vocab_size)), dtype=np.int32)
            prepared = packed, _fill(states, packed, batch.rows[rows[0]].eos_token_ids)
        packed, additive = prepared
        width = logits.shape[1]
        if additive.shape[1] != width:  # a model vocabulary wider than the tokenizer's
            additive = additive_mask(packed, width)
        add = torch.from_numpy(additive).to(logits.device)
        every_row = len(rows) == logits.shape[0]
        index = None if every_row else torch.tensor(rows, device=logits.device)
        masked = logits.add_(add) if every_row else logits[index].add_(add)
        dead = masked.amax(dim=-1) == float("-inf")
        if bool(dead.any()):  # the request's own settings removed every allowed token
            masked[dead] = add[dead]
        if not every_row:
            logits[index] = masked
        counts = np.bitwise_count(packed.view(np.uint32)).sum(axis=1).tolist()
        for state, count in zip(states, counts):
            state.stats.masks += 1
            state.stats.masked_tokens += width - count
        return logits
