"""The two masking backends against each other and against the grammars' own checkers, on the
default model's vocabulary: at every step of seeded random walks through each grammar, the
allowed-token sets agree up to the two documented differences (`cases.check_difference`), and
the text of every walk that reaches EOS matches the regex / validates against the schema."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest

from constraints.backends import (Grammar, LlguidanceBackend, OutlinesBackend, choice_grammar,
                                  mask_words)
from constraints.vocabulary import token_vocabulary
from decoding.base import InvalidArgument
from engine.tokenizer import Tokenizer
from tests.constraints.cases import check_difference

REGEXES = [r"[0-9]{3}-[a-z]+", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8}( [a-z]+){0,3}\.",
           r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?", r"\d{4}-\d{2}-\d{2}"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def backends(tokenizer):
    vocab = token_vocabulary(tokenizer)
    names = tokenizer.hf.convert_ids_to_tokens(list(range(len(vocab))))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return vocab, LlguidanceBackend(vocab, encode, names), OutlinesBackend(vocab)


def allowed(matcher, size: int) -> np.ndarray:
    row = np.zeros(mask_words(size), dtype=np.int32)
    matcher.fill_mask(row)
    return np.unpackbits(row.view(np.uint8), bitorder="little")[:size].astype(bool)


def walk(backends, grammar: Grammar, seed: int, steps: int = 40) -> bytes | None:
    """A seeded random walk through `grammar` checking both backends at every step; the
    walk's bytes when it chose EOS, else None."""
    vocab, llg, oc = backends
    a, b = llg.matcher(llg.compile(grammar)), oc.matcher(oc.compile(grammar))
    rng, out, eos = random.Random(seed), b"", vocab.eos_token_ids[0]
    for _ in range(steps):
        got_a, got_b = allowed(a, len(vocab)), allowed(b, len(vocab))
        assert got_a.any(), f"{grammar}: llguidance allows nothing after {out!r}"
        check_difference(a, b, got_a, got_b, f"{grammar} after {out!r}")
        assert not got_a[sorted(vocab.special_ids - {eos})].any()
        assert got_a[eos] == a.accepts() == b.accepts()
        token = rng.choice(np.nonzero(got_a)[0].tolist())
        assert a.check(token)
        if not got_b[token]:  # outlines-core's gap after an accepting prefix: it stops here
            return None
        assert b.check(token)
        if token == eos:
            return out
        assert a.consume(token) and b.consume(token)
        out += vocab.tokens[token]
    return None


@pytest.mark.parametrize("regex", REGEXES)
def test_backends_agree_along_walks_and_match_the_regex(backends, regex):
    for seed in range(3):
        text = walk(backends, Grammar("regex", regex), seed)
        if text is not None:
            assert re.fullmatch(regex, text.decode()), text


def test_json_schema_walks_validate(backends):
    ended = 0
    for seed in range(3):
        text = walk(backends, Grammar("json_schema", json.dumps(SCHEMA)), seed, steps=80)
        if text is not None:
            jsonschema.validate(json.loads(text), SCHEMA)
            ended += 1
    assert ended


def test_choices(backends):
    text = walk(backends, choice_grammar(["alpha", "beta", "gamma ray"]), 0)
    assert text.decode() in ("alpha", "beta", "gamma ray")


@pytest.mark.parametrize("grammar", [Grammar("regex", "(unclosed"),
                                     Grammar("json_schema", "{not json"),
                                     Grammar("grammar", "start: foo")])
def test_bad_grammars_name_the_field(backends, grammar):
    _, llg, oc = backends
    with pytest.raises(InvalidArgument) as err:
        llg.compile(grammar)
    assert err.value.field == grammar.field and "llguidance" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        oc.compile(grammar)
    assert err.value.field == grammar.field
