"""Python predicates on decoded text, registered by the server, as AWRS conditions.

`polydecode serve --predicate NAME=module:function` imports `function` and registers it under
NAME; a request names it in its AWRS params (`predicate`). The function is called on the
generated text so far (the prompt excluded; a UTF-8 character split across tokens is left out
until it is complete):

    function(text) -> bool          True: `text` can still be extended into an accepted output
    function(text, complete=True)   at EOS, if the function takes a `complete` keyword: True
                                    when `text` itself is an accepted output (without that
                                    keyword, EOS is accepted where the prefix check passes)

An exception raised by the function counts as a rejection (logged once per predicate).

`regex_prefix` below is one such predicate, built on the `regex` package's partial matching:
`--predicate digits=constraints.predicates:digits_dash_word` is how the benchmarks register one.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
from collections.abc import Callable

log = logging.getLogger("polydecode.constraints")


class Predicate:
    """A registered predicate: `prefix(text)` and `complete(text)`."""

    def __init__(self, name: str, fn: Callable[..., bool]) -> None:
        self.name = name
        self.fn = fn
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        self._takes_complete = "complete" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._warned = False

    def prefix(self, text: str) -> bool:
        return self._call(text)

    def complete(self, text: str) -> bool:
        return self._call(text, complete=True) if self._takes_complete else self._call(text)

    def _call(self, text: str, **kwargs) -> bool:
        try:
            return bool(self.fn(text, **kwargs))
        except Exception:
            if not self._warned:
                self._warned = True
                log.exception("predicate %r raised; counted as a rejection", self.name)
            return False


_PREDICATES: dict[str, Predicate] = {}


def register_predicate(name: str, fn: Callable[..., bool]) -> Predicate:
    if not name or not callable(fn):
        raise ValueError("a predicate needs a name and a callable")
    found = _PREDICATES[name] = Predicate(name, fn)
    return found


def unregister_predicate(name: str) -> None:
    _PREDICATES.pop(name, None)


def load_predicate(spec: str) -> Predicate:
    """Registers `NAME=module:function`; ValueError names what is wrong with the spec."""
    name, eq, target = spec.partition("=")
    module, colon, attr = target.partition(":")
    if not (eq and colon and name and module and attr):
        raise ValueError(f"--predicate {spec!r}: expected NAME=module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--predicate {spec!r}: {exc}") from None
    return register_predicate(name, fn)


def get_predicate(name: str) -> Predicate | None:
    return _PREDICATES.get(name)


def predicate_names() -> list[str]:
    return sorted(_PREDICATES)


# ---- example predicates ------------------------------------------------------------------------

def regex_prefix(pattern: str) -> Callable[..., bool]:
    """A predicate for `pattern`: a prefix can still be completed into a full match
    (`regex`'s partial matching); complete means a full match."""
    import regex

    compiled = regex.compile(pattern)

    def check(text: str, complete: bool = False) -> bool:
        if complete:
            return compiled.fullmatch(text) is not None
        return compiled.fullmatch(text, partial=True) is not None

    return check


@functools.cache
def _digits_dash_word():
    return regex_prefix(r"[0-9]{3}-[a-z]{2,8}")


def digits_dash_word(text: str, complete: bool = False) -> bool:
    """Three digits, a dash, two to eight lowercase letters (benchmarks and tests)."""
    return _digits_dash_word()(text, complete)


def no_repeated_4gram(text: str, complete: bool = False) -> bool:
    """No run of four whitespace-separated words occurs twice in `text` (rep-4 = 0, SimCTG's
    measure, as a hard constraint). A prefix's last word, not yet followed by whitespace, may
    still grow into another word, so the prefix check leaves it out."""
    words = text.split()
    if not complete and text and not text[-1].isspace():
        words = words[:-1]
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    return len(grams) == len(set(grams))
