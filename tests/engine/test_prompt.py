"""Structured prompt layout (Set-Based Prompting): positions, membership, tokenization rules."""

from __future__ import annotations

import pytest

from engine.errors import InvalidArgument
from engine.prompt import Parallel, StructuredPrompt, layout


def _encode(text: str, special: bool) -> list[int]:
    """A toy tokenizer: one token per character, BOS (0) when `special`."""
    return ([0] if special else []) + [ord(c) for c in text]


def test_members_share_the_start_position_and_the_suffix_follows_the_longest():
    out = layout(StructuredPrompt(segments=["ab", Parallel(members=["xyz", "q", [7, 8]]), "s"]),
                 _encode)
    assert out.token_ids == [0, 97, 98, 120, 121, 122, 113, 7, 8, 115]
    assert out.positions == [0, 1, 2, 3, 4, 5, 3, 3, 4, 6]
    assert out.set_ids == [-1, -1, -1, 0, 0, 0, 0, 0, 0, -1]
    assert out.member_ids == [-1, -1, -1, 0, 0, 0, 1, 2, 2, -1]


def test_only_the_first_segment_gets_special_tokens_and_sets_chain():
    prompt = StructuredPrompt(segments=[Parallel(members=["a", "bc"]), "d",
                                        Parallel(members=["e", "f"])])
    out = layout(prompt, _encode)
    assert out.token_ids == [97, 98, 99, 100, 101, 102]  # members never get BOS
    assert out.positions == [0, 0, 1, 2, 3, 3]
    assert out.set_ids == [0, 0, 0, -1, 1, 1]
    no_bos = layout(StructuredPrompt(segments=["ab", "c"], add_special_tokens=False), _encode)
    assert no_bos.token_ids == [97, 98, 99]


def test_structure_key_tells_structures_apart():
    a = layout(StructuredPrompt(segments=["p", Parallel(members=["xy", "z"])]), _encode)
    b = layout(StructuredPrompt(segments=["p", "xy", "z"]), _encode)
    assert a.token_ids == b.token_ids and a.structure_key != b.structure_key


@pytest.mark.parametrize("prompt, field", [
    (StructuredPrompt(segments=[]), "prompt"),
    (StructuredPrompt(segments=["a", ""]), "prompt.segments[1]"),
    (StructuredPrompt(segments=["a", Parallel(members=[])]), "prompt.segments[1]"),
    (StructuredPrompt(segments=["a", Parallel(members=["b", []])]),
     "prompt.segments[1].members[1]"),
])
def test_bad_structures_name_the_field(prompt, field):
    with pytest.raises(InvalidArgument) as err:
        layout(prompt, _encode)
    assert err.value.field == field
