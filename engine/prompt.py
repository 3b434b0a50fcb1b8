"""Structured prompts: sequential segments and parallel sets (Set-Based Prompting).

McIlroy-Young et al. (NeurIPS 2024): every member of a parallel set starts at the same position
id (the number of positions before the set), members cannot attend to each other, and what
follows the set starts at `set start + longest member` and attends to all members. Outputs are
then invariant to the order of the members (up to floating-point summation order).

Tokenization follows the reference implementation: the first segment with the tokenizer's
default special tokens, every other segment and every member on its own without them.
"""

from __future__ import annotations

from typing import Union

import msgspec

from engine.errors import InvalidArgument


class Parallel(msgspec.Struct, frozen=True):
    """A set of prompt parts whose order must not matter."""

    members: list[Union[str, list[int]]]


class StructuredPrompt(msgspec.Struct, frozen=True):
    segments: list[Union[str, list[int], Parallel]]
    add_special_tokens: bool = True
    """Whether the first segment, when it is text, gets the tokenizer's special tokens."""


class PromptLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Token ids plus, per prompt token, its position id and its set membership."""

    token_ids: list[int]
    positions: list[int]
    set_ids: list[int]
    """Index of the token's parallel set, -1 outside sets."""
    member_ids: list[int]
    """Index of the token's member within its set, -1 outside sets."""
    member_span: tuple[int, int] = (0, 0)
    """[first, last + 1) token indices covering every set member (empty without sets)."""
    next_position: int
    """Position id of the first token after the prompt: max(positions) + 1, which is past
    the longest member when the prompt ends with a set."""

    @property
    def structure_key(self) -> tuple:
        """Folded into prefix-cache hashes: a structured prompt never shares KV with a
        sequential one (or another structure) of the same tokens."""
        return ("set-prompt", hash((tuple(self.positions), tuple(self.set_ids),
                                    tuple(self.member_ids))))


def layout(prompt: StructuredPrompt, encode) -> PromptLayout:
    """Tokenizes and lays out `prompt`; `encode(text, add_special_tokens)` -> token ids."""
    if not prompt.segments:
        raise InvalidArgument("prompt", "a structured prompt needs at least one segment")
    ids, positions, set_ids, member_ids = [], [], [], []
    pos, num_sets = 0, 0
    for index, segment in enumerate(prompt.segments):
        if isinstance(segment, Parallel):
            if not segment.members:
                raise InvalidArgument(f"prompt.segments[{index}]", "a set needs members")
            longest = 0
            for m, member in enumerate(segment.members):
                tokens = _tokens(member, encode, False, f"prompt.segments[{index}].members[{m}]")
                ids += tokens
                positions += range(pos, pos + len(tokens))
                set_ids += [num_sets] * len(tokens)
                member_ids += [m] * len(tokens)
                longest = max(longest, len(tokens))
            pos += longest
            num_sets += 1
        else:
            special = index == 0 and prompt.add_special_tokens
            tokens = _tokens(segment, encode, special, f"prompt.segments[{index}]")
            ids += tokens
            positions += range(pos, pos + len(tokens))
            set_ids += [-1] * len(tokens)
            member_ids += [-1] * len(tokens)
            pos += len(tokens)
    members = [i for i, s in enumerate(set_ids) if s >= 0]
    span = (members[0], members[-1] + 1) if members else (0, 0)
    return PromptLayout(token_ids=ids, positions=positions, set_ids=set_ids,
                        member_ids=member_ids, member_span=span, next_position=pos)


def _tokens(part, encode, special: bool, field: str) -> list[int]:
    tokens = encode(part, special) if isinstance(part, str) else list(part)
    if not tokens:
        raise InvalidArgument(field, "must not be empty")
    return tokens
