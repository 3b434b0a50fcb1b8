"""Compilation under a time limit, its cache, and matchers that fail without taking the engine
down."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from constraints.backends import mask_words
from constraints.compiler import ConstraintCompiler, ConstraintState, ConstraintStats, fill_masks
from decoding.base import InvalidArgument
from decoding.constraint import Constraint
from engine.tokenizer import Tokenizer

EOS = (2,)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


def _hard_schema(max_length: int) -> str:
    props = {f"f{i}": {"type": "string", "maxLength": max_length} for i in range(6)}
    return json.dumps({"type": "object", "properties": props, "required": list(props),
                       "additionalProperties": False})


def test_a_slow_compile_is_refused_then_served_from_the_cache(tokenizer):
    compiler = ConstraintCompiler(tokenizer, "outlines", max_compile_s=0.2)
    constraint = Constraint(json_schema=_hard_schema(39))
    start = time.monotonic()
    with pytest.raises(InvalidArgument) as err:
        compiler.compile(constraint)
    assert time.monotonic() - start < 1.0
    assert err.value.field == "constraint.json_schema"
    assert "longer than" in err.value.reason
    deadline = time.monotonic() + 60
    while True:  # the worker goes on; its result lands in the cache
        try:
            compiled = compiler.compile(constraint)
            break
        except InvalidArgument:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert compiler.compile(constraint) is compiled
    assert compiler.compile(Constraint(json_schema=_hard_schema(39), backend="outlines")) \
        is compiled


def test_errors_are_not_cached(tokenizer):
    compiler = ConstraintCompiler(tokenizer)
    for _ in range(2):
        with pytest.raises(InvalidArgument) as err:
            compiler.compile(Constraint(regex="(a"))
        assert err.value.field == "constraint.regex" and "llguidance" in err.value.reason


class _Broken:
    """A matcher whose backend fails, or allows nothing."""

    def __init__(self, raises: bool) -> None:
        self.raises = raises

    def fill_mask(self, row) -> None:
        if self.raises:
            raise RuntimeError("lexer fuel exhausted")
        row[:] = 0

    def consume(self, token) -> bool:
        return True


@pytest.mark.parametrize("raises", [True, False], ids=["raises", "allows nothing"])
def test_a_failing_matcher_gets_eos_alone(raises):
    state = ConstraintState(_Broken(raises), 64, ConstraintStats())
    packed = np.full((1, mask_words(64)), -1, dtype=np.int32)
    fill_masks([state], packed, EOS)
    allowed = np.unpackbits(packed.view(np.uint8), bitorder="little")[:64]
    assert np.nonzero(allowed)[0].tolist() == list(EOS) and state.failed
