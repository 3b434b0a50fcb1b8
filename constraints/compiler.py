"""Compiling constraints off the engine's path, and the per-branch matcher state.

`ConstraintCompiler` owns the two backends of one tokenizer (built on first use) and compiles
a request's `Constraint` when the request is admitted, on a worker thread, under a time limit
(`max_compile_s`): both backends release the GIL while they work, so other requests keep
streaming while a hard schema compiles. A compile that runs past the limit is refused with
InvalidArgument saying so; the worker finishes it in the background and keeps the result in the
cache (keyed by backend and constraint text), so a retry of the same constraint is immediate.

A compile is more than parsing: it builds the matcher and its first mask, which is where
llguidance builds its lexer, so the limit covers the work a slow grammar really costs.

Each branch of a constrained generation holds a `ConstraintState`: a matcher, how many of the
branch's output tokens it has consumed, and the generation's `ConstraintStats`. A forked branch
copies its parent's matcher, so beam hypotheses and AWRS particles each follow their own text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections import OrderedDict

import msgspec
import numpy as np

from constraints.backends import (Grammar, LlguidanceBackend, Matcher, OutlinesBackend,
                                  mask_words)
from constraints.vocabulary import TokenVocabulary, token_vocabulary
from decoding.base import InvalidArgument
from decoding.constraint import BACKENDS

DEFAULT_BACKEND = "llguidance"
"""llguidance compiles in milliseconds (outlines-core builds a whole DFA x vocabulary index:
0.7 s for a 600-character schema regex) and its masks are exact after accepting prefixes
(see README, "Constrained generation")."""
DEFAULT_MAX_COMPILE_S = 10.0


class ConstraintStats:
    """Per generation: what the constraint cost. Masking counts masks and the tokens they
    removed; AWRS counts condition checks and the tokens that failed them."""

    __slots__ = ("masks", "masked_tokens", "checks", "rejected_tokens")

    def __init__(self) -> None:
        self.masks = 0
        self.masked_tokens = 0
        self.checks = 0
        self.rejected_tokens = 0

    def report(self) -> ConstraintReport:
        return ConstraintReport(masks=self.masks, masked_tokens=self.masked_tokens,
                                checks=self.checks, rejected_tokens=self.rejected_tokens)


class ConstraintReport(msgspec.Struct, frozen=True, gc=False):
    masks: int
    """Masks computed (one per constrained row per step)."""
    masked_tokens: int
    """Vocabulary entries those masks removed, summed over the masks."""
    checks: int
    """Single-token condition checks (AWRS)."""
    rejected_tokens: int
    """Checked tokens the condition rejected (AWRS)."""


class Compiled:
    """A constraint compiled by one backend: hands out fresh matchers."""

    def __init__(self, backend, grammar: Grammar, artifact) -> None:
        self.backend = backend
        self.grammar = grammar
        self._artifact = artifact

    @property
    def vocab(self) -> TokenVocabulary:
        return self.backend.vocab

    def matcher(self) -> Matcher:
        return self.backend.matcher(self._artifact)

    def state(self, stats: ConstraintStats | None = None) -> ConstraintState:
        return ConstraintState(self.matcher(), len(self.vocab), stats or ConstraintStats())


class ConstraintState:
    """One branch's matcher: it has consumed the first `consumed` output tokens."""

    __slots__ = ("matcher", "vocab_size", "consumed", "stats", "failed")

    def __init__(self, matcher: Matcher, vocab_size: int, stats: ConstraintStats,
                 consumed: int = 0) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.consumed = consumed
        self.stats = stats
        self.failed = False
        """A token the matcher refused was appended (only a strategy that ignores the mask
        can do that); the branch then gets EOS only."""

    def fork(self) -> ConstraintState:
        child = ConstraintState(self.matcher.copy(), self.vocab_size, self.stats,
                                self.consumed)
        child.failed = self.failed
        return child

    def sync(self, output_token_ids) -> None:
        """Consumes the branch's output tokens the matcher has not seen yet."""
        while self.consumed < len(output_token_ids):
            token = output_token_ids[self.consumed]
            self.consumed += 1
            if not self.failed and not self.matcher.consume(token):
                self.failed = True


def fill_masks(states: list[ConstraintState], bitmask: np.ndarray,
               eos_token_ids: tuple[int, ...], executor=None) -> None:
    """Row i of `bitmask` ([n, words] int32) = the allowed tokens of `states[i]`: llguidance
    rows in one parallel call (it releases the GIL), the others one by one (outlines-core's
    masks are table lookups). A matcher that fails (a token it refused was appended, a backend
    error, nothing allowed) gets EOS alone: its request ends instead of the engine."""
    llg_rows = []
    for i, state in enumerate(states):
        if state.failed:
            _eos_only(bitmask[i], eos_token_ids)
        elif executor is not None and hasattr(state.matcher, "raw"):
            llg_rows.append(i)
        else:
            _fill_one(state, bitmask[i], eos_token_ids)
    if llg_rows:
        import llguidance.numpy as lln

        try:
            lln.fill_next_token_bitmask_par(
                executor, [(states[i].matcher.raw, i) for i in llg_rows], bitmask)
        except (ValueError, RuntimeError):  # find the failing rows one by one
            for i in llg_rows:
                _fill_one(states[i], bitmask[i], eos_token_ids)
            return
        for i in llg_rows:
            states[i].matcher.fix_eos(bitmask[i])
            if not bitmask[i].any():
                states[i].failed = True
                _eos_only(bitmask[i], eos_token_ids)


def _fill_one(state: ConstraintState, row: np.ndarray, eos_token_ids) -> None:
    try:
        state.matcher.fill_mask(row)
    except (ValueError, RuntimeError):
        row[:] = 0
    if not row.any():
        state.failed = True
        _eos_only(row, eos_token_ids)


def _eos_only(row: np.ndarray, eos_token_ids) -> None:
    row[:] = 0
    bits = row.view(np.uint32)
    for t in eos_token_ids:
        bits[t // 32] |= np.uint32(1 << (t % 32))


class ConstraintCompiler:
    """Compiles constraints for one tokenizer; see the module docstring."""

    def __init__(self, tokenizer, default_backend: str = DEFAULT_BACKEND,
                 max_compile_s: float = DEFAULT_MAX_COMPILE_S, cache_size: int = 256,
                 workers: int = 2) -> None:
        if default_backend not in BACKENDS:
            raise ValueError(f"constraint backend must be one of {BACKENDS}")
        self.tokenizer = tokenizer
        self.default_backend = default_backend
        self.max_compile_s = max_compile_s
        self._cache: OrderedDict[tuple, concurrent.futures.Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, "polydecode-constraints")
        self._backends: dict[str, object] = {}

    @functools.cached_property
    def vocab(self) -> TokenVocabulary:
        return token_vocabulary(self.tokenizer)

    def backend(self, name: str):
        with self._lock:
            found = self._backends.get(name)
            if found is None:
                found = self._backends[name] = self._make_backend(name)
            return found

    def _make_backend(self, name: str):
        if name == "llguidance":
            names = self.tokenizer.hf.convert_ids_to_tokens(list(range(len(self.vocab))))
            encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
            return LlguidanceBackend(self.vocab, encode, names)
        return OutlinesBackend(self.vocab)

    def _submit(self, constraint) -> tuple[concurrent.futures.Future, str]:
        """The (possibly shared, cached) compile future of a `decoding.constraint.Constraint`
        and the field its errors name."""
        grammar = constraint.to_grammar()
        name = constraint.backend or self.default_backend
        if name not in BACKENDS:
            raise InvalidArgument("constraint.backend",
                                  f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
        key = (name, grammar.kind, grammar.text)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
            else:
                future = self._pool.submit(self._compile, name, grammar)
                self._cache[key] = future
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return future, grammar.field

    def _compile(self, name: str, grammar: Grammar) -> Compiled:
        backend = self.backend(name)
        compiled = Compiled(backend, grammar, backend.compile(grammar))
        matcher = compiled.matcher()
        matcher.fill_mask(np.zeros(mask_words(len(self.vocab)), dtype=np.int32))
        return compiled

    def _result(self, future: concurrent.futures.Future, key_field: str,
                constraint) -> Compiled:
        try:
            return future.result(timeout=0)
        except InvalidArgument:
            self._forget(future)
            raise
        except Exception as exc:  # a backend bug must not take the server down
            self._forget(future)
            raise InvalidArgument(key_field, f"could not compile: {exc}") from None

    def _forget(self, future) -> None:
        with self._lock:
            for key, value in list(self._cache.items()):
                if value is future:
                    del self._cache[key]

    def _too_slow(self, field: str) -> InvalidArgument:
        return InvalidArgument(field, f"compiling took longer than the server's limit of "
                                      f"{self.max_compile_s:g} s (--max-constraint-compile-s); "
                                      f"simplify the constraint")

    def compile(self, constraint) -> Compiled:
        """Blocking compile under the time limit (offline use)."""
        future, field = self._submit(constraint)
        try:
            future.result(timeout=self.max_compile_s)
        except concurrent.futures.TimeoutError:
            raise self._too_slow(field) from None
        except Exception:
            pass
        return self._result(future, field, constraint)

    async def compile_async(self, constraint) -> Compiled:
        """The same, awaited on an event loop (the loop keeps serving meanwhile)."""
        future, field = self._submit(constraint)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                   self.max_compile_s)
        except asyncio.TimeoutError:
            raise self._too_slow(field) from None
        except Exception:
            pass
        return self._result(future, field, constraint)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
