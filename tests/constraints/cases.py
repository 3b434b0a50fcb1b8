"""The constraints and prompts of the masking acceptance tests (and bench/constraints.py):
10 regexes, 5 JSON schemas, 2 Lark grammars and 3 choice lists, each with an independent
checker (`re.fullmatch`, `jsonschema.validate`, the `lark` package's parser, membership), and
50 prompts. Every constraint bounds its output's length, so a greedy run always ends."""

from __future__ import annotations

import json
import re

import jsonschema
import lark
import numpy as np

from decoding.constraint import Constraint

REGEXES = [
    r"[0-9]{3}-[a-z]{2,8}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{2,8}( [a-z]{1,8}){0,3}\.",
    r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?",
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    r"(true|false)",
    r"[a-z]{3,10}@[a-z]{3,8}\.(com|org|net)",
    r"\((\+|-|\*) [0-9]{1,2} [0-9]{1,2}\)",
    r"#[0-9a-f]{6}",
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [0-9]{1,2}:[0-9]{2}",
]


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties,
            "required": required or list(properties), "additionalProperties": False}


_DIGITS = {"type": "string", "pattern": "^[0-9]{1,3}$"}
SCHEMAS = [
    _object({"name": {"type": "string", "minLength": 1, "maxLength": 10}, "age": _DIGITS}),
    _object({"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}}),
    _object({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}),
    _object({"point": _object({"x": _DIGITS, "y": _DIGITS})}),
    _object({"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
             "active": {"type": "boolean"}}),
]

GRAMMARS = [
    'start: NUMBER OP NUMBER "=" NUMBER\nNUMBER: /[0-9]{1,3}/\nOP: "+" | "-" | "*"\n',
    'start: greeting " " NAME "!"\ngreeting: "Hello" | "Hi" | "Dear"\nNAME: /[A-Z][a-z]{1,9}/\n',
]

CHOICES = [
    ("red", "green", "blue"),
    ("Paris", "London", "Berlin", "Madrid", "Rome"),
    ("The answer is yes.", "The answer is no.", "I don't know."),
]

_SUBJECTS = ["the weather", "a train ticket", "the meeting", "your favourite color", "a cat",
             "the capital city", "a phone number", "the recipe", "an old friend", "the test"]
_TEMPLATES = ["Tell me about {}:", "Q: What do you know about {}?\nA:", "Write one line on {}.",
              "Fill in the form about {}.\n", "{} ->"]
PROMPTS = [t.format(s) for s in _SUBJECTS for t in _TEMPLATES]
assert len(PROMPTS) == 50


def constraints() -> list[tuple[str, Constraint]]:
    """(id, constraint) of all 20."""
    out = [(f"regex{i}", Constraint(regex=r)) for i, r in enumerate(REGEXES)]
    out += [(f"schema{i}", Constraint(json_schema=json.dumps(s))) for i, s in enumerate(SCHEMAS)]
    out += [(f"lark{i}", Constraint(grammar=g)) for i, g in enumerate(GRAMMARS)]
    out += [(f"choice{i}", Constraint(choice=c)) for i, c in enumerate(CHOICES)]
    return out


def matches(constraint: Constraint, text: str) -> bool:
    """The independent checker of `constraint` on a finished output."""
    kind = constraint.kind
    if kind == "regex":
        return re.fullmatch(constraint.regex, text) is not None
    if kind == "json_schema":
        try:
            jsonschema.validate(json.loads(text), json.loads(constraint.json_schema))
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "grammar":
        try:
            _parser(constraint.grammar).parse(text)
        except lark.LarkError:
            return False
        return True
    return text in constraint.choice


_PARSERS: dict[str, lark.Lark] = {}


def _parser(grammar: str) -> lark.Lark:
    if grammar not in _PARSERS:
        _PARSERS[grammar] = lark.Lark(grammar, start="start")
    return _PARSERS[grammar]


def check_difference(a, b, got_a, got_b, where: str) -> tuple[bool, bool]:
    """Asserts that where llguidance's (`a`, allowed set `got_a`, numpy bool) and
    outlines-core's (`b`, `got_b`) masks differ, the difference is one of the two documented
    ones (see test_masking); returns (canonical-only, outlines after an accepting prefix)."""
    only_a = np.nonzero(got_a & ~got_b)[0].tolist()
    only_b = np.nonzero(got_b & ~got_a)[0].tolist()
    if only_b:
        assert a.forced(), f"{where}: outlines alone allows {only_b[:5]}"
        assert all(a.check(t) for t in only_b), f"{where}: {only_b[:5]}"
    if only_a:
        assert b.accepts(), f"{where}: llguidance alone allows {only_a[:5]}"
        for t in only_a:
            after = a.copy()
            assert after.consume(t) and not after.accepts(), f"{where}: {t}"
    return bool(only_b), bool(only_a)
